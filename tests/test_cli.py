"""The ``semtoken-rag`` command: in-process through ``main()`` (engines from the core registry), plus
real runs of the installed console script where the process matters (pipes, raw stdin bytes)."""

from __future__ import annotations

import gzip
import html
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from semtoken_rag import SemToken, __version__, cli
from semtoken_rag.datasets import DATA_ENV, NQ_FILE
from semtoken_rag.registry import clear_registry, registered_engines

QUERY = "who got the first nobel prize in physics"
ROOT = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^semtoken-rag: (\d+) -> (\d+) tokens \(\d+\.\d%, [\d.]+x fewer\) in \d+\.\d\d s; "
                     r"(\d+)/(\d+) chunks kept$")


@pytest.fixture(scope="module")
def cli_engines():
    """The CLI's engines come from the core registry: start this module with none, leave none behind."""
    clear_registry()
    yield
    clear_registry()


@pytest.fixture()
def run(cli_engines, monkeypatch, capsys):
    """``run(*argv, stdin=None) -> (exit status, stdout, stderr)``; stdin is text (UTF-8) or raw bytes."""

    def _run(*argv: str, stdin: str | bytes | None = None) -> tuple[int, str, str]:
        data = stdin.encode("utf-8") if isinstance(stdin, str) else (stdin or b"")
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
        try:
            code = cli.main(["compress", "--device", "cpu", *argv] if argv[0] not in ("demo", "bench")
                            else list(argv))
        except SystemExit as e:  # argparse
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return _run


@pytest.fixture()
def files(nobel, tmp_path) -> list[str]:
    paths = []
    for i, text in enumerate(nobel):
        p = tmp_path / f"chunk{i}.txt"
        p.write_text(text, encoding="utf-8")
        paths.append(str(p))
    return paths


def _slices_of(text: str, source: str, marker: str = " … ") -> bool:
    """``text`` is pieces of ``source``, in order, joined by the gap marker."""
    pos = 0
    for piece in text.split(marker):
        found = source.find(piece, pos)
        if found < 0:
            return False
        pos = found + len(piece)
    return True


def test_files_print_compressed_chunks_and_summary(run, files, nobel):
    code, out, err = run("--query", QUERY, "--rate", "0.4", *files)
    assert code == 0
    assert "Röntgen" in out
    m = SUMMARY.match(err.strip().splitlines()[-1])
    assert m, err
    before, after, kept, total = map(int, m.groups())
    assert total == 4 and 0 < kept <= 4 and after <= math.floor(0.4 * before)
    blocks = out.rstrip("\n").split("\n\n")
    assert len(blocks) == kept
    # every printed block is made of slices of one chunk, in the chunks' order
    owners = [next(i for i, c in enumerate(nobel) if _slices_of(b, c.strip())) for b in blocks]
    assert owners == sorted(owners)


def test_stdin_blocks_and_json_budget(run, nobel):
    stdin = "\n\n" + "\n\n  \n".join(nobel) + "\n\n\n"
    code, out, err = run("--query", QUERY, "--rate", "0.3", "--json", stdin=stdin)
    assert code == 0
    res = json.loads(out)
    assert [c["index"] for c in res["chunks"]] == [0, 1, 2, 3]
    assert res["budget"] == math.floor(0.3 * res["original_tokens"])
    assert res["compressed_tokens"] <= res["budget"]
    assert sum(c["compressed_tokens"] for c in res["chunks"]) == res["compressed_tokens"]
    for c, source in zip(res["chunks"], nobel):
        assert c["text"] == " … ".join(source[s:e] for s, e in c["kept_spans"])
    assert SUMMARY.match(err.strip().splitlines()[-1])

    code, out, _ = run("--target-tokens", "40", "--json", "--quiet", stdin=stdin)
    res = json.loads(out)
    assert code == 0 and res["budget"] == 40 and res["compressed_tokens"] <= 40 and res["query"] is None


def test_stdin_dash_between_files(run, files, nobel):
    code, out, _ = run("--json", "--quiet", "--rate", "1", files[0], "-", files[3],
                       stdin=nobel[1] + "\n\n" + nobel[2])
    assert code == 0
    texts = [c["text"] for c in json.loads(out)["chunks"]]
    assert texts == [nobel[0], nobel[1], nobel[2], nobel[3]]


def test_html_page_shows_every_span_and_the_legend(run, files, nobel, tmp_path):
    page_path = tmp_path / "view.html"
    code, out, _ = run("--query", QUERY, "--rate", "0.3", "--json", "--spans", "--html", str(page_path), *files)
    assert code == 0
    page = page_path.read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "<script" not in page and "http" not in page
    for word in ("kept", "dropped", "collapsed", "repeat", "semantic density", "chunk relevance"):
        assert word in page
    assert html.escape(QUERY) in page
    res = json.loads(out)
    for chunk, source in zip(res["chunks"], nobel):
        assert chunk["spans"], "spans detail expected when compressing"
        for span in chunk["spans"]:
            if span["status"] != "collapsed":  # a collapsed span is shown as its kept head + the rest
                assert html.escape(source[span["start"]:span["end"]]) in page
        for s, e in chunk["kept_spans"]:
            assert html.escape(source[s:e].split()[0]) in page
        assert f"relevance {chunk['relevance']:.3f}" in page


@pytest.mark.parametrize("argv, message", [
    (["--rate", "1.5"], r"rate must be in \(0, 1\], got 1.5"),
    (["--rate", "0"], r"rate must be in \(0, 1\]"),
    (["--rate", "lots"], r"rate must be a number"),
    (["--target-tokens", "0"], r"expected a positive integer"),
    (["--target-tokens", str(2**53 + 1)], r"expected at most 2\*\*53 tokens"),  # (was a traceback, exit 1)
    (["--rate", "0.3", "--target-tokens", "9"], r"not allowed with argument"),
])
def test_bad_budget_arguments_exit_2(run, files, argv, message):
    code, out, err = run(*argv, files[0])
    assert code == 2 and out == ""
    assert re.search(message, err), err


def test_unreadable_inputs_exit_2(run, files, tmp_path):
    code, _, err = run(str(tmp_path / "nope.txt"))
    assert code == 2 and "cannot read" in err and "nope.txt: no such file" in err
    code, _, err = run(str(tmp_path))
    assert code == 2 and "is a directory" in err
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00bad")
    code, _, err = run(str(binary))
    assert code == 2 and "not UTF-8" in err
    code, _, err = run("-", files[0], "-")
    assert code == 2 and "only once" in err


def test_engine_errors_exit_2(run, files):
    code, _, err = run("--device", "no-such-device", files[0])
    assert code == 2 and "no-such-device" in err and "not a torch device" in err


def test_non_utf8_stdin_is_rejected_like_a_file(run):
    code, out, err = run("--json", stdin=b"good text\n\n\xff\xfe bad bytes")
    assert code == 2 and out == ""
    assert "cannot read stdin: not UTF-8 text (invalid start byte at byte 11)" in err


def test_a_query_that_is_not_utf8_is_a_user_error(run, files, tmp_path):
    """Bytes that are not UTF-8 in argv reach Python as lone surrogates: one line and status 2, not a
    traceback from the JSON or HTML writer."""
    bad = os.fsdecode(b"who got \xff the nobel")
    for extra in (["--json"], ["--html", str(tmp_path / "o.html")], []):
        code, out, err = run("--query", bad, *extra, files[0])
        assert code == 2 and out == "" and "--query is not UTF-8 text" in err and "Traceback" not in err, extra
    code, _, err = run("--query", QUERY, "--gap-marker", os.fsdecode(b" \xfe "), files[0])
    assert code == 2 and "--gap-marker is not UTF-8 text" in err
    assert not (tmp_path / "o.html").exists()


def test_an_empty_cache_dir_is_refused_not_the_working_directory(run, files, tmp_path, monkeypatch):
    """``--cache-dir "$UNSET"`` was ``Path("")``, the working directory, filled with shard folders."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["compress", "--device", "cpu", "--cache-dir", "", "-q", QUERY, files[0]])
    assert exit_.value.code == 2 and list(work.iterdir()) == []


def test_empty_input_prints_a_sensible_summary(run):
    code, out, err = run("--query", QUERY, stdin="\n  \n")
    assert code == 0 and out.strip() == ""
    assert re.fullmatch(r"semtoken-rag: 0 -> 0 tokens \(nothing to compress\) in \d+\.\d\d s; 0/0 chunks kept",
                        err.strip()), err
    code, out, _ = run("--json", "--quiet", stdin="")
    assert code == 0 and json.loads(out)["chunks"] == [] and json.loads(out)["original_tokens"] == 0


def test_invalid_option_value_is_a_user_error_before_any_input_is_read(run):
    code, out, err = run("--tokenizer", "no-such-tokenizer", stdin=b"\xff never read")
    assert code == 2 and out == ""
    assert re.search(r"semtoken-rag: error: invalid option value: tokenizer='no-such-tokenizer' is unknown", err), err
    assert "not UTF-8" not in err  # options are validated first
    code, out, err = run("--language", "not a language", stdin=b"\xff never read")
    assert code == 2 and out == "" and "invalid option value: language:" in err, err


def test_engine_bug_is_not_reported_as_a_user_error(run, files, monkeypatch):
    """Only user errors become exit 2; a ValueError from inside the engine surfaces with its traceback."""
    def broken(self, *a, **k):
        raise ValueError("internal invariant broken")

    monkeypatch.setattr(SemToken, "compress", broken)
    with pytest.raises(ValueError, match="internal invariant broken"):
        run(files[0])


def test_engines_come_from_the_core_registry(run, files):
    assert run("--rate", "0.5", "--quiet", files[0])[0] == 0
    engines = registered_engines()
    assert run("--rate", "0.3", "--quiet", files[1])[0] == 0  # same engine settings: same engine
    assert registered_engines() == engines and len(engines) >= 1
    assert run("--gap-marker", " [...] ", "--quiet", files[1])[0] == 0  # other settings: another engine
    assert len(registered_engines()) == len(engines) + 1
    assert run("--language", "de", "--quiet", files[1])[0] == 0  # --language reaches the configuration
    assert len(registered_engines()) == len(engines) + 2


def _script() -> list[str]:
    script = Path(sys.executable).with_name("semtoken-rag")
    return [str(script)] if script.exists() else [sys.executable, "-m", "semtoken_rag.cli"]


def test_console_script_rejects_non_utf8_stdin(tmp_path):
    done = subprocess.run([*_script(), "compress", "--device", "cpu", "--json"], input=b"caf\xe9 au lait",
                          capture_output=True, timeout=300, check=False, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == b""
    assert done.stderr.decode() == "semtoken-rag: error: cannot read stdin: not UTF-8 text (invalid " \
                                   "continuation byte at byte 3)\n"


def test_console_script_writes_utf8_to_an_ascii_stdout_and_drops_a_byte_order_mark(tmp_path):
    """A console whose encoding cannot hold the text (ASCII, Latin-1; the gap marker is not ASCII) got a
    UnicodeEncodeError traceback in the text output, which --json already wrote as UTF-8; and a file's
    byte-order mark went into its first chunk."""
    src = tmp_path / "bom.txt"
    src.write_bytes("\ufeffLe café coûte 3 €. Un thé coûte 2 €.\n\nDer Kaffee kostet 3 €.".encode("utf-8"))
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    done = subprocess.run([*_script(), "compress", "--device", "cpu", "--rate", "1", "--quiet", str(src)],
                          capture_output=True, timeout=300, check=False, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.decode("utf-8") == "Le café coûte 3 €. Un thé coûte 2 €.\n\nDer Kaffee kostet 3 €.\n"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xef\xbb\xbfcaf\xe9 au lait")
    done = subprocess.run([*_script(), "compress", "--device", "cpu", str(bad)], capture_output=True, timeout=300,
                          check=False, cwd=tmp_path, env=env)
    assert done.returncode == 2 and b"continuation byte at byte 6)" in done.stderr  # (counted in the file)


def test_console_script_into_a_closed_pipe_exits_quietly(tmp_path):
    """``semtoken-rag compress ... | head -c 5``: no BrokenPipeError traceback, SIGPIPE-like status."""
    text = "\n\n".join(f"Passage {i}. The value of item {i} is {i * 7}, measured in {1900 + i % 100}."
                         for i in range(2500))  # > 150 KiB of output at rate 1: more than a pipe holds
    src = tmp_path / "in.txt"
    src.write_text(text, encoding="utf-8")
    # (written as UTF-8 bytes: a reader leaving mid-write cut the one write short without an error, and
    # --json exited 0 with its output cut)
    for flag, head in (("", "Passa"), ("--json", '{\n "q')):
        line = f"{' '.join(_script())} compress --device cpu --rate 1 --quiet {flag} < {src} | head -c 5; " \
               'echo " ${PIPESTATUS[0]}"'
        done = subprocess.run(["bash", "-c", line],
                              capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
        assert done.stdout == f"{head} 141\n", done.stdout
        assert done.stderr == "", done.stderr


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"semtoken-rag {__version__}"


def test_bench_forwards_to_the_benchmarks_found_from_the_current_directory(capfd, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.main(["bench", "--help"]) == 0
    assert "usage: python -m benchmarks" in capfd.readouterr().out


def test_bench_without_its_extra_says_what_to_install():
    """A clone without the bench extra: one line naming the extra (was a traceback ending in matplotlib)."""
    hide = ("import importlib.abc, runpy, sys\n"
            "class NoMatplotlib(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'matplotlib':\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NoMatplotlib())\n"
            "sys.argv = ['benchmarks', '--help']\n"
            "runpy.run_module('benchmarks', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          check=False)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "[bench] error: the benchmarks need matplotlib: pip install -e '.[bench]' (from the clone's root)"]


def test_spans_without_json_is_a_user_error(run, files):
    code, out, err = run("--spans", files[0])  # (it was silently ignored)
    assert code == 2 and out == "" and "--spans goes with --json" in err


def test_demo_on_bundled_sample(run, tmp_path):
    page_path = tmp_path / "demo.html"
    code, out, err = run("demo", "--data", "bundled", "--n", "2", "--device", "cpu", "--html", str(page_path))
    assert code == 0, err
    assert "bundled sample" in out
    assert "[1] who got the first nobel prize in physics?" in out and "[2] " in out and "[3] " not in out
    assert "gold answer: Wilhelm Conrad Röntgen" in out
    assert re.search(r"answer kept: (yes|NO); passage #\d+", out)
    assert re.search(r"total: \d+ -> \d+ tokens .* answer kept in \d/2; median latency \d+\.\d\d s", out)
    assert "Röntgen" in page_path.read_text(encoding="utf-8")


def _nq_file(tmp_path: Path, n: int) -> Path:
    """An upstream-layout NQ file (gold passage first, in ``ctxs``) made from the bundled sample."""
    from semtoken_rag.datasets import load_nq

    path = tmp_path / NQ_FILE
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for r in load_nq(n):
            order = [r.gold_index, *(k for k in range(len(r.chunks)) if k != r.gold_index)]
            ctxs = [{"title": r.titles[k], "text": r.passages()[k][1]} for k in order]
            fh.write(json.dumps({"question": r.question, "answers": list(r.answers), "ctxs": ctxs}) + "\n")
    return path


def test_demo_reads_data_from_option_or_environment(run, tmp_path, monkeypatch):
    path = _nq_file(tmp_path, 2)
    code, out, err = run("demo", "--data", str(path), "--n", "1", "--device", "cpu")
    assert code == 0, err
    assert f"from {path};" in out and "[1] who got the first nobel prize in physics?" in out
    monkeypatch.setenv(DATA_ENV, str(tmp_path))  # a folder holding the NQ file
    code, out, err = run("demo", "--n", "1", "--device", "cpu")
    assert code == 0 and f"from {path};" in out
    code, out, _ = run("demo", "--data", "bundled", "--n", "1", "--device", "cpu")
    assert code == 0 and "bundled sample" in out
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "missing"))
    code, out, err = run("demo", "--n", "1", "--device", "cpu")
    assert code == 2 and out == "" and f"${DATA_ENV}" in err and "missing" in err


def test_demo_on_a_file_that_is_not_nq(run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n', encoding="utf-8")
    code, _, err = run("demo", "--data", str(bad), "--device", "cpu")
    assert code == 2 and "is not NQ JSON Lines" in err and "line 1" in err


def test_bench_without_a_clone_says_what_to_do(run, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "benchmarks", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p or ".") / "benchmarks").is_dir()])
    code, _, err = run("bench", "--quick")
    assert code == 2 and "from the root of a clone" in err and DATA_ENV in err


@pytest.mark.slow
def test_console_script_end_to_end(nobel, tmp_path):
    """The installed entry point in a fresh process: stdin blocks in, JSON out."""
    done = subprocess.run([*_script(), "compress", "--device", "cpu", "--query", QUERY, "--rate", "0.33", "--json"],
                          input="\n\n".join(nobel), capture_output=True, text=True, timeout=300, check=False,
                          cwd=tmp_path, env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 0, done.stderr
    res = json.loads(done.stdout)
    assert len(res["chunks"]) == 4 and res["compressed_tokens"] <= res["budget"]
    assert SUMMARY.match(done.stderr.strip().splitlines()[-1]), done.stderr
    assert "Loading weights" not in done.stderr


def test_version_and_help_do_not_load_torch():
    """`import semtoken_rag`, `--version` and `--help` stay fast: the engine (torch) loads on first use."""
    code = ("import sys, contextlib, io\n"
            "import semtoken_rag\n"
            "from semtoken_rag.cli import main\n"
            "for argv in (['--version'], ['--help'], ['compress', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            main(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "print('torch' in sys.modules, semtoken_rag.SemToken.__name__, 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "SemToken", "True"]


def test_demo_on_a_truncated_gzip_file_is_one_line(run, tmp_path):
    from importlib.resources import files as resources

    whole = gzip.compress((resources("semtoken_rag") / "data" / "sample_nq.jsonl").read_bytes())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])  # (EOFError in gzip, not an OSError)
    code, _, err = run("demo", "--data", str(cut), "--device", "cpu")
    assert code == 2 and "not a whole gzip file" in err and "Traceback" not in err


def test_a_closed_stdout_is_an_error_not_a_traceback(run, monkeypatch, files):
    monkeypatch.setattr(sys, "stdout", None)  # (as Python starts with `semtoken-rag ... >&-`)
    code, _, err = run("-q", QUERY, files[0])
    assert code == 2 and "standard output is closed" in err


def test_an_encoder_folder_without_a_model_is_named(run, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run("--encoder", str(tmp_path / "empty"), "-q", QUERY, "-", stdin="some text")
    assert code == 2 and "a folder without a model" in err and "config.json" in err and len(err.splitlines()) == 1
