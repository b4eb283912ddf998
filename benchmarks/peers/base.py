"""The interface every benchmarked method implements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Output:
    """What a method kept for one question at one budget.

    ``texts`` are the kept pieces (one per input chunk with "" for dropped ones, or whatever pieces
    the method returns); the context's token count is the sum of the pieces' token counts, and the
    context shown to a reader is the non-empty pieces joined with blank lines.
    """

    texts: list[str]
    encoder_tokens: int | None = None      # encoder tokens processed, for tokens/s


class Method:
    name: str = "method"
    label: str = "method"
    description: str = ""
    measures_warm: bool = False   # the runner also times a repeat call with a warm cache

    def setup(self) -> None:
        """Load models; timed separately from per-question latency."""

    def clear_cache(self) -> None:
        """Drop caches so the next call is cold."""

    def compress(self, chunks: Sequence[str], query: str, rate: float, budget: int) -> Output:
        if type(self).select is Method.select:
            raise NotImplementedError(f"{type(self).__name__} must implement compress() or prepare()/select()")
        return self.select(self.prepare(chunks, query), chunks, query, rate, budget)

    # Methods whose scoring does not depend on the budget split the work: the runner calls prepare()
    # once per question and select() per budget, and charges each budget prepare + select time (what
    # one compress() call costs), without recomputing embeddings three times.
    def prepare(self, chunks: Sequence[str], query: str):
        return None

    def select(self, state, chunks: Sequence[str], query: str, rate: float, budget: int) -> Output:
        return self.compress(chunks, query, rate, budget)

    def config(self) -> dict:
        return {"description": self.description}


def join_context(texts: Sequence[str]) -> str:
    return "\n\n".join(t for t in texts if t)
