"""Benchmark harness for semtoken-rag: answer recall vs tokens kept vs cost, beside peer methods.

Run ``python -m benchmarks --help``. Reusable pieces: :func:`benchmarks.data.load_nq`,
:func:`benchmarks.metrics.answer_recall_hit`, :func:`benchmarks.metrics.normalize_answer`.
"""

__all__ = ["data", "metrics"]
