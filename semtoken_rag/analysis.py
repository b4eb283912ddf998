"""What a chunk's text and fingerprints say regardless of the query, worked out once per chunk.

A call's host-side work was mostly per-chunk and query-independent, yet redone on every call: the
budget tokens of each unit, sentence and markdown structure, protected groups, fenced blocks, the
span clustering (Algorithm 1), the units the encoder could not see, the search terms of the lexical
evidence and the answer-type candidates. :class:`AnalysisMemo` keeps them per chunk in a byte-bounded
LRU; :meth:`AnalysisMemo.analyse` gives a whole call's arrays, computing only what it lacks (missing
chunks in one batch: one tokenizer call, one clustering pass).

Entries are keyed by the chunk's text and by an :class:`AnalysisSpec`: the budget tokenizer, the
protect patterns, the segment caps, the clustering parameters and the encoder's identity, so a memo
shared by engines of different configurations never hands one the other's results.

Every array equals what the per-call code computes on the whole call: segment breaks never cross a
chunk end (its last unit always ends a sentence), protected groups and fenced blocks are renumbered
per call, and a chunk's clustering never looks past its last unit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import itertools
import sys
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import evidence as ev
from . import spans as sp
from . import structure as st
from .budget import BudgetTokenizer
from .lru import ByteLRU

__all__ = ["STORED_NAMESPACE", "STORED_VERSION", "AnalysisMemo", "AnalysisSpec", "CallAnalysis", "CallStats",
           "ChunkAnalysis", "ChunkStats", "analyse_for_store", "call_stats", "chunk_stats", "chunk_stats_many", "from_stored", "stored_prefix",
           "tokenizer_identity", "window_entropy"]

_ENTRY_OVERHEAD = 512  # the entry object, its dict and its LRU slot, roughly
_ROWS_AT_ONCE = 16384  # float64 rows converted at once by the vector statistics (24 MiB at d = 384)
_STR_OVERHEAD = sys.getsizeof("")  # a str object's own bytes besides its characters (ASCII)

# A chunk's analysis and vector statistics are kept in its fingerprint entry, beside the fingerprints they were
# worked out from (issue 10: a replica's first call on pre-warmed chunks analysed them all again). Their arrays
# are named after this version, the settings and the versions of the libraries that shape them
# (stored_prefix); bump it whenever the arrays a chunk gets for the same text, fingerprints and settings
# change (tests/test_stored_analysis.py holds a digest of what sample chunks get and fails until it is
# bumped), so that no replica reads another version's.
STORED_VERSION = 1
STORED_NAMESPACE = "analysis."  # every stored analysis array's name starts so (an entry keeps one analysis)
_MAX_UNIT_TOKENS = 1 << 32  # (a word's budget tokens: a stored count above this is not one)
_STORED_LIBRARIES = ("semtoken-rag", "sentencex", "quicktok-v1", "regex", "numpy", "torch")


def tokenizer_identity(tokenizer: BudgetTokenizer) -> Hashable:
    """What makes two budget tokenizers count alike: the encoding's name when given by name, else the
    tokenizer object itself (a callable or a tokenizer object is only known to count like itself)."""
    return ("name", tokenizer.spec) if isinstance(tokenizer.spec, str) else ("object", tokenizer)


@dataclass(frozen=True)
class AnalysisSpec:
    """Everything a chunk's analysis depends on besides its text and fingerprints."""

    tokenizer: BudgetTokenizer
    patterns: tuple[Any, ...]  # compiled protect regexes
    max_segment_units: int
    max_segment_tokens: int
    tau: float
    max_span_units: int
    namespace: str  # the encoder's identity: the fingerprints a chunk's text gets
    language: str = "en"  # sentence segmentation's language (spans.sentence_ends)
    key: Hashable = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (
            tokenizer_identity(self.tokenizer), tuple((p.pattern, p.flags) for p in self.patterns),
            self.max_segment_units, self.max_segment_tokens, float(self.tau), self.max_span_units,
            self.namespace, self.language))


@dataclass
class ChunkAnalysis:
    """One chunk's query-independent arrays, per unit (its ``k`` words): ``costs`` budget tokens (with
    the whitespace before the unit), ``breaks`` segment ends (structure, caps, protected groups joined),
    ``group`` protected group (``-1`` none, ids local to the chunk), ``block`` fenced block (same),
    ``fence`` fence-line flags, ``blind`` units that carry the previous unit's vector, ``bounds`` the
    span boundaries of local clustering (``[0, ..., k]``). ``extras`` holds what only some calls need
    (search terms, answer-type candidates), filled on first use."""

    costs: np.ndarray
    breaks: np.ndarray
    group: np.ndarray
    block: np.ndarray
    fence: np.ndarray
    blind: np.ndarray
    bounds: np.ndarray
    total: int = -1  # budget tokens of the whole text (-1: not known)
    extras: dict[Hashable, Any] = field(default_factory=dict)
    nbytes: int = 0

    def size(self, text: str) -> int:
        arrays = (self.costs, self.breaks, self.group, self.block, self.fence, self.blind, self.bounds)
        return (_ENTRY_OVERHEAD + sys.getsizeof(text) + sum(a.nbytes for a in arrays)
                + sum(_sizeof(v) for v in self.extras.values()))


@dataclass
class CallAnalysis:
    """A call's arrays (chunks concatenated): ``costs``, ``breaks``, ``group`` and ``block`` (ids unique
    over the call), ``fence``, ``blind``, ``bounds`` (global span boundaries); ``chunks`` the per-chunk
    entries, in order."""

    costs: np.ndarray
    breaks: np.ndarray
    group: np.ndarray
    block: np.ndarray
    fence: np.ndarray
    blind: np.ndarray
    bounds: np.ndarray
    chunks: list[ChunkAnalysis]


class AnalysisMemo:
    """Per-chunk analyses in an LRU of at most ``max_bytes`` bytes (0 keeps nothing); thread-safe.

    ``hits`` and ``misses`` count chunks served from the memo and analysed afresh.
    """

    def __init__(self, max_bytes: int) -> None:
        self._lru: ByteLRU[ChunkAnalysis] = ByteLRU(max_bytes, sizeof=lambda a: a.nbytes)
        self._extras_lock = threading.Lock()  # (extra: an entry's extras are made and counted once)
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    @property
    def max_bytes(self) -> int:
        return self._lru.max_bytes

    def __len__(self) -> int:
        return len(self._lru)

    def clear(self) -> None:
        self._lru.clear()

    def counts(self, spec: AnalysisSpec, texts: Sequence[str]) -> np.ndarray:
        """Budget tokens of each whole text: memoised with its analysis, else counted (one call)."""
        out = np.zeros(len(texts), dtype=np.int64)
        todo = []
        for i, t in enumerate(texts):
            entry = self._lru.get((spec.key, t))
            if entry is not None and entry.total >= 0:
                out[i] = entry.total
            else:
                todo.append(i)
        if todo:
            out[todo] = spec.tokenizer.count_many([texts[i] for i in todo])
        return out

    def analyse(self, spec: AnalysisSpec, chunks: Sequence[str], units: Sequence[np.ndarray],
                vectors: torch.Tensor, offsets: np.ndarray, totals: np.ndarray | None = None,
                normed: torch.Tensor | None = None,
                stored: Callable[[int], ChunkAnalysis | None] | None = None) -> CallAnalysis:
        """The call's analysis: ``units[i]`` are chunk ``i``'s char spans, ``vectors`` the call's unit
        vectors (float32, chunks concatenated, ``offsets`` the unit offset of each chunk); ``totals``
        the whole texts' budget tokens when known (kept with new entries for :meth:`counts`); ``normed``
        the vectors L2-normalised when the caller has them (else normalised here, the same rows);
        ``stored(i)``: chunk ``i``'s analysis as a store kept it (:func:`from_stored`), asked only for
        chunks the memo lacks, held like one worked out here (a hit, not a miss)."""
        entries: list[ChunkAnalysis | None] = [self._lru.get((spec.key, t)) for t in chunks]
        todo = [i for i, e in enumerate(entries) if e is None]
        if todo and stored is not None:
            for i in todo:
                entry = stored(i)
                if entry is not None:
                    if totals is not None:
                        entry.total = int(totals[i])
                    entry.nbytes = entry.size(chunks[i])
                    entries[i] = entry
                    self._lru.put((spec.key, chunks[i]), entry)
            todo = [i for i in todo if entries[i] is None]
        self.hits += len(chunks) - len(todo)
        self.misses += len(todo)
        if todo:
            def rows(v: torch.Tensor | None) -> list[torch.Tensor] | None:
                if v is None:
                    return None
                return [v] if len(todo) == len(chunks) else [v[int(offsets[i]):int(offsets[i + 1])] for i in todo]

            fresh = _analyse_chunks(spec, [chunks[i] for i in todo], [units[i] for i in todo], rows(vectors),
                                    rows(normed))
            for i, entry in zip(todo, fresh):
                if totals is not None:
                    entry.total = int(totals[i])
                entry.nbytes = entry.size(chunks[i])
                entries[i] = entry
                self._lru.put((spec.key, chunks[i]), entry)
        done: list[ChunkAnalysis] = entries  # type: ignore[assignment]
        return _join(done, offsets)

    def extra(self, spec: AnalysisSpec, text: str, entry: ChunkAnalysis, name: Hashable, make) -> Any:
        """``entry.extras[name]``, computed by ``make()`` on first use (the entry's bytes recounted)."""
        value = entry.extras.get(name)
        if value is None:
            made = make()  # (outside the lock: concurrent calls on the same chunk may both make it)
            with self._extras_lock:  # the first one made is kept and counted, once
                value = entry.extras.setdefault(name, made)
                if value is made:
                    entry.nbytes += _sizeof(value)  # (the entry's other parts are counted already)
            key = (spec.key, text)
            if value is made and key in self._lru:
                self._lru.put(key, entry)
        return value


def _sizeof(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (list, tuple, set, frozenset)):
        if type(next(iter(value), "")) is str:  # search terms, candidate words: the usual case, in C
            return sys.getsizeof(value) + sum(map(len, value)) + _STR_OVERHEAD * len(value)  # (as if ASCII)
        return sys.getsizeof(value) + sum(_sizeof(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sys.getsizeof(value) + sum(_sizeof(getattr(value, f.name)) for f in dataclasses.fields(value))
    return sys.getsizeof(value)


def _analyse_chunks(spec: AnalysisSpec, texts: list[str], units: list[np.ndarray],
                    vectors: list[torch.Tensor], normed: list[torch.Tensor] | None = None) -> list[ChunkAnalysis]:
    # budget tokens of each unit with the whitespace before it: one tokenizer call for every chunk
    pieces: list[str] = []
    for text, u in zip(texts, units):
        if len(u):
            prev = np.concatenate([[u[0, 0]], u[:-1, 1]])
            pieces.extend(text[a:e] for a, e in zip(prev.tolist(), u[:, 1].tolist()))
    all_costs = spec.tokenizer.count_pieces(pieces)
    sizes = [len(u) for u in units]
    cuts = np.cumsum([0, *sizes])
    breaks_all, groups = [], []
    for k, (text, u) in enumerate(zip(texts, units)):
        costs = all_costs[cuts[k]:cuts[k + 1]]
        br = st.structure_break_after(text, u, sp.sentence_break_after(text, u, spec.language))
        group = st.protected_groups(text, u, spec.patterns)
        if len(u) > spec.max_segment_units and np.diff(sp.segment_bounds(br)).max() > spec.max_segment_units:
            br = sp.cap_segments(br, spec.max_segment_units, sp.clause_ends(text, u))  # (else: nothing to cut)
        br = sp.cap_segment_costs(br, costs, spec.max_segment_tokens)
        breaks_all.append(st.join_groups(br, group))
        groups.append(group)
    # local clustering of all new chunks in one pass: a chunk's last unit is a break, so no span and
    # no similarity that counts crosses into the next chunk
    joined = torch.cat(vectors) if len(vectors) > 1 else (vectors[0] if vectors else torch.zeros((0, 1)))
    joined_normed = None if normed is None else (torch.cat(normed) if len(normed) > 1 else normed[0])
    n = int(joined.shape[0])
    bounds = sp.local_clusters(joined, np.concatenate(breaks_all) if breaks_all else np.zeros(0, bool),
                               spec.tau, spec.max_span_units, normed=joined_normed) if n \
        else np.zeros(1, dtype=np.int64)
    # units whose vector copies the previous unit's (same chunk)
    same = np.zeros(n, dtype=bool)
    if n > 1:  # (rows equal in their first column are few: only those are compared whole)
        maybe = torch.nonzero(joined[1:, 0] == joined[:-1, 0]).flatten()
        if len(maybe):
            whole = (joined[maybe + 1] == joined[maybe]).all(dim=-1)
            same[(maybe[whole] + 1).cpu().numpy()] = True
    out = []
    for k, (text, u) in enumerate(zip(texts, units)):
        a, b = int(cuts[k]), int(cuts[k + 1])
        block, fence = st.fence_roles(text, u)
        blind = same[a:b].copy()
        if len(blind):
            blind[0] = False
        lo, hi = np.searchsorted(bounds, [a, b])
        out.append(ChunkAnalysis(all_costs[a:b].copy(), breaks_all[k], groups[k], block, fence, blind,
                                 bounds[lo:hi + 1] - a))
    return out


def _rebase(ids: list[np.ndarray]) -> np.ndarray:
    """Per-chunk ids (``-1``: none) made unique over the call, chunk after chunk."""
    out, base = [], 0
    for g in ids:
        top = int(g.max()) if len(g) else -1
        out.append(np.where(g >= 0, g + base, -1) if base and top >= 0 else g)
        base += top + 1 if top >= 0 else 0
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _join(entries: list[ChunkAnalysis], offsets: np.ndarray) -> CallAnalysis:
    def cat(name: str, dtype) -> np.ndarray:
        return np.concatenate([getattr(e, name) for e in entries]).astype(dtype, copy=False) if entries \
            else np.zeros(0, dtype=dtype)

    bounds = [np.zeros(1, dtype=np.int64)]
    for e, off in zip(entries, offsets[:-1].tolist()):
        if len(e.bounds) > 1:
            bounds.append(e.bounds[1:] + off)
    return CallAnalysis(cat("costs", np.int64), cat("breaks", bool),
                        _rebase([e.group for e in entries]).astype(np.int64, copy=False),
                        _rebase([e.block for e in entries]).astype(np.int64, copy=False),
                        cat("fence", bool), cat("blind", bool), np.concatenate(bounds), entries)


def unit_term_codes(memo: AnalysisMemo, spec: AnalysisSpec, chunks: Sequence[str], units: Sequence[np.ndarray],
                    call: CallAnalysis) -> np.ndarray:
    """The search term of each unit of the call (:func:`semtoken_rag.evidence.unit_terms`) as its
    :func:`semtoken_rag.evidence.term_codes`, memoised per chunk (what BM25 reads)."""
    parts = [memo.extra(spec, text, e, "term_codes", lambda t=text, x=u, e=e: ev.word_term_codes(
        _words(memo, spec, t, x, e))) for text, u, e in zip(chunks, units, call.chunks)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def segment_keys(memo: AnalysisMemo, spec: AnalysisSpec, chunks: Sequence[str], units: Sequence[np.ndarray],
                 call: CallAnalysis) -> np.ndarray:
    """Per segment of the call (chunk after chunk), a hash of its normalised words
    (:func:`semtoken_rag.evidence.unit_words`: case and punctuation aside), memoised per chunk: segments with
    equal keys say the same words. (Python's string hash: equal within a process, which is all the memo
    lives for.)"""
    parts = [memo.extra(spec, text, e, "segment_keys", lambda t=text, x=u, e=e: _segment_keys(
        _words(memo, spec, t, x, e), e.breaks)) for text, u, e in zip(chunks, units, call.chunks)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _segment_keys(words: list[str], breaks: np.ndarray) -> np.ndarray:
    bounds = sp.segment_bounds(breaks).tolist()
    return np.array([hash(" ".join(words[a:b])) for a, b in itertools.pairwise(bounds)], dtype=np.int64)


def type_hits(memo: AnalysisMemo, spec: AnalysisSpec, chunks: Sequence[str], units: Sequence[np.ndarray],
              call: CallAnalysis, kind: str, exclude: frozenset[str]) -> np.ndarray:
    """:func:`semtoken_rag.evidence.type_hits` of every unit of the call: the candidates of ``kind``
    (memoised per chunk, with their normalised words) less those whose word is in ``exclude``."""
    out = np.zeros(len(call.costs), dtype=bool)
    base = 0
    for text, u, e in zip(chunks, units, call.chunks):
        idx, words = memo.extra(spec, text, e, ("type", kind), lambda t=text, x=u, e=e: _type_candidates(
            t, x, kind, _words(memo, spec, t, x, e)))
        for i, w in zip(idx.tolist(), words):
            if w not in exclude:
                out[base + i] = True
        base += len(u)
    return out


def _words(memo: AnalysisMemo, spec: AnalysisSpec, text: str, units: np.ndarray, entry: ChunkAnalysis
           ) -> list[str]:
    """The chunk's normalised words (:func:`semtoken_rag.evidence.unit_words`), memoised: terms and answer
    types both read them."""
    return memo.extra(spec, text, entry, "words", lambda: ev.unit_words(text, units))


def _type_candidates(text: str, units: np.ndarray, kind: str, words: list[str]
                     ) -> tuple[np.ndarray, list[str]]:
    hits = np.flatnonzero(ev.type_hits(text, units, kind, words=words))
    return hits, [words[i] for i in hits.tolist()]


@dataclass(frozen=True)
class ChunkStats:
    """A chunk's query-independent vector statistics (float32): ``span_entropy`` the semantic entropy of
    the local window of each span of several units (``nan`` for a single unit: selection never reads it,
    since one word is never collapsed; :func:`window_entropy` gives every span's), ``seg_entropy`` each
    segment's, ``centroids`` each segment's mean vector L2-normalised, ``centroid`` the whole chunk's."""

    span_entropy: np.ndarray
    seg_entropy: np.ndarray
    centroids: np.ndarray
    centroid: np.ndarray


@dataclass(frozen=True)
class CallStats:
    """:class:`ChunkStats` of a call's chunks concatenated (``centroid`` one row per chunk)."""

    span_entropy: np.ndarray
    seg_entropy: np.ndarray
    centroids: np.ndarray
    chunk_centroids: np.ndarray


def chunk_stats(vectors: np.ndarray, bounds: np.ndarray, breaks: np.ndarray, window_units: int) -> ChunkStats:
    """:class:`ChunkStats` of one chunk from its unit vectors (``(k, d)``), span bounds (``[0, ..., k]``) and
    segment breaks, in float64 over the chunk alone: the values depend on nothing but the chunk, whatever
    call it comes with and whether they come from the memo.

    Semantic entropy H = Tr(Cov) = mean ||h||^2 - ||mean h||^2 of a range (clamped at 0), from the
    range's own sums.

    >>> v = np.array([[1., 0], [1., 0], [0., 1]], dtype=np.float16)
    >>> s = chunk_stats(v, np.array([0, 2, 3]), np.array([False, True, True]), 5)
    >>> [round(float(x), 3) for x in s.span_entropy], s.seg_entropy.tolist(), s.centroids.tolist()
    ([0.444, nan], [0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]])
    """
    return chunk_stats_many([vectors], [bounds], [breaks], window_units)[0]


def chunk_stats_many(vectors: Sequence[np.ndarray], bounds: Sequence[np.ndarray],
                     breaks: Sequence[np.ndarray], window_units: int) -> list[ChunkStats]:
    """:func:`chunk_stats` of several chunks in one vectorised pass, the same numbers as one at a time:
    every sum runs over one segment's or one window's rows alone, in order, so no number depends on
    another chunk. Segment sums are one ``index_add_`` over the call's rows (float64); only the windows of
    spans of several units (a few in a call) are summed, row by row of the window."""
    n = len(vectors)
    if n == 0:
        return []
    arrs = [np.asarray(v) for v in vectors]
    d = int(arrs[0].shape[1])
    ks = np.fromiter((len(v) for v in arrs), dtype=np.int64, count=n)
    off = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(ks, out=off[1:])
    x16 = np.concatenate(arrs) if off[-1] else np.zeros((0, d), dtype=np.float16)
    # segments (each chunk's last unit is a break: none crosses a chunk end)
    brk = np.concatenate([np.asarray(b, dtype=bool) for b in breaks])
    seg_b = np.flatnonzero(brk) + 1
    seg_a = np.concatenate([[0], seg_b[:-1]]).astype(np.int64) if len(seg_b) else seg_b
    n_seg = len(seg_b)
    seg_of = torch.from_numpy(np.repeat(np.arange(n_seg), seg_b - seg_a))
    sums = torch.zeros((n_seg, d), dtype=torch.float64)
    sq = torch.zeros(n_seg, dtype=torch.float64)
    rows = torch.from_numpy(x16)
    for a in range(0, len(x16), _ROWS_AT_ONCE):  # row after row, in float64 a block at a time
        x = rows[a:a + _ROWS_AT_ONCE].double()
        sums.index_add_(0, seg_of[a:a + _ROWS_AT_ONCE], x)
        sq.index_add_(0, seg_of[a:a + _ROWS_AT_ONCE], torch.linalg.vecdot(x, x))
    seg_n = np.maximum(seg_b - seg_a, 1)
    seg_h = _entropy(sums.numpy(), sq.numpy(), seg_n)
    cents = _unit(sums.numpy() / seg_n[:, None])
    seg_chunk = np.searchsorted(off, seg_a, side="right") - 1
    n_segs = np.bincount(seg_chunk, minlength=n)
    chunk_sums = torch.zeros((n, d), dtype=torch.float64).index_add_(0, torch.from_numpy(seg_chunk), sums)
    chunk_cents = _unit(chunk_sums.numpy() / np.maximum(ks, 1)[:, None])
    # the windows of spans of several units
    n_spans = np.fromiter((len(b) - 1 for b in bounds), dtype=np.int64, count=n)
    span_chunk = np.repeat(np.arange(n), n_spans)
    starts = np.concatenate([np.asarray(b[:-1], dtype=np.int64) for b in bounds]) + off[span_chunk]
    ends = np.concatenate([np.asarray(b[1:], dtype=np.int64) for b in bounds]) + off[span_chunk]
    span_h = np.full(len(starts), np.nan, dtype=np.float32)
    wide = np.flatnonzero(ends - starts > 1)
    if len(wide):
        c = span_chunk[wide]
        ws, we = sp.window_ranges(starts[wide], ends[wide], off[c], off[c + 1], window_units)
        span_h[wide] = _window_entropy(x16, ws, we)
    sp_cut = np.concatenate([[0], np.cumsum(n_spans)]).tolist()
    sg_cut = np.concatenate([[0], np.cumsum(n_segs)]).tolist()
    return [ChunkStats(span_h[sp_cut[i]:sp_cut[i + 1]].copy(), seg_h[sg_cut[i]:sg_cut[i + 1]].copy(),
                       cents[sg_cut[i]:sg_cut[i + 1]].copy(), chunk_cents[i].copy()) for i in range(n)]


def window_entropy(vectors: np.ndarray, bounds: np.ndarray, window_units: int) -> np.ndarray:
    """The semantic entropy of every span's local window (float32), of one chunk's unit vectors
    (``(k, d)``) and span bounds: what :class:`ChunkStats` holds for spans of several units, and for
    single units too (a result's spans report it when read).

    >>> v = np.array([[1., 0], [1., 0], [0., 1]], dtype=np.float16)
    >>> [round(float(x), 3) for x in window_entropy(v, np.array([0, 2, 3]), 5)]
    [0.444, 0.444]
    """
    x16 = np.asarray(vectors)
    bounds = np.asarray(bounds, dtype=np.int64)
    k = len(x16)
    starts, ends = bounds[:-1], bounds[1:]
    ws, we = sp.window_ranges(starts, ends, np.zeros_like(starts), np.full_like(starts, k), window_units)
    return _window_entropy(x16, ws, we)


def _window_entropy(x16: np.ndarray, ws: np.ndarray, we: np.ndarray) -> np.ndarray:
    """Entropy of rows ``[ws[i], we[i])`` of ``x16``, each window summed in float64 row by row."""
    if len(ws) == 0:
        return np.zeros(0, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(x16))
    width = we - ws
    sums = torch.zeros((len(ws), x.shape[1]), dtype=torch.float64)
    sq = torch.zeros(len(ws), dtype=torch.float64)
    for j in range(int(width.max())):  # the j-th row of every window that has one
        has = np.flatnonzero(width > j)
        rows = x.index_select(0, torch.from_numpy(ws[has] + j)).double()
        sums.index_add_(0, torch.from_numpy(has), rows)
        sq.index_add_(0, torch.from_numpy(has), torch.linalg.vecdot(rows, rows))
    return _entropy(sums.numpy(), sq.numpy(), np.maximum(width, 1))


def _entropy(sums: np.ndarray, sq: np.ndarray, count: np.ndarray) -> np.ndarray:
    """mean ||h||^2 - ||mean h||^2 from a range's sums (clamped at 0), float32."""
    mean = sums / count[:, None]
    return np.maximum(sq / count - np.einsum("ij,ij->i", mean, mean), 0.0).astype(np.float32)


def _unit(v: np.ndarray) -> np.ndarray:  # as torch.nn.functional.normalize: v / max(||v||, 1e-12)
    return (v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def call_stats(memo: AnalysisMemo, spec: AnalysisSpec, chunks: Sequence[str], vectors: Sequence[Any],
               call: CallAnalysis, window_units: int, clustering: bool = True) -> CallStats:
    """The call's :class:`CallStats`: each chunk's :func:`chunk_stats` (memoised with its analysis), its
    vectors ``vectors[i]`` (``(k, d)``, float16 as cached); spans are single units without ``clustering``."""
    name = ("stats", window_units, clustering)
    todo = [i for i, e in enumerate(call.chunks) if e.extras.get(name) is None]
    if todo:  # the chunks new to the memo, in one pass
        arrs = [vectors[i].numpy() if isinstance(vectors[i], torch.Tensor) else np.asarray(vectors[i])
                for i in todo]
        fresh = chunk_stats_many(arrs, [call.chunks[i].bounds if clustering else
                                        np.arange(len(a) + 1, dtype=np.int64) for i, a in zip(todo, arrs)],
                                 [call.chunks[i].breaks for i in todo], window_units)
        made = dict(zip(todo, fresh))
    per: list[ChunkStats] = [memo.extra(spec, text, e, name, lambda i=i: made[i])
                             for i, (text, e) in enumerate(zip(chunks, call.chunks))]
    d = per[0].centroid.shape[-1] if per else 0

    def cat(name: str, shape: tuple[int, ...]) -> np.ndarray:
        parts = [getattr(x, name) for x in per]
        return np.concatenate(parts) if parts else np.zeros(shape, dtype=np.float32)

    return CallStats(cat("span_entropy", (0,)), cat("seg_entropy", (0,)), cat("centroids", (0, d)),
                     np.stack([x.centroid for x in per]) if per else np.zeros((0, d), dtype=np.float32))


def _library_versions() -> tuple[str, ...]:
    out = []
    for name in _STORED_LIBRARIES:
        try:
            out.append(f"{name}={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{name}=?")
    return tuple(out)


def stored_prefix(spec: AnalysisSpec, window_units: int, clustering: bool) -> str | None:
    """The prefix of the names of a chunk's stored analysis arrays in its fingerprint entry: a digest of
    what they depend on besides its text and fingerprints (the settings, :data:`STORED_VERSION`, the
    versions of the libraries that shape them); ``None`` when the budget tokenizer is an object or a
    callable (it counts like itself alone: no other engine could use them)."""
    if not isinstance(spec.tokenizer.spec, str):
        return None
    what = repr((STORED_VERSION, spec.key, int(window_units), bool(clustering), _library_versions()))
    return STORED_NAMESPACE + hashlib.blake2b(what.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest() + "."


def analyse_for_store(spec: AnalysisSpec, texts: list[str], units: list[np.ndarray], vectors: list[Any],
                      window_units: int, clustering: bool, prefix: str,
                      device: torch.device | None = None) -> list[dict[str, np.ndarray]]:
    """The arrays to store in each chunk's entry (its :class:`ChunkAnalysis` and :class:`ChunkStats`, as a
    call works them out, named ``prefix + name``), from its char spans and float16 fingerprints (``(k, d)``,
    as cached); the clustering runs on ``device``, as the engine's calls do."""
    if not texts:
        return []
    arrs = [v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v) for v in vectors]
    entries = _analyse_chunks(spec, texts, units, [torch.from_numpy(np.asarray(a)).to(device).float()
                                                   for a in arrs])
    stats = chunk_stats_many(arrs, [e.bounds if clustering else np.arange(len(a) + 1, dtype=np.int64)
                                    for e, a in zip(entries, arrs)], [e.breaks for e in entries], window_units)
    out = []
    for e, cs in zip(entries, stats):
        arrays = {"costs": e.costs.astype(np.int64), "breaks": e.breaks.astype(bool), "group": e.group.astype(np.int64),
                  "block": e.block.astype(np.int64), "fence": e.fence.astype(bool), "blind": e.blind.astype(bool),
                  "bounds": e.bounds.astype(np.int64), "span_entropy": cs.span_entropy,
                  "seg_entropy": cs.seg_entropy, "centroids": cs.centroids, "centroid": cs.centroid}
        out.append({prefix + name: a for name, a in arrays.items()})
    return out


def from_stored(arrays: Mapping[str, np.ndarray], prefix: str, k: int, d: int, window_units: int,
                clustering: bool) -> ChunkAnalysis | None:
    """The :class:`ChunkAnalysis` (its statistics among its extras) stored in an entry's ``arrays`` under
    ``prefix`` for a chunk of ``k`` units and ``d``-dimensional fingerprints; ``None`` when there is none
    or it does not fit the chunk (a checksum proves what a writer wrote, not that it was right: dtypes,
    shapes, integer ranges, finite statistics and entropies of at least 0 are checked; the arrays copied;
    a single unit's span entropy is ``nan``, as the call's own)."""
    if prefix + "costs" not in arrays:
        return None
    try:
        a = {name: np.array(arrays[prefix + name]) for name in (
            "costs", "breaks", "group", "block", "fence", "blind", "bounds", "span_entropy", "seg_entropy",
            "centroids", "centroid")}
    except (KeyError, TypeError, ValueError):
        return None
    per_unit = {"costs": np.int64, "breaks": np.bool_, "group": np.int64, "block": np.int64, "fence": np.bool_,
                "blind": np.bool_}
    if any(a[n].shape != (k,) or a[n].dtype != dtype for n, dtype in per_unit.items()):
        return None
    bounds, breaks = a["bounds"], a["breaks"]
    if bounds.dtype != np.int64 or bounds.ndim != 1 or len(bounds) < 1 or bounds[0] != 0 or bounds[-1] != k \
            or (np.diff(bounds) <= 0).any() or (k and not breaks[-1]) or not (0 <= a["costs"]).all() \
            or (a["costs"] > _MAX_UNIT_TOKENS).any() or any(((a[n] < -1) | (a[n] >= k)).any() for n in ("group", "block")):
        return None
    n_seg = int(breaks.sum())
    floats = {"span_entropy": (len(bounds) - 1,) if clustering else (k,), "seg_entropy": (n_seg,),
              "centroids": (n_seg, d), "centroid": (d,)}
    if any(a[n].shape != shape or a[n].dtype != np.float32 for n, shape in floats.items()):
        return None
    single = np.diff(bounds) == 1 if clustering else np.ones(k, dtype=bool)
    span_h = a["span_entropy"]
    if not (np.isnan(span_h[single]).all() and np.isfinite(span_h[~single]).all() and (span_h[~single] >= 0).all()
            and all(np.isfinite(a[n]).all() for n in ("seg_entropy", "centroids", "centroid"))
            and (a["seg_entropy"] >= 0).all()):
        return None
    entry = ChunkAnalysis(a["costs"], breaks, a["group"], a["block"], a["fence"], a["blind"], bounds)
    entry.extras[("stats", window_units, clustering)] = ChunkStats(a["span_entropy"], a["seg_entropy"],
                                                                    a["centroids"], a["centroid"])
    return entry
