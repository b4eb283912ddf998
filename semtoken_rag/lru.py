"""A thread-safe least-recently-used map bounded in bytes (storage layer).

Used for the in-memory fingerprint store and the engine's query memo: the caller says what one value
costs, the map evicts the least recently used values until the total is under the bound. And
:func:`remember`, the policy of the plain dict memos of words and pieces (bounded in entries).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

V = TypeVar("V")
K = TypeVar("K")


def remember(memo: dict[K, V], fresh: Mapping[K, V], limit: int) -> None:
    """Add ``fresh`` to ``memo``, a dict of at most ``limit`` entries: when they would not fit, the memo
    starts afresh; more new entries than it can hold at all (a huge text's words) are not kept. For memos
    of what recurs (a language's words), where recency matters less than the cost of an LRU per lookup;
    one dict operation each, so threads may share a memo.

    >>> memo = {"a": 1}
    >>> remember(memo, {"b": 2}, 2); sorted(memo)
    ['a', 'b']
    >>> remember(memo, {"c": 3}, 2); sorted(memo)
    ['c']
    >>> remember(memo, {"x": 0, "y": 0, "z": 0}, 2); sorted(memo)
    ['c']
    """
    if len(fresh) > limit:
        return
    if len(memo) + len(fresh) > limit:
        memo.clear()
    memo.update(fresh)


class ByteLRU(Generic[V]):
    """Map of at most ``max_bytes`` bytes (as ``sizeof(value)`` counts them); LRU eviction.

    A value larger than the whole bound is not kept (``put`` returns ``False``). ``max_bytes=0`` keeps
    nothing. Counts evictions; safe to share between threads.

    >>> lru = ByteLRU(max_bytes=10, sizeof=len)
    >>> lru.put("a", "xxxx"), lru.put("b", "yyyy"), lru.get("a")
    (True, True, 'xxxx')
    >>> lru.put("c", "zzzz")  # evicts "b", the least recently used
    True
    >>> sorted(lru.keys()), lru.nbytes, lru.evictions
    (['a', 'c'], 8, 1)
    """

    def __init__(self, max_bytes: int, sizeof: Callable[[V], int]) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an int >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._sizeof = sizeof
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self.evictions = 0

    def get(self, key: Hashable) -> V | None:
        """The value for ``key`` (now the most recently used), or ``None``."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def peek(self, key: Hashable) -> V | None:
        """The value for ``key``, or ``None``; its place in the order unchanged."""
        with self._lock:
            item = self._items.get(key)
            return None if item is None else item[0]

    def put(self, key: Hashable, value: V) -> bool:
        """Store ``value`` under ``key``, evicting old values; ``False`` if it alone exceeds the bound."""
        size = int(self._sizeof(value))
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size > self.max_bytes:
                return False
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped
                self.evictions += 1
            return True

    def pop(self, key: Hashable) -> V | None:
        """Remove ``key``; return its value or ``None``."""
        with self._lock:
            item = self._items.pop(key, None)
            if item is None:
                return None
            self._bytes -= item[1]
            return item[0]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes held, as ``sizeof`` counted them."""
        return self._bytes

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)
