"""Unit tier: properties of SemToken.compress on a tiny random-weight BERT (fast; no real encoder).

The tiny encoder's fingerprints mean nothing, which is the point here: whatever the vectors, spans,
selection and rendering must give one result per chunk, in order, made only of slices of the chunk,
within the budget, without touching the caller's list.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
from conftest import TINY_WORDS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semtoken_rag import CompressionResult, SemToken, SemTokenConfig

GAP = " … "
ODD = ["", " ", "\n", "\t", "  \n\t ", ".", "!", "?", "\u200b", "\ufeff", "\u00a0", "\x00", "\x07", "\x1b[31m",
       "\x7f", "\ud800", "\udfff", "é", "e\u0301", "ﬁ", "🚀", "🇯🇵", "👩\u200d👩\u200d👧", "שלום", "مرحبا",
       "東京", "は", "日本の首都です。", "한국어", "ภาษาไทย", "Ωmega", "1901", "3.14", "{\"a\":[1,2]}",
       "https://example.org/x?y=1", "a" * 60]
word = st.one_of(st.sampled_from(TINY_WORDS), st.sampled_from(ODD),
                 st.text(min_size=1, max_size=12),
                 st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=8))
sep = st.sampled_from([" ", " ", " ", "  ", "\n", ". ", ", ", "! ", "? ", "。", "\n\n", "\t", ""])


@st.composite
def chunk(draw) -> str:
    words = draw(st.lists(st.tuples(word, sep), max_size=40))
    text = "".join(w + s for w, s in words)
    if draw(st.booleans()) and text:  # some chunks end mid-sentence, some with a full stop
        text = text.rstrip() + "."
    return text


chunks_st = st.lists(st.one_of(chunk(), st.sampled_from(["", " ", "\n\t \n"])), max_size=6)
query_st = st.one_of(st.none(), st.sampled_from(["", "   ", "nobel prize", "who was first", "東京"]),
                     st.text(max_size=30))


def check(res: CompressionResult, chunks: list[str], engine: SemToken, budget: int) -> None:
    """What every result holds, whatever the encoder's vectors."""
    assert isinstance(res, CompressionResult)
    assert len(res.chunks) == len(chunks) and [c.index for c in res.chunks] == list(range(len(chunks)))
    assert res.budget == budget
    assert res.compressed_tokens <= budget
    assert res.original_tokens == sum(c.original_tokens for c in res.chunks)
    assert res.compressed_tokens == sum(c.compressed_tokens for c in res.chunks)
    identity = budget >= res.original_tokens
    if identity:  # everything fits: each chunk as it is (blank ones "")
        assert res.texts == [t if t.strip() else "" for t in chunks]
    for c, text in zip(res.chunks, chunks):
        assert c.original_tokens == engine.count_tokens(text)
        assert c.compressed_tokens == engine.count_tokens(c.text)
        # the output is the chunk's own slices, in order, joined by the gap marker
        assert c.text == GAP.join(text[s:e] for s, e in c.kept_spans)
        flat = [x for span in c.kept_spans for x in span]
        assert all(0 <= s < e <= len(text) for s, e in c.kept_spans)
        assert all(a[1] < b[0] for a, b in zip(c.kept_spans, c.kept_spans[1:]))  # disjoint, not touching
        assert flat == sorted(flat)
        if not text.strip():  # blank chunks give "", always
            assert c.text == "" and c.kept_spans == () and c.compressed_tokens == 0
        if not identity:  # slices start and end on a word, never on whitespace
            assert all(not text[s].isspace() and not text[e - 1].isspace() for s, e in c.kept_spans)
        # the span judgements cover words inside the chunk, in order; repeats are never kept
        for s in c.spans:
            assert 0 <= s.start < s.end <= len(text)
            assert s.status in {"kept", "collapsed", "dropped", "repeat"}
        assert [s.start for s in c.spans] == sorted(s.start for s in c.spans)
        for a, b in c.repeat_spans:
            assert 0 <= a < b <= len(text)
            assert not any(s < b and a < e for s, e in c.kept_spans)


def budget_of(engine: SemToken, chunks: list[str], rate: float | None, target: int | None) -> int:
    total = sum(engine.count_tokens(c) for c in chunks)
    if target is not None:
        return target
    return math.floor((engine.config.rate if rate is None else rate) * total + 1e-9)


FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(chunks_st, query_st, st.one_of(st.none(), st.floats(0.01, 1.0)))
def test_rate_budget_and_slices(tiny_engine, chunks, query, rate):
    before = copy.deepcopy(chunks)
    res = tiny_engine.compress(chunks, query, rate=rate)
    assert chunks == before
    check(res, chunks, tiny_engine, budget_of(tiny_engine, chunks, rate, None))


@FAST
@given(chunks_st, query_st, st.integers(1, 120))
def test_target_tokens_budget_and_slices(tiny_engine, chunks, query, target):
    before = copy.deepcopy(chunks)
    res = tiny_engine.compress(chunks, query, target_tokens=target)
    assert chunks == before
    check(res, chunks, tiny_engine, target)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks_st, query_st, st.floats(0.05, 0.9), st.sampled_from(["c1", "c2"]))
def test_conversations_and_repeated_calls(tiny_engine, chunks, query, rate, conversation):
    """A call repeated (its fingerprints now cached) gives the same output; in a conversation the
    second call only drops more (what was sent), never breaks an invariant."""
    first = tiny_engine.compress(chunks, query, rate=rate)
    again = tiny_engine.compress(chunks, query, rate=rate)
    assert again.texts == first.texts and [c.kept_spans for c in again.chunks] == [c.kept_spans for c in first.chunks]
    budget = budget_of(tiny_engine, chunks, rate, None)
    for _ in range(2):
        res = tiny_engine.compress(chunks, query, rate=rate, conversation_id=conversation)
        check(res, chunks, tiny_engine, budget)


def test_duplicate_and_long_chunks(tiny_engine):
    """The same chunk twice comes back twice (in place); a chunk over many 32-token windows works."""
    long = " ".join(["the river was first in the war of the year"] * 60) + "."
    chunks = ["the nobel prize in physics.", long, "the nobel prize in physics.", ""]
    for rate in (0.1, 0.5, 0.9):
        res = tiny_engine.compress(chunks, "nobel prize", rate=rate)
        check(res, chunks, tiny_engine, budget_of(tiny_engine, chunks, rate, None))
    fp = tiny_engine.encoder.fingerprint([long])[0]
    assert len(fp.units) == len(long.split()) and fp.vectors.shape == (len(fp.units), 32)
    assert (fp.vectors.float().norm(dim=-1) > 0).all()  # every word got a vector from some window


def test_input_kinds_and_errors(tiny_engine):
    chunks = ("the first prize.", "a banana fruit.")
    res = tiny_engine.compress(chunks, "prize", rate=0.5)  # a tuple is a sequence of str too
    check(res, list(chunks), tiny_engine, budget_of(tiny_engine, list(chunks), 0.5, None))
    assert tiny_engine.compress([], "q").chunks == ()
    with pytest.raises(TypeError, match="not a single string"):
        tiny_engine.compress("the first prize.", "q")
    with pytest.raises(TypeError, match=r"chunks\[1\] must be str, got bytes"):
        tiny_engine.compress(["ok", b"bytes"], "q")
    with pytest.raises(ValueError, match="rate must be in"):
        tiny_engine.compress(list(chunks), "q", rate=0.0)
    for bad in (-1, 2**53 + 1, 2**70):  # (budgets are worked out exactly up to 2**53, as overheads)
        with pytest.raises(ValueError, match="target_tokens must be a positive int"):
            tiny_engine.compress(list(chunks), "q", target_tokens=bad)
    assert tiny_engine.compress(list(chunks), "q", target_tokens=2**53).budget == 2**53
    for bad in (7, -1, float("nan"), "0.5", True):  # checked even where target_tokens decides the budget
        with pytest.raises(ValueError, match="rate must be in"):
            tiny_engine.compress(list(chunks), "q", rate=bad, target_tokens=5)
        with pytest.raises(ValueError, match="rate must be in"):
            tiny_engine.compress_many([list(chunks)], ["q"], rate=bad, target_tokens=5)


@pytest.mark.parametrize("field", ["rate", "target_tokens", "batch_size", "tau", "batch_window_ms",
                                   "store_ttl_seconds", "max_length"])
def test_config_numbers_refuse_bools(field):
    """pydantic's lax mode takes True as 1: SemTokenConfig(rate=True) kept everything without a word."""
    for value in (True, False, np.bool_(True)):
        with pytest.raises(ValueError, match="a number is needed, got the bool"):
            SemTokenConfig(**{field: value})
    assert SemTokenConfig(use_query=False, cuda_graphs=True, show_progress_bar=None).use_query is False


def test_overheads_and_conversation_ids_that_cannot_be_used(tiny_engine):
    """Overheads past 2**53 tokens (each or in all: budgets are worked out in int64 and float64) and a
    conversation id that is not a str raise before any work."""
    chunks = ["the first prize in physics.", "a banana fruit."]
    for bad in ([2**62, 2**62], [2**63, 0], [np.uint64(2**64 - 1), 0], [2**53 + 1, 0]):
        with pytest.raises(ValueError, match=r"chunk_overheads\[0\] must be an int in \[0, 2\*\*53\]"):
            tiny_engine.compress(chunks, "prize", rate=0.5, chunk_overheads=bad)
    with pytest.raises(ValueError, match=r"chunk_overheads sum to \d+ tokens, more than 2\*\*53"):
        tiny_engine.compress(chunks, "prize", target_tokens=30, chunk_overheads=[2**53, 1])
    for conv in (5, b"a", ("a",), ["a"]):
        with pytest.raises(TypeError, match="conversation id must be str or None"):
            tiny_engine.compress(chunks, "prize", conversation_id=conv)
    assert tiny_engine.prewarm(["a banana fruit, again."], batch_size=np.int64(2)) in (0, 1)


def test_blank_chunks_come_back_empty_and_buy_no_budget(tiny_engine):
    """Whitespace-only chunks are "" even when everything fits, and their overheads are not in the budget."""
    for blank in (" ", "  ", "\n\n\r\n", "\xa0\u202f\u2009\u3000"):
        res = tiny_engine.compress([blank], None, rate=1.0)
        assert res.texts == [""] and res.chunks[0].kept_spans == () and res.compressed_tokens == 0
        res = tiny_engine.compress(["the first prize in physics.", blank], None, target_tokens=500)
        assert res.texts == ["the first prize in physics.", ""] and res.chunks[1].compressed_tokens == 0
    text = "the first nobel prize in physics went to a man in the year of the war, and he was glad."
    alone = tiny_engine.compress([text], "prize", rate=0.5)
    with_blank = tiny_engine.compress([text, "   "], "prize", rate=0.5, chunk_overheads=[0, 100])
    # (its own tokens are in the original count, as every chunk's; its overhead is not)
    assert with_blank.budget == math.floor(0.5 * (alone.original_tokens + tiny_engine.count_tokens("   ")))
    assert with_blank.texts[1] == "" and with_blank.overhead_tokens == 0


def test_an_overhead_over_the_budget_leaves_the_other_chunks_their_room(tiny_engine):
    """A chunk whose overhead leaves no room for a word of it keeps nothing; the others still get the budget."""
    chunks = ["the first nobel prize in physics was given in the year of the war.", "a banana fruit."]
    res = tiny_engine.compress(chunks, "nobel prize physics", target_tokens=20, chunk_overheads=[100, 0])
    assert res.texts == ["", "a banana fruit."]
    assert res.compressed_tokens + res.overhead_tokens <= 20
    # an overhead that leaves room, but not for the cheapest word of the chunk (each Greek word here
    # is several tokens): the chunk gives nothing and the other fits whole
    greek, fruit = "Ελληνικά κείμενα εδώ", "Bananas are yellow berries grown in the tropics."
    assert min(tiny_engine.count_tokens(" " + w) for w in greek.split()) > 1
    target = tiny_engine.count_tokens(fruit) + 1
    for overhead in (target - 1, target, 100):
        res = tiny_engine.compress([greek, fruit], greek, target_tokens=target, chunk_overheads=[overhead, 0])
        assert res.texts == ["", fruit], overhead


def test_span_status_agrees_with_the_kept_text(tiny_engine):
    """A span is "kept" when any of its characters are in kept_spans (a segment too long for the
    budget gives its best run of words), and never "dropped" or "repeat" then."""
    long_word = "Supercalifragilisticexpialidocious" * 3 + " is a long word in a sentence about nothing much."
    engines = [tiny_engine, SemToken(tiny_engine.config.model_copy(update={"partial_fit": True}))]
    for engine in engines:
        for text in (long_word, "Daniel Tsui shared th\x1fe 1998 Nobel Prize in Physics with Horst Störmer."):
            for target in range(1, 12):
                chunk = engine.compress([text], None, target_tokens=target).chunks[0]
                for span in chunk.spans:
                    inside = any(a < span.end and span.start < b for a, b in chunk.kept_spans)
                    assert (span.status in ("kept", "collapsed")) == inside, (target, span, chunk.kept_spans)


def test_warm_calls_share_the_cached_fingerprints_and_never_write_them(tiny_encoder):
    """A memory hit wraps the cache's own float16 rows (no copy per call); no step of a call writes to
    them, so the cached bytes after many warm calls are those first stored."""
    from semtoken_rag import SemTokenConfig
    from semtoken_rag.keys import cache_key

    engine = SemToken(SemTokenConfig(encoder=str(tiny_encoder), device="cpu", max_length=32, window_overlap=8))
    chunks = ["the nobel prize in physics was first awarded in 1901.", "the river was first in the war.",
              "a banana is a fruit. the banana is yellow."]
    engine.compress(chunks, "nobel prize", rate=0.5)
    entries = [engine.cache.get_many([cache_key(c, engine.preparer.namespace)])[0] for c in chunks]
    before = [e["fingerprints"].tobytes() for e in entries]
    prepared = engine.preparer.lookup(chunks, None)
    for c, e in zip(chunks, entries):
        assert np.shares_memory(prepared.fingerprints[c].vectors.numpy(), e["fingerprints"])
    for rate in (0.2, 0.5, 0.9):
        engine.compress(chunks, "nobel prize", rate=rate)
        engine.compress_many([chunks, chunks[::-1]], ["banana", None], rate=rate)
    assert [e["fingerprints"].tobytes() for e in entries] == before


def test_a_pass_of_mostly_unknown_tokens_is_warned_about_once(tiny_encoder, caplog):
    """The tiny BERT knows ASCII letters, digits and punctuation alone: a Greek word is its unknown token."""
    import logging

    from semtoken_rag.encoder import _UNKNOWN_SHARE, Encoder

    enc = Encoder(str(tiny_encoder), device="cpu", max_length=32, window_overlap=8)
    known = " ".join(TINY_WORDS[i % len(TINY_WORDS)] for i in range(60))
    unknown = " ".join(f"αβ{i}" for i in range(8)) + " " + known  # 8 of 68 words: under the share
    with caplog.at_level(logging.WARNING, logger="semtoken_rag.encoder"):
        enc.fingerprint([known, unknown])
        assert not caplog.records and 8 / 68 < 2 * _UNKNOWN_SHARE
        enc.fingerprint(["λόγος μῦθος ἔπος " * 20, known])
        enc.fingerprint(["ψυχή " * 40])  # (once per encoder)
    assert len(caplog.records) == 1 and "unknown to the encoder" in caplog.records[0].getMessage()


def test_the_unknown_token_warning_is_said_once_by_concurrent_passes(tiny_encoder, caplog):
    """Threads whose passes all cross the share at once: one warning, not one per thread (the check and the
    mark are one step)."""
    import logging
    import sys
    import threading

    from semtoken_rag.encoder import Encoder

    enc = Encoder(str(tiny_encoder), device="cpu", max_length=32, window_overlap=8)
    unk = enc.tokenizer.unk_token_id
    sequences = [[unk] * 50_000 for _ in range(4)]  # (counting them takes long enough for threads to meet)
    start = threading.Barrier(8)

    def note():
        start.wait()
        enc._note_unknown(sequences)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with caplog.at_level(logging.WARNING, logger="semtoken_rag.encoder"):
            threads = [threading.Thread(target=note) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(interval)
    assert len([r for r in caplog.records if "unknown to the encoder" in r.getMessage()]) == 1


def test_the_registry_shares_one_engine_for_a_bound_method_tokenizer_and_warns_when_it_grows(
        tiny_encoder, monkeypatch, caplog):
    """``counter.count`` is a new object at every access: a component built per request with it got a new
    engine (and memos) per request. Settings that really are new each time make the registry say so, and
    it keeps the 64 (here 5) asked for most recently."""
    import logging

    from semtoken_rag import registry

    class Counter:
        def count(self, text: str) -> int:
            return len(text.split())

    counter = Counter()
    settings = {"encoder": str(tiny_encoder), "device": "cpu", "max_length": 32, "window_overlap": 8}
    registry.clear_registry()
    try:
        first = registry.shared_engine(SemTokenConfig(**settings, tokenizer=counter.count))
        assert registry.shared_engine(SemTokenConfig(**settings, tokenizer=counter.count)) is first
        assert registry.shared_engine(SemTokenConfig(**settings, tokenizer=Counter().count)) is not first
        assert first.count_tokens("one two three") == 3
        gone = registry.registered_engines()
        monkeypatch.setattr(registry, "_MAX_ENGINES", 5)
        monkeypatch.setattr(registry, "_warned_evicting", False)
        with caplog.at_level(logging.WARNING, logger="semtoken_rag.registry"):
            for k in range(6):  # (a lambda per request: new settings each time)
                registry.shared_engine(SemTokenConfig(**settings, tokenizer=lambda text, k=k: len(text) + k))
                assert registry.shared_engine(SemTokenConfig(**settings, tokenizer=counter.count)) is first
        held = registry.registered_engines()
        assert len(held) == 5 and first in held  # (asked for at every request: never the least recent)
        assert len(caplog.records) == 1 and "registry holds 5 engines" in caplog.records[0].getMessage()
        # the engines let go are closed; a component that still holds one keeps working with it
        let_go = [e for e in gone if e not in held]
        assert let_go and all(e.closed for e in let_go)
        assert let_go[0].compress(["one two three four five six"], "two", rate=0.5).compressed_tokens > 0
    finally:
        registry.clear_registry()


def test_conversation_max_count_bounds_the_conversations_remembered(tiny_encoder):
    chunks = [" ".join(TINY_WORDS[(i * 5 + k) % len(TINY_WORDS)] for k in range(30)) + "." for i in range(3)]
    engine = SemToken(SemTokenConfig(encoder=str(tiny_encoder), device="cpu", max_length=32, window_overlap=8,
                                     conversation_max_count=3))
    assert engine.memory.max_conversations == 3
    for c in ("a", "b", "c", "d"):
        engine.compress(chunks, "w", rate=0.5, conversation_id=c)
    assert len(engine.memory) == 3 and "a" not in engine.memory and "d" in engine.memory
    assert SemToken(SemTokenConfig(encoder=str(tiny_encoder), device="cpu", max_length=32,
                                   window_overlap=8)).memory.max_conversations == 1024
    with pytest.raises(ValueError, match="conversation_max_count"):
        SemTokenConfig(conversation_max_count=0)


def test_entries_the_encoder_made_are_not_checked_again_but_a_stores_are(tiny_encoder, tmp_path, monkeypatch):
    """The first warm call (a chat's second turn) trusts the entries this process's encoder just made;
    an entry read from a store is checked against its chunk before use, once."""
    from semtoken_rag import prepare

    checked = []
    real = prepare.validate_fingerprints
    monkeypatch.setattr(prepare, "validate_fingerprints", lambda *a: checked.append(a[2]) or real(*a))
    chunks = ["the nobel prize in physics was first awarded in 1901.", "a banana is a fruit. it is yellow."]
    cfg = SemTokenConfig(encoder=str(tiny_encoder), device="cpu", max_length=32, window_overlap=8,
                         cache_dir=tmp_path)
    first = SemToken(cfg)
    cold = first.compress(chunks, "nobel prize", rate=0.5)
    warm = first.compress(chunks, "nobel prize", rate=0.5)
    assert warm.cache_hits == 2 and warm.texts == cold.texts
    assert checked == []
    first.close()  # (the files are written on a worker thread; close waits for them)
    second = SemToken(cfg)  # the same entries, decoded from cache_dir's files
    for _ in range(2):
        assert second.compress(chunks, "nobel prize", rate=0.5).texts == cold.texts
    assert sorted(checked) == sorted(map(len, chunks))  # each checked once, then remembered as fitting


def test_a_config_from_model_copy_is_validated_when_the_engine_is_built(tiny_encoder):
    """pydantic's model_copy(update=...) skips validation: the engine checks the config it is given (a rate
    of -0.5 made a negative budget and kept nothing, silently)."""
    from pydantic import ValidationError

    good = SemTokenConfig(encoder=str(tiny_encoder), device="cpu")
    for update in ({"rate": -0.5}, {"rate": 5.0}, {"target_tokens": -10}, {"tau": 7}):
        with pytest.raises(ValidationError, match=next(iter(update))):
            SemToken(good.model_copy(update=update))
    with pytest.raises(TypeError, match="config must be a SemTokenConfig, got dict"):
        SemToken({"rate": 0.5})
    coerced = SemToken(good.model_copy(update={"rate": "0.5", "target_tokens": "20"}))  # (what validation makes)
    assert (coerced.config.rate, coerced.config.target_tokens) == (0.5, 20)
    assert coerced.compress(["Paris is the capital of France."], "capital").budget == 20


@dataclasses.dataclass
class WordCounter:
    """A budget tokenizer that is a callable dataclass (model_dump would make it a dict)."""

    per_word: int = 1

    def __call__(self, text: str) -> int:
        return self.per_word * len(text.split())


def test_an_engine_takes_a_callable_dataclass_tokenizer(tiny_encoder):
    counter = WordCounter()
    engine = SemToken(SemTokenConfig(encoder=str(tiny_encoder), device="cpu", tokenizer=counter))
    assert engine.config.tokenizer is counter and engine.count_tokens("a b c") == 3
    assert SemToken(engine.config, parts=engine.parts, rate=0.5).config.tokenizer is counter


def test_a_tokenizer_callable_must_return_an_int():
    from semtoken_rag.budget import BudgetTokenizer

    assert BudgetTokenizer(lambda t: np.int64(len(t))).count_many(["abc"]).tolist() == [3]
    for bad in (lambda t: len(t) / 4, lambda t: str(len(t)), lambda t: True):
        with pytest.raises(TypeError, match="must return an int"):
            BudgetTokenizer(bad).count_many(["abcdef"])


def test_results_pickle_at_the_size_of_their_data_and_compare_by_content(tiny_engine):
    """An unread span list held a function over the call's fingerprints: a pickled result (sent from a
    worker) carried all of them. Results compare by what was kept: a cached call equals the cold one."""
    import json
    import pickle

    chunks = [" ".join(TINY_WORDS) * 3, "Paris is the capital of France. " * 8, "   "]
    tiny_engine.clear_caches()
    cold = tiny_engine.compress(chunks, "capital of France", rate=0.5)
    warm = tiny_engine.compress(chunks, "capital of France", rate=0.5)
    assert cold.encoder_calls > 0 == warm.encoder_calls and cold == warm and hash(cold) == hash(warm)
    data = pickle.dumps(cold)
    assert len(data) < 4 * len(json.dumps(cold.to_dict(spans=True)))
    back = pickle.loads(data)
    assert back == cold and [list(c.spans) for c in back.chunks] == [list(c.spans) for c in cold.chunks]


def test_a_forked_child_is_not_held_by_locks_a_parent_thread_held(tiny_engine):
    """A child forked while a thread of the parent was inside a call of a conversation (or building a
    registry engine) must not wait for that thread, which does not exist in the child."""
    import os
    import threading

    from semtoken_rag import registry

    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with tiny_engine._conversation("c"), registry._LOCK:
            inside.set()
            leave.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    inside.wait(30)
    try:
        pid = os.fork()
        if pid == 0:  # the child: both would block for good without their renewal
            try:
                tiny_engine.forget_conversation("c")
                registry.registered_engines()
                os._exit(0)
            finally:
                os._exit(1)
        for _ in range(600):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            leave.wait(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on a lock")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        leave.set()
        thread.join()


def test_a_conversation_call_whose_budget_holds_everything_still_judges_repeats(tiny_engine):
    """A turn whose budget held every chunk whole was returned as it was: nothing remembered, and nothing the
    conversation had received dropped."""
    chunks = ["Paris is the capital of France. The river Seine runs through the city from east to west.",
              "The Nobel prize in physics was first awarded in 1901. It went to a German physicist for rays."]
    tiny_engine.forget_conversation("whole")
    first = tiny_engine.compress(chunks, "capital", target_tokens=10**6, conversation_id="whole")
    assert [c.text for c in first.chunks] == chunks and tiny_engine.memory.spans("whole") > 0
    again = tiny_engine.compress(chunks, "capital", target_tokens=10**6, conversation_id="whole")
    assert all(c.is_empty for c in again.chunks)  # (all received before)
    alone = tiny_engine.compress(chunks, "capital", target_tokens=10**6)
    assert [c.text for c in alone.chunks] == chunks and alone.encoder_calls == 0


@pytest.mark.parametrize("many", [False, True])
def test_a_call_cancelled_after_it_remembered_takes_it_back(tiny_engine, monkeypatch, many):
    """A timeout that fires after the worker thread remembered what it sends, before the result reaches the
    caller, left those spans in the conversations: the next turn dropped text the user never got."""
    import asyncio
    import threading

    chunks = ["Paris is the capital of France. The river Seine runs through the city from east to west.",
              "The Nobel prize in physics was first awarded in 1901. It went to a German physicist for rays."]
    ids = ["cancel-a", "cancel-b", "cancel-c"]
    for c in ids:
        tiny_engine.forget_conversation(c)
    added, release = threading.Event(), threading.Event()
    real_add = tiny_engine.memory.add

    def add(conversation_id, centroids):  # the first request's spans remembered, then the caller gives up
        epoch = real_add(conversation_id, centroids)
        added.set()
        release.wait(30)
        return epoch

    monkeypatch.setattr(tiny_engine.memory, "add", add)

    async def main() -> None:
        call = tiny_engine.acompress_many([chunks] * 3, ["capital"] * 3, target_tokens=10**6, conversation_ids=ids) \
            if many else tiny_engine.acompress(chunks, "capital", target_tokens=10**6, conversation_id=ids[0])
        task = asyncio.ensure_future(call)
        assert await asyncio.to_thread(added.wait, 30)
        task.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert [tiny_engine.memory.spans(c) for c in ids] == [0, 0, 0]
    monkeypatch.undo()
    got = tiny_engine.compress(chunks, "capital", target_tokens=10**6, conversation_id=ids[0])
    assert [c.text for c in got.chunks] == chunks  # (nothing was received: nothing is a repeat)
