"""Objects whose threads and locks must be made anew in a child made by ``fork``.

A forked child has only the thread that forked: a lock another thread held then stays held there for
good, and a worker thread or a claim it would have finished never finishes. :func:`renew_after_fork`
registers an object (weakly) whose ``_after_fork()`` is called in every such child.
"""

from __future__ import annotations

import os
import weakref
from typing import Protocol


class _Renewable(Protocol):
    def _after_fork(self) -> None: ...


_objects: weakref.WeakSet = weakref.WeakSet()


def renew_after_fork(obj: _Renewable) -> None:
    """Call ``obj._after_fork()`` in each child this process forks from now on, while ``obj`` lives."""
    _objects.add(obj)


def _in_child() -> None:
    for obj in list(_objects):
        obj._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_child)
