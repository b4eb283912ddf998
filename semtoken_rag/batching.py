"""Micro-batching: concurrent callers share one call of a batch function.

Callers (threads, or asyncio tasks through :meth:`MicroBatcher.asubmit`) submit one item each; a
worker thread takes what has queued, calls ``fn(items)`` once and routes each result (or exception)
back to the caller that submitted the item, as text-embeddings-inference batches requests for one
forward pass.

A caller that knows it *may* submit soon opens a :meth:`MicroBatcher.session` first (the engine does
so on entering ``compress``). Before a call, the worker waits for the items of open sessions, at most
``window_ms``, and stops as soon as every open session has submitted or left: a lone caller never
waits, and callers that have not announced themselves are not waited for. While ``fn`` runs, new
items queue up and go together into the next call (continuous batching).

Guarantees: every submitted item gets exactly one result or exception; results keep the item's
identity (``fn`` must return one result per item, in order); when ``fn`` raises on a batch of
several items, each item is retried alone so that the exception reaches only the caller whose item
raised it; the wait before a batch starts is bounded by ``window_ms``; :meth:`MicroBatcher.close`
serves what was queued, then stops the worker; a submit after close raises ``RuntimeError``. In a
child process made by ``fork`` (``gunicorn --preload``, ``multiprocessing``), whose copy has no worker
thread, every batcher is closed: callers there do their work on their own instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


_LIVE: weakref.WeakSet[MicroBatcher] = weakref.WeakSet()  # every batcher of this process (see _after_fork)


def _after_fork() -> None:
    """In a forked child: the batchers' worker threads were not copied, and their locks may have been
    held by a thread that does not exist here. Each batcher gets fresh ones and is closed, with nothing
    queued (its queue belonged to the parent's callers)."""
    for batcher in list(_LIVE):
        batcher._cond = threading.Condition()
        batcher._queue = deque()
        batcher._announced = 0
        batcher._closed = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class _Session:
    """A caller's announcement that it may submit one item (see :meth:`MicroBatcher.session`)."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = True


class MicroBatcher(Generic[T, R]):
    """Coalesce items submitted by concurrent callers into calls of ``fn(list_of_items)``.

    Args:
        fn: the batch function; gets a non-empty list and returns a sequence of one result per item.
        window_ms: the longest the worker waits for items of open sessions after the first item
            (>= 0). 0 still batches what queued while the previous call ran, and never waits.
        max_batch: most items in one call (>= 1).
        name: the worker thread's name (for logs and debuggers).

    Example:
        >>> import threading
        >>> batches = []
        >>> def square_all(xs):
        ...     batches.append(len(xs))
        ...     return [x * x for x in xs]
        >>> ready = threading.Barrier(8)
        >>> with MicroBatcher(square_all, window_ms=5000) as mb:
        ...     out = [None] * 8
        ...     def work(i):
        ...         with mb.session() as s:  # announced: the worker waits for this item
        ...             ready.wait()
        ...             out[i] = mb.submit(i, s)
        ...     threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        ...     for t in threads: t.start()
        ...     for t in threads: t.join()
        >>> out
        [0, 1, 4, 9, 16, 25, 36, 49]
        >>> batches  # one call; no 5 s wait: every session had submitted
        [8]
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], *, window_ms: float = 2.0, max_batch: int = 256,
                 name: str = "semtoken-batcher") -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if isinstance(window_ms, bool) or not isinstance(window_ms, (int, float)) or not window_ms >= 0:
            raise ValueError(f"window_ms must be a number >= 0, got {window_ms!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        self.fn, self.window = fn, float(window_ms) / 1000.0
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: deque[tuple[T, Future]] = deque()
        self._announced = 0  # open sessions that have not submitted yet
        self._closed = False
        self.batches = 0  # calls of fn made (retries of a failed batch included)
        self.items = 0  # items served
        self._worker = threading.Thread(target=self._run, name=name, daemon=True)
        self._worker.start()
        _LIVE.add(self)

    # -- callers ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[_Session]:
        """Announce a caller that may :meth:`submit` one item; pass the session to ``submit``.

        Leaving the block without submitting withdraws the announcement.
        """
        ticket = _Session()
        with self._cond:
            if self._closed:
                raise RuntimeError("MicroBatcher is closed")
            self._announced += 1
        try:
            yield ticket
        finally:
            self._withdraw(ticket)

    def leave(self, session: _Session | None) -> None:
        """Withdraw ``session``'s announcement early: its caller will not submit (it found everything
        it needed elsewhere), so no batch waits for it. Idempotent; also what leaving the block does."""
        self._withdraw(session)

    def _withdraw(self, ticket: _Session | None) -> None:
        if ticket is not None and ticket.open:
            with self._cond:
                ticket.open = False
                self._announced -= 1
                self._cond.notify_all()

    def submit_future(self, item: T, session: _Session | None = None) -> Future:
        """Queue ``item``; a :class:`concurrent.futures.Future` of its result."""
        future: Future = Future()
        if threading.current_thread() is self._worker:  # fn submitting again: serve inline, no deadlock
            self._withdraw(session)
            self._serve([(item, future)])
            return future
        with self._cond:
            if self._closed:
                raise RuntimeError("MicroBatcher is closed")
            if session is not None and session.open:
                session.open = False
                self._announced -= 1
            self._queue.append((item, future))
            self._cond.notify_all()
        return future

    def submit(self, item: T, session: _Session | None = None) -> R:
        """Queue ``item`` and block until its result (or raise the exception ``fn`` raised for it)."""
        return self.submit_future(item, session).result()

    async def asubmit(self, item: T, session: _Session | None = None) -> R:
        """:meth:`submit` for asyncio: awaits the result without blocking the event loop."""
        return await asyncio.wrap_future(self.submit_future(item, session))

    def close(self, timeout: float | None = None) -> None:
        """Serve what is queued, then stop the worker (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def announced(self) -> int:
        """Open sessions that have neither submitted nor left: the callers a batch would wait for."""
        return self._announced

    def __enter__(self) -> MicroBatcher[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker -----------------------------------------------------------------------------------
    def _take(self) -> list[tuple[T, Future]] | None:
        """The next batch (waits for it), or None once closed and drained."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.window
            while len(self._queue) < self.max_batch and self._announced > 0 and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(len(self._queue), self.max_batch)
            return [self._queue.popleft() for _ in range(n)]

    def _run(self) -> None:
        try:
            while True:
                batch = self._take()
                if batch is None:
                    return
                self._serve(batch)
        finally:  # stopped (closed, or a BaseException escaped): nobody may wait forever
            with self._cond:
                self._closed = True
                left = list(self._queue)
                self._queue.clear()
            for _, f in left:
                if f.set_running_or_notify_cancel():
                    f.set_exception(RuntimeError("MicroBatcher worker stopped"))

    def _serve(self, batch: list[tuple[T, Future]]) -> None:
        live = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]
        if not live:
            return
        self.batches += 1
        try:
            results = list(self.fn([item for item, _ in live]))
            if len(results) != len(live):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(live)} items")
        except Exception as e:  # noqa: BLE001 - routed to the callers, never lost
            if len(live) == 1:
                live[0][1].set_exception(e)
            else:
                logger.debug("batch of %d failed (%r); serving its items one by one", len(live), e)
                for pair in live:
                    self._serve_alone(pair)
            return
        except BaseException as e:  # KeyboardInterrupt, SystemExit: fail this batch, stop the worker
            for _, f in live:
                f.set_exception(e)
            raise
        self.items += len(live)
        for (_, f), r in zip(live, results):
            f.set_result(r)

    def _serve_alone(self, pair: tuple[T, Future]) -> None:
        item, future = pair
        self.batches += 1
        try:
            results = list(self.fn([item]))
            if len(results) != 1:
                raise RuntimeError(f"batch function returned {len(results)} results for 1 item")
        except Exception as e:  # noqa: BLE001 - routed to this caller
            future.set_exception(e)
            return
        self.items += 1
        future.set_result(results[0])
