"""Calibrate LlamaIndex SentenceEmbeddingOptimizer's ``percentile_cutoff`` per budget on the tuning split.

    python -m benchmarks.calibrate --n 150      # questions 0-149 (never the questions figures come from)

For each rate, the largest cutoff whose mean achieved ratio (kept / original Llama-3 tokens) stays
under the rate; when none does, the cutoff with the smallest ratio. Prints the grid's mean ratios and
the dict to paste into ``LlamaIndexOptimizer.CALIBRATED``.
"""

from __future__ import annotations

import argparse
import json

from .data import TUNE, load_nq, main_guard
from .metrics import TokenCounter, budget_for, mean
from .peers.frameworks import LlamaIndexOptimizer

GRID = (0.15, 0.2, 0.25, 0.3, 0.34, 0.4, 0.45, 0.5, 0.55, 0.6)


def pick(ratios: dict[float, float], rate: float) -> float:
    """The largest cutoff whose mean ratio is under ``rate``, else the one with the smallest ratio.

    >>> pick({0.2: 0.41, 0.25: 0.29, 0.3: 0.31, 0.34: 0.33, 0.4: 0.40}, 0.33)
    0.3
    >>> pick({0.2: 0.41, 0.25: 0.29}, 0.2)
    0.25
    """
    under = [c for c, r in ratios.items() if r < rate]
    return max(under) if under else min(ratios, key=ratios.get)


def _memoise_embeddings(embed_model) -> None:
    """Embed each sentence once for the whole grid (the optimizer re-embeds on every call; the cutoff
    changes only which sentences are kept, not their embeddings)."""
    inner, memo = embed_model._get_text_embeddings, {}

    def cached(texts: list[str]) -> list[list[float]]:
        missing = list(dict.fromkeys(t for t in texts if t not in memo))
        if missing:
            memo.update(zip(missing, inner(missing)))
        return [memo[t] for t in texts]

    object.__setattr__(embed_model, "_get_text_embeddings", cached)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=len(TUNE), help="questions from 0 on, inside the tuning split")
    p.add_argument("--rates", nargs="+", type=float, default=[0.5, 0.33, 0.2])
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    if not 0 < args.n <= len(TUNE):
        p.error(f"--n must be in 1..{len(TUNE)} (the tuning split 0-{TUNE.stop - 1}), got {args.n}")
    counter = TokenCounter("llama3")
    records = load_nq(args.n, "random", args.data_dir, start=TUNE.start)
    method = LlamaIndexOptimizer(counter, percentile={c: c for c in GRID})
    method.setup()
    _memoise_embeddings(method.embed_model)
    ratios = {}
    for cutoff in GRID:
        got = []
        for rec in records:
            total = counter.context_tokens(rec.chunks)
            out = method.compress(rec.chunks, rec.question, cutoff, budget_for(total, cutoff))
            got.append(counter.context_tokens(out.texts) / total)
        ratios[cutoff] = round(mean(got), 3)
        print(f"cutoff {cutoff:.2f}: mean achieved ratio {ratios[cutoff]:.3f}", flush=True)
    chosen = {rate: pick(ratios, rate) for rate in args.rates}
    print(json.dumps({"questions": f"{records[0].index}-{records[-1].index}", "ratios": ratios,
                      "calibrated": chosen}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
