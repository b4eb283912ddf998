"""The ``semtoken-rag prewarm`` sub-command (parser and command; wired into :mod:`semtoken_rag.cli`).

    semtoken-rag prewarm corpus.jsonl --store redis://127.0.0.1:6379/0             # in-process
    semtoken-rag prewarm corpus.parquet --store redis://cache:6379/0 --ray          # local Ray cluster
    semtoken-rag prewarm corpus.parquet --store redis://cache:6379/0 --ray auto     # a running cluster
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _seconds(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {value}")
    return x


def _gib(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {value!r}") from None
    if not x >= 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of GiB >= 0, got {value}")
    return x


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``prewarm`` to the sub-command parsers ``sub`` of ``semtoken-rag``."""
    from .cli import _positive_int, add_encoder_options  # (cli is loaded when this runs)

    p = sub.add_parser(
        "prewarm", help="fingerprint a corpus into a shared store (in-process or on Ray)",
        description="Fingerprint every chunk of a corpus into a fingerprint store shared by the replicas, "
                    "so that their query-time calls encode only the query. CORPUS is JSON Lines (.jsonl, "
                    ".jsonl.gz: one object per line) or Parquet; each record's TEXT_FIELD is one chunk, "
                    "exactly as the retriever returns it. Chunks already stored are skipped, so a stopped "
                    "run resumes.")
    p.add_argument("corpus", type=Path, metavar="CORPUS", help="a .jsonl(.gz) or .parquet file")
    p.add_argument("--store", required=True,
                   help="where fingerprints go: redis://host:port/db (rediss://, unix://) or a directory")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray Data: no ADDRESS starts a local cluster, 'auto' joins a running one, "
                        "ray://host:10001 a remote one")
    p.add_argument("--text-field", default="text", help="field (column) with the chunk text (default text)")
    p.add_argument("--actors", type=_positive_int, default=None,
                   help="Ray actors (default: one per GPU, else one per 2 CPUs)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="texts per batch (default 256)")
    p.add_argument("--device", default=None, help="torch device for in-process runs (default: CUDA if present)")
    add_encoder_options(p)
    p.add_argument("--tokenizer", default=None,
                   help="the replicas' budget tokenizer, for the analysis kept with each chunk: llama3 "
                        "(default), cl100k_base, o200k_base, qwen3, or a model name such as gpt-4o")
    p.add_argument("--language", default=None,
                   help="the replicas' language for sentence boundaries, an ISO 639 code (default en)")
    p.add_argument("--no-analyses", action="store_true",
                   help="keep fingerprints alone, not each chunk's analysis (faster pre-warm; a replica's "
                        "first call on a chunk then works it out)")
    p.add_argument("--max-disk-gib", type=_gib, default=None, metavar="GIB",
                   help="bound of a directory store in GiB, past which its oldest entries are deleted (default "
                        "1; 0: unbounded): the corpus must fit, and replicas that share the directory need "
                        "SemTokenConfig(cache_max_disk_bytes=...) as large")
    p.add_argument("--store-ttl", type=_seconds, default=None, metavar="SECONDS",
                   help="Redis entries expire this long after they are written (default: never)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``semtoken-rag prewarm`` with parsed ``args``; prints the report, returns the exit status."""
    from pydantic import ValidationError

    from .cli import PROG, CLIError, encoder_fields, option_error
    from .config import SemTokenConfig
    from .prewarm import CorpusError, prewarm_corpus

    fields = {"store": args.store, "device": args.device, "store_ttl_seconds": args.store_ttl,
              "tokenizer": args.tokenizer, "language": args.language,
              "prewarm_analyses": False if args.no_analyses else None, **encoder_fields(args)}
    if args.actors is not None and args.ray is None:
        raise CLIError("--actors needs --ray (in-process pre-warming runs in this process)")
    from .store_url import REDIS_SCHEMES

    if args.store_ttl is not None and not args.store.lower().startswith(REDIS_SCHEMES):
        raise CLIError("--store-ttl needs a Redis store (redis://, rediss://, unix://): directory entries do not expire")
    if args.max_disk_gib is not None and args.store.lower().startswith(REDIS_SCHEMES):
        raise CLIError("--max-disk-gib bounds a directory store: a Redis store's bound is its server's maxmemory")
    fields = {k: v for k, v in fields.items() if v is not None}
    if args.max_disk_gib is not None:  # (0: unbounded, None in the config)
        fields["cache_max_disk_bytes"] = max(1, int(args.max_disk_gib * 2**30)) if args.max_disk_gib else None
    try:
        config = SemTokenConfig(**fields)
    except ValidationError as e:  # a bad option value is a user error
        raise option_error(e) from None
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(desc="pre-warm", unit=" passages", file=sys.stderr, dynamic_ncols=True)
    try:
        report = prewarm_corpus(args.corpus, config, text_field=args.text_field,
                                use_ray=args.ray is not None, ray_address=args.ray or None,
                                actors=args.actors, batch_size=args.batch_size,
                                progress=None if bar is None else bar.update)
    except FileNotFoundError as e:
        raise CLIError(str(e).strip("'\"")) from None
    except CorpusError as e:
        raise CLIError(str(e)) from None
    except (ValueError, ImportError, OSError) as e:  # (ValueError: the engine names a setting it cannot use)
        raise CLIError(f"cannot pre-warm {args.corpus}: {e}") from None
    finally:
        if bar is not None:
            bar.close()
    analysed = f" ({report.analysed} of them given their analysis)" if report.analysed else ""
    summary = (f"{report.passages} passages into {config.store}: {report.encoded} encoded, "
               f"{report.skipped} already stored or blank{analysed}, {report.seconds:.1f} s "
               f"({report.passages_per_second:.0f} passages/s{' on Ray' if report.ray else ''})")
    whole = not report.store_errors and (not report.pruned or report.missing == 0)  # (the corpus all stored)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    elif whole:
        print(f"pre-warmed {summary}")
    if report.store_errors:  # the command's one job is the store: its faults fail the run (no success line)
        print(f"{PROG}: error: {report.store_errors} fault(s) of the store {config.store} during the run: "
              "fingerprints may be missing from it (see the warnings above); run again once it works "
              f"(read {summary})", file=sys.stderr)
        return 1
    if report.pruned:  # (entries its own bound deleted: of this corpus, a failed run; older ones, a warning)
        bound = f"{config.cache_max_disk_bytes / 2**30:g} GiB" if config.cache_max_disk_bytes else "its bound"
        if report.missing == 0:
            print(f"{PROG}: warning: the store {config.store} holds at most {bound}: it deleted {report.pruned} "
                  "older entries to make room for this corpus, which is all in it", file=sys.stderr)
            return 0
        lost = "the corpus may not be all in it" if report.missing is None else \
            f"{report.missing} of the corpus's chunks are not in it"
        print(f"{PROG}: error: the store {config.store} holds at most {bound}: it deleted {report.pruned} entries "
              f"during the run, and {lost}; run again with a larger --max-disk-gib (0: unbounded), and give the "
              f"replicas that share it SemTokenConfig(cache_max_disk_bytes=...) as large (read {summary})",
              file=sys.stderr)
        return 1
    return 0
