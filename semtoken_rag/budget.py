"""Downstream-LLM token counting and budgeted selection."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .lru import remember
from .text import without_surrogates

logger = logging.getLogger(__name__)

_QUICKTOK_NAMES = {"llama3", "cl100k_base", "o200k_base", "o200k_harmony", "qwen3"}
# count_pieces remembers the counts of this many distinct short pieces per tokenizer (about 6 MB of NQ
# words), then starts over
_PIECE_MEMO = 65_536
_PIECE_CHARS = 32
# texts of fewer characters than this in all are counted one after another on the calling thread, more in
# the tokenizer's parallel batch call. A call's chunks (about 12k characters for 20 passages) and its
# pieces are far below it: waking a thread pool costs more than it saves there, most of all right after
# the encoder pass, when torch's OpenMP threads still hold the cores (on 2 cores after a torch op,
# quicktok for 20 passages: 1.21 ms batched, 0.30 ms serial; 400: 6.20 and 6.00; 1,000: 11.99 and 14.61;
# a cold call of 20 passages 8-19 ms faster in side-by-side runs). Only counts over many long texts at once
# (count_many of a corpus) still go to the batch call.
_SERIAL_CHARS = 262_144


def _token_count(value: Any, spec: Any) -> int:
    """A callable tokenizer's answer, which must be an int (a float would be rounded down silently: a budget
    it counts could be passed; a bool or a str is its bug)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"the tokenizer {getattr(spec, '__name__', spec)!r} must return an int (a token count), "
                        f"got {type(value).__name__} {value!r}")
    return int(value)


def _serial_or_batch(one: Callable[[str], int], batch: Callable[[list[str]], Sequence[int]]
                     ) -> Callable[[list[str]], np.ndarray]:
    def many(texts: list[str]) -> np.ndarray:
        if sum(map(len, texts)) < _SERIAL_CHARS:
            return np.fromiter(map(one, texts), dtype=np.int64, count=len(texts))
        return np.asarray(batch(texts), dtype=np.int64)
    return many


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
        self._pieces: dict[str, int] = {}  # count_pieces' memo
        self._many: Callable[[list[str]], np.ndarray]
        if isinstance(spec, str):
            import quicktok

            enc = quicktok.get_encoding(spec) if spec in _QUICKTOK_NAMES else _model_encoding(spec)
            self.name = spec
            self._many = _serial_or_batch(enc.count, lambda texts: quicktok.count_batch(enc, texts))
        elif hasattr(spec, "encode_ordinary_batch"):  # tiktoken.Encoding
            self.name = getattr(spec, "name", "tiktoken")
            self._many = _serial_or_batch(lambda text: len(spec.encode_ordinary(text)), lambda texts: [
                len(ids) for ids in spec.encode_ordinary_batch(texts)])
        elif hasattr(spec, "encode") and callable(spec) and hasattr(spec, "vocab_size"):
            self.name = getattr(spec, "name_or_path", "huggingface")
            self._many = lambda texts: np.asarray(
                [len(ids) for ids in spec(texts, add_special_tokens=False)["input_ids"]], dtype=np.int64)
        elif callable(spec):
            self.name = getattr(spec, "__name__", "callable")
            self._many = lambda texts: np.asarray([_token_count(spec(t), spec) for t in texts], dtype=np.int64)
        else:
            raise TypeError(f"cannot count tokens with {spec!r}")

    def count_pieces(self, pieces: Sequence[str]) -> np.ndarray:
        """:meth:`count_many` of many short pieces of text that repeat (each word of a chunk with the
        whitespace before it), the same counts, through a memo of the pieces already counted (those of
        up to 32 characters, at most 65,536 of them: the words of a language recur, so a new chunk's
        words are mostly known).

        >>> tok = BudgetTokenizer("llama3")
        >>> tok.count_pieces(["The", " first", " Nobel", " first"]).tolist() == tok.count_many(
        ...     ["The", " first", " Nobel", " first"]).tolist()
        True
        """
        memo = self._pieces
        found = list(map(memo.get, pieces))
        todo = [i for i, c in enumerate(found) if c is None]
        if todo:
            fresh = self.count_many([pieces[i] for i in todo]).tolist()
            for i, c in zip(todo, fresh):
                found[i] = c
            remember(memo, {pieces[i]: c for i, c in zip(todo, fresh) if len(pieces[i]) <= _PIECE_CHARS},
                     _PIECE_MEMO)
        return np.asarray(found, dtype=np.int64).reshape(len(pieces))

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


# Redundancy-aware selection compares segments in batches: a kept segment waits in a buffer of this many
# rows, checked against each popped segment (one small product), and a full buffer is folded into the
# best cosine of every pending segment with one matrix product (pending x buffer). The work is
# kept x pending x dim in a few large BLAS calls instead of one small product per pop, and the memory is
# bounded (one float32 copy of the vectors, one of the pending ones, a pending x buffer block) however
# many pairs are similar, so dense similarity (boilerplate) needs no fallback. A sparse neighbour graph
# of all pairs above the threshold was the alternative: on the 1M-character benchmark chunk its
# all-pairs product alone took as long as this whole selection, and its memory grows with the pairs.
_FRESH_ROWS = 128
_EXACT_COPY_VALUES = 1 << 22  # segments x dim up to which the vectors are copied to float64 once (32 MiB)
_PAIRS_AT_ONCE = 512
# up to this many segments, a kept segment is compared with every pending one at once (one product of a
# vector) and the best cosines are exact at every step; above, kept rows are folded _FRESH_ROWS at a time.
# The same cosines and mask either way; eagerly, 125 segments (20 NQ passages): 0.90 ms against 1.18 ms (the same 40 calls' inputs)
_EAGER_ROWS = 512


def pair_cosines(vectors: np.ndarray, a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Dot products of ``vectors[a]`` and ``vectors[b]`` row by row (cosines of L2-normalised vectors).

    Float32 vectors, float64 arithmetic: the products are exact and each row is summed on its own in a
    fixed order, so a pair's value is the same float whichever rows come with it and in either order
    (a BLAS product's value for a row can change with the slice it is part of).

    >>> v = np.array([[0.6, 0.8], [1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    >>> pair_cosines(v, np.array([1, 2]), 0).round(6).tolist()
    [0.6, 0.8]
    >>> bool((pair_cosines(v, np.array([0, 0]), np.array([1, 2])) == pair_cosines(v, np.array([1, 2]), 0)).all())
    True
    """
    return (vectors[a].astype(np.float64) * vectors[b].astype(np.float64)).sum(axis=-1)


class _KeptOverlap:
    """The best cosine of each pending segment with the kept ones, updated in batches (see _FRESH_ROWS).

    Float32 products only pick candidates, within ``margin`` (a bound on their rounding error) of the
    threshold or of the best; the cosine that counts is always :func:`pair_cosines`, so the result
    depends neither on the batching nor on BLAS. Rows whose vector is not finite take and give nothing.
    """

    def __init__(self, vectors: np.ndarray, pending: np.ndarray, lowest: np.ndarray, threshold: float) -> None:
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        n = len(pending)
        if vecs.ndim != 2 or len(vecs) != n:
            raise ValueError(f"vectors must have one row per segment ({n}), got shape {vecs.shape}")
        self.vecs = vecs
        # the float64 copy pair_cosines would make of each row, made once (small calls: every call's)
        self.vecs64 = vecs.astype(np.float64) if vecs.size <= _EXACT_COPY_VALUES else None
        finite = np.isfinite(vecs).all(axis=1)
        norms = np.einsum("ij,ij->i", vecs, vecs, dtype=np.float64)[finite]
        # |float32 dot - exact| <= d * 2^-24 * |a| |b|; twice that, and the float64 sum's own error
        self.margin = (2 * vecs.shape[1] * 2.0 ** -24 + 1e-12) * max(1.0, float(norms.max(initial=0.0)))
        self.cut = threshold - self.margin
        self.linked = finite
        self.lowest = lowest
        self.pending = pending & finite
        self.n_pending = int(self.pending.sum())
        self.best = np.full(n, -np.inf)
        self.rows = np.flatnonzero(self.pending)
        self.rows_vecs = vecs if len(self.rows) == n else vecs[self.rows]  # no copy when all are pending
        self.eager = n <= _EAGER_ROWS
        self.fresh = np.empty(_FRESH_ROWS, dtype=np.int64)
        self.fresh_vecs = np.empty((_FRESH_ROWS, vecs.shape[1]), dtype=np.float32)
        self.n_fresh = 0

    def best_cosine(self, i: int) -> np.float64:
        """Best cosine of segment ``i`` with every kept segment so far (-inf when none counts)."""
        if self.n_fresh and self.linked[i]:
            sims = self.fresh_vecs[:self.n_fresh] @ self.vecs[i]
            top = float(sims.max())
            if top > self.cut and top + self.margin > self.best[i]:  # else no fresh row can beat best
                near = self.fresh[:self.n_fresh][sims > max(self.cut, top - 2 * self.margin)]
                self.best[i] = max(self.best[i], float(self._exact(near, i).max()))
        return self.best[i]

    def _exact(self, a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
        """:func:`pair_cosines` of rows ``a`` and ``b``, the same floats (from the float64 copy when made)."""
        if self.vecs64 is None:
            return pair_cosines(self.vecs, a, b)
        return (self.vecs64[a] * self.vecs64[b]).sum(axis=-1)

    def done(self, i: int) -> None:
        """Segment ``i`` is decided (kept or dropped): its best cosine no longer matters."""
        if self.pending[i]:
            self.pending[i] = False
            self.n_pending -= 1

    def keep(self, j: int, room: int) -> None:
        """Segment ``j`` is kept and ``room`` tokens are left: ``j`` counts for every pending segment
        from now on, and those that can no longer fit are decided (dropped)."""
        if not self.linked[j]:
            return
        if self.eager:  # as a fold of this one row (see _fold): every pending best is exact again
            sims = (self.vecs @ self.vecs[j]).astype(np.float64)
            hit = np.flatnonzero(self.pending & (sims > self.cut) & (sims + self.margin > self.best))
            if len(hit):
                self.best[hit] = np.maximum(self.best[hit], self._exact(hit, j))
            return
        self.fresh[self.n_fresh] = j
        self.fresh_vecs[self.n_fresh] = self.vecs[j]
        self.n_fresh += 1
        if self.n_fresh == _FRESH_ROWS:
            self._fold(room)

    def _fold(self, room: int) -> None:
        self.pending[self.rows[self.lowest[self.rows] > room]] = False
        self.n_pending = int(self.pending.sum())
        if 2 * self.n_pending < len(self.rows):  # drop decided rows once they are half of the block
            self.rows = np.flatnonzero(self.pending)
            self.rows_vecs = self.vecs[self.rows]
        if len(self.rows):
            sims = self.rows_vecs @ self.fresh_vecs[:self.n_fresh].T
            top = sims.max(axis=1).astype(np.float64)
            hit = np.flatnonzero((top > self.cut) & (top + self.margin > self.best[self.rows])
                                 & self.pending[self.rows])
            if len(hit):
                floor = np.maximum(self.cut, top[hit] - 2 * self.margin)
                r, c = np.nonzero(sims[hit] > floor[:, None])
                who, whom = self.rows[hit[r]], self.fresh[c]
                for k in range(0, len(who), _PAIRS_AT_ONCE):  # bounded float64 temporaries
                    part = slice(k, k + _PAIRS_AT_ONCE)
                    np.maximum.at(self.best, who[part], self._exact(who[part], whom[part]))
        self.n_fresh = 0


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
    where ``s`` is its best cosine with a kept segment (lazy greedy: scores only ever drop; a popped
    segment whose score dropped below the next one's goes back with its new score). A cosine is
    :func:`pair_cosines` of the two float32 vectors; a segment whose vector is not finite is never
    penalised and penalises none. Cost: a heap (n log n) plus kept x pending x dim multiply-adds in large
    BLAS products, with memory linear in n (see ``_FRESH_ROWS``).

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
    allowed = np.ones(n, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    # the cheapest a segment can ever be (it bridges two slices, its chunk already paid its overhead);
    # ``used`` only grows, so a segment above ``budget - used`` by this bound never fits again
    lowest = np.asarray(costs, dtype=np.int64) - abs(int(gap_cost))
    aware = vectors is not None and redundancy_weight > 0
    if aware:
        overlap = _KeptOverlap(vectors, allowed & (lowest <= budget), lowest, redundancy_threshold)
    n_kept = 0
    heap = [(s, i) for i, (s, a) in enumerate(zip((-scores).tolist(), allowed.tolist())) if a]
    heapq.heapify(heap)
    slices: dict[int, int] = {}
    used = 0
    # Python lists for the scalar reads of the loop (numpy scalars there cost more than the arithmetic);
    # ``scores`` stays an array so that a penalised score is computed in the same types as before
    g, low, kept = np.asarray(groups).tolist(), lowest.tolist(), [False] * n
    while heap:
        _, i = heapq.heappop(heap)
        if low[i] > budget - used:
            if aware:
                overlap.done(i)
            continue
        if aware and n_kept:
            best = overlap.best_cosine(i)  # a float64 scalar, as before
            current = scores[i] - redundancy_weight * max(0.0, best - redundancy_threshold)
            if heap and current < -heap[0][0]:
                heapq.heappush(heap, (-current, i))  # stale: re-rank it
                continue
        if aware:
            overlap.done(i)
        left = i > 0 and g[i - 1] == g[i] and kept[i - 1]
        right = i + 1 < n and g[i + 1] == g[i] and kept[i + 1]
        have = slices.get(g[i], 0)
        delta_slices = -1 if (left and right) else (0 if (left or right) else 1)
        gaps_before = max(have - 1, 0)
        gaps_after = max(have + delta_slices - 1, 0)
        cost = int(costs[i]) + gap_cost * (gaps_after - gaps_before)
        if have == 0 and group_overheads is not None:
            cost += int(group_overheads[g[i]])
        if used + cost <= budget:
            kept[i] = True
            used += cost
            slices[g[i]] = have + delta_slices
            if aware:
                overlap.keep(i, budget - used)
                n_kept += 1
    return np.array(kept, dtype=bool)
