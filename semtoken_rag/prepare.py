"""The encoder work of one or many requests, done in one pass: chunk fingerprints and query vectors.

:class:`Preparer` looks every chunk up in the fingerprint cache, encodes the missing ones of *all*
requests in one length-sorted encoder pass (a chunk shared by several requests, or repeated inside
one, is encoded once), stores them, and embeds every uncached query in one more pass. The engine's
pipeline then runs per request on the :class:`Prepared` result without touching the encoder, which
is how ``compress_many`` and micro-batched concurrent calls share encoder passes.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .cache import CacheEntry, FingerprintCache, cache_key
from .encoder import Encoder, Fingerprints

logger = logging.getLogger(__name__)

QueryVector = tuple[torch.Tensor, torch.Tensor]  # pooled (d,), tokens (t, d); L2-normalised
Request = tuple[Sequence[str], "str | None"]


@dataclass
class Prepared:
    """Fingerprints and query vectors for a set of requests (texts and queries are the keys)."""

    fingerprints: dict[str, Fingerprints] = field(default_factory=dict)
    cached: set[str] = field(default_factory=set)  # texts whose fingerprints came from the cache
    encoded: set[str] = field(default_factory=set)  # texts encoded by this preparation's pass
    queries: dict[str, QueryVector] = field(default_factory=dict)
    encoder_calls: int = 0  # forward batches spent on chunks (queries excluded)

    def covers(self, chunks: Sequence[str], query: str | None) -> bool:
        return all(c in self.fingerprints for c in chunks) and (query is None or query in self.queries)


class Preparer:
    """Cache lookups plus one batched encoder pass for any number of requests (thread-safe)."""

    def __init__(self, encoder: Encoder, cache: FingerprintCache, namespace: str, max_queries: int = 1024
                 ) -> None:
        self.encoder, self.cache, self.namespace = encoder, cache, namespace
        self.max_queries = max_queries
        self._queries: OrderedDict[str, QueryVector] = OrderedDict()
        self._lock = threading.Lock()

    def clear_queries(self) -> None:
        with self._lock:
            self._queries.clear()

    def _cached_query(self, query: str) -> QueryVector | None:
        with self._lock:
            vec = self._queries.get(query)
            if vec is not None:
                self._queries.move_to_end(query)
            return vec

    def lookup(self, chunks: Sequence[str], query: str | None, into: Prepared | None = None) -> Prepared:
        """What the caches hold for one request (no encoding); check :meth:`Prepared.covers`."""
        out = into if into is not None else Prepared()
        for text in chunks:
            if text in out.fingerprints:
                continue
            if not text.strip():  # nothing to encode or cache: no units
                out.fingerprints[text] = _blank(text, self.encoder.dim)
                continue
            entry = self.cache.get(cache_key(text, self.namespace))
            if entry is not None:
                out.fingerprints[text] = Fingerprints(entry.arrays["units"].astype(np.int64),
                                                      torch.from_numpy(np.array(entry.arrays["fingerprints"])))
                out.cached.add(text)
        if query is not None and query not in out.queries:
            vec = self._cached_query(query)
            if vec is not None:
                out.queries[query] = vec
        return out

    def prepare(self, requests: Sequence[Request]) -> Prepared:
        """Fingerprints of every chunk and vectors of every query of ``requests``: cached ones looked
        up, the rest encoded in one pass each (chunks, then queries) and cached."""
        out = Prepared()
        for chunks, query in requests:
            self.lookup(chunks, query, out)
        missing = list(dict.fromkeys(t for chunks, _ in requests for t in chunks if t not in out.fingerprints))
        if missing:
            calls, seconds = self.encoder.forward_calls, self.encoder.encode_seconds
            fresh = self.encoder.fingerprint(missing)
            out.encoder_calls = self.encoder.forward_calls - calls
            per_text = (self.encoder.encode_seconds - seconds) / len(missing)
            for text, fp in zip(missing, fresh):
                out.fingerprints[text] = fp
                out.encoded.add(text)
                self.cache.put(cache_key(text, self.namespace), CacheEntry(
                    {"fingerprints": fp.vectors.numpy(), "units": fp.units.astype(np.int32)},
                    encode_seconds=per_text))
        new_queries = list(dict.fromkeys(q for _, q in requests if q is not None and q not in out.queries))
        if new_queries:
            vecs = self.encoder.embed_queries(new_queries)
            with self._lock:
                for q, vec in zip(new_queries, vecs):
                    out.queries[q] = vec
                    self._queries[q] = vec
                    self._queries.move_to_end(q)
                while len(self._queries) > self.max_queries:
                    self._queries.popitem(last=False)
        logger.debug("prepared %d requests: %d chunks encoded in %d batches, %d queries embedded",
                     len(requests), len(missing), out.encoder_calls, len(new_queries))
        return out


def _blank(text: str, dim: int) -> Fingerprints:
    return Fingerprints(np.zeros((0, 2), dtype=np.int64), torch.zeros((0, dim), dtype=torch.float16))
