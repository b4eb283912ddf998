"""SemToken: the front door."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import numbers
import sys
import time
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import spans as sp
from . import structure as st
from .budget import BudgetTokenizer, select_under_budget
from .config import SemTokenConfig
from .diskstore import DirectoryStore
from .encoder import Encoder, Fingerprints
from .fileformat import CacheEntry, validate_fingerprints
from .keys import cache_key
from .lru import ByteLRU
from .render import join_slices, kept_slices
from .repeats import ConversationMemory, find_repeats
from .results import CompressedChunk, CompressionResult, SpanInfo
from .store import CacheStats, LayeredCache, MemoryStore

logger = logging.getLogger(__name__)

_MAX_SEGMENT_TOKENS = 96  # prose segments (<= 48 words) stay under it; it bounds runs without spaces


@dataclass
class _Call:
    """The units of one call, all chunks concatenated (internal)."""

    vectors: torch.Tensor  # (n, d) float32 on the device
    units: list[np.ndarray]  # per chunk (k, 2) char spans
    offsets: np.ndarray  # (chunks + 1,) unit offsets of each chunk
    chunk_of: np.ndarray  # (n,) chunk index of each unit


class SemToken:
    """Query-aware compression of retrieved chunks under a downstream-LLM token budget.

    Example:
        >>> from semtoken_rag import SemToken
        >>> engine = SemToken()
        >>> chunks = ["The first Nobel Prize in Physics was awarded in 1901 to Wilhelm Conrad Röntgen. "
        ...           "The prize is awarded by the Royal Swedish Academy of Sciences.",
        ...           "Bananas are berries. Strawberries are not. Botanists classify fruit by ovary."]
        >>> res = engine.compress(chunks, query="who got the first nobel prize in physics", rate=0.4)
        >>> res.compressed_tokens <= res.budget
        True
        >>> "Röntgen" in res.chunks[0].text
        True
    """

    def __init__(self, config: SemTokenConfig | None = None, **overrides: Any) -> None:
        config = config or SemTokenConfig()
        # overrides are validated (model_copy alone would not)
        self.config = SemTokenConfig(**{**config.model_dump(), **overrides}) if overrides else config
        cfg = self.config
        self.encoder = Encoder(cfg.encoder, device=cfg.device, dtype=cfg.dtype, max_length=cfg.max_length,
                               window_overlap=cfg.window_overlap, batch_size=cfg.batch_size,
                               show_progress_bar=cfg.show_progress_bar)
        self.tokenizer = BudgetTokenizer(cfg.tokenizer)
        disk = None if cfg.cache_dir is None else DirectoryStore(
            cfg.cache_dir, max_disk_bytes=cfg.cache_max_disk_bytes, fsync=False)
        self.cache = LayeredCache(MemoryStore(cfg.cache_max_bytes), disk)
        self.memory = ConversationMemory(max_spans=cfg.conversation_max_spans,
                                         max_bytes=cfg.conversation_max_bytes)
        self._namespace = self.encoder.identity
        # query -> ((q, q_tokens), bytes charged)
        self._queries: ByteLRU[tuple[tuple[torch.Tensor, torch.Tensor], int]] = ByteLRU(
            cfg.query_memo_max_bytes, sizeof=lambda item: item[1])
        self._gap_cost = self.tokenizer.count("a" + cfg.gap_marker + "b") - self.tokenizer.count("a b")
        self._protect = st.compile_patterns(cfg.protect)

    # -- public API -----------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Downstream-LLM tokens of ``text``, as the engine counts them for the budget."""
        if not isinstance(text, str):
            raise TypeError(f"count_tokens expects a str, got {type(text).__name__}")
        return self.tokenizer.count(text)

    def cache_stats(self) -> CacheStats:
        """What the caches hold and saved: fingerprint hits, misses, bytes, bad entries, store errors,
        encoder seconds saved, and the conversations and query embeddings remembered (entries, bytes).

        >>> from semtoken_rag import SemToken
        >>> engine = SemToken()
        >>> engine.cache_stats().hits, engine.cache_stats().queries
        (0, 0)
        """
        return dataclasses.replace(self.cache.stats(), conversations=len(self.memory),
                                   conversation_bytes=self.memory.nbytes, queries=len(self._queries),
                                   query_bytes=self._queries.nbytes)

    def clear_caches(self, *, disk: bool = False) -> None:
        """Forget the fingerprints held in memory, the query memo and every conversation.

        Entries in ``cache_dir`` stay (other processes may share them) unless ``disk=True``. Counters
        in :meth:`cache_stats` keep counting.
        """
        self.cache.clear(disk=disk)
        self._queries.clear()
        self.memory.clear()

    def forget_conversation(self, conversation_id: str) -> bool:
        """Forget what ``conversation_id`` received (its next call repeats nothing); ``True`` if known."""
        return self.memory.forget(conversation_id)

    async def acompress(self, chunks: Sequence[str], query: str | None = None, *, rate: float | None = None,
                        target_tokens: int | None = None, conversation_id: str | None = None,
                        chunk_overheads: Sequence[int] | None = None) -> CompressionResult:
        """:meth:`compress` in a worker thread, keeping the event loop free."""
        return await asyncio.to_thread(self.compress, chunks, query, rate=rate, target_tokens=target_tokens,
                                       conversation_id=conversation_id, chunk_overheads=chunk_overheads)

    def compress(self, chunks: Sequence[str], query: str | None = None, *, rate: float | None = None,
                 target_tokens: int | None = None, conversation_id: str | None = None,
                 chunk_overheads: Sequence[int] | None = None) -> CompressionResult:
        """Compress ``chunks`` for ``query`` so that their downstream-LLM tokens fit the budget.

        Args:
            chunks: the retrieved texts, in order. Empty or whitespace-only chunks are allowed and come
                back as ``""``. One result per chunk, in the same order, always.
            query: the user's question; ``None`` (or blank) compresses by semantic density alone.
            rate: fraction of tokens kept, in (0, 1] (default ``config.rate``).
            target_tokens: absolute budget in tokens (> 0); overrides ``rate``.
            conversation_id: optional key; spans this conversation already received in earlier calls
                are dropped as repeats.
            chunk_overheads: optional non-negative int per chunk: tokens the caller adds around a chunk
                (a metadata header, a separator), paid once when anything of that chunk is kept.

        The budget is ``target_tokens`` or ``floor(rate * (original_tokens + overheads))`` (overheads of
        the non-empty chunks); ``compressed_tokens + overhead_tokens`` never exceeds it
        (``compressed_tokens`` is the sum of each compressed chunk's tokens, ``overhead_tokens`` the sum
        of the overheads of the chunks that kept something). When the budget is smaller than any piece
        of text, every chunk comes back empty.

        >>> res = SemToken().compress(["Paris is the capital of France.", "Bananas are berries."],
        ...                           "capital of France", target_tokens=12, chunk_overheads=[4, 4])
        >>> res.compressed_tokens + res.overhead_tokens <= 12
        True
        """
        started = time.perf_counter()
        chunks = _check_chunks(chunks)
        query = _check_query(query)
        budget_rate, target = self._budget_args(rate, target_tokens)
        overheads = _check_overheads(chunk_overheads, len(chunks))
        counts = self.tokenizer.count_many(chunks)
        total = int(counts.sum())
        full_overhead = int(overheads[[bool(c) for c in chunks]].sum()) if len(chunks) else 0
        budget = target if target is not None else math.floor(budget_rate * (total + full_overhead) + 1e-9)
        if budget >= total + full_overhead:
            return self._identity(chunks, counts, query, budget, started, full_overhead)
        if total == 0:
            return self._empty(chunks, counts, query, budget, started)
        with torch.inference_mode():
            return self._compress(chunks, counts, query, budget, conversation_id, started, overheads)

    # -- pipeline -----------------------------------------------------------------------------------
    def _budget_args(self, rate: float | None, target: int | None) -> tuple[float, int | None]:
        if target is not None:
            if isinstance(target, (bool, np.bool_)) or not isinstance(target, (int, np.integer)) or target <= 0:
                raise ValueError(f"target_tokens must be a positive int, got {target!r}")
            return 1.0, int(target)
        if rate is None:
            return self.config.rate, self.config.target_tokens
        if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, numbers.Real) or math.isnan(rate) \
                or not 0.0 < float(rate) <= 1.0:
            raise ValueError(f"rate must be in (0, 1], got {rate!r}")
        return float(rate), None

    def _fingerprints(self, chunks: list[str]) -> tuple[list[Fingerprints], int, int]:
        """Fingerprints of ``chunks`` (cache first), cache hits, and this call's encoder batches."""
        keys = [cache_key(c, self._namespace) for c in chunks]
        asked = [i for i, c in enumerate(chunks) if c.strip()]  # blank chunks have no units to cache

        def fits(j: int, entry: CacheEntry) -> bool:  # a valid checksum is not a valid entry
            return validate_fingerprints(entry.get("units"), entry.get("fingerprints"), len(chunks[asked[j]]),
                                         self.encoder.dim)

        found: dict[int, Fingerprints] = {}
        for i, entry in zip(asked, self.cache.get_many([keys[i] for i in asked], valid=fits)):
            if entry is not None:
                found[i] = Fingerprints(entry["units"].astype(np.int64),
                                        torch.from_numpy(np.array(entry["fingerprints"])))
        missing = [i for i in range(len(chunks)) if i not in found]
        batches = 0
        if missing:
            fresh, spent = self.encoder.fingerprint_with_stats([chunks[i] for i in missing])
            seconds = spent.seconds / max(len(missing), 1)
            new: list[tuple[str, CacheEntry]] = []
            for i, fp in zip(missing, fresh):
                found[i] = fp
                if chunks[i].strip():
                    new.append((keys[i], CacheEntry(
                        {"fingerprints": fp.vectors.numpy(), "units": fp.units.astype(np.int32)},
                        encode_seconds=seconds)))
            self.cache.put_many(new)
            batches = spent.batches
        return [found[i] for i in range(len(chunks))], len(chunks) - len(missing), batches

    def _query_vector(self, query: str) -> tuple[torch.Tensor, torch.Tensor]:
        memo = self._queries.get(query)
        if memo is not None:
            return memo[0]
        vec = self.encoder.embed_queries([query])[0]
        size = sys.getsizeof(query) + 256 + sum(t.element_size() * t.nelement() for t in vec)
        self._queries.put(query, (vec, size))
        return vec

    def _compress(self, chunks: list[str], counts: np.ndarray, query: str | None, budget: int,
                  conversation_id: str | None, started: float, overheads: np.ndarray) -> CompressionResult:
        cfg = self.config
        fps, hits, encoder_calls = self._fingerprints(chunks)  # this call's batches (query excluded)
        call = _concat(fps, self.encoder.device)
        n = len(call.chunk_of)
        if n == 0:
            return self._empty(chunks, counts, query, budget, started)
        # costs in downstream-LLM tokens: each unit with the whitespace before it
        unit_cost = self._unit_costs(chunks, call)
        # segments: sentences (chunk ends included), long ones cut to max_segment_units words and to
        # _MAX_SEGMENT_TOKENS tokens (pieces of text without spaces cost many tokens each)
        # (structure.py: a table row, a code line, a list item is one segment; protected text is one piece)
        struct = st.call_structure(chunks, call.units, self._protect, query)
        breaks = sp.cap_segment_costs(sp.cap_segments(struct.breaks, cfg.max_segment_units), unit_cost,
                                      _MAX_SEGMENT_TOKENS)
        breaks = st.join_groups(breaks, struct.group)
        segs = sp.segment_bounds(breaks)
        seg_of_unit = np.repeat(np.arange(len(segs) - 1), np.diff(segs))
        seg_chunk = call.chunk_of[segs[:-1]]
        # spans by local clustering (Algorithm 1) inside segments; coarse ones collapse to their anchor
        if cfg.use_clustering:
            bounds = sp.local_clusters(call.vectors, breaks, cfg.tau, cfg.max_span_units)
        else:
            bounds = np.arange(n + 1, dtype=np.int64)
        starts, ends = bounds[:-1], bounds[1:]
        span_seg = seg_of_unit[starts]
        stats = sp.PrefixStats(call.vectors)
        lo, hi = call.offsets[call.chunk_of[starts]], call.offsets[call.chunk_of[starts] + 1]
        ws, we = sp.window_ranges(starts, ends, lo, hi, cfg.window_units)
        span_entropy = stats.entropy(ws, we).float().cpu().numpy()
        # units the encoder could not see on their own (pieces of one [UNK] word, dropped characters)
        # carry a copy of the previous unit's vector: their spans are not judged coarse or repeats
        blind = _blind_units(call)
        blind_span = np.add.reduceat(blind, starts) > 0
        collapsed = (ends - starts > 1) & (span_entropy <= cfg.delta) & ~blind_span if cfg.use_entropy \
            else np.zeros(len(starts), dtype=bool)
        collapsed &= ~(np.add.reduceat(struct.group >= 0, starts) > 0)  # protected text is never collapsed
        # segment scores: query importance, chunk relevance, semantic density
        seg_entropy = stats.entropy(segs[:-1], segs[1:]).float()
        q, q_tokens = self._query_vector(query) if (query is not None and cfg.use_query) else (None, None)
        score = torch.zeros(len(segs) - 1, dtype=torch.float32, device=seg_entropy.device)
        seg_rel = chunk_rel = None
        if q is not None:
            seg_rel = stats.cosine(q, segs[:-1], segs[1:]).float()
            chunk_rel = stats.cosine(q, call.offsets[:-1], call.offsets[1:]).float()
            score += cfg.maxsim_weight * sp.maxsim(q_tokens, call.vectors, seg_of_unit, len(segs) - 1) \
                + cfg.sentence_weight * seg_rel + cfg.chunk_weight * chunk_rel[torch.as_tensor(seg_chunk)]
            score += cfg.exact_number_weight * torch.as_tensor(
                np.add.reduceat(struct.number_hits, segs[:-1]) > 0, dtype=score.dtype, device=score.device)
        if cfg.use_entropy or q is None:
            score += (cfg.entropy_weight if q is not None else 1.0) * sp.normalise(seg_entropy)
        score_np = score.cpu().numpy().astype(np.float64)
        # collapsed spans cost their anchor only
        kept_cost = unit_cost.copy()
        for s, e in zip(starts[collapsed], ends[collapsed]):
            kept_cost[s + 1:e] = 0
        cum = np.concatenate([[0], np.cumsum(kept_cost)])
        seg_cost = cum[segs[1:]] - cum[segs[:-1]]
        # repeats and redundancy-aware selection under the budget
        centroids = torch.nn.functional.normalize(stats.mean(segs[:-1], segs[1:]).float(), dim=-1)
        centroids = centroids.cpu().numpy().astype(np.float32)
        repeat = self._repeats(centroids, segs, score_np, conversation_id) & ~(np.add.reduceat(blind, segs[:-1]) > 0)
        seg_fence = np.add.reduceat(struct.fence, segs[:-1]) > 0
        seg_block = struct.block[segs[:-1]]
        allowed = ~repeat & ~seg_fence
        keep = select_under_budget(
            score_np, seg_cost, seg_chunk, budget, self._gap_cost, allowed, centroids,
            cfg.redundancy_weight if cfg.dedup else 0.0, cfg.redundancy_threshold,
            overheads if overheads.any() else None)
        # -- hook (structure.py): fences come with kept code; when the top-ranked segment cannot fit on its
        # own, the budget goes to its best run of words, not to scraps of other passages; with
        # partial_fit, the best segment left over gets its best run of words that fits what is left
        top = int(np.flatnonzero(allowed)[np.argmax(score_np[allowed])]) if allowed.any() else -1
        if top >= 0 and seg_cost[top] + overheads[seg_chunk[top]] > budget:
            keep[:] = False
        kept_blocks = np.unique(seg_block[keep & ~seg_fence & (seg_block >= 0)])
        keep |= seg_fence & np.isin(seg_block, kept_blocks)
        fences = (seg_block, seg_fence)
        texts, slices, out_counts, keep_units = self._render(chunks, call, segs, keep, starts, ends,
                                                             collapsed, score_np, budget, overheads, fences)
        if cfg.partial_fit or not keep_units.any():
            partial = self._best_partial(chunks, call, segs, keep_units, score_np, allowed,
                                         unit_cost, struct.group, q_tokens, overheads,
                                         budget - int(out_counts.sum()) - int(overheads[[bool(x) for x in slices]].sum()))
            if partial is not None:
                keep_units = keep_units | partial  # (a part of a segment is not remembered as received)
                slices = [kept_slices(u, keep_units[a:b])
                          for u, a, b in zip(call.units, call.offsets[:-1], call.offsets[1:])]
                texts = [join_slices(t, x, cfg.gap_marker) for t, x in zip(chunks, slices)]
                out_counts = self.tokenizer.count_many(texts)
        if conversation_id is not None:
            self._remember(conversation_id, centroids, segs, keep)
        span_status = np.where(collapsed & keep_units[starts], "collapsed", np.where(
            keep_units[starts], "kept", np.where(repeat[span_seg], "repeat", "dropped")))
        span_rel = None if seg_rel is None else seg_rel.cpu().numpy()[span_seg]
        return self._result(chunks, counts, query, budget, started, call, starts, ends, span_status,
                            span_entropy, span_rel, chunk_rel, score_np[span_seg], texts, slices,
                            out_counts, hits, encoder_calls, overheads)

    def _best_partial(self, chunks, call, segs, keep_units, score, allowed, unit_cost, group, q_tokens,
                      overheads, left: int) -> np.ndarray | None:
        """Unit mask of the most query-relevant run of whole words of the best segment not kept that fits
        the ``left`` tokens of the budget (its chunk's overhead or a gap marker paid), or None."""
        seg_kept = np.add.reduceat(keep_units, segs[:-1]) > 0
        cand = np.flatnonzero(allowed & ~seg_kept)
        if len(cand) == 0 or left <= 0:
            return None
        k = int(cand[np.argmax(score[cand])])
        a, b = int(segs[k]), int(segs[k + 1])
        c = int(call.chunk_of[a])
        lo, hi = int(call.offsets[c]), int(call.offsets[c + 1])
        before = keep_units[lo:hi]
        extra = 0 if before.any() else int(overheads[c])
        old_text = join_slices(chunks[c], kept_slices(call.units[c], before), self.config.gap_marker)
        old = self.tokenizer.count(old_text) if before.any() else 0
        if q_tokens is None:
            rel = np.ones(b - a)
        else:
            normed = torch.nn.functional.normalize(call.vectors[a:b].float(), dim=-1)
            rel = (normed @ q_tokens.to(normed).T).max(dim=1).values.cpu().numpy().astype(np.float64)
        room = left - extra - (self._gap_cost if before.any() else 0)
        while room > 0:
            wa, wb = st.best_window(rel, unit_cost[a:b], room, group[a:b])
            if wb == wa:
                return None
            mask = np.zeros(len(keep_units), dtype=bool)
            mask[a + wa:a + wb] = True
            text = join_slices(chunks[c], kept_slices(call.units[c], before | mask[lo:hi]), self.config.gap_marker)
            over = self.tokenizer.count(text) - old + extra - left
            if over <= 0:
                return mask
            room -= over
        return None

    def _unit_costs(self, chunks: list[str], call: _Call) -> np.ndarray:
        pieces = []
        for text, units in zip(chunks, call.units):
            if len(units):
                prev = np.concatenate([[units[0, 0]], units[:-1, 1]])
                pieces.extend(text[a:e] for a, e in zip(prev.tolist(), units[:, 1].tolist()))
        return self.tokenizer.count_many(pieces)

    def _repeats(self, centroids: np.ndarray, segs: np.ndarray, score: np.ndarray,
                 conversation_id: str | None) -> np.ndarray:
        """Segments that repeat a better-ranked one (in any chunk) or what the conversation received."""
        cfg = self.config
        n_seg = len(segs) - 1
        if not cfg.dedup or n_seg == 0:
            return np.zeros(n_seg, dtype=bool)
        eligible = np.diff(segs) >= cfg.min_repeat_units
        order = np.lexsort((np.arange(n_seg), -score))
        repeat = find_repeats(centroids, np.arange(n_seg), order, cfg.repeat_threshold, eligible) >= 0
        if conversation_id is not None:
            repeat |= self.memory.query(conversation_id, centroids, cfg.repeat_threshold) & eligible
        return repeat

    def _remember(self, conversation_id: str, centroids: np.ndarray, segs: np.ndarray, keep: np.ndarray) -> None:
        chosen = keep & (np.diff(segs) >= self.config.min_repeat_units)
        if chosen.any():
            self.memory.add(conversation_id, centroids[chosen])

    def _render(self, chunks, call, segs, keep, starts, ends, collapsed, score, budget, overheads, fences=None):
        keep = keep.copy()
        score = score.copy()
        if fences is not None:  # fence lines go with their block's code: never trimmed before it
            score[fences[1]] = np.inf
        dropped_tail = np.zeros(len(call.chunk_of), dtype=bool)
        for s, e in zip(starts[collapsed], ends[collapsed]):
            dropped_tail[s + 1:e] = True
        seg_of_unit = np.repeat(np.arange(len(segs) - 1), np.diff(segs))
        while True:
            if fences is not None:
                keep = st.balance_fences(keep, *fences)
            keep_units = keep[seg_of_unit] & ~dropped_tail
            slices = [kept_slices(u, keep_units[a:b])
                      for u, a, b in zip(call.units, call.offsets[:-1], call.offsets[1:])]
            texts = [join_slices(t, s, self.config.gap_marker) for t, s in zip(chunks, slices)]
            out_counts = self.tokenizer.count_many(texts)
            paid = int(overheads[[bool(s) for s in slices]].sum())
            excess = int(out_counts.sum()) + paid - budget
            if excess <= 0:
                return texts, slices, out_counts, keep_units
            # BPE merges across slice edges can cost a token or two more than estimated: drop the
            # weakest kept segment until the exact count fits
            logger.debug("exact count over budget by %d tokens; trimming", excess)
            kept_idx = np.flatnonzero(keep)
            if len(kept_idx) == 0:  # nothing left to drop: the texts are all "" and cost 0
                return texts, slices, np.zeros_like(out_counts), keep_units
            keep[kept_idx[np.argmin(score[kept_idx])]] = False

    def _result(self, chunks, counts, query, budget, started, call, starts, ends, status, entropy,
                span_rel, chunk_rel, score, texts, slices, out_counts, hits, encoder_calls, overheads):
        chunk_rel_np = chunk_rel.cpu().numpy() if chunk_rel is not None else None
        span_chunk = call.chunk_of[starts]
        per_chunk = np.searchsorted(span_chunk, np.arange(len(chunks) + 1))
        char_start = np.concatenate([u[:, 0] for u in call.units])[starts]
        char_end = np.concatenate([u[:, 1] for u in call.units])[ends - 1]
        out = []
        for i, text in enumerate(chunks):
            infos = tuple(SpanInfo(int(char_start[k]), int(char_end[k]), str(status[k]), float(entropy[k]),
                                   None if span_rel is None else float(span_rel[k]), float(score[k]))
                          for k in range(per_chunk[i], per_chunk[i + 1]))
            rep = tuple((s.start, s.end) for s in infos if s.status == "repeat")
            out.append(CompressedChunk(
                index=i, text=texts[i], kept_spans=tuple(slices[i]), original_tokens=int(counts[i]),
                compressed_tokens=int(out_counts[i]),
                relevance=None if chunk_rel_np is None else float(chunk_rel_np[i]),
                repeat_spans=rep, spans=infos))
        paid = int(overheads[[bool(s) for s in slices]].sum())
        return CompressionResult(tuple(out), query, budget, int(counts.sum()), int(out_counts.sum()),
                                 encoder_calls, hits, time.perf_counter() - started, paid)

    def _empty(self, chunks, counts, query, budget, started) -> CompressionResult:
        """No chunk has a word (whitespace only) and the budget is short: every chunk comes back ""."""
        out = tuple(CompressedChunk(i, "", (), int(c), 0, None) for i, c in enumerate(counts))
        return CompressionResult(out, query, budget, int(counts.sum()), 0, 0, 0, time.perf_counter() - started)

    def _identity(self, chunks, counts, query, budget, started, overhead) -> CompressionResult:
        """Everything fits, overheads included: chunks come back unchanged."""
        out = tuple(CompressedChunk(i, t, ((0, len(t)),) if t else (), int(c), int(c), None)
                    for i, (t, c) in enumerate(zip(chunks, counts)))
        return CompressionResult(out, query, budget, int(counts.sum()), int(counts.sum()),
                                 0, 0, time.perf_counter() - started, overhead)


def _concat(fps: list[Fingerprints], device: torch.device) -> _Call:
    sizes = np.asarray([len(fp.units) for fp in fps], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    vectors = torch.cat([fp.vectors for fp in fps]) if len(fps) else torch.zeros((0, 1))
    vectors = vectors.to(device).float()
    return _Call(vectors, [fp.units for fp in fps], offsets, np.repeat(np.arange(len(fps)), sizes))


def _blind_units(call: _Call) -> np.ndarray:
    """Units whose vector is an exact copy of the previous unit's in the same chunk (the encoder gave
    them no token of their own: pieces of a long word it read as one [UNK], dropped characters)."""
    v = call.vectors
    blind = np.zeros(len(call.chunk_of), dtype=bool)
    if len(blind) > 1:
        blind[1:] = (v[1:] == v[:-1]).all(dim=-1).cpu().numpy() & (call.chunk_of[1:] == call.chunk_of[:-1])
    return blind


def _check_chunks(chunks: Any) -> list[str]:
    if isinstance(chunks, (str, bytes)):
        raise TypeError("chunks must be a sequence of str, not a single string: wrap it in a list")
    if isinstance(chunks, (Mapping, AbstractSet)):
        raise TypeError(f"chunks must be an ordered sequence of str, got a {type(chunks).__name__}: "
                        "pass a list (e.g. list(d.values()))")
    try:
        chunks = list(chunks)
    except TypeError as e:
        raise TypeError(f"chunks must be a sequence of str, got {type(chunks).__name__}") from e
    for i, c in enumerate(chunks):
        if not isinstance(c, str):
            raise TypeError(f"chunks[{i}] must be str, got {type(c).__name__}")
    return chunks


def _check_overheads(overheads: Any, n: int) -> np.ndarray:
    """``chunk_overheads`` as an int64 array of ``n`` non-negative ints (zeros when None)."""
    if overheads is None:
        return np.zeros(n, dtype=np.int64)
    if isinstance(overheads, (str, bytes)) or not isinstance(overheads, (Sequence, np.ndarray)):
        raise TypeError(f"chunk_overheads must be a sequence of ints, got {type(overheads).__name__}")
    if len(overheads) != n:
        raise ValueError(f"chunk_overheads has {len(overheads)} values for {n} chunks: give one per chunk")
    for i, x in enumerate(overheads):
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0:
            raise ValueError(f"chunk_overheads[{i}] must be an int >= 0, got {x!r}")
    return np.asarray([int(x) for x in overheads], dtype=np.int64)


def _check_query(query: Any) -> str | None:
    if query is None:
        return None
    if not isinstance(query, str):
        raise TypeError(f"query must be str or None, got {type(query).__name__}")
    return query if query.strip() else None
