"""SemToken: the front door."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import analysis as an
from . import evidence as ev
from . import spans as sp
from . import structure as st
from .batching import MicroBatcher
from .budget import BudgetTokenizer, select_under_budget
from .config import MAX_TOKENS, SemTokenConfig, check_budget
from .device_search import DeviceConversationMemory, find_repeats_torch
from .diskstore import DirectoryStore
from .encoder import DEFAULT_BATCH_SIZE, Encoder, Fingerprints, auto_dtype
from .fileformat import CacheEntry, has_array, validate_fingerprints
from .forksafe import renew_after_fork
from .keys import cache_key
from .lru import ByteLRU
from .prepare import Prepared, Preparer, entry_fingerprints
from .render import join_slices, kept_slices, kept_slices_many
from .repeats import ConversationMemory, exact_repeats, faiss_gpu_available, find_repeats
from .results import CompressedChunk, CompressionResult, SpanList
from .store import CacheStats, LayeredCache, MemoryStore, WarnOnce
from .store_url import open_store

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)

DEFAULT_CUDA_WINDOW_MS = 2.0  # micro-batching window on CUDA when config.batch_window_ms is None
_CONVERSATION_LOCKS = 64  # locks the conversation ids share (SemToken._conversation)
_MAX_SEGMENT_TOKENS = 96  # prose segments (<= 48 words) stay under it; it bounds runs without spaces


# the settings an engine's encoder, fingerprint cache and query memo depend on: engines that agree on them
# may share those (:class:`EncoderParts`; the registry's engines do), whatever their budget settings
ENCODER_FIELDS = ("encoder", "device", "dtype", "max_length", "window_overlap", "batch_size", "show_progress_bar",
                  "cuda_graphs", "cache_dir", "cache_max_bytes", "cache_max_disk_bytes", "store", "store_ttl_seconds",
                  "store_timeout_seconds", "store_write_behind", "query_memo_max_bytes")


def encoder_settings(config: SemTokenConfig) -> dict[str, Any]:
    """The :data:`ENCODER_FIELDS` of ``config`` as the encoder resolves them: ``device=None`` is the device
    it picks, ``dtype="auto"`` the precision, ``batch_size=None`` the batch size it picks there and
    ``store_write_behind=None`` whether it writes behind there (so that equivalent settings compare equal)."""
    values = {f: getattr(config, f) for f in ENCODER_FIELDS}
    device = values["device"] if values["device"] is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:  # (the encoder names a bad device when it is built)
        return values
    values["device"] = str(resolved)
    if values["dtype"] == "auto":
        values["dtype"] = auto_dtype(resolved)
    if values["batch_size"] is None:
        values["batch_size"] = DEFAULT_BATCH_SIZE[resolved.type == "cuda"]
    if values["store_write_behind"] is None:
        values["store_write_behind"] = resolved.type == "cuda"
    return values


@dataclass(eq=False)
class EncoderParts:
    """What an engine holds for its encoder: the loaded model, the fingerprint cache (memory, and
    ``cache_dir`` or ``store``), the query memo and the preparer over them. Engines built with the same
    parts share one model in memory, and a chunk one of them fingerprinted is a cache hit for all, while
    each keeps its own tokenizer, scoring, analyses and conversations. The store's connections are
    closed when the last engine using the parts is closed.

    >>> from semtoken_rag import SemToken, SemTokenConfig
    >>> parts = EncoderParts.build(SemTokenConfig(device="cpu"))
    >>> a = SemToken(SemTokenConfig(device="cpu"), parts=parts)
    >>> b = SemToken(SemTokenConfig(device="cpu", tokenizer="cl100k_base"), parts=parts)
    >>> a.encoder is b.encoder and a.cache is b.cache
    True
    """

    config: SemTokenConfig
    encoder: Encoder
    cache: LayeredCache
    queries: ByteLRU
    preparer: Preparer
    users: int = 0  # engines using these parts that are not closed
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @classmethod
    def build(cls, config: SemTokenConfig) -> EncoderParts:
        cfg = config
        encoder = Encoder(cfg.encoder, device=cfg.device, dtype=cfg.dtype, max_length=cfg.max_length,
                          window_overlap=cfg.window_overlap, batch_size=cfg.batch_size,
                          show_progress_bar=cfg.show_progress_bar, cuda_graphs=cfg.cuda_graphs)
        disk = None if cfg.cache_dir is None else DirectoryStore(
            cfg.cache_dir, max_disk_bytes=cfg.cache_max_disk_bytes, fsync=False, prune_in_background=True)
        if cfg.store is not None:  # Redis or a directory, shared by replicas
            disk = open_store(cfg.store, namespace=encoder.identity, ttl_seconds=cfg.store_ttl_seconds,
                              timeout_seconds=cfg.store_timeout_seconds, max_disk_bytes=cfg.cache_max_disk_bytes)
        behind = cfg.store_write_behind if cfg.store_write_behind is not None else encoder.device.type == "cuda"
        cache = LayeredCache(MemoryStore(cfg.cache_max_bytes), disk, write_behind=behind)
        # query -> ((q, q_tokens), bytes charged)
        queries: ByteLRU[tuple[tuple[torch.Tensor, torch.Tensor], int]] = ByteLRU(
            cfg.query_memo_max_bytes, sizeof=lambda item: item[1])
        return cls(cfg, encoder, cache, queries, Preparer(encoder, cache, encoder.identity, queries))

    def fits(self, config: SemTokenConfig) -> bool:
        """Whether an engine with ``config`` may use these parts (the same :func:`encoder_settings`)."""
        return encoder_settings(config) == encoder_settings(self.config)

    def acquire(self) -> None:
        """One more engine uses these parts."""
        with self._lock:
            self.users += 1

    def release(self) -> None:
        """An engine using these parts was closed; the last one closes the store's connections (a later
        call through them reconnects)."""
        with self._lock:
            self.users -= 1
            last = self.users <= 0
        if last:
            self.cache.close()


@dataclass
class _Plan:
    """One checked request: its token counts and budget, or its finished result (internal)."""

    chunks: list[str]
    query: str | None
    counts: np.ndarray
    budget: int
    overheads: np.ndarray
    conversation_id: str | None
    done: CompressionResult | None


@dataclass
class _Call:
    """The units of one call, all chunks concatenated (internal)."""

    vectors: torch.Tensor  # (n, d) float32 on the device
    units: list[np.ndarray]  # per chunk (k, 2) char spans
    offsets: np.ndarray  # (chunks + 1,) unit offsets of each chunk
    chunk_of: np.ndarray  # (n,) chunk index of each unit
    all_units: np.ndarray  # (n, 2) the char spans of ``units`` concatenated

    @functools.cached_property
    def normed(self) -> torch.Tensor:
        """``vectors`` L2-normalised (row by row: each row as it would be alone), made once per call."""
        return torch.nn.functional.normalize(self.vectors, dim=-1)


@dataclass
class _State:
    """What one call has worked out so far, carried between the pipeline's steps (internal).

    Units are the call's words (all chunks concatenated), segments the selection's pieces
    (``segs`` bounds, ``seg_of_unit`` maps a unit to its segment), spans the clustering's runs
    (``starts``/``ends``); ``collapsed`` spans keep their anchor only; ``score`` ranks segments.
    """

    chunks: list[str]
    counts: np.ndarray
    query: str | None
    budget: int
    started: float
    overheads: np.ndarray
    call: _Call
    segs: np.ndarray
    seg_of_unit: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    collapsed: np.ndarray
    score: np.ndarray
    context_excess: Callable[[list[str]], int] | None = None


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

    def __init__(self, config: SemTokenConfig | None = None, *, parts: EncoderParts | None = None,
                 **overrides: Any) -> None:
        """``parts``: an encoder, fingerprint cache and query memo to share with other engines (see
        :class:`EncoderParts`); they must have been built with this configuration's :data:`ENCODER_FIELDS`."""
        config = config if config is not None else SemTokenConfig()
        if not isinstance(config, SemTokenConfig):
            raise TypeError(f"config must be a SemTokenConfig, got {type(config).__name__}")
        # validated here, overrides included, and the engine keeps the validated copy: a config made with
        # model_copy(update=...) never was (a rate of -0.5 made a negative budget; "0.5" stayed a str). From
        # the fields as they are: model_dump would turn a dataclass or model tokenizer into a dict
        self.config = SemTokenConfig(**{**dict(config), **overrides})
        cfg = self.config
        if parts is None:
            parts = EncoderParts.build(cfg)
        elif not isinstance(parts, EncoderParts):
            raise TypeError(f"parts must be EncoderParts or None, got {type(parts).__name__}")
        elif not parts.fits(cfg):
            mine, theirs = encoder_settings(cfg), encoder_settings(parts.config)
            differ = [f for f in ENCODER_FIELDS if mine[f] != theirs[f]]
            raise ValueError(f"parts were built with other encoder settings ({', '.join(differ)})")
        self.parts = parts
        self._closed = True  # (until the end: an engine that failed to build holds no share of the parts)
        self.encoder, self.cache, self._queries, self.preparer = parts.encoder, parts.cache, parts.queries, parts.preparer
        self.tokenizer = BudgetTokenizer(cfg.tokenizer)
        self.repeat_search = choose_repeat_search(self.encoder.device)
        logger.info("semtoken-rag repeat search: %s", self.repeat_search)
        self.memory: ConversationMemory | DeviceConversationMemory
        if self.repeat_search == "torch":
            self.memory = DeviceConversationMemory(max_conversations=cfg.conversation_max_count,
                                                   max_spans=cfg.conversation_max_spans,
                                                   max_bytes=cfg.conversation_max_bytes, device=self.encoder.device)
        else:
            self.memory = ConversationMemory(max_conversations=cfg.conversation_max_count,
                                             max_spans=cfg.conversation_max_spans,
                                             max_bytes=cfg.conversation_max_bytes)
        self._namespace = self.encoder.identity
        window = cfg.batch_window_ms if cfg.batch_window_ms is not None else \
            (DEFAULT_CUDA_WINDOW_MS if self.encoder.device.type == "cuda" else 0.0)
        self.batcher: MicroBatcher[tuple[list[str], str | None, Prepared], Prepared] | None = None
        if window > 0:
            # the worker thread holds the engine weakly: an engine nobody uses any more is collected, and
            # its collection stops the worker (close() and ``with SemToken() as engine`` stop it at once)
            prepare_batch = weakref.WeakMethod(self._prepare_batch)

            def batch(requests):
                fn = prepare_batch()
                if fn is None:
                    raise RuntimeError("the engine of this micro-batcher was garbage-collected")
                return fn(requests)

            self.batcher = MicroBatcher(batch, window_ms=window, max_batch=cfg.max_batch_requests,
                                        name="semtoken-encoder-batcher")
            weakref.finalize(self, self.batcher.close)
        logger.info("semtoken-rag micro-batching of concurrent calls: %s",
                    f"on, window {window:g} ms" if self.batcher else "off")
        # the calls of one conversation run their repeat check and their remembering one at a time (else two
        # at once both see what the conversation had, send the same text and remember it twice); ids share
        # _CONVERSATION_LOCKS locks, so the calls of two conversations may wait for each other, never longer
        # than one call's host work (the encoding happens before)
        self._conversation_locks = tuple(threading.RLock() for _ in range(_CONVERSATION_LOCKS))
        renew_after_fork(self)
        self._gap_cost = self.tokenizer.count("a" + cfg.gap_marker + "b") - self.tokenizer.count("a b")
        self._protect = st.compile_patterns(cfg.protect)
        # per-chunk, query-independent host work (unit token costs, structure, clustering, evidence terms)
        self.analyses = an.AnalysisMemo(cfg.analysis_memo_max_bytes)
        self._spec = an.AnalysisSpec(self.tokenizer, self._protect, cfg.max_segment_units, _MAX_SEGMENT_TOKENS,
                                     cfg.tau, cfg.max_span_units, self._namespace, cfg.language)
        # pre-warming keeps each chunk's analysis in its fingerprint entry, its arrays named after these
        # settings (None: nothing to keep, e.g. a callable budget tokenizer)
        self._stored_prefix = an.stored_prefix(self._spec, cfg.window_units, cfg.use_clustering)
        self._warn = WarnOnce(logger)
        parts.acquire()
        self._closed = False

    # -- public API -----------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Downstream-LLM tokens of ``text``, as the engine counts them for the budget."""
        if not isinstance(text, str):
            raise TypeError(f"count_tokens expects a str, got {type(text).__name__}")
        return self.tokenizer.count(text)

    def cache_stats(self) -> CacheStats:
        """What the caches hold and saved: fingerprint hits, misses, bytes, bad entries, store errors,
        encoder seconds saved, and the conversations, query embeddings and per-chunk analyses remembered
        (entries, bytes). Fingerprint and query figures count every engine that shares :attr:`parts`.

        >>> from semtoken_rag import SemToken
        >>> engine = SemToken()
        >>> engine.cache_stats().hits, engine.cache_stats().queries
        (0, 0)
        """
        return dataclasses.replace(self.cache.stats(), conversations=len(self.memory),
                                   conversation_bytes=self.memory.nbytes, queries=len(self._queries),
                                   query_bytes=self._queries.nbytes, analyses=len(self.analyses),
                                   analysis_bytes=self.analyses.nbytes)

    def clear_caches(self, *, disk: bool = False) -> None:
        """Forget the fingerprints held in memory, the query memo, the per-chunk analyses and every
        conversation (the fingerprints and query memo of every engine that shares this one's
        :attr:`parts`, such as the registry's engines with the same encoder settings).

        Entries in ``cache_dir`` stay (other processes may share them) unless ``disk=True``. Counters
        in :meth:`cache_stats` keep counting.
        """
        self.cache.clear(disk=disk)
        self._queries.clear()
        self.analyses.clear()
        with contextlib.ExitStack() as stack:  # (after the calls of every conversation in flight)
            for lock in self._conversation_locks:
                stack.enter_context(lock)
            self.memory.clear()

    def forget_conversation(self, conversation_id: str) -> bool:
        """Forget what ``conversation_id`` received (its next call repeats nothing); ``True`` if known.
        A call of that conversation in flight finishes first: what it sends is forgotten too."""
        with self._conversation(conversation_id):
            return self.memory.forget(conversation_id)

    def _after_fork(self) -> None:
        """In a child made by ``fork``: the conversation locks (and the memory's) anew; one that a thread of
        the parent held then would stay held for good (the child's calls of ~1 in 64 conversations hung)."""
        self._conversation_locks = tuple(threading.RLock() for _ in range(_CONVERSATION_LOCKS))
        self.memory._after_fork()

    def _conversation(self, conversation_id: str | None) -> contextlib.AbstractContextManager:
        """The lock that orders the calls of ``conversation_id`` (nothing to hold without one)."""
        if conversation_id is None:
            return contextlib.nullcontext()
        return self._conversation_locks[hash(conversation_id) % len(self._conversation_locks)]

    def close(self) -> None:
        """Stop the micro-batching worker thread, if any, wait until ``cache_dir`` or the store has the
        fingerprints queued for it, and close the store's connections unless another open engine shares
        them (:class:`EncoderParts`). Calls after this still work: they encode on their
        own, and the store reconnects. Idempotent; ``with SemToken(...) as engine:`` closes on leaving."""
        if self.batcher is not None:
            self.batcher.close()
        self.cache.flush()  # (the store has what this engine made, even while other engines share it)
        with self.parts._lock:
            was_open, self._closed = not self._closed, True
        if was_open:  # (the store closes with the last engine of its parts: others may be mid-call)
            self.parts.release()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the engine still serves, encoding on its own)."""
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def compress_many(self, chunk_lists: Sequence[Sequence[str]], queries: Sequence[str | None], *,
                      rate: float | None = None, target_tokens: int | None = None,
                      conversation_ids: Sequence[str | None] | None = None) -> list[CompressionResult]:
        """Compress many requests at once: ``compress(chunk_lists[i], queries[i], ...)`` for every ``i``,
        with the encoder work of all of them shared.

        The chunks missing from the cache are fingerprinted in one length-sorted encoder pass (a chunk
        that several requests share is encoded once) and all new queries are embedded in one more
        pass. Each result equals the single call's. Every request is checked before any work: a bad
        one raises ``TypeError``/``ValueError`` naming its index. ``rate``/``target_tokens`` apply to
        every request; ``conversation_ids`` gives one id (or None) per request, and requests of one
        conversation are served in order.

        >>> engine = SemToken()
        >>> out = engine.compress_many([["Paris is the capital of France. Bananas are yellow."],
        ...                             ["Bananas are yellow. Paris is the capital of France."]],
        ...                            ["capital of France", "fruit colour"], rate=0.5)
        >>> [r.compressed_tokens <= r.budget for r in out]
        [True, True]
        """
        return self._compress_many(chunk_lists, queries, rate, target_tokens, conversation_ids)

    def _compress_many(self, chunk_lists, queries, rate, target_tokens, conversation_ids,
                       abandoned: _Delivery | None = None) -> list[CompressionResult]:
        started = time.perf_counter()
        plans = self._plan_many(chunk_lists, queries, rate, target_tokens, conversation_ids)
        todo = [(p.chunks, p.query if self.config.use_query else None) for p in plans if p.done is None]
        with torch.inference_mode():
            prepared = self.preparer.prepare(todo) if todo else Prepared()
            out = []
            for p in plans:
                if p.done is not None:
                    out.append(p.done)
                    continue
                out.append(self._compress(p.chunks, p.counts, p.query, p.budget, p.conversation_id, started,
                                          p.overheads, prepared, abandoned=abandoned))
            return out

    async def acompress_many(self, chunk_lists: Sequence[Sequence[str]], queries: Sequence[str | None], *,
                             rate: float | None = None, target_tokens: int | None = None,
                             conversation_ids: Sequence[str | None] | None = None) -> list[CompressionResult]:
        """:meth:`compress_many` in a worker thread, keeping the event loop free. Cancelled (a timeout, a
        client gone), the thread still finishes its work, but remembers nothing for ``conversation_ids``:
        what was never delivered is not a repeat next turn."""
        return await _in_thread(self._compress_many, chunk_lists, queries, rate, target_tokens, conversation_ids)

    def _plan_many(self, chunk_lists, queries, rate, target_tokens, conversation_ids):
        """Check every request (errors name the index), then count tokens and set budgets."""
        if isinstance(chunk_lists, (str, bytes)):
            raise TypeError("chunk_lists must be a list of lists of str (one list per request), got a str")
        if isinstance(queries, (str, bytes)):
            raise TypeError("queries must be a list with one query (str or None) per request, got a str")
        chunk_lists, queries = list(chunk_lists), list(queries)
        if len(queries) != len(chunk_lists):
            raise ValueError(f"{len(chunk_lists)} chunk lists but {len(queries)} queries: give one per request")
        if conversation_ids is None:
            conversation_ids = [None] * len(chunk_lists)
        elif isinstance(conversation_ids, (str, bytes)) or len(conversation_ids) != len(chunk_lists):
            raise ValueError("conversation_ids must be a list with one id (str or None) per request")
        budget_rate, target = self._budget_args(rate, target_tokens)
        checked = []
        for i, (chunks, query, conv) in enumerate(zip(chunk_lists, queries, conversation_ids)):
            try:
                checked.append((_check_chunks(chunks), _check_query(query), _check_conversation(conv)))
            except (TypeError, ValueError) as e:
                raise type(e)(f"request {i}: {e}") from e
        started = time.perf_counter()
        return [self._plan(chunks, query, budget_rate, target, np.zeros(len(chunks), dtype=np.int64), conv, started)
                for chunks, query, conv in checked]

    def prewarm(self, texts: Sequence[str], *, batch_size: int = 256) -> int:
        """Fingerprint the texts the cache and its store lack, and store them; returns how many were encoded.

        For ingestion: chunks pre-warmed here (and in a store shared by replicas) are cache hits when a
        later call compresses them, which then encodes only the query. Blank and repeated texts are
        skipped; what the store already holds is not recomputed (one existence check), so a stopped
        pre-warm resumes. ``batch_size`` texts are encoded and stored at a time.

        >>> from semtoken_rag import SemToken
        >>> engine = SemToken()
        >>> engine.prewarm(["Paris is the capital of France.", "Paris is the capital of France.", " "])
        1
        >>> engine.prewarm(["Paris is the capital of France."])
        0
        """
        return self._prewarm(texts, batch_size)[0]

    def _prewarm(self, texts: Sequence[str], batch_size: int) -> tuple[int, int]:
        """:meth:`prewarm`; returns how many texts were encoded, and how many stored entries got the analysis
        they lacked (:meth:`_add_analyses`)."""
        texts = _check_chunks(texts)
        if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        batch_size = int(batch_size)
        by_key = {cache_key(t, self._namespace): t for t in texts if t.strip()}
        there = self.cache.contains_many(list(by_key))
        todo = [k for k, found in zip(by_key, there) if not found]
        analysed = self._add_analyses({k: by_key[k] for k, found in zip(by_key, there) if found}, batch_size, todo)
        with torch.inference_mode():
            for start in range(0, len(todo), batch_size):
                part = todo[start:start + batch_size]
                # (this call's own seconds: the encoder's running total also counts other threads' passes)
                fresh, stats = self.encoder.fingerprint_with_stats([by_key[k] for k in part])
                seconds = stats.seconds / len(part)
                extra = self._stored_arrays([by_key[k] for k in part], fresh)
                self.cache.put_many([(k, CacheEntry({"fingerprints": fp.vectors.numpy(),
                                                     "units": fp.units.astype(np.int32), **more}, seconds))
                                     for k, fp, more in zip(part, fresh, extra)])
        # (with write-behind, a batch is written while the next one is encoded; all are stored on return)
        self.cache.flush()
        return len(todo), analysed

    def _add_analyses(self, stored: dict[str, str], batch_size: int, todo: list[str]) -> int:
        """Give the ``stored`` entries (key -> text) that lack this engine's analysis (stored before analyses
        were, by a call, or under other settings or versions) the analysis of their stored fingerprints, no
        encoding; an entry keeps one analysis, the other ones are dropped. Entries found unusable on reading
        are appended to ``todo`` (to encode). Returns how many entries got one."""
        prefix = self._stored_prefix
        if prefix is None or not self.config.prewarm_analyses or not stored:
            return 0
        keys = list(stored)
        lacking = [k for k, has in zip(keys, self.cache.contains_arrays(keys, prefix)) if not has]
        done = 0
        for start in range(0, len(lacking), batch_size):
            part = lacking[start:start + batch_size]
            add = []  # (the store's own entries, not memory's, which may hold an analysis the store lost)
            for k, entry in zip(part, self.cache.stored_many(part)):
                if entry is None or not validate_fingerprints(entry.get("units"), entry.get("fingerprints"),
                                                              len(stored[k]), self.encoder.dim):
                    todo.append(k)  # (gone, damaged or wrong since the check: encoded afresh)
                elif not has_array(entry.arrays, prefix):  # (the check may miss some)
                    add.append((k, entry))
            if not add:
                continue
            with torch.inference_mode():
                extra = self._stored_arrays([stored[k] for k, _ in add], [entry_fingerprints(e) for _, e in add])
            kept = [{n: a for n, a in e.arrays.items() if not n.startswith(an.STORED_NAMESPACE)} for _, e in add]
            self.cache.put_many([(k, CacheEntry({**arrays, **more}, e.encode_seconds))
                                 for (k, e), arrays, more in zip(add, kept, extra)])
            done += len(add)
        if done:
            logger.info("kept the analysis of %d stored chunks that lacked it (from their stored fingerprints)", done)
        return done

    async def acompress(self, chunks: Sequence[str], query: str | None = None, *, rate: float | None = None,
                        target_tokens: int | None = None, conversation_id: str | None = None,
                        chunk_overheads: Sequence[int] | None = None,
                        context_excess: Callable[[list[str]], int] | None = None) -> CompressionResult:
        """:meth:`compress` in a worker thread, keeping the event loop free. Cancelled (a timeout, a client
        gone), the thread still finishes its work, but remembers nothing for ``conversation_id``: what was
        never delivered is not a repeat next turn."""
        return await _in_thread(self._compress_one, chunks, query, rate, target_tokens, conversation_id,
                                chunk_overheads, context_excess)

    def compress(self, chunks: Sequence[str], query: str | None = None, *, rate: float | None = None,
                 target_tokens: int | None = None, conversation_id: str | None = None,
                 chunk_overheads: Sequence[int] | None = None,
                 context_excess: Callable[[list[str]], int] | None = None) -> CompressionResult:
        """Compress ``chunks`` for ``query`` so that their downstream-LLM tokens fit the budget.

        Args:
            chunks: the retrieved texts, in order. Empty or whitespace-only chunks are allowed and come
                back as ``""``. One result per chunk, in the same order, always.
            query: the user's question; ``None`` (or blank) compresses by semantic density alone.
            rate: fraction of tokens kept, in (0, 1] (default ``config.rate``).
            target_tokens: absolute budget in tokens (> 0); overrides ``rate``.
            conversation_id: optional key; spans this conversation already received in earlier calls
                are dropped as repeats. Such a call judges repeats whatever its budget (one that holds
                every chunk whole still drops them, and remembers what it sends).
            chunk_overheads: optional non-negative int per chunk: tokens the caller adds around a chunk
                (a metadata header, a separator), paid once when anything of that chunk is kept (at
                most 2**53 in all). A chunk keeps nothing when its overhead leaves no room for a word.
            context_excess: optional check of the context the caller builds from the output: called with
                the compressed texts (one per chunk, ``""`` for those that kept nothing), it returns how
                many tokens that context is over the caller's budget (0 or less: it fits). Overheads
                charged per chunk are an estimate when the caller's tokenizer merges across what it
                joins (a separator without a newline, a header); with this check the weakest kept
                segments are dropped until the context itself fits, and only what is sent is remembered
                for ``conversation_id``. The framework integrations pass it.

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
        return self._compress_one(chunks, query, rate, target_tokens, conversation_id, chunk_overheads,
                                  context_excess)

    def _compress_one(self, chunks, query, rate, target_tokens, conversation_id, chunk_overheads, context_excess,
                      abandoned: _Delivery | None = None) -> CompressionResult:
        started = time.perf_counter()
        with self._session() as session:  # announced first: concurrent callers batch their encoding
            chunks = _check_chunks(chunks)
            query = _check_query(query)
            conversation_id = _check_conversation(conversation_id)
            budget_rate, target = self._budget_args(rate, target_tokens)
            overheads = _check_overheads(chunk_overheads, len(chunks))
            if context_excess is not None and not callable(context_excess):
                raise TypeError(f"context_excess must be callable (texts -> int), got {type(context_excess).__name__}")
            plan = self._plan(chunks, query, budget_rate, target, overheads, conversation_id, started)
            if plan.done is not None and (context_excess is None or not plan.done.compressed_tokens
                                          or _excess(context_excess, plan.done.texts) <= 0):
                return plan.done
            # (everything fits by the engine's counts but not as the caller joins it: select and trim)
            with torch.inference_mode():
                prepared = self._prepare(chunks, query, session)
                return self._compress(chunks, plan.counts, query, plan.budget, conversation_id, started,
                                      overheads, prepared, context_excess, abandoned)

    def _plan(self, chunks, query, budget_rate, target, overheads, conversation_id, started) -> _Plan:
        """Token counts and budget of one request; the result itself when no encoding is needed."""
        counts = self.analyses.counts(self._spec, chunks)
        total = int(counts.sum())
        full_overhead = int(overheads[[bool(c.strip()) for c in chunks]].sum()) if len(chunks) else 0
        budget = target if target is not None else math.floor(budget_rate * (total + full_overhead) + 1e-9)
        done = None
        # (a conversation's call takes the whole path whatever its budget: what it sends is remembered, and what
        # the conversation received before is dropped as repeats)
        if budget >= total + full_overhead and conversation_id is None:
            done = self._identity(chunks, counts, query, budget, started, full_overhead)
        elif total == 0:
            done = self._empty(chunks, counts, query, budget, started)
        return _Plan(chunks, query, counts, budget, overheads, conversation_id, done)

    @contextlib.contextmanager
    def _session(self):
        """The micro-batcher's session for one call, else None (no batcher, or closed: even while
        this call was joining, when the call encodes on its own as every call after close() does)."""
        batcher = self.batcher
        with contextlib.ExitStack() as stack:
            ticket = None
            if batcher is not None and not batcher.closed:
                try:
                    ticket = stack.enter_context(batcher.session())
                except RuntimeError:
                    if not batcher.closed:
                        raise
            yield ticket

    def _prepare_batch(self, requests: list[tuple[list[str], str | None, Prepared]]) -> list[Prepared]:
        """The micro-batcher's batch function: one shared preparation for all queued calls."""
        with torch.inference_mode():
            # (the worker never waits for another call's pass: the calls queued behind it would wait too)
            prepared = self.preparer.prepare([(c, q) for c, q, _ in requests], [k for _, _, k in requests],
                                             wait_for_others=False)
        return [prepared] * len(requests)

    def _prepare(self, chunks: list[str], query: str | None, session) -> Prepared:
        """Fingerprints and query vector of one call: from the caches, else through the micro-batcher
        (shared with concurrent calls), else one encoder pass of its own."""
        if query is not None and not self.config.use_query:
            query = None
        prepared = self.preparer.lookup(chunks, query)
        if prepared.covers(chunks, query):
            if session is not None:  # nothing to submit: no concurrent call's batch may wait for this one
                self.batcher.leave(session)
            return prepared
        if self.batcher is not None and not self.batcher.closed:
            try:
                return self.batcher.submit((chunks, query, prepared), session)
            except RuntimeError:
                if not self.batcher.closed:
                    raise
        return self.preparer.prepare([(chunks, query)], [prepared])

    # -- pipeline -----------------------------------------------------------------------------------
    def _budget_args(self, rate: float | None, target: int | None) -> tuple[float, int | None]:
        check_budget(rate, target)
        if target is not None:
            return 1.0, int(target)
        if rate is None:
            return self.config.rate, self.config.target_tokens
        return float(rate), None

    def _compress(self, chunks: list[str], counts: np.ndarray, query: str | None, budget: int,
                  conversation_id: str | None, started: float, overheads: np.ndarray, prepared: Prepared,
                  context_excess: Callable[[list[str]], int] | None = None,
                  abandoned: _Delivery | None = None) -> CompressionResult:
        """One request's selection, under its conversation's lock (:meth:`_conversation`: its repeat check and
        its remembering); ``abandoned``: the delivery to a caller that awaits the result (cancelled: nothing is
        remembered then)."""
        with self._conversation(conversation_id):
            return self._select(chunks, counts, query, budget, conversation_id, started, overheads, prepared,
                                context_excess, abandoned)

    def _select(self, chunks: list[str], counts: np.ndarray, query: str | None, budget: int,
                conversation_id: str | None, started: float, overheads: np.ndarray, prepared: Prepared,
                context_excess: Callable[[list[str]], int] | None,
                abandoned: _Delivery | None) -> CompressionResult:
        cfg = self.config
        fps = [prepared.fingerprints[c] for c in chunks]
        hits = sum(c in prepared.cached for c in chunks)
        encoder_calls = prepared.encoder_calls if any(c in prepared.encoded for c in chunks) else 0
        call = _concat(fps, self.encoder.device)
        n = len(call.chunk_of)
        if n == 0:
            return self._empty(chunks, counts, query, budget, started)
        # the query-independent work, once per chunk (analysis.py): costs in downstream-LLM tokens (each
        # unit with the whitespace before it); segments: sentences (chunk ends included), long ones cut to
        # max_segment_units words and to _MAX_SEGMENT_TOKENS tokens (pieces of text without spaces cost
        # many tokens each); structure.py: a table row, a code line, a list item is one segment;
        # protected text is one piece; the spans of local clustering (Algorithm 1) inside segments
        q_wanted = query is not None and cfg.use_query  # (maxsim reads the normalised rows too: made once)
        stored = functools.partial(self._stored_analysis, chunks, call, prepared) \
            if self._stored_prefix is not None and prepared.entries else None
        ana = self.analyses.analyse(self._spec, chunks, call.units, call.vectors, call.offsets, counts,
                                    call.normed if q_wanted else None, stored)
        unit_cost = ana.costs
        breaks = ana.breaks
        numbers = st.query_numbers(query) if query else frozenset()
        number_hits = np.concatenate([st.number_hits(text, u, numbers) for text, u in zip(chunks, call.units)]) \
            if numbers else None
        segs = sp.segment_bounds(breaks)
        seg_of_unit = np.repeat(np.arange(len(segs) - 1), np.diff(segs))
        seg_chunk = call.chunk_of[segs[:-1]]
        # spans by local clustering (Algorithm 1) inside segments; coarse ones collapse to their anchor
        if cfg.use_clustering:
            bounds = ana.bounds
        else:
            bounds = np.arange(n + 1, dtype=np.int64)
        starts, ends = bounds[:-1], bounds[1:]
        span_seg = seg_of_unit[starts]
        # query-independent vector statistics, once per chunk (analysis.py): window and segment entropies,
        # segment and chunk centroids; only the query's part of the score is computed per call
        cs = an.call_stats(self.analyses, self._spec, chunks, [fp.vectors for fp in fps], ana, cfg.window_units,
                           cfg.use_clustering)
        span_entropy, seg_entropy, centroids = cs.span_entropy, cs.seg_entropy, cs.centroids
        q, q_tokens = prepared.queries[query] if (query is not None and cfg.use_query) else (None, None)
        score = np.zeros(len(segs) - 1, dtype=np.float32)
        seg_rel_np = chunk_rel_np = None
        if q is not None:
            q_np = q.float().cpu().numpy()
            seg_rel_np, chunk_rel_np = centroids @ q_np, cs.chunk_centroids @ q_np
            # the only device work of a call: each query token's best cosine with a unit (one transfer back)
            rel = cfg.maxsim_weight * sp.maxsim(q_tokens, call.vectors, seg_of_unit, len(segs) - 1,
                                                normed=call.normed).cpu().numpy()
            terms = an.unit_term_codes(self.analyses, self._spec, chunks, call.units, ana) \
                if cfg.lexical_weight > 0 or cfg.chunk_lexical_weight > 0 else None
            if cfg.lexical_weight > 0:  # (evidence.py) exact words of the query, BM25 over the call's segments
                lex = ev.lexical_scores_of_codes(terms, ev.query_terms(query), segs)
                rel = rel + cfg.lexical_weight * lex.astype(np.float32)
            score += rel + cfg.sentence_weight * seg_rel_np + cfg.chunk_weight * chunk_rel_np[seg_chunk]
            if cfg.chunk_lexical_weight > 0:  # the same over the call's chunks, for each chunk's segments
                present = np.diff(call.offsets) > 0  # (a chunk without words is no document)
                chunk_lex = np.zeros(len(chunks))
                chunk_lex[present] = ev.lexical_scores_of_codes(terms, ev.query_terms(query),
                                                       np.append(call.offsets[:-1][present], n))
                score += cfg.chunk_lexical_weight * chunk_lex[seg_chunk].astype(np.float32)
            if cfg.neighbour_weight > 0:
                score += cfg.neighbour_weight * _neighbour_best(rel, seg_chunk)
            if cfg.answer_type_weight > 0:
                kind = ev.answer_type(query)
                if kind is not None:
                    exclude = frozenset(ev.query_terms(query)) | ev.query_words(query)
                    typed = an.type_hits(self.analyses, self._spec, chunks, call.units, ana, kind, exclude)
                    score += cfg.answer_type_weight * (np.add.reduceat(typed.astype(np.int64), segs[:-1]) > 0
                                                       ).astype(np.float32)
            if number_hits is not None:
                score += cfg.exact_number_weight * (np.add.reduceat(number_hits, segs[:-1]) > 0).astype(np.float32)
        if cfg.use_entropy or q is None:
            score += (cfg.entropy_weight if q is not None else 1.0) * sp.normalise(seg_entropy)
        score_np = score.astype(np.float64)
        centroids_t = torch.from_numpy(centroids).to(self.encoder.device) if self.repeat_search == "torch" else None
        # units the encoder could not see on their own (pieces of one [UNK] word, dropped characters)
        # carry a copy of the previous unit's vector: their spans are not judged coarse or repeats
        blind = ana.blind
        blind_span = np.add.reduceat(blind, starts) > 0
        collapsed = (ends - starts > 1) & (span_entropy <= cfg.delta) & ~blind_span if cfg.use_entropy \
            else np.zeros(len(starts), dtype=bool)
        collapsed &= ~(np.add.reduceat(ana.group >= 0, starts) > 0)  # protected text is never collapsed
        state = _State(chunks, counts, query, budget, started, overheads, call, segs, seg_of_unit, starts, ends,
                       collapsed, score_np, context_excess)
        # collapsed spans cost their anchor only
        kept_cost = np.where(_tails(starts, ends, collapsed, n), 0, unit_cost)
        cum = np.concatenate([[0], np.cumsum(kept_cost)])
        seg_cost = cum[segs[1:]] - cum[segs[:-1]]
        # repeats and redundancy-aware selection under the budget
        repeat = self._repeats(centroids, centroids_t, segs, score_np, conversation_id, chunks, call, ana) \
            & ~(np.add.reduceat(blind, segs[:-1]) > 0)
        seg_fence = np.add.reduceat(ana.fence, segs[:-1]) > 0
        seg_block = ana.block[segs[:-1]]
        allowed = ~repeat & ~seg_fence
        # titles (structure.py) come with their chunk's kept text: selection pays them as chunk overheads
        titles, sel_overheads = self._titles(chunks, call, segs, seg_chunk, seg_cost, overheads, ana)
        # a segment of which not even its cheapest word fits beside its chunk's overhead can give nothing
        # (and must not be the top-ranked one that the budget goes to)
        allowed &= ~titles & (overheads[seg_chunk] + np.minimum.reduceat(unit_cost, segs[:-1]) <= budget)
        keep = select_under_budget(
            score_np, seg_cost, seg_chunk, budget, self._gap_cost, allowed, centroids,
            cfg.redundancy_weight if cfg.dedup else 0.0, cfg.redundancy_threshold,
            sel_overheads if sel_overheads.any() else None)
        # -- hook (structure.py): fences come with kept code; when the top-ranked segment cannot fit on its
        # own, the budget goes to its best run of words, not to scraps of other passages; with
        # partial_fit, the best segment left over gets its best run of words that fits what is left
        top = int(np.flatnonzero(allowed)[np.argmax(score_np[allowed])]) if allowed.any() else -1
        if top >= 0 and seg_cost[top] + sel_overheads[seg_chunk[top]] > budget:
            keep[:] = False
        kept_blocks = np.unique(seg_block[keep & ~seg_fence & (seg_block >= 0)])
        keep |= seg_fence & np.isin(seg_block, kept_blocks)
        fences = (seg_block, seg_fence)
        counted: dict[str, int] = {}  # texts already counted by this call
        texts, slices, out_counts, keep_units = self._render(state, keep, fences, counted,
                                                             titles if titles.any() else None)
        # what is remembered as received: the selected segments that were sent (render may trim some)
        sent = keep & (np.add.reduceat(keep_units, segs[:-1]) > 0)
        if cfg.partial_fit or not keep_units.any():
            partial = self._best_partial(chunks, call, segs, keep_units, score_np, allowed,
                                         unit_cost, ana.group, q_tokens, overheads,
                                         budget - int(out_counts.sum()) - int(overheads[[bool(x) for x in slices]].sum()),
                                         counted)
            if partial is not None:
                with_part = keep_units | partial  # (a part of a segment is not remembered as received)
                part_slices = kept_slices_many(call.all_units, with_part, call.offsets)
                part_texts = [join_slices(t, x, cfg.gap_marker) for t, x in zip(chunks, part_slices)]
                if context_excess is None or _excess(context_excess, part_texts) <= 0:
                    keep_units, slices, texts = with_part, part_slices, part_texts
                    out_counts = self._count(texts, counted)
        if conversation_id is not None:
            self._remember(conversation_id, centroids, segs, sent, abandoned)
        span_kept = np.add.reduceat(keep_units, starts) > 0  # (partial fit can keep some of a span's units)
        span_status = np.where(collapsed & keep_units[starts], "collapsed", np.where(
            span_kept, "kept", np.where(repeat[span_seg], "repeat", "dropped")))
        span_rel = None if seg_rel_np is None else seg_rel_np[span_seg]
        # every span's window entropy, worked out for a chunk only when its spans are read (selection reads
        # the spans of several units alone)
        span_bounds = [e.bounds for e in ana.chunks] if cfg.use_clustering else \
            [np.arange(len(u) + 1, dtype=np.int64) for u in call.units]
        entropy = [functools.partial(_window_entropy, fp.vectors, b, cfg.window_units)
                   for fp, b in zip(fps, span_bounds)]
        return self._result(state, span_status, entropy, span_rel, chunk_rel_np, texts, slices, out_counts,
                            hits, encoder_calls)

    def _stored_analysis(self, chunks: list[str], call: _Call, prepared: Prepared, i: int) -> an.ChunkAnalysis | None:
        """The analysis that pre-warming kept in the entry of cached chunk ``i`` (asked by the analysis memo
        for chunks it lacks), or None; one that does not fit its chunk is ignored (logged once) and worked
        out again."""
        entry = prepared.entries.get(chunks[i])
        if entry is None or not len(call.units[i]):
            return None
        ana = an.from_stored(entry.arrays, self._stored_prefix, len(call.units[i]),  # type: ignore[arg-type]
                             int(call.vectors.shape[1]), self.config.window_units, self.config.use_clustering)
        if ana is None and self._stored_prefix + "costs" in entry.arrays:  # type: ignore[operator]
            self._warn("analysis", "ignoring the stored analysis of cache entry %s: it does not fit its chunk; it "
                       "is worked out again", cache_key(chunks[i], self._namespace)[:16])
        return ana

    def _stored_arrays(self, texts: list[str], fps: list[Fingerprints]) -> list[dict[str, np.ndarray]]:
        """What pre-warming keeps in each chunk's entry beside its fingerprints: its analysis (none where the
        settings cannot be named: :func:`semtoken_rag.analysis.stored_prefix`)."""
        if self._stored_prefix is None or not self.config.prewarm_analyses:
            return [{} for _ in texts]
        return an.analyse_for_store(self._spec, texts, [fp.units for fp in fps], [fp.vectors for fp in fps],
                                    self.config.window_units, self.config.use_clustering, self._stored_prefix,
                                    self.encoder.device)

    def _best_partial(self, chunks, call, segs, keep_units, score, allowed, unit_cost, group, q_tokens,
                      overheads, left: int, counted: dict[str, int]) -> np.ndarray | None:
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
        old = int(self._count([old_text], counted)[0]) if before.any() else 0
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

    def _repeats(self, centroids: np.ndarray, centroids_t: torch.Tensor, segs: np.ndarray, score: np.ndarray,
                 conversation_id: str | None, chunks: list[str], call: _Call, ana: an.CallAnalysis) -> np.ndarray:
        """Segments that repeat a better-ranked one (in any chunk) or what the conversation received."""
        cfg = self.config
        n_seg = len(segs) - 1
        if not cfg.dedup or n_seg == 0:
            return np.zeros(n_seg, dtype=bool)
        eligible = np.diff(segs) >= cfg.min_repeat_units
        order = np.lexsort((np.arange(n_seg), -score))
        if self.repeat_search == "torch":
            found = find_repeats_torch(centroids_t, np.arange(n_seg), order, cfg.repeat_threshold, eligible)
        else:
            found = find_repeats(centroids, np.arange(n_seg), order, cfg.repeat_threshold, eligible,
                                 use_gpu=self.repeat_search == "faiss-gpu")
        if cfg.repeat_guard:  # (evidence.py) a near-repeat with a number or name of its own stays
            def facts(k: int) -> frozenset[str]:  # the segment's numbers and names, memoised with its chunk
                a, b = int(segs[k]), int(segs[k + 1])
                c = int(call.chunk_of[a])
                off = int(call.offsets[c])
                return self.analyses.extra(self._spec, chunks[c], ana.chunks[c], ("facts", a - off, b - off),
                                           lambda: ev.facts(chunks[c], call.units[c][a - off:b - off]))

            for i in np.flatnonzero(found >= 0).tolist():
                if facts(i) - facts(int(found[i])):  # (ev.carries_new_facts)
                    found[i] = -1
        # the same words as a better-ranked segment (case and punctuation aside), whatever their vectors (a
        # sentence copied into two passages sits in other contexts, so its centroids can differ) and
        # whatever the repeat guard says (they hold the same words)
        if cfg.exact_repeats:
            keys = an.segment_keys(self.analyses, self._spec, chunks, call.units, ana)
            found = np.where(found < 0, exact_repeats(keys, order, eligible), found)
        repeat = found >= 0
        if conversation_id is not None:
            on_device = self.repeat_search == "torch"
            hit = self.memory.query(conversation_id, centroids_t if on_device else centroids, cfg.repeat_threshold)
            repeat |= (hit.cpu().numpy() if isinstance(hit, torch.Tensor) else hit) & eligible
        return repeat

    def _remember(self, conversation_id: str, centroids: np.ndarray, segs: np.ndarray, keep: np.ndarray,
                  delivery: _Delivery | None = None) -> None:
        chosen = keep & (np.diff(segs) >= self.config.min_repeat_units)
        if not chosen.any():
            return
        if delivery is None:
            self.memory.add(conversation_id, centroids[chosen])
        else:
            delivery.remember(self.memory, conversation_id, centroids[chosen])

    def _title_segments(self, chunks, call, segs, seg_chunk, ana) -> np.ndarray:
        """Per chunk, the segment that is its title (structure.title_units), ``-1`` where it has none."""
        out = np.full(len(chunks), -1, dtype=np.int64)
        first = np.searchsorted(segs[:-1], call.offsets[:-1])  # first segment of each chunk
        most = self.config.title_max_words
        for c, (text, units) in enumerate(zip(chunks, call.units)):
            k = self.analyses.extra(self._spec, text, ana.chunks[c], ("title", most),
                                    lambda t=text, u=units: st.title_units(t, u, most))
            f = int(first[c])
            if k and f < len(segs) - 1 and seg_chunk[f] == c and segs[f + 1] - segs[f] == k:
                out[c] = f
        return out

    def _titles(self, chunks, call, segs, seg_chunk, seg_cost, overheads, ana) -> tuple[np.ndarray, np.ndarray]:
        """Title segments (config ``keep_titles``) and the overheads selection pays per chunk: the caller's,
        plus its title and a gap marker."""
        titles = np.zeros(len(segs) - 1, dtype=bool)
        if not self.config.keep_titles:
            return titles, overheads
        sel = overheads.copy()
        title_seg = self._title_segments(chunks, call, segs, seg_chunk, ana)
        for c in np.flatnonzero(title_seg >= 0).tolist():
            f = int(title_seg[c])
            titles[f] = True
            sel[c] += int(seg_cost[f]) + self._gap_cost
        return titles, sel

    def _count(self, texts: list[str], counted: dict[str, int]) -> np.ndarray:
        """Budget tokens of ``texts``, counting only those not in ``counted`` (which learns them)."""
        todo = [t for t in dict.fromkeys(texts) if t not in counted]
        if todo:
            counted.update(zip(todo, self.tokenizer.count_many(todo).tolist()))
        return np.asarray([counted[t] for t in texts], dtype=np.int64)

    def _render(self, state: _State, keep: np.ndarray, fences: tuple[np.ndarray, np.ndarray] | None = None,
                counted: dict[str, int] | None = None, titles: np.ndarray | None = None
                ) -> tuple[list[str], list[list[tuple[int, int]]], np.ndarray, np.ndarray]:
        """Kept segments -> texts within the budget: the exact count decides, trimming the weakest kept
        segment while BPE merges across slice edges cost more than estimated. A title segment is kept
        exactly when something else of its chunk is. Returns the texts, their slices, their token counts
        and the kept-unit mask."""
        chunks, call, overheads, budget = state.chunks, state.call, state.overheads, state.budget
        keep = keep.copy()
        score = state.score.copy()
        if fences is not None:  # fence lines go with their block's code: never trimmed before it
            score[fences[1]] = np.inf
        if titles is not None:  # a title goes when the last of its chunk's text goes
            score[titles] = np.inf
            seg_chunk = call.chunk_of[state.segs[:-1]]
        dropped_tail = _tails(state.starts, state.ends, state.collapsed, len(call.chunk_of))
        seg_of_unit = state.seg_of_unit
        while True:
            if fences is not None:
                keep = st.balance_fences(keep, *fences)
            if titles is not None:
                body = keep & ~titles
                keep = body | (titles & np.isin(seg_chunk, seg_chunk[body]))
            keep_units = keep[seg_of_unit] & ~dropped_tail
            slices = kept_slices_many(call.all_units, keep_units, call.offsets)
            texts = [join_slices(t, s, self.config.gap_marker) for t, s in zip(chunks, slices)]
            out_counts = self._count(texts, counted if counted is not None else {})
            paid = int(overheads[[bool(s) for s in slices]].sum())
            excess = int(out_counts.sum()) + paid - budget
            if excess <= 0 and state.context_excess is not None:  # the caller's own count of its context
                excess = _excess(state.context_excess, texts)
            if excess <= 0:
                return texts, slices, out_counts, keep_units
            # BPE merges across slice edges can cost a token or two more than estimated: drop the
            # weakest kept segment until the exact count fits
            logger.debug("exact count over budget by %d tokens; trimming", excess)
            kept_idx = np.flatnonzero(keep)
            if len(kept_idx) == 0:  # nothing left to drop: the texts are all "" and cost 0
                return texts, slices, np.zeros_like(out_counts), keep_units
            keep[kept_idx[np.argmin(score[kept_idx])]] = False

    def _result(self, state: _State, status: np.ndarray, entropy: list[Any], span_rel: np.ndarray | None,
                chunk_rel_np: np.ndarray | None, texts: list[str], slices: list[list[tuple[int, int]]],
                out_counts: np.ndarray, hits: int, encoder_calls: int) -> CompressionResult:
        chunks, counts, call, starts, ends = state.chunks, state.counts, state.call, state.starts, state.ends
        score = state.score[state.seg_of_unit[starts]]
        span_chunk = call.chunk_of[starts]
        per_chunk = np.searchsorted(span_chunk, np.arange(len(chunks) + 1))
        char_start = call.all_units[starts, 0]
        char_end = call.all_units[ends - 1, 1]
        is_repeat = status == "repeat"
        out = []
        for i, text in enumerate(chunks):
            a, b = per_chunk[i], per_chunk[i + 1]
            infos = SpanList(char_start[a:b], char_end[a:b], status[a:b], entropy[i],
                             None if span_rel is None else span_rel[a:b], score[a:b])
            rep = tuple(zip(char_start[a:b][is_repeat[a:b]].tolist(), char_end[a:b][is_repeat[a:b]].tolist()))
            out.append(CompressedChunk(
                index=i, text=texts[i], kept_spans=tuple(slices[i]), original_tokens=int(counts[i]),
                compressed_tokens=int(out_counts[i]),
                relevance=None if chunk_rel_np is None else float(chunk_rel_np[i]),
                repeat_spans=rep, spans=infos))
        paid = int(state.overheads[[bool(s) for s in slices]].sum())
        return CompressionResult(tuple(out), state.query, state.budget, int(counts.sum()), int(out_counts.sum()),
                                 encoder_calls, hits, time.perf_counter() - state.started, paid)

    def _empty(self, chunks, counts, query, budget, started) -> CompressionResult:
        """No chunk has a word (whitespace only) and the budget is short: every chunk comes back ""."""
        return CompressionResult.nothing_kept(counts.tolist(), query, budget, time.perf_counter() - started)

    def _identity(self, chunks, counts, query, budget, started, overhead) -> CompressionResult:
        """Everything fits, overheads included: chunks come back unchanged (blank ones as ""), unscored
        (relevance None: nothing is encoded)."""
        out = tuple(CompressedChunk(i, t, ((0, len(t)),), int(c), int(c), None) if t.strip() else
                    CompressedChunk(i, "", (), int(c), 0, None) for i, (t, c) in enumerate(zip(chunks, counts)))
        return CompressionResult(out, query, budget, int(counts.sum()), sum(c.compressed_tokens for c in out),
                                 0, 0, time.perf_counter() - started, overhead)


def _excess(check: Callable[[list[str]], int], texts: list[str]) -> int:
    """A caller's ``context_excess`` of ``texts``, checked: an int (a bool or a float is its bug)."""
    got = check(list(texts))
    if isinstance(got, bool) or not isinstance(got, (int, np.integer)):
        raise TypeError(f"context_excess must return an int (tokens over the budget), got {type(got).__name__}")
    return int(got)


class _Delivery:
    """What a call made for an awaiting caller remembered for its conversations, taken back if that caller is
    cancelled before the result reaches it (a timeout, a client gone): what was never delivered is no repeat
    next turn. The thread cannot be stopped: it may remember before or after the cancel, and either way
    nothing of it stays."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._remembered: list[tuple[Any, str, np.ndarray, int]] = []

    def remember(self, memory: Any, conversation_id: str, centroids: np.ndarray) -> None:
        with self._lock:
            if self._cancelled:
                return
            epoch = memory.add(conversation_id, centroids)
            self._remembered.append((memory, conversation_id, centroids, epoch))

    def cancel(self) -> None:
        """Take back what was remembered (in the conversation's epoch only: one forgotten and started afresh
        since holds another call's rows); what the adds trimmed or evicted by the memory's bounds stays gone."""
        with self._lock:
            self._cancelled = True
            taken, self._remembered = self._remembered, []
        for memory, conversation_id, centroids, epoch in taken:
            memory.remove(conversation_id, centroids, epoch)


async def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args, abandoned=delivery)`` in a worker thread (as ``asyncio.to_thread``); cancelled while it
    runs or before its result is taken, what it remembered is taken back (:class:`_Delivery`)."""
    delivery = _Delivery()
    try:
        return await asyncio.to_thread(fn, *args, abandoned=delivery)
    except asyncio.CancelledError:
        delivery.cancel()
        raise


def choose_repeat_search(device: torch.device) -> str:
    """The repeat and conversation search path for an engine on ``device``, chosen once at start:
    ``"faiss-gpu"`` on CUDA when faiss has GPU support, ``"torch"`` (exact search on the device) on
    CUDA otherwise or wherever faiss is not installed, ``"faiss-cpu"`` on CPU.

    >>> choose_repeat_search(torch.device("cpu")) in ("faiss-cpu", "torch")
    True
    """
    try:
        import faiss  # noqa: F401 - only whether it imports
    except ImportError:
        return "torch"
    if device.type == "cuda":
        return "faiss-gpu" if faiss_gpu_available() else "torch"
    return "faiss-cpu"


def _window_entropy(vectors: torch.Tensor, bounds: np.ndarray, window_units: int) -> np.ndarray:
    """Window entropy of each span of one chunk (:func:`semtoken_rag.analysis.window_entropy`)."""
    return an.window_entropy(vectors.cpu().numpy(), bounds, window_units)


def _concat(fps: list[Fingerprints], device: torch.device) -> _Call:
    sizes = np.asarray([len(fp.units) for fp in fps], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if not len(fps):
        vectors = torch.zeros((0, 1), device=device)
    elif device.type == "cpu":  # each chunk's float16 rows converted into their place in one float32 array:
        # one pass over the rows, where a concatenation and then a conversion made two (0.3 of 0.55 ms here)
        vectors = torch.empty((int(offsets[-1]), fps[0].vectors.shape[1]), dtype=torch.float32)
        for fp, a, b in zip(fps, offsets[:-1].tolist(), offsets[1:].tolist()):
            if b > a:
                vectors[a:b].copy_(fp.vectors)
    else:  # float16 over the bus, converted on the device (numpy's concatenation: a plain copy)
        vectors = torch.from_numpy(np.concatenate([fp.vectors.numpy() for fp in fps])).to(device).float()
    units = [fp.units for fp in fps]
    all_units = np.concatenate(units) if units else np.zeros((0, 2), dtype=np.int64)
    return _Call(vectors, units, offsets, np.repeat(np.arange(len(fps)), sizes), all_units)


def _tails(starts: np.ndarray, ends: np.ndarray, collapsed: np.ndarray, n: int) -> np.ndarray:
    """Unit mask of the collapsed spans' units after their anchor (spans do not overlap).

    >>> _tails(np.array([0, 3, 4]), np.array([3, 4, 7]), np.array([True, False, True]), 7).astype(int).tolist()
    [0, 1, 1, 0, 0, 1, 1]
    """
    edges = np.zeros(n + 1, dtype=np.int64)
    np.add.at(edges, starts[collapsed] + 1, 1)
    np.add.at(edges, ends[collapsed], -1)
    return np.cumsum(edges[:-1]) > 0


def _neighbour_best(rel: np.ndarray, seg_chunk: np.ndarray) -> np.ndarray:
    """Per segment, the better relevance of its previous and next segment in the same chunk (its own
    where it has neither).

    >>> _neighbour_best(np.array([0.1, 0.5, 0.2, 0.9], dtype=np.float32), np.array([0, 0, 0, 1])).tolist()
    [0.5, 0.20000000298023224, 0.5, 0.8999999761581421]
    """
    same_prev = np.concatenate([[False], seg_chunk[1:] == seg_chunk[:-1]])
    same_next = np.concatenate([seg_chunk[:-1] == seg_chunk[1:], [False]])
    prev = np.where(same_prev, np.roll(rel, 1), -np.inf)
    nxt = np.where(same_next, np.roll(rel, -1), -np.inf)
    best = np.maximum(prev, nxt)
    return np.where(np.isinf(best), rel, best).astype(rel.dtype, copy=False)




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
        if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not 0 <= int(x) <= MAX_TOKENS:
            raise ValueError(f"chunk_overheads[{i}] must be an int in [0, 2**53], got {x!r}")
    values = [int(x) for x in overheads]
    if sum(values) > MAX_TOKENS:  # (budgets are worked out in int64 and float64: exact up to here)
        raise ValueError(f"chunk_overheads sum to {sum(values)} tokens, more than 2**53")
    return np.asarray(values, dtype=np.int64)


def _check_conversation(conversation_id: Any) -> str | None:
    if conversation_id is not None and not isinstance(conversation_id, str):
        raise TypeError(f"conversation id must be str or None, got {type(conversation_id).__name__}")
    return conversation_id


def _check_query(query: Any) -> str | None:
    if query is None:
        return None
    if not isinstance(query, str):
        raise TypeError(f"query must be str or None, got {type(query).__name__}")
    return query if query.strip() else None
