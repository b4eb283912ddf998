"""Repeats: spans whose centroids repeat content kept elsewhere in the call or sent earlier.

* :func:`find_repeats`: one FAISS range search over the call's span centroids, then a greedy pass in
  priority order.
* :class:`ConversationMemory`: the centroids already sent to each conversation, bounded in bytes
  (over all conversations), in spans per conversation and in conversations.

Only numpy and the standard library are imported at module import; faiss is imported lazily.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_CONVERSATION_OVERHEAD = 512  # bytes charged per conversation for Python objects
_GPU = threading.local()  # StandardGpuResources is not thread-safe: one per thread


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise ImportError("repeat detection needs FAISS: pip install faiss-cpu "
                          "(or 'semtoken-rag[gpu]' for faiss-gpu on CUDA machines)") from e
    return faiss


def _matrix(centroids: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(centroids, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"centroids must be a 2-D array (n, d), got shape {x.shape}")
    return x


EPOCHS = itertools.count(1)  # conversation epochs (ConversationMemory.add), unique in the process


def rows_without(vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Mask of ``vectors``' rows to keep once each of ``rows`` is taken out (one equal row each, the newest;
    a row not found is passed over).

    >>> rows_without(np.array([[1, 0], [0, 1], [1, 0]], np.float32), np.array([[1, 0]], np.float32)).tolist()
    [True, True, False]
    """
    wanted: dict[bytes, int] = {}
    for r in rows:
        wanted[r.tobytes()] = wanted.get(r.tobytes(), 0) + 1
    keep = np.ones(len(vectors), dtype=bool)
    for i in range(len(vectors) - 1, -1, -1):
        if not wanted:
            break
        b = vectors[i].tobytes()
        if wanted.get(b):
            keep[i] = False
            wanted[b] -= 1
            if not wanted[b]:
                del wanted[b]
    return keep


def faiss_gpu_available() -> bool:
    """True when the installed faiss has GPU support and sees at least one GPU."""
    faiss = _faiss()
    try:
        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except RuntimeError:
        return False


def _neighbors(x: np.ndarray, threshold: float, use_gpu: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i, j, sim) with inner product ``x[i] . x[j] >= threshold`` (self pairs included)."""
    faiss = _faiss()
    cpu = faiss.IndexFlatIP(x.shape[1])
    cpu.add(x)
    rows = np.arange(len(x))
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if use_gpu:
        try:
            if getattr(_GPU, "res", None) is None:
                _GPU.res = faiss.StandardGpuResources()
            k = min(len(x), 256)
            sims, ids = faiss.index_cpu_to_gpu(_GPU.res, 0, cpu).search(x, k)
            ok = (ids >= 0) & (sims >= threshold)
            full = ok[:, -1] if k < len(x) else np.zeros(len(x), bool)  # maybe more than k: redo on CPU
            qi, col = np.nonzero(ok & ~full[:, None])
            parts.append((qi, ids[qi, col], sims[qi, col]))
            rows = np.flatnonzero(full)
        except (RuntimeError, AttributeError) as e:
            logger.debug("FAISS GPU search failed (%s); using CPU", e)
            parts, rows = [], np.arange(len(x))
    if len(rows):
        radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # faiss keeps sim > radius
        lims, sims, ids = cpu.range_search(x[rows], radius)
        qi = np.repeat(rows, np.diff(lims.astype(np.int64)))
        keep = sims >= threshold
        parts.append((qi[keep], ids[keep], sims[keep]))
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))  # type: ignore[return-value]


def exact_repeats(keys: np.ndarray, order: np.ndarray, eligible: np.ndarray | None = None) -> np.ndarray:
    """For each span, the index of the first span in ``order`` (best first) with the same ``key``, when
    that is another span; else -1. Ineligible spans are never marked and never used as originals.

    >>> exact_repeats(np.array([7, 3, 7, 7]), order=np.array([2, 0, 1, 3])).tolist()
    [2, -1, -1, 2]
    >>> exact_repeats(np.array([7, 3, 7]), order=np.array([2, 0, 1]), eligible=np.array([1, 1, 0], bool)).tolist()
    [-1, -1, -1]
    """
    keys, order = np.asarray(keys), np.asarray(order)
    n = len(keys)
    out = np.full(n, -1, dtype=np.int64)
    ok = np.ones(n, dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    if n < 2 or ok.sum() < 2:
        return out
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    idx = np.flatnonzero(ok)
    by = idx[np.lexsort((rank[idx], keys[idx]))]  # by key, best first within a key
    first = np.concatenate([[True], keys[by[1:]] != keys[by[:-1]]])
    head = by[np.maximum.accumulate(np.where(first, np.arange(len(by)), 0))]
    out[by[~first]] = head[~first]
    return out


def find_repeats(centroids: np.ndarray, groups: np.ndarray, order: np.ndarray, threshold: float,
                 eligible: np.ndarray | None = None, *, use_gpu: bool | None = None) -> np.ndarray:
    """For each span, the index of a higher-priority span it repeats, else -1.

    ``centroids`` (n, d) are L2-normalised span centroids, ``groups`` (n,) the chunk of each span,
    ``order`` (n,) a permutation of ``range(n)``, best first. Span ``i`` repeats span ``j`` when they
    belong to different groups, ``j`` comes earlier in ``order``, ``cos >= threshold`` and ``j`` is
    not a repeat itself; among such ``j`` the most similar wins. Ineligible spans are never marked and
    never used as originals. One FAISS range search, then one greedy pass in priority order.
    ``use_gpu=None`` uses a FAISS GPU index when available (falls back to CPU).

    >>> c = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    >>> find_repeats(c, groups=np.array([0, 0, 1]), order=np.array([0, 1, 2]), threshold=0.95).tolist()
    [-1, -1, 0]
    """
    x = _matrix(centroids)
    n = x.shape[0]
    groups, order = np.asarray(groups), np.asarray(order)
    ok_mask = np.ones(n, bool) if eligible is None else np.asarray(eligible, dtype=bool)
    for label, arr in (("groups", groups), ("order", order), ("eligible", ok_mask)):
        if arr.shape != (n,):
            raise ValueError(f"{label} must have shape ({n},), got {arr.shape}")
    if not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError("order must be a permutation of range(n)")
    if not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite float, got {threshold!r}")
    result = np.full(n, -1, dtype=np.int64)
    idx = np.flatnonzero(ok_mask)
    if idx.size < 2 or n == 0 or x.shape[1] == 0:
        return result
    gpu = faiss_gpu_available() if use_gpu is None else bool(use_gpu)
    qi, nj, sims = _neighbors(x[idx], float(threshold), gpu)
    q, j = idx[qi], idx[nj]
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    keep = (groups[q] != groups[j]) & (rank[j] < rank[q])
    q, j, sims = q[keep], j[keep], sims[keep]
    sort = np.lexsort((rank[j], -sims, rank[q]))  # by query priority, then similarity, then original priority
    out = result.tolist()
    for a, b in zip(q[sort].tolist(), j[sort].tolist()):
        if out[a] == -1 and out[b] == -1:  # b's status is final: all its own pairs came earlier
            out[a] = b
    return np.asarray(out, dtype=np.int64)



class ConversationMemory:
    """Span centroids already sent to each conversation, for recognising repeats across turns.

    Bounds, all enforced on ``add``: the newest ``max_spans`` centroids per conversation, at most
    ``max_conversations`` conversations, and ``max_bytes`` over all of them (the centroids and the
    FAISS index's copy of them, plus a small overhead per conversation). Past a bound the least
    recently used conversations go first; a conversation that alone exceeds ``max_bytes`` keeps its
    newest centroids that fit. Thread-safe; CPU FAISS ``IndexFlatIP``.

    >>> mem = ConversationMemory()
    >>> epoch = mem.add("chat-1", np.array([[1, 0]], np.float32))
    >>> mem.query("chat-1", np.array([[1, 0], [0, 1]], np.float32), threshold=0.9).tolist()
    [True, False]
    >>> mem.query("chat-2", np.array([[1, 0]], np.float32), threshold=0.9).tolist()
    [False]
    >>> len(mem), mem.nbytes
    (1, 528)
    """

    def __init__(self, max_conversations: int = 1024, max_spans: int = 4096, max_bytes: int = 64 * 2**20
                 ) -> None:
        for label, value in (("max_conversations", max_conversations), ("max_spans", max_spans),
                             ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an int >= 1, got {value!r}")
        self.max_conversations, self.max_spans, self.max_bytes = max_conversations, max_spans, max_bytes
        self._lock = threading.RLock()
        self._convs: OrderedDict[str, tuple[np.ndarray, Any]] = OrderedDict()
        self._epochs: dict[str, int] = {}  # per conversation, a number new each time it starts afresh
        self._bytes = 0

    @staticmethod
    def _size(vectors: np.ndarray) -> int:
        return _CONVERSATION_OVERHEAD + 2 * vectors.nbytes  # our copy and the index's

    def add(self, conversation_id: str, centroids: np.ndarray) -> int:
        """Record that ``conversation_id`` received spans with these centroids; returns the conversation's
        epoch (:meth:`remove`)."""
        x = _matrix(centroids)
        with self._lock:
            old = self._convs.pop(conversation_id, None)
            if old is None:
                self._epochs[conversation_id] = next(EPOCHS)
            epoch = self._epochs[conversation_id]
            if old is not None:
                self._bytes -= self._size(old[0])
                if old[0].shape[1] != x.shape[1]:
                    self._convs[conversation_id] = old
                    self._bytes += self._size(old[0])
                    raise ValueError(f"dimension {x.shape[1]} != {old[0].shape[1]} for {conversation_id!r}")
            vectors = x if old is None else np.concatenate([old[0], x])
            row = 2 * x.shape[1] * x.itemsize
            fit = self.max_spans if row == 0 else min(self.max_spans,
                                                      (self.max_bytes - _CONVERSATION_OVERHEAD) // row)
            if fit <= 0:
                logger.debug("conversation memory: %r does not fit max_bytes; not kept", conversation_id)
                self._epochs.pop(conversation_id, None)
                return epoch
            if old is not None and len(vectors) <= fit:
                index = old[1]
                index.add(x)
            else:
                vectors = vectors[len(vectors) - min(fit, len(vectors)):]
                index = _faiss().IndexFlatIP(x.shape[1])
                index.add(vectors)
            self._convs[conversation_id] = (vectors, index)
            self._bytes += self._size(vectors)
            while len(self._convs) > self.max_conversations or self._bytes > self.max_bytes:
                dropped, (vecs, _) = self._convs.popitem(last=False)
                self._epochs.pop(dropped, None)
                self._bytes -= self._size(vecs)
                logger.debug("conversation memory: dropped %r", dropped)
            return epoch

    def remove(self, conversation_id: str, centroids: np.ndarray, epoch: int) -> None:
        """Take back centroids :meth:`add` recorded for ``conversation_id`` in ``epoch`` (what a cancelled
        call sent: it never reached the conversation): nothing once the conversation was forgotten or
        dropped since (it started afresh: equal rows are another call's); rows a bound trimmed meanwhile are
        passed over, and what the add trimmed or evicted stays gone. A conversation left with no rows goes."""
        x = _matrix(centroids)
        with self._lock:
            old = self._convs.get(conversation_id)
            if old is None or self._epochs.get(conversation_id) != epoch or not len(x) \
                    or old[0].shape[1] != x.shape[1]:
                return
            keep = rows_without(old[0], x)
            if keep.all():
                return
            if not keep.any():
                self.forget(conversation_id)
                return
            vectors = np.ascontiguousarray(old[0][keep])
            index = _faiss().IndexFlatIP(x.shape[1])
            index.add(vectors)
            self._convs[conversation_id] = (vectors, index)
            self._bytes += self._size(vectors) - self._size(old[0])

    def _after_fork(self) -> None:
        self._lock = threading.RLock()

    def query(self, conversation_id: str, centroids: np.ndarray, threshold: float) -> np.ndarray:
        """Bool mask: which centroids have a stored neighbour with cosine >= ``threshold``."""
        x = _matrix(centroids)
        with self._lock:
            conv = self._convs.get(conversation_id)
            if conv is None or len(x) == 0:
                return np.zeros(len(x), dtype=bool)
            self._convs.move_to_end(conversation_id)
            if conv[0].shape[1] != x.shape[1]:
                raise ValueError(f"dimension {x.shape[1]} != {conv[0].shape[1]} for {conversation_id!r}")
            sims, _ = conv[1].search(x, 1)
        return sims[:, 0] >= threshold

    def spans(self, conversation_id: str) -> int:
        """Number of centroids stored for ``conversation_id`` (0 if unknown)."""
        with self._lock:
            conv = self._convs.get(conversation_id)
            return 0 if conv is None else len(conv[0])

    @property
    def nbytes(self) -> int:
        """Bytes held over all conversations, as counted against ``max_bytes``."""
        with self._lock:
            return self._bytes

    def forget(self, conversation_id: str) -> bool:
        """Drop one conversation; ``True`` if it was known."""
        with self._lock:
            old = self._convs.pop(conversation_id, None)
            self._epochs.pop(conversation_id, None)
            if old is not None:
                self._bytes -= self._size(old[0])
            return old is not None

    def clear(self) -> None:
        with self._lock:
            self._convs.clear()
            self._epochs.clear()
            self._bytes = 0

    def __contains__(self, conversation_id: object) -> bool:
        with self._lock:
            return conversation_id in self._convs

    def __len__(self) -> int:
        with self._lock:
            return len(self._convs)
