"""The benchmark's view of the NQ 20-passage set: the core loader, fed from the evaluation data folder.

Loading and answer matching live in :mod:`semtoken_rag.datasets`; this module only finds the full
NQ file (the bundled sample is far too small to benchmark on) and names the question splits.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from semtoken_rag.datasets import DATA_ENV, NQ_FILE, GoldPosition, NQRecord, gold_position_for
from semtoken_rag.datasets import load_nq as _load_nq

__all__ = ["EVAL", "NQ_FILE", "TUNE", "DataMissing", "NQRecord", "gold_position_for", "load_nq", "main_guard", "nq_source",
           "resolve_data_dir"]

# Questions 0-149 are for tuning; every figure the benchmarks report comes from questions 150-440.
TUNE = range(150)
EVAL = range(150, 441)


class DataMissing(FileNotFoundError):
    """The NQ evaluation file is not where a benchmark looked (it needs ``../shared/data`` or a path)."""


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Explicit argument, then ``$SEMTOKEN_RAG_DATA``, then ``<repo>/../shared/data``: the folder of NQ_FILE."""
    if data_dir:
        candidates = [Path(data_dir)]
    elif os.environ.get(DATA_ENV):
        candidates = [Path(os.environ[DATA_ENV])]
    else:
        candidates = [repo_root().parent / "shared" / "data"]
    for c in candidates:
        if c.is_file() and c.name == NQ_FILE:
            return c.parent
        if (c / NQ_FILE).is_file():
            return c
    raise DataMissing(f"{NQ_FILE} not found in {', '.join(str(c) for c in candidates)}; "
                            f"pass --data-dir or set {DATA_ENV}")


def load_nq(n: int | None = None, gold_position: GoldPosition = "random",
            data_dir: str | os.PathLike | None = None, start: int = 0) -> list[NQRecord]:
    """Up to ``n`` questions from ``start`` on, from the evaluation data (see :func:`resolve_data_dir`)."""
    return _load_nq(n, resolve_data_dir(data_dir) / NQ_FILE, gold_position, start)


def nq_source(data: str | os.PathLike | None) -> Path:
    """The NQ file that ``--data`` names (a file or its folder), else :class:`DataMissing`: the benchmarks
    measure on the full file, never on the bundled sample."""
    from semtoken_rag.datasets import resolve_source

    try:
        source = resolve_source(data)
    except FileNotFoundError as e:
        raise DataMissing(str(e)) from None
    if source is None:
        raise DataMissing("no NQ file given (--data)")
    return source


def main_guard(main: Callable[[], object]) -> int:
    """Run a benchmark's ``main()`` as a command: a missing NQ file is one line on stderr and exit status 2.

    The benchmarks need the full evaluation file (``../shared/data`` beside a checkout of the project, or
    ``--data-dir`` / ``$SEMTOKEN_RAG_DATA``); without it they stop before any work, not with a traceback.
    """
    try:
        status = main()
    except DataMissing as e:
        print(f"[bench] error: {e} (the benchmarks need the NQ evaluation file, ../shared/data in the "
              f"project's checkout)", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0
