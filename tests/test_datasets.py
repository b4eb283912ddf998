"""The one NQ loader and answer matcher (semtoken_rag.datasets) on the bundled sample and on files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from semtoken_rag.datasets import (
    BUNDLED_LABEL,
    DATA_ENV,
    NQ_FILE,
    answer_in,
    describe_source,
    gold_position_for,
    load_nq,
    resolve_source,
)

SAMPLE = Path(__file__).resolve().parents[1] / "semtoken_rag" / "data" / "sample_nq.jsonl"


def _raw_sample() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]


def _upstream(tmp_path: Path, raws: list[dict], name: str = NQ_FILE) -> Path:
    """The bundled records in the upstream layout: ``ctxs`` with the gold passage first."""
    path = tmp_path / name
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for r in raws:
            ps, g = r["passages"], r["gold_index"]
            fh.write(json.dumps({"question": r["question"], "answers": r["answers"],
                                 "ctxs": [ps[g], *ps[:g], *ps[g + 1:]]}) + "\n")
    return path


def test_bundled_sample_keeps_its_order_and_gold_index(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    raws = _raw_sample()
    recs = load_nq()
    assert [r.index for r in recs] == list(range(len(raws)))
    for rec, raw in zip(recs, raws):
        assert rec.question == raw["question"] and rec.answers == tuple(raw["answers"])
        assert rec.passages() == [(p["title"], p["text"]) for p in raw["passages"]]
        assert rec.chunks == tuple(f"{p['title']}\n{p['text']}" for p in raw["passages"])
        assert rec.gold_index == raw["gold_index"] > 0
        assert answer_in(rec.answers, rec.chunks[rec.gold_index])
    assert describe_source(resolve_source()) == BUNDLED_LABEL


@pytest.mark.parametrize("name", [NQ_FILE, "plain.jsonl"])
def test_upstream_file_gold_moves_to_a_seeded_position_never_first(tmp_path, name):
    raws = _raw_sample()
    path = _upstream(tmp_path, raws, name)
    recs = load_nq(source=path)
    assert len(recs) == len(raws)
    for i, (rec, raw) in enumerate(zip(recs, raws)):
        gold = raw["passages"][raw["gold_index"]]
        assert rec.gold_index == gold_position_for(i, "random")
        assert rec.passages()[rec.gold_index] == (gold["title"], gold["text"])
        others = [p for k, p in enumerate(raw["passages"]) if k != raw["gold_index"]]
        assert [p for k, p in enumerate(rec.passages()) if k != rec.gold_index] == \
            [(p["title"], p["text"]) for p in others]  # distractors keep their order
    # the same file through a folder, through the environment, a window of it, fixed positions
    if name == NQ_FILE:
        assert load_nq(source=tmp_path) == recs
    assert [r.index for r in load_nq(2, path, start=3)] == [3, 4]
    assert all(r.gold_index == 19 for r in load_nq(None, path, "last"))


def test_environment_names_the_source(tmp_path, monkeypatch):
    path = _upstream(tmp_path, _raw_sample()[:2])
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert resolve_source() == path and len(load_nq()) == 2
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"\$SEMTOKEN_RAG_DATA .*nowhere"):
        load_nq()


def test_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no NQ file"):
        load_nq(source=tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answers": ["a"], "ctxs": [{"title": "t", "text": "x"}]}\n{"question": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2 is not an NQ record: KeyError"):
        load_nq(source=bad)
    assert len(load_nq(1, bad)) == 1  # the good first line alone loads
    with pytest.raises(ValueError, match="n must be"):
        load_nq(-1)
    with pytest.raises(TypeError, match="float"):
        gold_position_for(0, 2.5)


@pytest.mark.parametrize("answers, context, hit", [
    (["Wilhelm Conrad Röntgen"], "awarded to Wilhelm Conrad Röntgen, of Germany", True),
    (["Marie Curie", "wilhelm conrad röntgen."], "to Wilhelm  Conrad Röntgen!", True),
    (["Marie Curie"], "to Wilhelm Conrad Röntgen", False),
    ([""], "anything", False),
    (["the 1901"], "in 1901 to", True),
    (["U.S."], "the us army", True),
    (["Röntgen"], "", False),
])
def test_answer_in(answers, context, hit):
    assert answer_in(answers, context) is hit
