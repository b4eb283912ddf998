"""Downstream-LLM token counting and budgeted selection."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .text import without_surrogates

logger = logging.getLogger(__name__)

_QUICKTOK_NAMES = {"llama3", "cl100k_base", "o200k_base", "o200k_harmony", "qwen3"}


class BudgetTokenizer:
    """Counts the downstream LLM's tokens (its KV slots) offline.

    Accepts an encoding name ('llama3', 'cl100k_base', 'o200k_base', 'qwen3'; the vocabularies ship
    in the package quicktok-v1, whose ids match tiktoken's byte for byte), a model name such as
    'gpt-4o' or 'meta-llama/Llama-3.1-8B', a tiktoken ``Encoding``, a Hugging Face tokenizer, or a
    callable ``text -> int``.

    >>> tok = BudgetTokenizer("llama3")
    >>> tok.count("The first Nobel Prize in Physics was awarded in 1901.")
    13
    >>> tok.count_many(["a b", ""]).tolist()
    [2, 0]
    >>> BudgetTokenizer(lambda t: len(t.split()) + 1).count_many(["a b", ""]).tolist()
    [3, 0]
    """

    def __init__(self, spec: Any = "llama3") -> None:
        self.spec = spec
        self._many: Callable[[list[str]], np.ndarray]
        if isinstance(spec, str):
            import quicktok

            enc = quicktok.get_encoding(spec) if spec in _QUICKTOK_NAMES else _model_encoding(spec)
            self.name = spec
            self._many = lambda texts: np.asarray(quicktok.count_batch(enc, texts), dtype=np.int64)
        elif hasattr(spec, "encode_ordinary_batch"):  # tiktoken.Encoding
            self.name = getattr(spec, "name", "tiktoken")
            self._many = lambda texts: np.asarray(
                [len(ids) for ids in spec.encode_ordinary_batch(texts)], dtype=np.int64)
        elif hasattr(spec, "encode") and callable(spec) and hasattr(spec, "vocab_size"):
            self.name = getattr(spec, "name_or_path", "huggingface")
            self._many = lambda texts: np.asarray(
                [len(ids) for ids in spec(texts, add_special_tokens=False)["input_ids"]], dtype=np.int64)
        elif callable(spec):
            self.name = getattr(spec, "__name__", "callable")
            self._many = lambda texts: np.asarray([int(spec(t)) for t in texts], dtype=np.int64)
        else:
            raise TypeError(f"cannot count tokens with {spec!r}")

    def count(self, text: str) -> int:
        """Tokens of one text (no special tokens)."""
        return int(self.count_many([text])[0])

    def count_many(self, texts: Sequence[str]) -> np.ndarray:
        """Tokens of each text, as an int64 array. The empty text is 0 tokens (nothing is sent), whatever
        the tokenizer says of it (a callable may add a constant, e.g. a BOS token)."""
        texts = [without_surrogates(t) for t in texts]
        counts = np.zeros(len(texts), dtype=np.int64)
        present = [i for i, t in enumerate(texts) if t]
        if present:
            counts[present] = self._many([texts[i] for i in present])
        if (counts < 0).any():
            raise ValueError(f"tokenizer {self.name!r} returned a negative count")
        return counts


def _model_encoding(name: str):
    import quicktok

    try:
        return quicktok.encoding_for_model(name)
    except KeyError as e:
        raise ValueError(
            f"tokenizer={name!r} is unknown: use one of {sorted(_QUICKTOK_NAMES)}, a model name such as "
            "'gpt-4o' or 'meta-llama/Llama-3.1-8B', a tiktoken Encoding, a Hugging Face tokenizer or a "
            "callable") from e


def select_under_budget(scores: np.ndarray, costs: np.ndarray, groups: np.ndarray, budget: int,
                        gap_cost: int = 0, allowed: np.ndarray | None = None,
                        vectors: np.ndarray | None = None, redundancy_weight: float = 0.0,
                        redundancy_threshold: float = 0.5,
                        group_overheads: np.ndarray | None = None) -> np.ndarray:
    """Greedy budgeted selection of segments, best first; returns a boolean keep mask.

    Segments are given in document order; ``groups[i]`` is the chunk of segment ``i``. Kept segments of
    a chunk that are not adjacent form separate slices, joined by a gap marker that costs ``gap_cost``:
    adding a segment that opens a new slice pays it, one that bridges two slices gets it back. A
    segment that does not fit when its turn comes is skipped, so the total cost, gaps included, never
    exceeds ``budget``.

    With ``vectors`` (L2-normalised, one per segment) and ``redundancy_weight`` > 0 the selection is
    redundancy-aware: a segment's score drops by ``redundancy_weight * max(0, s - redundancy_threshold)``
    where ``s`` is its best cosine with a kept segment (lazy greedy: scores only ever drop).

    With ``group_overheads`` (tokens per group, paid once when anything of the group is kept: a
    metadata header, a separator) the first kept segment of a group also pays its group's overhead.

    >>> select_under_budget(np.array([0.9, 0.1, 0.8]), np.array([5, 5, 5]), np.zeros(3, int), 10).tolist()
    [True, False, True]
    >>> select_under_budget(np.array([0.9, 0.1, 0.8]), np.array([5, 5, 5]), np.array([0, 0, 1]), 12,
    ...                     group_overheads=np.array([2, 2])).tolist()
    [True, True, False]
    """
    n = len(scores)
    keep = np.zeros(n, dtype=bool)
    if n == 0 or budget < 0:
        return keep
    allowed = np.ones(n, dtype=bool) if allowed is None else allowed
    scores = np.asarray(scores, dtype=np.float64)
    aware = vectors is not None and redundancy_weight > 0
    if aware:
        # kept vectors in a preallocated matrix; each segment remembers its best cosine with the kept
        # ones and how many of them it has seen, so a re-check multiplies only the rows kept since
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        kept_mat = np.empty_like(vecs)
        best = np.full(n, -np.inf)
        seen = np.zeros(n, dtype=np.int64)
    n_kept = 0
    # the cheapest a segment can ever be (it bridges two slices, its chunk already paid its overhead);
    # ``used`` only grows, so a segment above ``budget - used`` by this bound never fits again
    lowest = np.asarray(costs, dtype=np.int64) - abs(int(gap_cost))
    heap = [(-scores[i], i) for i in range(n) if allowed[i]]
    heapq.heapify(heap)
    slices: dict[int, int] = {}
    used = 0
    g = groups
    while heap:
        _, i = heapq.heappop(heap)
        if lowest[i] > budget - used:
            continue
        if aware and n_kept:
            if seen[i] < n_kept:
                best[i] = max(best[i], float(np.max(kept_mat[seen[i]:n_kept] @ vecs[i])))
                seen[i] = n_kept
            current = scores[i] - redundancy_weight * max(0.0, best[i] - redundancy_threshold)
            if heap and current < -heap[0][0]:
                heapq.heappush(heap, (-current, i))  # stale: re-rank it
                continue
        left = i > 0 and g[i - 1] == g[i] and keep[i - 1]
        right = i + 1 < n and g[i + 1] == g[i] and keep[i + 1]
        have = slices.get(g[i], 0)
        delta_slices = -1 if (left and right) else (0 if (left or right) else 1)
        gaps_before = max(have - 1, 0)
        gaps_after = max(have + delta_slices - 1, 0)
        cost = int(costs[i]) + gap_cost * (gaps_after - gaps_before)
        if have == 0 and group_overheads is not None:
            cost += int(group_overheads[g[i]])
        if used + cost <= budget:
            keep[i] = True
            used += cost
            slices[g[i]] = have + delta_slices
            if aware:
                kept_mat[n_kept] = vecs[i]
                n_kept += 1
    return keep
