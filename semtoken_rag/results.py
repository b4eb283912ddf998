"""Typed, frozen results: numbers as numbers, spans as character offsets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

SpanStatus = Literal["kept", "collapsed", "dropped", "repeat"]


@dataclass(frozen=True)
class SpanInfo:
    """One span of a chunk as the engine judged it (character offsets into the original chunk).

    ``status``: ``kept`` (all of it, or part of it when a segment too long for the budget gives its
    best run of words: ``kept_spans`` say which characters); ``collapsed`` (coarse, low-density span
    of which only the first word was kept); ``dropped`` (did not make the budget); ``repeat`` (repeats content kept from another chunk
    or already sent in the conversation).
    """

    start: int
    end: int
    status: SpanStatus
    entropy: float
    relevance: float | None
    score: float


class SpanList(Sequence[SpanInfo]):
    """The spans of one chunk, built as :class:`SpanInfo` objects only when read (a call judges
    thousands of spans; most callers never look at them). Immutable; equal to any sequence of the
    same spans. A column may be given as a function that makes it, called on first read (the engine
    gives the entropies so: until the spans are read, the list holds a reference to its chunk's cached
    fingerprints, which costs memory only once the cache has evicted them).

    >>> import numpy as np
    >>> spans = SpanList(np.array([0, 6]), np.array([5, 12]), np.array(["kept", "dropped"]),
    ...                  np.array([2.5, 3.0]), None, np.array([0.9, 0.1]))
    >>> len(spans), spans[1].status, spans[0] == SpanInfo(0, 5, "kept", 2.5, None, 0.9)
    (2, 'dropped', True)
    """

    __slots__ = ("_cols", "_items")

    def __init__(self, start: Any, end: Any, status: Any, entropy: Any, relevance: Any, score: Any) -> None:
        self._cols = (start, end, status, entropy, relevance, score)
        self._items: tuple[SpanInfo, ...] | None = None

    def _build(self) -> tuple[SpanInfo, ...]:
        if self._items is None:
            self._cols = tuple(c() if callable(c) else c for c in self._cols)  # (what a function held goes)
            start, end, status, entropy, relevance, score = self._cols
            rel = [None] * len(start) if relevance is None else [float(x) for x in relevance.tolist()]
            self._items = tuple(SpanInfo(a, b, str(st), float(h), r, float(sc)) for a, b, st, h, r, sc in zip(
                start.tolist(), end.tolist(), status.tolist(), entropy.tolist(), rel, score.tolist()))
        return self._items

    def __len__(self) -> int:
        return len(self._cols[0])

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (a result sent to another process) and copied as the tuple of its spans: unread, it holds
        a function over its chunk's fingerprints, a view of the whole call's (20-32 MB pickled)."""
        return (tuple, (self._build(),))

    def __getitem__(self, i):  # type: ignore[override]
        return self._build()[i]

    def __iter__(self):
        return iter(self._build())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (SpanList, tuple, list)):
            return self._build() == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._build())

    def __repr__(self) -> str:
        return f"SpanList({list(self._build())!r})"


@dataclass(frozen=True)
class CompressedChunk:
    """The compressed form of one input chunk.

    ``text`` is made only of slices of the original chunk, in order, joined by the gap marker;
    ``kept_spans`` are those slices' ``(start, end)`` character offsets into the original chunk.
    ``relevance`` is the chunk's query relevance; ``None`` without a query, and when the budget held every
    chunk whole in a call without a conversation (then nothing is encoded or scored).
    """

    index: int
    text: str
    kept_spans: tuple[tuple[int, int], ...]
    original_tokens: int
    compressed_tokens: int
    relevance: float | None
    repeat_spans: tuple[tuple[int, int], ...] = ()
    spans: Sequence[SpanInfo] = field(default=(), repr=False)  # a lazy SpanList from the engine

    @property
    def is_empty(self) -> bool:
        """True when nothing of the chunk was kept."""
        return not self.kept_spans

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (what integrations put in ``metadata["semtoken"]``)."""
        return {
            "original_tokens": self.original_tokens,
            "compressed_tokens": self.compressed_tokens,
            "kept_spans": [list(s) for s in self.kept_spans],
            "relevance": None if self.relevance is None else round(self.relevance, 6),
        }


@dataclass(frozen=True)
class CompressionResult:
    """What :meth:`SemToken.compress` returns: one :class:`CompressedChunk` per input chunk, in order.

    ``encoder_calls`` counts the encoder's forward batches spent on chunks (0 when every chunk came
    from the cache); ``cache_hits`` the chunks whose fingerprints came from the cache;
    ``overhead_tokens`` the ``chunk_overheads`` paid by the chunks that kept something (the budget
    holds ``compressed_tokens + overhead_tokens <= budget``). Results compare (and hash) by what was kept
    and counted: ``encoder_calls``, ``cache_hits`` and ``seconds`` say how this call got there, and are left
    out (a cached call equals the cold one).
    """

    chunks: tuple[CompressedChunk, ...]
    query: str | None
    budget: int
    original_tokens: int
    compressed_tokens: int
    encoder_calls: int = field(default=0, compare=False)
    cache_hits: int = field(default=0, compare=False)
    seconds: float = field(default=0.0, compare=False)
    overhead_tokens: int = 0

    @classmethod
    def nothing_kept(cls, counts: Sequence[int], query: str | None, budget: int = 0,
                     seconds: float = 0.0) -> CompressionResult:
        """The result that keeps nothing of chunks of ``counts`` tokens: every chunk ``""`` (a budget
        too small for any text, or chunks without words).

        >>> res = CompressionResult.nothing_kept([3, 0], "q")
        >>> res.texts, res.original_tokens, res.compressed_tokens
        (['', ''], 3, 0)
        """
        out = tuple(CompressedChunk(i, "", (), int(c), 0, None) for i, c in enumerate(counts))
        return cls(out, query, int(budget), sum(int(c) for c in counts), 0, 0, 0, seconds)

    @property
    def ratio(self) -> float:
        """Compressed tokens over original tokens (1.0 for empty input)."""
        return self.compressed_tokens / self.original_tokens if self.original_tokens else 1.0

    @property
    def texts(self) -> list[str]:
        """The compressed texts, one per input chunk."""
        return [c.text for c in self.chunks]

    def to_dict(self, spans: bool = False) -> dict[str, Any]:
        """JSON-able form of the whole result (``spans=True`` adds every span's judgement)."""
        chunks = []
        for c in self.chunks:
            d = {"index": c.index, "text": c.text, **c.to_dict(),
                 "repeat_spans": [list(s) for s in c.repeat_spans]}
            if spans:
                d["spans"] = [vars(s) for s in c.spans]
            chunks.append(d)
        return {"query": self.query, "budget": self.budget, "original_tokens": self.original_tokens,
                "compressed_tokens": self.compressed_tokens, "ratio": round(self.ratio, 6),
                "overhead_tokens": self.overhead_tokens, "encoder_calls": self.encoder_calls, "cache_hits": self.cache_hits,
                "seconds": round(self.seconds, 6), "chunks": chunks}
