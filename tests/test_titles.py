"""keep_titles: a chunk's title line comes with its kept text, is paid within the budget, never kept alone."""

from __future__ import annotations

import pytest

from semtoken_rag import SemToken, SemTokenConfig

CHUNKS = [
    ("Tin Woodman\nDorothy meets a man made of tin in the forest. He wants a heart from the Wizard. "
     "They oil his joints and he joins them on the road."),
    "Emerald City\nThe city is the capital of the Land of Oz. Its walls are green. The Wizard lives there.",
    "No title here. Just a sentence about roads and bricks. Another about the weather in Kansas.",
]


@pytest.fixture(scope="module")
def engines(tiny_encoder):
    cfg = SemTokenConfig(encoder=str(tiny_encoder), device="cpu", keep_titles=False)
    return SemToken(cfg), SemToken(cfg.model_copy(update={"keep_titles": True}))


@pytest.mark.parametrize("target", [3, 8, 15, 25, 40, 60])
def test_titles_come_with_kept_text_within_budget(engines, target):
    off, on = engines
    res = on.compress(CHUNKS, "who wants a heart", target_tokens=target)
    assert res.compressed_tokens <= res.budget == target
    if target < 20:  # too small for a sentence with its title: the best run of words is kept alone
        return
    for chunk, out in zip(CHUNKS, res.chunks):
        title = chunk.split("\n", 1)[0] if "\n" in chunk else None
        if title is None or not out.text:
            continue
        assert out.text.startswith(title)
        assert out.text.strip() != title  # never alone
    base = off.compress(CHUNKS, "who wants a heart", target_tokens=target)
    assert base.compressed_tokens <= base.budget


def test_title_appears_where_it_did_not(engines):
    off, on = engines
    target = 30
    a = off.compress(CHUNKS, "who wants a heart", target_tokens=target)
    b = on.compress(CHUNKS, "who wants a heart", target_tokens=target)
    def kept_titles(r):
        return [o.text.startswith(c.split("\n")[0]) for c, o in zip(CHUNKS[:2], r.chunks) if o.text]

    assert kept_titles(b) and all(kept_titles(b))
    assert not all(kept_titles(a))  # without the knob, some kept text comes without its title


def test_whole_chunk_unchanged_when_everything_fits(engines):
    _, on = engines
    res = on.compress(CHUNKS, "who wants a heart", rate=1.0)
    assert [c.text for c in res.chunks] == CHUNKS
