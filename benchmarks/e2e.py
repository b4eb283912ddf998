"""End to end: SmolLM2-135M-Instruct answers from the full context and from each method's context.

Accuracy is best-subspan match (a normalized gold answer occurs in the normalized first line of the
output), greedy decoding. Prefill time is one timed forward pass over the prompt; KV-cache bytes are
summed over the key/value tensors of the ``past_key_values`` that prefill returned.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from tqdm.auto import tqdm

from . import smollm2
from .metrics import best_subspan_em, mean, median

INSTRUCTION = ("Write a high-quality answer for the given question using only the provided search results "
               "(some of which might be irrelevant).")


def build_prompt(pieces: Sequence[str], question: str) -> str:
    docs = "\n\n".join(f"Document [{i}]: {p}" for i, p in enumerate((p for p in pieces if p), 1))
    return f"{INSTRUCTION}\n\n{docs}\n\nQuestion: {question}\nAnswer:"


class Reader:
    def __init__(self, max_new_tokens: int = 48):
        import torch

        self.torch = torch
        self.model, self.tok = smollm2.load()
        self.max_new_tokens = max_new_tokens
        self._warm = False

    def _ids(self, prompt: str):
        enc = self.tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt")
        return enc if self.torch.is_tensor(enc) else enc["input_ids"]

    def answer(self, prompt: str) -> dict:
        torch = self.torch
        ids = self._ids(prompt)
        with torch.inference_mode():
            if not self._warm:      # first forward pays one-off allocation costs
                self.model(input_ids=ids[:, :16], use_cache=True)
                self._warm = True
            t = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True)
            prefill = time.perf_counter() - t
            pkv = out.past_key_values
            layers = getattr(pkv, "layers", None)
            pairs = [(layer.keys, layer.values) for layer in layers] if layers is not None else list(pkv)
            kv_bytes = int(sum(k.nbytes + v.nbytes for k, v in pairs))
            gen: list[int] = []
            nxt = out.logits[:, -1].argmax(-1)
            for _ in range(self.max_new_tokens):
                tid = int(nxt)
                if tid == self.tok.eos_token_id:
                    break
                gen.append(tid)
                text = self.tok.decode(gen, skip_special_tokens=True)
                if "\n" in text.strip():
                    break
                o = self.model(input_ids=nxt[:, None], past_key_values=pkv, use_cache=True)
                pkv = o.past_key_values
                nxt = o.logits[:, -1].argmax(-1)
        text = self.tok.decode(gen, skip_special_tokens=True).strip()
        first = text.split("\n")[0].strip() if text else ""
        return {"answer": first, "prefill_s": prefill, "prompt_tokens": int(ids.shape[1]), "kv_bytes": kv_bytes}


def run_e2e(contexts: dict[str, dict[int, list[str]]], questions: dict[int, tuple[str, Sequence[str]]],
            max_new_tokens: int = 48) -> dict:
    """``contexts``: name -> {question index -> kept pieces}. Returns name -> summary (+ per question)."""
    reader = Reader(max_new_tokens=max_new_tokens)
    results = {}
    for name, by_q in contexts.items():
        rows = []
        for qi in tqdm(sorted(by_q), desc=f"e2e {name}", unit="q", leave=False, dynamic_ncols=True):
            question, answers = questions[qi]
            r = reader.answer(build_prompt(by_q[qi], question))
            r["correct"] = int(best_subspan_em(r["answer"], answers))
            r["question_index"] = qi
            rows.append(r)
        results[name] = {
            "n": len(rows),
            "accuracy": mean([r["correct"] for r in rows]),
            "prefill_median_s": median([r["prefill_s"] for r in rows]),
            "prefill_mean_s": mean([r["prefill_s"] for r in rows]),
            "prompt_tokens_mean": mean([r["prompt_tokens"] for r in rows]),
            "kv_bytes_mean": mean([r["kv_bytes"] for r in rows]),
            "per_question": rows,
        }
    return results
