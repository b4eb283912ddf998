"""Exact inner-product search in torch, on whatever device the vectors live on (CUDA or CPU).

The same answers as FAISS ``IndexFlatIP`` (``range_search`` for pairs at or above a threshold,
``search(k=1)`` for the best stored neighbour), without FAISS: on CUDA the search stays on the device
next to the fingerprints, and a machine without any faiss wheel (e.g. a CUDA 13 image, where
``faiss-gpu-cu12`` lacks its CUDA 12 cuBLAS) still finds repeats. Inner products are float32 (float64
when TF32 matmul is switched on, so that no precision is lost); a pair is kept when ``sim >= threshold``
in float32, as :func:`semtoken_rag.repeats.find_repeats` keeps FAISS's.

Pure functions over tensors plus :class:`DeviceConversationMemory`, the on-device twin of
:class:`semtoken_rag.repeats.ConversationMemory`.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import numpy as np
import torch

from .repeats import EPOCHS, rows_without

logger = logging.getLogger(__name__)

_BLOCK_ELEMENTS = 1 << 24  # similarity entries computed at once (64 MiB of float32)
_CONVERSATION_OVERHEAD = 256  # bytes charged per conversation besides its centroids


def _check(x: torch.Tensor, label: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{label} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{label} must be a 2-D tensor (n, d), got shape {tuple(x.shape)}")
    return x


def _compute_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return torch.float64  # TF32 would round the inputs to 10 mantissa bits
    return torch.float32


def _threshold(threshold: float) -> float:
    t = float(threshold)
    if not np.isfinite(t):
        raise ValueError(f"threshold must be a finite float, got {threshold!r}")
    return float(np.float32(t))


def range_pairs(x: torch.Tensor, threshold: float, y: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All pairs ``(i, j, sim)`` with ``sim = x[i] . y[j] >= threshold`` (``y`` defaults to ``x``, self
    pairs included), sorted by ``i`` then ``j``; int64 indices and float32 sims on ``x``'s device.

    >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    >>> i, j, s = range_pairs(x, 0.9)
    >>> list(zip(i.tolist(), j.tolist()))
    [(0, 0), (0, 2), (1, 1), (2, 0), (2, 2)]
    """
    x = _check(x)
    y = x if y is None else _check(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    t = _threshold(threshold)
    dtype = _compute_dtype(x.device)
    xs, ys = x.to(dtype), y.to(device=x.device, dtype=dtype)
    rows = max(1, _BLOCK_ELEMENTS // max(len(y), 1))
    parts_i, parts_j, parts_s = [], [], []
    for a in range(0, len(x), rows):
        sims = (xs[a:a + rows] @ ys.T).float()
        qi, nj = torch.nonzero(sims >= t, as_tuple=True)
        parts_i.append(qi + a)
        parts_j.append(nj)
        parts_s.append(sims[qi, nj])
    if not parts_i:
        empty = torch.zeros(0, dtype=torch.int64, device=x.device)
        return empty, empty.clone(), torch.zeros(0, dtype=torch.float32, device=x.device)
    return torch.cat(parts_i), torch.cat(parts_j), torch.cat(parts_s)


def best_similarity(x: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Per row of ``x``, its largest inner product with a row of ``stored`` (``-inf`` when empty);
    FAISS ``IndexFlatIP.search(x, 1)``'s distances.

    >>> best_similarity(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), torch.tensor([[0.0, 1.0]])).tolist()
    [0.0, 0.800000011920929]
    """
    x, stored = _check(x), _check(stored, "stored")
    if len(stored) == 0 or len(x) == 0:
        return torch.full((len(x),), float("-inf"), device=x.device)
    dtype = _compute_dtype(x.device)
    xs, ss = x.to(dtype), stored.to(device=x.device, dtype=dtype)
    rows = max(1, _BLOCK_ELEMENTS // len(stored))
    return torch.cat([(xs[a:a + rows] @ ss.T).amax(dim=1).float() for a in range(0, len(x), rows)])


def repeat_candidates(centroids: torch.Tensor, groups: torch.Tensor, rank: torch.Tensor, threshold: float,
                      eligible: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(q, j)`` where eligible span ``q`` may repeat eligible span ``j`` (another group, better
    ranked, ``cos >= threshold``), in the order the greedy pass of ``find_repeats`` reads them: by
    ``rank[q]``, then similarity (highest first), then ``rank[j]``. One device-to-host transfer.

    >>> c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    >>> q, j = repeat_candidates(c, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2]), 0.95,
    ...                          torch.ones(3, dtype=torch.bool))
    >>> q.tolist(), j.tolist()
    ([2], [0])
    """
    idx = torch.nonzero(eligible, as_tuple=True)[0]
    if len(idx) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    qi, nj, sims = range_pairs(centroids[idx], threshold)
    q, j = idx[qi], idx[nj]
    keep = (groups[q] != groups[j]) & (rank[j] < rank[q])
    q, j, sims = q[keep], j[keep], sims[keep]
    # lexsort by (rank[q], -sim, rank[j]): stable sorts from the last key to the first
    order = torch.argsort(rank[j], stable=True)
    order = order[torch.argsort(-sims[order], stable=True)]
    order = order[torch.argsort(rank[q][order], stable=True)]
    out = torch.stack([q[order], j[order]]).cpu().numpy()
    return out[0], out[1]


class DeviceConversationMemory:
    """Span centroids already sent to each conversation, kept as float32 tensors on ``device``.

    The API and bounds of :class:`semtoken_rag.repeats.ConversationMemory` (``add``, ``query``,
    ``spans``, ``nbytes``, ``forget``, ``clear``; ``max_conversations``, ``max_spans``, ``max_bytes``,
    least recently used first) without FAISS; bytes count the one copy held on the device. ``query``
    also accepts a tensor and then returns a bool tensor on the device, so a call on CUDA stays there.

    >>> mem = DeviceConversationMemory(device="cpu")
    >>> epoch = mem.add("chat-1", np.array([[1, 0]], np.float32))
    >>> mem.query("chat-1", np.array([[1, 0], [0, 1]], np.float32), threshold=0.9).tolist()
    [True, False]
    """

    def __init__(self, max_conversations: int = 1024, max_spans: int = 4096, max_bytes: int = 64 * 2**20,
                 device: str | torch.device = "cpu") -> None:
        for label, value in (("max_conversations", max_conversations), ("max_spans", max_spans),
                             ("max_bytes", max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an int >= 1, got {value!r}")
        self.max_conversations, self.max_spans, self.max_bytes = max_conversations, max_spans, max_bytes
        self.device = torch.device(device)
        self._lock = threading.RLock()
        self._convs: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._epochs: dict[str, int] = {}  # as ConversationMemory's
        self._bytes = 0

    @staticmethod
    def _size(vectors: torch.Tensor) -> int:
        return _CONVERSATION_OVERHEAD + vectors.element_size() * vectors.nelement()

    def _tensor(self, centroids: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = centroids if isinstance(centroids, torch.Tensor) else torch.from_numpy(
            np.ascontiguousarray(centroids, dtype=np.float32))
        if x.ndim != 2:
            raise ValueError(f"centroids must be a 2-D array (n, d), got shape {tuple(x.shape)}")
        return x.to(device=self.device, dtype=torch.float32)

    def add(self, conversation_id: str, centroids: np.ndarray | torch.Tensor) -> int:
        """Record that ``conversation_id`` received spans with these centroids (newest kept); returns the
        conversation's epoch (as ConversationMemory.add)."""
        x = self._tensor(centroids)
        with self._lock:
            old = self._convs.pop(conversation_id, None)
            if old is None:
                self._epochs[conversation_id] = next(EPOCHS)
            epoch = self._epochs[conversation_id]
            if old is not None:
                self._bytes -= self._size(old)
                if old.shape[1] != x.shape[1]:
                    self._convs[conversation_id] = old
                    self._bytes += self._size(old)
                    raise ValueError(f"dimension {x.shape[1]} != {old.shape[1]} for {conversation_id!r}")
            vectors = x if old is None else torch.cat([old, x])
            row = x.shape[1] * 4
            fit = self.max_spans if row == 0 else min(self.max_spans,
                                                      (self.max_bytes - _CONVERSATION_OVERHEAD) // row)
            if fit <= 0:
                logger.debug("conversation memory: %r does not fit max_bytes; not kept", conversation_id)
                self._epochs.pop(conversation_id, None)
                return epoch
            vectors = vectors[len(vectors) - min(fit, len(vectors)):]
            self._convs[conversation_id] = vectors
            self._bytes += self._size(vectors)
            while len(self._convs) > self.max_conversations or self._bytes > self.max_bytes:
                dropped, vecs = self._convs.popitem(last=False)
                self._epochs.pop(dropped, None)
                self._bytes -= self._size(vecs)
                logger.debug("conversation memory: dropped %r", dropped)
            return epoch

    def remove(self, conversation_id: str, centroids: np.ndarray | torch.Tensor, epoch: int) -> None:
        """Take back centroids :meth:`add` recorded for ``conversation_id`` in ``epoch`` (what a cancelled
        call sent), as ConversationMemory.remove."""
        x = self._tensor(centroids)
        with self._lock:
            old = self._convs.get(conversation_id)
            if old is None or self._epochs.get(conversation_id) != epoch or not len(x) or old.shape[1] != x.shape[1]:
                return
            keep = rows_without(old.cpu().numpy(), x.cpu().numpy())
            if keep.all():
                return
            if not keep.any():
                self.forget(conversation_id)
                return
            vectors = old[torch.from_numpy(keep).to(old.device)]
            self._convs[conversation_id] = vectors
            self._bytes += self._size(vectors) - self._size(old)

    def _after_fork(self) -> None:
        self._lock = threading.RLock()

    def query(self, conversation_id: str, centroids: np.ndarray | torch.Tensor, threshold: float
              ) -> np.ndarray | torch.Tensor:
        """Which centroids have a stored neighbour with cosine >= ``threshold`` (numpy in, numpy out;
        tensor in, bool tensor on the device out)."""
        as_tensor = isinstance(centroids, torch.Tensor)
        x = self._tensor(centroids)
        t = _threshold(threshold)
        with self._lock:
            stored = self._convs.get(conversation_id)
            if stored is not None:
                self._convs.move_to_end(conversation_id)
                if stored.shape[1] != x.shape[1]:
                    raise ValueError(f"dimension {x.shape[1]} != {stored.shape[1]} for {conversation_id!r}")
        if stored is None or len(x) == 0:
            hit = torch.zeros(len(x), dtype=torch.bool, device=self.device)
        else:
            hit = best_similarity(x, stored) >= t
        return hit if as_tensor else hit.cpu().numpy()

    def spans(self, conversation_id: str) -> int:
        """Number of centroids stored for ``conversation_id`` (0 if unknown)."""
        with self._lock:
            stored = self._convs.get(conversation_id)
            return 0 if stored is None else len(stored)

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
                self._bytes -= self._size(old)
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


def find_repeats_torch(centroids: torch.Tensor, groups: np.ndarray, order: np.ndarray, threshold: float,
                       eligible: np.ndarray | None = None) -> np.ndarray:
    """:func:`semtoken_rag.repeats.find_repeats` with the search in torch on ``centroids``' device.

    Same inputs (``centroids`` a tensor here) and the same answer: per span, the index of a
    higher-priority span in another group that it repeats, else -1.

    >>> c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    >>> find_repeats_torch(c, np.array([0, 0, 1]), np.array([0, 1, 2]), 0.95).tolist()
    [-1, -1, 0]
    """
    x = _check(centroids, "centroids")
    n = x.shape[0]
    groups, order = np.asarray(groups), np.asarray(order)
    ok_mask = np.ones(n, bool) if eligible is None else np.asarray(eligible, dtype=bool)
    for label, arr in (("groups", groups), ("order", order), ("eligible", ok_mask)):
        if arr.shape != (n,):
            raise ValueError(f"{label} must have shape ({n},), got {arr.shape}")
    if not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError("order must be a permutation of range(n)")
    _threshold(threshold)
    out = [-1] * n
    if ok_mask.sum() < 2 or x.shape[1] == 0:
        return np.asarray(out, dtype=np.int64)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    dev = x.device
    q, j = repeat_candidates(x, torch.as_tensor(groups, device=dev), torch.as_tensor(rank, device=dev),
                             threshold, torch.as_tensor(ok_mask, device=dev))
    for a, b in zip(q.tolist(), j.tolist()):
        if out[a] == -1 and out[b] == -1:  # b's status is final: all its own pairs came earlier
            out[a] = b
    return np.asarray(out, dtype=np.int64)
