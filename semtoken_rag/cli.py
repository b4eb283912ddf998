"""The ``semtoken-rag`` command: compress chunks, run the demo, forward to the benchmarks.

    semtoken-rag compress --query "who got the first nobel prize in physics" --rate 0.33 a.txt b.txt
    cat chunks.txt | semtoken-rag compress --query "..." --json      # one chunk per blank-line block
    semtoken-rag compress --query "..." --html view.html a.txt b.txt  # what was kept, dropped, collapsed
    semtoken-rag demo --data nq.jsonl.gz                              # real retrieved passages, NQ
    semtoken-rag prewarm corpus.jsonl --store redis://127.0.0.1:6379/0 [--ray]  # fill a shared store
    semtoken-rag bench --quick                                        # python -m benchmarks (a clone)

Exit status: 0 on success; 2 for a user error (bad option value, unreadable or non-UTF-8 input, a
device torch cannot use), printed as one line; 1 when ``prewarm``'s store failed during the run (its
fingerprints may be missing), or 141 when the reader of stdout goes away (``| head``). Anything else is
a bug and ends with a traceback.
"""

from __future__ import annotations

import argparse
import codecs
import importlib.util
import io
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from . import __version__, prewarm_cli
from .config import MAX_TOKENS, SemTokenConfig
from .datasets import DATA_ENV, NQ_FILE
from .results import CompressionResult

if TYPE_CHECKING:
    from .datasets import NQRecord
    from .engine import SemToken

logger = logging.getLogger(__name__)

PROG = "semtoken-rag"


class CLIError(Exception):
    """A user-facing failure: printed as ``semtoken-rag: error: ...``, exit status 2."""


def option_error(e: ValidationError) -> CLIError:
    """A configuration built from the options failed validation: one line naming each bad value."""
    problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'option'}: {err['msg']} "
                         f"(got {err.get('input')!r})" for err in e.errors())
    return CLIError(f"invalid option value: {problems}")


# -- argument types ------------------------------------------------------------------------------------
def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"rate must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < rate <= 1.0:
        raise argparse.ArgumentTypeError(f"rate must be in (0, 1], got {value}")
    return rate


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


def _budget_tokens(value: str) -> int:
    n = _positive_int(value)
    if n > MAX_TOKENS:  # (the engine works budgets out exactly up to here)
        raise argparse.ArgumentTypeError(f"expected at most 2**53 tokens, got {value}")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``semtoken-rag`` (sub-commands compress, demo, bench)."""
    default_rate = SemTokenConfig.model_fields["rate"].default
    parser = argparse.ArgumentParser(
        prog=PROG, description="Query-aware compression of retrieved chunks for RAG (SemToken), budgeted "
                               "in the downstream LLM's tokens.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log INFO (-v) or DEBUG (-vv)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    engine_opts = argparse.ArgumentParser(add_help=False)
    engine_opts.add_argument("--device", default=None,
                             help="torch device: cpu, cuda, cuda:1... (default: CUDA if present, else CPU)")
    engine_opts.add_argument("--cache-dir", default=None, type=_cache_dir,
                             help="directory persisting fingerprints across runs (default: memory only)")
    add_encoder_options(engine_opts)

    p = sub.add_parser(
        "compress", parents=[engine_opts], help="compress chunks from files or stdin",
        description="Compress retrieved chunks. Each FILE is one chunk; '-' or no FILE reads stdin, one "
                    "chunk per blank-line-separated block. Prints the non-empty compressed chunks, "
                    "separated by blank lines, and a one-line summary on stderr.")
    p.add_argument("files", nargs="*", metavar="FILE", help="one chunk per file; '-' reads stdin")
    p.add_argument("-q", "--query", default=None, help="the user's question (default: density alone)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("-r", "--rate", type=_rate, default=None,
                        help=f"fraction of tokens kept, in (0, 1] (default {default_rate})")
    budget.add_argument("-t", "--target-tokens", type=_budget_tokens, default=None,
                        help="absolute budget in downstream-LLM tokens")
    p.add_argument("--tokenizer", default=None,
                   help="budget tokenizer: llama3 (default), cl100k_base, o200k_base, qwen3, or a model "
                        "name such as gpt-4o")
    p.add_argument("--gap-marker", default=None, help="text between kept slices of a chunk (default ' … ')")
    p.add_argument("--language", default=None,
                   help="language of the chunks for sentence boundaries, an ISO 639 code (default en)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON instead of text")
    p.add_argument("--spans", action="store_true", help="with --json: include every span's judgement")
    p.add_argument("--html", metavar="OUT", type=Path, default=None,
                   help="write a self-contained HTML page of what was kept")
    p.add_argument("--quiet", action="store_true", help="no summary line on stderr")

    d = sub.add_parser(
        "demo", parents=[engine_opts], help="compress real retrieved passages (NQ) and show what was kept",
        description="Compress the 20 retrieved passages of a few NaturalQuestions questions and show, per "
                    "question, the tokens saved and whether the gold answer survived. Reads --data, "
                    f"else ${DATA_ENV}, else the sample bundled with the package.")
    d.add_argument("--n", type=_positive_int, default=5, help="questions (default 5)")
    d.add_argument("-r", "--rate", type=_rate, default=None,
                   help=f"fraction of tokens kept (default {default_rate})")
    d.add_argument("--data", default=None, metavar="PATH",
                   help=f"an NQ .jsonl(.gz) file, or a folder holding {NQ_FILE} (default: ${DATA_ENV}, else the "
                        "bundled sample); 'bundled' forces the bundled sample")
    d.add_argument("--html", metavar="OUT", type=Path, default=None,
                   help="write the first question's HTML page")

    prewarm_cli.add_parser(sub)
    sub.add_parser("bench", add_help=False, help="run the benchmarks (python -m benchmarks; needs a clone)",
                   description="Forwards all arguments to python -m benchmarks.")
    return parser


# -- helpers -------------------------------------------------------------------------------------------
def add_encoder_options(parser: argparse.ArgumentParser) -> None:
    """``--encoder`` and ``--dtype``: what fingerprints (and so cache and store keys) depend on."""
    parser.add_argument("--encoder", default=None,
                        help="encoder model: all-MiniLM-L6-v2 (bundled, the default), a local model folder, or an "
                             "installed package that ships one")
    parser.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                        help="encoder precision (default auto: float16 on CUDA, bfloat16 on CPUs with AMX or "
                             "AVX-512 BF16, else float32); fingerprints are stored per encoder and precision, so "
                             "pre-warm with the --encoder and --dtype the replicas run")


def encoder_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields of :func:`add_encoder_options` (None where not given)."""
    return {"encoder": args.encoder, "dtype": args.dtype}


def _engine(config: SemTokenConfig) -> SemToken:
    """The registry's engine for ``config``; a device or tokenizer the engine rejects is a user error."""
    from .registry import shared_engine  # torch loads with the engine, not for --help or --version

    try:
        return shared_engine(config)
    except ValueError as e:  # the engine's constructor names the option value it cannot use
        where = f" on device {config.device!r}" if config.device else ""
        raise CLIError(f"cannot start the engine{where}: {e}") from None


def _config(args: argparse.Namespace, **extra) -> SemTokenConfig:
    """The options as a validated configuration; an invalid value is a user error naming it."""
    from .budget import BudgetTokenizer

    fields = {"device": args.device, "cache_dir": args.cache_dir, **encoder_fields(args), **extra}
    try:
        config = SemTokenConfig(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        raise option_error(e) from None
    try:
        BudgetTokenizer(config.tokenizer)  # a name is resolved here, before any input is read
    except ValueError as e:
        raise CLIError(f"invalid option value: {e}") from None
    return config


def _split_blocks(text: str) -> list[str]:
    """One chunk per blank-line-separated block (blocks stripped, empty ones skipped)."""
    return [b.strip() for b in re.split(r"\n[ \t\r\f\v]*\n", text) if b.strip()]


def _decode(data: bytes, name: str) -> str:
    try:  # (a byte-order mark is the file's encoding, not text of a chunk: utf-8-sig drops it)
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        at = e.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)  # (counted after it)
        raise CLIError(f"cannot read {name}: not UTF-8 text ({e.reason} at byte {at})") from None


def _read_stdin() -> str:
    """stdin as strictly decoded UTF-8, whatever the locale says (the same rule as for files)."""
    if sys.stdin is None:
        raise CLIError("no stdin to read chunks from")
    if sys.stdin.isatty():
        print(f"{PROG}: reading chunks from the terminal, one per blank-line-separated block; "
              "end with Ctrl-D", file=sys.stderr)
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is not None:
        return _decode(buffer.read(), "stdin")
    text = sys.stdin.read()  # a text-only stream (embedded use): refuse what UTF-8 cannot carry
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CLIError(f"cannot read stdin: not UTF-8 text ({e.reason} at character {e.start})") from None
    return text


def _read_chunks(files: Sequence[str]) -> list[str]:
    if files.count("-") > 1:
        raise CLIError("'-' (stdin) may be given only once")
    chunks: list[str] = []
    for name in files or ["-"]:
        if name == "-":
            chunks.extend(_split_blocks(_read_stdin()))
            continue
        try:
            data = Path(name).read_bytes()
        except FileNotFoundError:
            raise CLIError(f"cannot read {name}: no such file") from None
        except IsADirectoryError:
            raise CLIError(f"cannot read {name}: is a directory") from None
        except OSError as e:
            raise CLIError(f"cannot read {name}: {e.strerror or e}") from None
        chunks.append(_decode(data, name))
    return chunks


def _summary(res: CompressionResult) -> str:
    kept = sum(not c.is_empty for c in res.chunks)
    if not res.original_tokens:
        how = "nothing to compress"
    elif not res.compressed_tokens:
        how = "0.0%, everything dropped"
    else:
        how = f"{res.ratio:.1%}, {res.original_tokens / res.compressed_tokens:.1f}x fewer"
    return (f"{res.original_tokens} -> {res.compressed_tokens} tokens ({how}) in {res.seconds:.2f} s; "
            f"{kept}/{len(res.chunks)} chunks kept")


def _write_json(data: dict) -> None:
    """JSON as UTF-8 bytes whatever stdout's encoding (the input was checked to be valid UTF-8)."""
    _write(json.dumps(data, ensure_ascii=False, indent=1))


def _write(line: str) -> None:
    """``line`` and a newline to stdout as UTF-8 bytes whatever its encoding: the chunks' text, the gap
    marker " … " and the demo's passages are Unicode, which an ASCII or Latin-1 stdout cannot encode."""
    text = line + "\n"
    if sys.stdout is None:  # (started with stdout closed: `semtoken-rag ... >&-`)
        raise CLIError("standard output is closed: there is nowhere to write the result")
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:
        sys.stdout.write(text)
        return
    sys.stdout.flush()
    data = memoryview(text.encode("utf-8"))
    while data:  # a reader that leaves mid-write ends a write early without an error: the next one raises
        data = data[buffer.write(data):]
    buffer.flush()


def _write_html(path: Path, result: CompressionResult, chunks: Sequence[str], title: str) -> None:
    from .render import to_html

    try:
        path.write_text(to_html(result, chunks, title), encoding="utf-8")
    except OSError as e:
        raise CLIError(f"cannot write {path}: {e.strerror or e}") from None


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _preview(text: str, answers: Sequence[str], width: int = 110) -> str:
    """A window of ``text`` around the first answer found in it (else its start), on one line."""
    flat = " ".join(text.split())
    low = flat.lower()
    hits = [low.find(a.lower()) for a in answers if a and low.find(a.lower()) >= 0]
    if not hits or len(flat) <= width:
        return _one_line(flat, width)
    start = max(0, min(hits) - width // 3)
    piece = flat[start:start + width]
    return ("…" if start else "") + piece + ("…" if start + width < len(flat) else "")


# -- commands ------------------------------------------------------------------------------------------
def _cache_dir(value: str) -> Path:
    """``--cache-dir``: a path, not empty (``Path("")`` is the working directory: an unset variable)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must be a directory path, got an empty string")
    return Path(value)


def _argument_text(value: str | None, option: str) -> str | None:
    """A text argument as UTF-8 text: bytes that are not UTF-8 reach Python's argv as lone surrogates,
    which no output (JSON, HTML) can encode."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CLIError(f"{option} is not UTF-8 text (a byte that is not UTF-8 at character {e.start})") from None
    return value


def _cmd_compress(args: argparse.Namespace) -> int:
    if args.spans and not args.json:
        raise CLIError("--spans goes with --json (each span's judgement is part of the JSON result)")
    args.query = _argument_text(args.query, "--query")
    args.gap_marker = _argument_text(args.gap_marker, "--gap-marker")
    config = _config(args, tokenizer=args.tokenizer, gap_marker=args.gap_marker, language=args.language)
    chunks = _read_chunks(args.files)
    engine = _engine(config)
    res = engine.compress(chunks, args.query, rate=args.rate, target_tokens=args.target_tokens)
    if args.html is not None:
        _write_html(args.html, res, chunks, PROG)
    if args.json:
        _write_json(res.to_dict(spans=args.spans))
    else:
        _write("\n\n".join(c.text.strip() for c in res.chunks if not c.is_empty))
    if not args.quiet:
        print(f"{PROG}: {_summary(res)}", file=sys.stderr)
    return 0


def _demo_questions(data: str | None, n: int) -> tuple[list[NQRecord], str]:
    from .datasets import describe_source, load_nq, resolve_source

    try:
        path = None if data == "bundled" else resolve_source(data)
        return load_nq(n, path), describe_source(path)
    except FileNotFoundError as e:
        raise CLIError(f"no demo data: {e}") from None
    except OSError as e:
        raise CLIError(f"cannot read demo data {data}: {e.strerror or e}") from None
    except ValueError as e:  # a line that is not an NQ record (the message names it)
        raise CLIError(f"demo data is not NQ JSON Lines: {e}") from None
    except (EOFError, zlib.error) as e:  # (a truncated or damaged .gz: not OSErrors)
        raise CLIError(f"cannot read demo data {data}: not a whole gzip file ({e})") from None


def _cmd_demo(args: argparse.Namespace) -> int:
    from .datasets import answer_in

    config = _config(args)
    questions, label = _demo_questions(args.data, args.n)
    if not questions:
        raise CLIError(f"no questions in {label}")
    engine = _engine(config)
    rate = args.rate if args.rate is not None else engine.config.rate
    _write(f"{PROG} demo: {len(questions)} question(s) x {len(questions[0].chunks)} retrieved passages from "
           f"{label}; keeping {rate:.0%} of {engine.tokenizer.name} tokens on {engine.encoder.device}\n")
    seconds, before, after, found = [], 0, 0, 0
    for i, q in enumerate(questions, 1):
        res = engine.compress(q.chunks, q.question, rate=rate)
        if i == 1 and args.html is not None:
            _write_html(args.html, res, q.chunks, f"{PROG} demo · gold answer: {' | '.join(q.answers)} "
                        f"(gold passage #{q.gold_index})")
        ok = answer_in(q.answers, "\n\n".join(res.texts))
        seconds.append(res.seconds)
        before, after, found = before + res.original_tokens, after + res.compressed_tokens, found + ok
        # the passage that still holds the answer, else what is left of the gold passage
        holder = next((c for c in res.chunks if answer_in(q.answers, c.text)), res.chunks[q.gold_index])
        _write(f"[{i}] {q.question.rstrip('?')}?\n"
               f"    gold answer: {' | '.join(q.answers)} (gold passage #{q.gold_index} of {len(q.chunks)})\n"
               f"    {_summary(res)}\n"
               f"    answer kept: {'yes' if ok else 'NO'}; passage #{holder.index} "
               f"({holder.original_tokens} -> {holder.compressed_tokens} tokens) kept: "
               + (f"\"{_preview(holder.text, q.answers)}\"" if holder.text else "nothing") + "\n")
    fewer = f", {before / after:.1f}x fewer" if after else ""
    _write(f"total: {before} -> {after} tokens ({after / max(before, 1):.1%}{fewer}); answer kept "
           f"in {found}/{len(questions)}; median latency {statistics.median(seconds):.2f} s per question")
    if args.html is not None:
        _write(f"wrote {args.html} (question 1)")
    return 0


def _cmd_bench(argv: Sequence[str]) -> int:
    """Run ``python -m benchmarks ARGS`` where Python finds ``benchmarks`` (run from a clone's root)."""
    env = dict(os.environ)
    cwd = os.getcwd()
    if (Path(cwd) / "benchmarks" / "__main__.py").is_file():  # python -m puts the cwd first on the path
        env["PYTHONPATH"] = os.pathsep.join(p for p in (cwd, env.get("PYTHONPATH")) if p)
    elif importlib.util.find_spec("benchmarks") is None:
        print(f"{PROG}: error: the benchmarks are not installed with the package; run them from the root of "
              "a clone of the repository, with the NQ evaluation data given by --data-dir or "
              f"${DATA_ENV}:\n    cd semtoken-rag && semtoken-rag bench --quick", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "benchmarks", *argv], env=env)


def _stdout_gone() -> int:
    """The reader of stdout went away (``| head``): no traceback, no further writes (Python docs' recipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass  # stdout is not a real file (embedded use): nothing will flush to a closed pipe
    return 128 + 13  # as if killed by SIGPIPE, like other Unix filters


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``semtoken-rag`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after it belongs to the benchmarks' own parser
        return _cmd_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    logging.basicConfig(level=level, format=f"{PROG}: %(levelname)s %(name)s: %(message)s")
    if level > logging.DEBUG:  # no "Loading weights" bar from transformers in the command's output
        import transformers

        transformers.utils.logging.disable_progress_bar()
    try:
        if args.command == "prewarm":
            code = prewarm_cli.run(args)
        else:
            code = _cmd_compress(args) if args.command == "compress" else _cmd_demo(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except CLIError as e:  # user errors only: engine bugs end with a traceback
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _stdout_gone()


if __name__ == "__main__":
    sys.exit(main())
