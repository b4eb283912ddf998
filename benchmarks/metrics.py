"""Answer matching (the core matcher, :func:`semtoken_rag.datasets.answer_in`), token counting and cost
statistics."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import cache

from semtoken_rag.datasets import answer_in, normalize_answer

__all__ = ["TokenCounter", "answer_in", "best_subspan_em", "budget_for", "mean", "median", "normalize_answer",
           "percentile"]


def best_subspan_em(prediction: str, answers: Iterable[str]) -> bool:
    """Lost-in-the-middle metric: a normalized gold answer occurs in the normalized prediction."""
    return answer_in(answers, prediction)


# --- downstream-LLM token counting -------------------------------------------------------------

@cache
def _encoding(name: str):
    import quicktok

    return quicktok.get_encoding(name)


class TokenCounter:
    """Counts downstream-LLM tokens (default: Llama 3 vocabulary via the offline ``quicktok`` package)."""

    def __init__(self, encoding: str = "llama3"):
        self.name = encoding
        self.enc = _encoding(encoding)

    def __call__(self, text: str) -> int:
        return self.enc.count(text) if text else 0

    def encode(self, text: str) -> list[int]:
        return list(self.enc.encode(text)) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))

    def context_tokens(self, texts: Iterable[str]) -> int:
        """Tokens of a context = sum over kept chunks of tokens(chunk text)."""
        return sum(self(t) for t in texts if t)


def budget_for(original_tokens: int, rate: float) -> int:
    """The token budget every method is held to: floor(rate * original), at least 1."""
    return max(1, math.floor(rate * original_tokens + 1e-9))


# --- statistics ---------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for no values."""
    vals = sorted(v for v in values if v is not None and not math.isnan(v))
    if not vals:
        return float("nan")
    if len(vals) == 1:
        return float(vals[0])
    k = (len(vals) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return float(vals[lo] + (vals[hi] - vals[lo]) * (k - lo))


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")
