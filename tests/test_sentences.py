"""Unit tier: sentence segmentation (sentencex plus line breaks and Thai) and exact repeats of segments."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semtoken_rag import SemTokenConfig
from semtoken_rag.repeats import exact_repeats
from semtoken_rag.spans import cap_segments, clause_ends, segment_bounds, sentence_break_after, sentence_ends
from semtoken_rag.text import split_units


def sentences(text: str, language: str = "en") -> list[str]:
    """The text of each sentence that :func:`sentence_break_after` delimits (first word to last)."""
    units = split_units(text)
    bounds = segment_bounds(sentence_break_after(text, units, language)).tolist()
    return [text[units[a, 0]:units[b - 1, 1]] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize(("text", "expected"), [
    # initials and abbreviations end no sentence: an answer such as "Charles K. Kao" stays in one piece
    ("In 2009, Charles K. Kao was awarded the prize. It was shared.",
     ["In 2009, Charles K. Kao was awarded the prize.", "It was shared."]),
    ("Brown's party was defeated by a company of U.S. Marines, led by Colonel Robert E. Lee. Brown was hanged.",
     ["Brown's party was defeated by a company of U.S. Marines, led by Colonel Robert E. Lee.", "Brown was hanged."]),
    ("He was treated by Dr. Smith at St. Mary's. He recovered.",
     ["He was treated by Dr. Smith at St. Mary's.", "He recovered."]),
    ("It rained. Then it stopped! Did it? Yes.", ["It rained.", "Then it stopped!", "Did it?", "Yes."]),
    # a line break always ends one (titles, list items); so do CJK full stops and a space between Thai phrases
    ("Nobel Prize\nThe first prize was awarded in 1901", ["Nobel Prize", "The first prize was awarded in 1901"]),
    ("東京は日本の首都です。大阪は都市です。", ["東京は日本の首都です。", "大阪は都市です。"]),
    ("ภาษาไทย เป็นภาษาราชการ", ["ภาษาไทย", "เป็นภาษาราชการ"]),
])
def test_sentences(text, expected):
    assert sentences(text) == expected


def test_language_knob():
    text = "Das gilt z. B. für Berlin. Dann kam Dr. Müller."
    assert sentences(text, "de") == ["Das gilt z. B. für Berlin.", "Dann kam Dr. Müller."]
    assert SemTokenConfig(language="de").language == "de"
    with pytest.raises(ValueError, match="language"):
        SemTokenConfig(language="not a language")
    with pytest.raises(ValueError, match="language"):
        SemTokenConfig(language="")


@pytest.mark.parametrize("text", ["", " ", "\n\n", "a", "x\ud800y. Z\udfff", "\x00. A", "😀. 😀", "a" * 5000 + ". B"])
def test_odd_text(text):
    ends = sentence_ends(text)
    assert all(0 <= i < len(text) and not text[i].isspace() or text[i] == "\n" for i in ends.tolist())
    units = split_units(text)
    br = sentence_break_after(text, units)
    assert len(br) == len(units) and (len(br) == 0 or br[-1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(list("ab .!?\n\u00a0E。ภ") + ["U.S.", "Dr.", "\ud800", "Kao. "]), max_size=30))
def test_sentence_ends_are_sorted_characters_of_the_text(pieces):
    text = "".join(pieces)
    ends = sentence_ends(text).tolist()
    assert ends == sorted(set(ends))
    assert all(0 <= i < len(text) and (not text[i].isspace() or text[i] == "\n") for i in ends)
    if text.strip():  # the text's last character that is not a space ends a sentence
        assert len(text.rstrip()) - 1 in ends


@pytest.mark.parametrize("space", ["\u00a0", "\u2009", "\u3000"])
def test_a_wide_space_before_a_full_stop_is_no_crash(space, tiny_engine):
    """sentencex panics on a space that is not ASCII before a full stop; such texts are segmented with
    plain spaces there (the same sentences as a plain space gives), and a call over one compresses."""
    text = f"Robert E{space}. Lee won the battle. Then he left."
    assert sentence_ends(text).tolist() == sentence_ends(text.replace(space, " ")).tolist()
    assert len(text.rstrip()) - 1 in sentence_ends(text).tolist()
    chunks = [text, "Another passage about the war."]
    res = tiny_engine.compress(chunks, "who won the battle", rate=0.5)
    assert len(res.chunks) == 2 and res.compressed_tokens <= res.budget


def brute_exact_repeats(keys, order, eligible):
    out = [-1] * len(keys)
    for pos, i in enumerate(order):
        if not eligible[i]:
            continue
        for j in order[:pos]:
            if eligible[j] and keys[j] == keys[i]:
                out[i] = int(j)
                break
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), max_size=12), st.randoms(use_true_random=False))
def test_exact_repeats_is_the_first_copy_in_order(items, rnd):
    keys = np.array([k for k, _ in items], dtype=np.int64)
    eligible = np.array([e for _, e in items], dtype=bool)
    order = list(range(len(items)))
    rnd.shuffle(order)
    got = exact_repeats(keys, np.array(order, dtype=np.int64), eligible).tolist()
    assert got == brute_exact_repeats(keys.tolist(), order, eligible.tolist())


@pytest.fixture(scope="module")
def exact_only(tiny_encoder):
    """A tiny engine whose vector search finds only identical vectors (repeat_threshold 1.0): what it drops
    as repeats, the exact-text rule found."""
    from semtoken_rag import SemToken

    return SemToken(SemTokenConfig(encoder=str(tiny_encoder), device="cpu", repeat_threshold=1.0))


def test_engine_keeps_one_copy_of_a_sentence_found_in_two_chunks(exact_only):
    dup = "The North Pole is at the centre of the Northern Hemisphere."
    chunks = [f"North Pole\nThe pole lies in the Arctic Ocean. {dup} Ice covers it.",
              f"Arctic\n{dup.upper()} The Arctic has long winters. Polar bears live there."]  # (case aside)
    before = list(chunks)
    res = exact_only.compress(chunks, "where is the north pole", rate=0.95)
    assert chunks == before
    kept = [c for c in res.chunks if dup.lower() in c.text.lower()]
    assert len(kept) == 1
    other = res.chunks[1 - kept[0].index]
    start = chunks[other.index].lower().index(dup.lower())
    assert any(a <= start < b for a, b in other.repeat_spans)  # reported as a repeat, not silently dropped
    # without the copy, the same sentence is kept: it was dropped as a repeat, not for the budget
    alone = exact_only.compress([chunks[other.index]], "where is the north pole", rate=0.95)
    assert dup.lower() in alone.chunks[0].text.lower()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=80), st.integers(1, 12))
def test_clause_aware_caps(items, max_units):
    breaks = np.array([b for b, _ in items], dtype=bool)
    breaks[-1] = True
    soft = np.array([s for _, s in items], dtype=bool)
    out = cap_segments(breaks, max_units, soft)
    assert (out | breaks).tolist() == out.tolist()  # every sentence end stays
    bounds = segment_bounds(out).tolist()
    assert all(b - a <= max_units for a, b in itertools.pairwise(bounds))
    for a, b in itertools.pairwise(bounds):  # an added cut is after a clause end where one was in reach
        if not breaks[b - 1]:
            reach = soft[a + max(max_units // 2, 1) - 1:a + max_units - 1]
            assert soft[b - 1] or not reach.any()
            assert soft[b - 1] or b - a == max_units


def test_long_sentence_is_cut_after_a_comma():
    text = ("The 2018 Winter Olympics, officially known as the XXIII Olympic Winter Games, were a multi-sport "
            "event held from 9 to 25 February 2018 in Pyeongchang County, South Korea, with the opening rounds "
            "of some events held on 8 February.")
    units = split_units(text)
    out = cap_segments(sentence_break_after(text, units), 16, clause_ends(text, units))
    cuts = [text[s:e] for (s, e), b in zip(units.tolist(), out) if b]
    assert all(c.endswith((",", ".")) for c in cuts), cuts
    assert any(c == "County," for c in cuts)  # "9 to 25 February 2018 in Pyeongchang County," stays whole
