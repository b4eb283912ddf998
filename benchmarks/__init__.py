"""Benchmark harness for semtoken-rag: answer recall vs tokens kept vs cost, beside peer methods.

Run ``python -m benchmarks --help``. Reusable pieces: :func:`benchmarks.data.load_nq`,
:func:`semtoken_rag.datasets.answer_in` (the one answer matcher, re-exported by :mod:`benchmarks.metrics`).
"""

__all__ = ["data", "metrics"]
