"""The encoder work of one or many requests, done in one pass: chunk fingerprints and query vectors.

:class:`Preparer` looks every chunk up in the fingerprint cache, encodes the missing ones of *all*
requests in one length-sorted encoder pass (a chunk shared by several requests, or repeated inside
one, is encoded once), stores them, and embeds every uncached query in one more pass. The engine's
pipeline then runs per request on the :class:`Prepared` result without touching the encoder, which
is how ``compress_many`` and micro-batched concurrent calls share encoder passes.
"""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from .encoder import Encoder, Fingerprints
from .fileformat import CacheEntry, validate_fingerprints
from .forksafe import renew_after_fork
from .keys import cache_key
from .lru import ByteLRU
from .store import LayeredCache

logger = logging.getLogger(__name__)

QueryVector = tuple[torch.Tensor, torch.Tensor]  # pooled (d,), tokens (t, d); L2-normalised
Request = tuple[Sequence[str], "str | None"]


@dataclass
class Prepared:
    """Fingerprints and query vectors for a set of requests (texts and queries are the keys)."""

    fingerprints: dict[str, Fingerprints] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)  # texts whose fingerprints came from the cache
    entries: dict[str, CacheEntry] = field(default_factory=dict)  # their entries (stored analyses: engine)
    encoded: set[str] = field(default_factory=set)  # texts encoded by this preparation's pass
    missed: set[str] = field(default_factory=set)  # texts looked up and not found (not asked again)
    queries: dict[str, QueryVector] = field(default_factory=dict)
    encoder_calls: int = 0  # forward batches spent on chunks (queries excluded)

    def covers(self, chunks: Sequence[str], query: str | None) -> bool:
        return all(c in self.fingerprints for c in chunks) and (query is None or query in self.queries)

    def merge(self, other: Prepared) -> None:
        self.fingerprints.update(other.fingerprints)
        self.entries.update(other.entries)
        self.queries.update(other.queries)
        self.cached |= other.cached
        self.missed |= other.missed - self.fingerprints.keys()


class Preparer:
    """Cache lookups plus one batched encoder pass for any number of requests (thread-safe).

    ``queries`` is the engine's query memo: query -> (vector, bytes charged).
    """

    def __init__(self, encoder: Encoder, cache: LayeredCache, namespace: str,
                 queries: ByteLRU[tuple[QueryVector, int]]) -> None:
        self.encoder, self.cache, self.namespace, self.queries = encoder, cache, namespace, queries
        # entries already found to fit a chunk of a given length (entries are immutable): a memory hit
        # is not checked again on every call; weak, so an entry evicted from the cache is forgotten
        self._fit: weakref.WeakValueDictionary[tuple[int, int], CacheEntry] = weakref.WeakValueDictionary()
        # texts being encoded by a call in flight -> their fingerprints when done (:meth:`_claim`)
        self._in_flight: dict[str, tuple[Future[Fingerprints], int]] = {}  # (and the size of its pass)
        self._flight_lock = threading.Lock()
        renew_after_fork(self)

    def lookup(self, chunks: Sequence[str], query: str | None, into: Prepared | None = None) -> Prepared:
        """What the caches hold for one request (no encoding); check :meth:`Prepared.covers`."""
        out = into if into is not None else Prepared()
        asked = []
        for text in dict.fromkeys(chunks):
            if text in out.fingerprints or text in out.missed:
                continue
            if not text.strip():  # nothing to encode or cache: no units
                out.fingerprints[text] = _blank(self.encoder.dim)
            else:
                asked.append(text)

        def fits(j: int, entry: CacheEntry) -> bool:  # a valid checksum is not a valid entry
            seen = (id(entry), len(asked[j]))
            if self._fit.get(seen) is entry:
                return True
            ok = validate_fingerprints(entry.get("units"), entry.get("fingerprints"), len(asked[j]),
                                       self.encoder.dim)
            if ok:
                self._fit[seen] = entry
            return ok

        if asked:
            entries = self.cache.get_many([cache_key(t, self.namespace) for t in asked], valid=fits)
            for text, entry in zip(asked, entries):
                if entry is not None:
                    out.fingerprints[text] = entry_fingerprints(entry)
                    out.cached.add(text)
                    out.entries[text] = entry
                else:
                    out.missed.add(text)
        if query is not None and query not in out.queries:
            memo = self.queries.get(query)
            if memo is not None:
                out.queries[query] = memo[0]
        return out

    def prepare(self, requests: Sequence[Request], known: Sequence[Prepared | None] = (), *,
                wait_for_others: bool = True) -> Prepared:
        """Fingerprints of every chunk and vectors of every query of ``requests``: cached ones looked
        up, the rest encoded in one pass (the queries riding with the chunks) and cached. ``known``: lookups
        already made for these requests (their misses are not looked up again).

        Single flight: a chunk that a concurrent call is encoding is waited for, not encoded again, where
        that call's pass is not much larger than this one's (:data:`WAIT_FOR_AT_MOST`); with
        ``wait_for_others=False`` (the micro-batcher's worker, which must not hold back the calls queued
        behind it) it is encoded here too."""
        out = Prepared()
        for k in known:
            if k is not None:
                out.merge(k)
        for chunks, query in requests:
            self.lookup(chunks, query, out)
        missing = list(dict.fromkeys(t for chunks, _ in requests for t in chunks if t not in out.fingerprints))
        new_queries = list(dict.fromkeys(q for _, q in requests if q is not None and q not in out.queries))
        mine: list[str] = []
        try:
            mine, theirs, also = self._claim(missing, wait_for_others)
            # (a call in flight may have finished these between the lookup and the claim: not encoded again)
            self._from_memory(mine, out)
            vectors = self._encode([t for t in mine if t not in out.fingerprints] + also, new_queries, out)
        finally:
            self._release(mine, out)
        retry = []
        for text, pending in theirs.items():
            try:
                out.fingerprints[text] = pending.result()
                out.cached.add(text)  # (not encoded by this call: as a cache hit a moment later would be)
            except Exception:  # noqa: BLE001 - its encoder call failed there; this call tries it itself
                retry.append(text)
        if retry:
            self._encode(retry, [], out)
        for q, vec in zip(new_queries, vectors):
            out.queries[q] = vec
            size = sys.getsizeof(q) + 256 + sum(t.element_size() * t.nelement() for t in vec)
            self.queries.put(q, (vec, size))
        logger.debug("prepared %d requests: %d chunks missed, %d waited for (%d encoded after all), %d "
                     "queries embedded, %d encoder batches", len(requests), len(missing), len(theirs),
                     len(retry), len(new_queries), out.encoder_calls)
        return out

    def _encode(self, texts: list[str], queries: list[str], out: Prepared) -> list[QueryVector]:
        """Fingerprint ``texts`` and embed ``queries`` in one pass (the queries ride in the padding of the
        chunks' rows: Encoder.encode), into ``out`` and the cache; returns the query vectors."""
        if not texts:
            return self.encoder.embed_queries(queries)
        fresh, vectors, spent = self.encoder.encode(texts, queries)
        out.encoder_calls += spent.batches
        seconds = spent.seconds / len(texts)
        new = []
        for text, fp in zip(texts, fresh):
            out.fingerprints[text] = fp
            out.encoded.add(text)
            entry = CacheEntry({"fingerprints": fp.vectors.numpy(), "units": fp.units.astype(np.int32)},
                               encode_seconds=seconds)
            # made here by the encoder for this text: it fits, and a memory hit need not check it
            # (0.3 ms of the next call on these 20 passages, the second turn of a chat)
            self._fit[(id(entry), len(text))] = entry
            new.append((cache_key(text, self.namespace), entry))
        self.cache.put_many(new)
        return vectors

    def _from_memory(self, texts: list[str], out: Prepared) -> None:
        """Those of ``texts`` that the memory cache holds now, into ``out`` (no stats: they were counted as
        misses by the lookup a moment ago)."""
        if not texts:
            return
        for text, entry in zip(texts, self.cache.memory.get_many([cache_key(t, self.namespace) for t in texts])):
            if entry is not None and self._fit.get((id(entry), len(text))) is entry:  # (made by this process)
                out.fingerprints[text] = entry_fingerprints(entry)
                out.cached.add(text)

    def _claim(self, texts: list[str], wait: bool = True
               ) -> tuple[list[str], dict[str, Future[Fingerprints]], list[str]]:
        """Of ``texts``: those this call encodes and has claimed (concurrent calls wait for them), those it
        waits for (claimed by a call in flight whose pass is at most :data:`WAIT_FOR_AT_MOST` times this
        one's), and those it encodes although claimed (that call's pass is larger, or ``wait`` is False). A
        call encodes all it claimed before it waits for any other: no two calls wait for each other."""
        mine, theirs, also = [], {}, []
        limit = max(WAIT_FOR_AT_MOST * len(texts), WAIT_FOR_AT_LEAST)
        with self._flight_lock:
            for text in texts:
                claimed = self._in_flight.get(text)
                if claimed is None:
                    mine.append(text)
                elif wait and claimed[1] <= limit:
                    theirs[text] = claimed[0]
                else:
                    also.append(text)
            for text in mine:
                self._in_flight[text] = (Future(), len(mine))
        return mine, theirs, also

    def _release(self, texts: list[str], out: Prepared) -> None:
        """The claimed ``texts`` are done: their waiters get the fingerprints, or an error where the
        encoder call failed (they then encode the texts themselves)."""
        with self._flight_lock:
            done = [(self._in_flight.pop(text)[0], out.fingerprints.get(text)) for text in texts]
        for pending, fp in done:
            if fp is not None:
                pending.set_result(fp)
            else:
                pending.set_exception(RuntimeError("the concurrent call encoding this chunk failed"))

    def _after_fork(self) -> None:
        """In a forked child: the chunks in flight are the parent's threads' (they never finish here)."""
        self._in_flight = {}
        self._flight_lock = threading.Lock()


#: a call waits for a chunk that a concurrent call is encoding when that call's pass holds at most this many
#: times the chunks this call misses (or WAIT_FOR_AT_LEAST): a one-chunk call does not wait for a pass of
#: 240 (1.9 s against 38 ms encoding it itself, CPU), eight calls on the same 20 passages share one
WAIT_FOR_AT_MOST = 2
WAIT_FOR_AT_LEAST = 16



def entry_fingerprints(entry: CacheEntry) -> Fingerprints:
    """A cached entry's :class:`Fingerprints` (its units as int64, its vectors as :func:`_vectors`)."""
    return Fingerprints(entry["units"].astype(np.int64), _vectors(entry))


def _vectors(entry: CacheEntry) -> torch.Tensor:
    """A cached entry's fingerprints as a tensor: the cache's own memory where the entry has a writable alias
    of it (entries made in this process; nothing downstream writes to fingerprints), else a copy (entries
    decoded from a store's bytes). The copy cost 0.6 ms of a 6 ms call on cached chunks (20 passages)."""
    shared = entry.shared_array("fingerprints")
    return torch.from_numpy(shared if shared is not None else np.array(entry["fingerprints"]))


def _blank(dim: int) -> Fingerprints:
    return Fingerprints(np.zeros((0, 2), dtype=np.int64), torch.zeros((0, dim), dtype=torch.float16))
