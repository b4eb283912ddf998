"""Fast tests of the benchmark's data (the core loader on the full NQ file) and answer metric (no models)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from benchmarks.data import EVAL, NQ_FILE, TUNE, gold_position_for, load_nq, resolve_data_dir
from benchmarks.metrics import (
    TokenCounter,
    answer_in,
    best_subspan_em,
    budget_for,
    normalize_answer,
    percentile,
)
from semtoken_rag.datasets import DATA_ENV


def _data_dir() -> Path:
    try:
        return resolve_data_dir()
    except FileNotFoundError:
        pytest.skip(f"NQ data not found (../shared/data next to the clone, or ${DATA_ENV})")


# --- metric ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, norm", [
    ("The Beatles", "beatles"),
    ("  Wilhelm   Conrad\tRöntgen. ", "wilhelm conrad röntgen"),
    ("A Tale of Two Cities!", "tale of two cities"),
    ("an apple, the pear", "apple pear"),
    ("theatre", "theatre"),               # articles only as whole words
    ("May 18, 2018", "may 18 2018"),
    ("U.S.", "us"),
    ("", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_answer_in():
    ctx = "The first Nobel Prize in Physics was awarded in 1901 to Wilhelm Conrad Röntgen, of Germany."
    assert answer_in(["Wilhelm Conrad Röntgen"], ctx)
    assert answer_in(["Marie Curie", "wilhelm conrad röntgen."], ctx)   # any answer
    assert not answer_in(["Marie Curie"], ctx)
    assert not answer_in([""], ctx)                                   # empty answers never match
    assert answer_in(["the 1901"], "in 1901 to")                       # articles dropped both sides
    assert not answer_in(["Röntgen"], "")
    assert best_subspan_em("It was Röntgen.", ["röntgen"])


def test_budget_and_percentile():
    assert budget_for(1000, 0.33) == 330
    assert budget_for(1000, 0.5) == 500
    assert budget_for(3, 0.2) == 1
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 95) == 5


def test_token_counter_llama3():
    c = TokenCounter("llama3")
    assert c("hello world") == 2
    assert c("") == 0
    assert c.context_tokens(["hello world", "", "hello world"]) == 4


# --- data ------------------------------------------------------------------------------------------

def test_gold_position_rule():
    positions = [gold_position_for(i, "random") for i in range(441)]
    assert positions == [random.Random(1234 + i).randrange(20) for i in range(441)]
    assert min(positions) == 0 and max(positions) == 19  # every position is used
    assert [gold_position_for(0, p) for p in ("first", "middle", "last")] == [0, 9, 19]
    assert gold_position_for(3, 7) == 7
    with pytest.raises(ValueError, match="outside 0..19"):
        gold_position_for(0, 20)
    with pytest.raises(ValueError, match="'centre'"):
        gold_position_for(0, "centre")


def test_splits_do_not_overlap():
    assert TUNE == range(150) and EVAL == range(150, 441) and not set(TUNE) & set(EVAL)


def test_load_nq_random_positions():
    data_dir = _data_dir()
    recs = load_nq(12, data_dir=data_dir)
    assert len(recs) == 12
    with gzip.open(data_dir / NQ_FILE, "rt", encoding="utf-8") as fh:
        raw = [json.loads(next(fh)) for _ in range(12)]
    for i, (rec, r) in enumerate(zip(recs, raw)):
        assert rec.index == i
        assert rec.question == r["question"] and list(rec.answers) == r["answers"]
        assert len(rec.chunks) == 20
        assert rec.gold_index == random.Random(1234 + i).randrange(20)
        gold = r["ctxs"][0]
        assert rec.chunks[rec.gold_index] == f"{gold['title']}\n{gold['text']}"
        distractors = [f"{c['title']}\n{c['text']}" for c in r["ctxs"][1:]]
        assert [c for k, c in enumerate(rec.chunks) if k != rec.gold_index] == distractors   # order kept
        assert rec.titles == tuple(c.split("\n", 1)[0] for c in rec.chunks)
        assert rec.passages()[rec.gold_index] == (gold["title"], gold["text"])


def test_load_nq_start_reads_from_that_question():
    later = load_nq(3, data_dir=_data_dir(), start=EVAL.start)
    assert [r.index for r in later] == [150, 151, 152]
    assert later[0].chunks == load_nq(151, data_dir=_data_dir())[150].chunks


@pytest.mark.parametrize("pos, idx", [("first", 0), ("middle", 9), ("last", 19), (4, 4)])
def test_load_nq_fixed_positions(pos, idx):
    recs = load_nq(3, gold_position=pos, data_dir=_data_dir())
    assert all(r.gold_index == idx for r in recs)
    first = load_nq(3, gold_position=0, data_dir=_data_dir())
    for r, f in zip(recs, first):
        assert r.chunks[idx] == f.chunks[0]


def test_load_nq_data_dir_override(tmp_path, monkeypatch):
    real = _data_dir()
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=DATA_ENV):
        load_nq(1)
    monkeypatch.setenv(DATA_ENV, str(real / NQ_FILE))  # the file itself also names the folder
    assert resolve_data_dir() == real


def test_chunks_carry_no_labels():
    rec = load_nq(1, data_dir=_data_dir())[0]
    assert all(isinstance(c, str) for c in rec.chunks)
    assert not any("isgold" in c or "hasanswer" in c for c in rec.chunks)


# --- model-free peers stay within budget ------------------------------------------------------------

def test_truncate_and_cheap_peers_within_budget():
    from benchmarks.peers.simple import LengthOnly, Truncation
    from benchmarks.text import split_sentences, truncate_tokens

    c = TokenCounter("llama3")
    text = "Dr. Smith went to Washington. He arrived on May 18, 2018! Then he left.\nNext line"
    assert split_sentences(text) == ["Dr. Smith went to Washington.", "He arrived on May 18, 2018!",
                                     "Then he left.", "Next line"]
    for n in range(25):
        cut = truncate_tokens(text, n, c, word_boundary=True)
        assert c(cut) <= n and text.startswith(cut)
    chunks = ["alpha beta gamma " * 20, "short one", "delta epsilon " * 30, "tiny"]
    total = c.context_tokens(chunks)
    for rate in (0.5, 0.33, 0.2):
        b = budget_for(total, rate)
        for m in (Truncation(c), LengthOnly(c)):
            out = m.compress(chunks, "q", rate, b)
            assert len(out.texts) == len(chunks)
            assert c.context_tokens(out.texts) <= b
    kept = LengthOnly(c).compress(chunks, "q", 0.2, budget_for(total, 0.2)).texts
    assert kept[1] == "short one" and kept[3] == "tiny"


def test_bench_run_writes_results_and_keeps_finished_methods_if_stopped(tmp_path, monkeypatch):
    """A real (tiny) benchmark run writes <name>.json and removes its partial file; a run stopped after
    its first method leaves that method's results in <name>.partial.json."""
    import json

    from benchmarks import cli

    data_dir = str(_data_dir())
    argv = ["--n", "3", "--methods", "truncation", "length_only", "--positions-n", "0", "--no-e2e",
            "--no-plots", "--data-dir", data_dir, "--out-dir", str(tmp_path), "--name", "tiny"]
    assert cli.main(argv) == 0
    done = json.loads((tmp_path / "tiny.json").read_text())
    assert set(done["per_question"]) == {"truncation", "length_only"}
    assert not (tmp_path / "tiny.partial.json").exists()

    real_run = cli.run_method
    calls = []

    def stop_at_second(method, *a, **k):
        calls.append(method.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C or a kill during the second method looks like
        return real_run(method, *a, **k)

    monkeypatch.setattr(cli, "run_method", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*argv[:-1], "stopped"])
    part = json.loads((tmp_path / "stopped.partial.json").read_text())
    assert part["partial"] is True and set(part["methods"]) == {"truncation"}
    assert part["per_question"]["truncation"]["0.33"]["hit"] == done["per_question"]["truncation"]["0.33"]["hit"]
    assert not (tmp_path / "stopped.json").exists()


def test_paired_table_counts_discordant_questions_on_shared_indices():
    from scipy.stats import binomtest

    from benchmarks.report import paired_table

    def method(label, idx, hits):
        return {"label": label}, {"question_index": idx, "0.33": {"hit": hits}}

    sem, sem_q = method("semtoken-rag", [0, 1, 2, 3, 4, 5], [1, 1, 1, 1, 0, 0])
    rr, rr_q = method("rerank", [0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 1, 0])
    # a subset method, given in another order: only questions 5, 1 and 4 are paired
    sub, sub_q = method("slow", [5, 1, 4], [1, 0, 1])
    results = {"config": {"budgets": [0.33]},
               "methods": {"semtoken": sem, "rerank": rr, "slow": sub, "none": {"label": "none"}},
               "per_question": {"none": rr_q, "semtoken": sem_q, "rerank": rr_q, "slow": sub_q}}
    lines = paired_table(results).splitlines()
    assert len(lines) == 4  # header, rule, rerank, slow ("none" and the reference are not rows)
    assert lines[2] == f"| rerank (n=6) | +3/−1 ({binomtest(3, 4).pvalue:.2g}) |"
    assert lines[3] == f"| slow (n=3) | +1/−2 ({binomtest(1, 3).pvalue:.2g}) |"
    assert paired_table({"config": {"budgets": [0.33]}, "methods": {}, "per_question": {}}) == ""


def test_benchmark_without_the_data_is_one_line_and_status_2(tmp_path, capsys):
    from benchmarks.cli import main

    assert main(["--quick", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("[bench] error:") and NQ_FILE in err and err.count("\n") == 1


# --- a benchmark without its data stops with one line, before any work -----------------------------

@pytest.mark.parametrize("module, argv", [
    ("calibrate", ["--data-dir", "{missing}"]),
    ("levers", ["--data-dir", "{missing}"]),
    ("scale", ["--data-dir", "{missing}"]),
    ("redis_roundtrip", ["--data-dir", "{missing}"]),
    ("selection", ["--data-dir", "{missing}"]),
    ("e2e_split", ["contexts", "--data-dir", "{missing}", "--out", "{missing}/ctx.json"]),
    ("prewarm_throughput", ["--data", "{missing}"]),
    ("processes", ["--data", "{missing}"]),
    ("tail_latency", ["--data", "{missing}"]),
    ("stored_analyses", ["--data", "{missing}"]),
])
def test_benchmark_without_data_is_one_line_and_status_2(module, argv, tmp_path, capsys):
    import importlib

    from benchmarks.data import main_guard

    main = importlib.import_module(f"benchmarks.{module}").main
    missing = str(tmp_path / "no-such-folder")
    argv = [a.format(missing=missing) for a in argv]
    assert main_guard(lambda: main(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[bench] error: ") and missing in err[0], err
    assert not (tmp_path / "no-such-folder").exists()  # nothing written for the run


def test_latency_and_host_cost_without_data_exit_2_without_traceback(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, DATA_ENV: str(tmp_path / "none")}
    for argv in (["-m", "benchmarks.latency"], ["-m", "benchmarks.host_cost", "--data", str(tmp_path / "none")]):
        p = subprocess.run([sys.executable, *argv], cwd=root, env=env, capture_output=True, text=True, timeout=120,
                           check=False)
        assert p.returncode == 2, (argv, p.stderr)
        assert "Traceback" not in p.stderr and p.stderr.startswith("[bench] error: "), p.stderr
