"""benchmarks.report.restrict: a committed run re-rendered over a range of its questions (no models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.report import main, restrict

FULL = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "full.json"


@pytest.fixture(scope="module")
def full() -> dict:
    return json.loads(FULL.read_text())


def test_restricting_to_every_question_gives_the_runs_own_summaries(full):
    again = restrict(full, 0)
    for name, m in full["methods"].items():
        r = again["methods"][name]
        assert r["n_questions"] == m["n_questions"]
        for b, s in m["budgets"].items():
            for key in ("recall", "hits", "over_budget", "tokens_mean", "achieved_ratio_mean"):
                assert r["budgets"][b][key] == pytest.approx(s[key]), (name, b, key)
            # per-question latencies are stored to 10 µs
            assert r["budgets"][b]["latency_median_s"] == pytest.approx(s["latency_median_s"], abs=1e-5)
        # cold: a cached method's first budget, as the runner times it; others: every call
        assert r["latency"]["cold_median_s"] == pytest.approx(m["latency"]["cold_median_s"], abs=1e-5), name


def test_held_out_part_counts_only_questions_150_on(full):
    held = restrict(full, 150)
    assert held["config"]["questions"] == "150-440" and held["config"]["n"] == 291
    q = full["per_question"]["semtoken"]
    i150 = q["question_index"].index(150)
    for b in ("0.5", "0.33", "0.2"):
        hits = q[b]["hit"][i150:]
        assert held["methods"]["semtoken"]["budgets"][b]["hits"] == sum(hits)
        assert held["per_question"]["semtoken"][b]["hit"] == hits
    assert "positions" not in held and full.get("positions")  # ran on its own questions: not restricted
    assert full["methods"]["semtoken"]["n_questions"] == 441  # the input is not modified


def test_command_reports_a_range_without_questions_as_an_error(tmp_path, capsys):
    assert main([str(FULL), "--start", "500"]) == 2
    assert "no questions" in capsys.readouterr().err
    out = tmp_path / "held.md"
    assert main([str(FULL), "--start", "150", "--out", str(out)]) == 0
    assert "questions 150-440" in out.read_text()
