"""semtoken-rag itself, and its ablation variants (the paper's Table 2), behind the Method interface."""

from __future__ import annotations

from collections.abc import Sequence

from .. import encoder
from ..metrics import TokenCounter
from .base import Method, Output

# (method name suffix, label, SemTokenConfig field overrides). Data-driven: a variant whose fields
# SemTokenConfig does not have is skipped with a printed reason.
ABLATIONS: list[tuple[str, str, dict]] = [
    ("no_clustering", "w/o local clustering", {"use_clustering": False}),
    ("no_entropy", "w/o entropy scoring", {"use_entropy": False}),
    ("no_query", "w/o query conditioning", {"use_query": False}),
    ("no_dedup", "w/o cross-chunk repeat removal", {"dedup": False}),
    # the defaults before issue 14 (every recall lever off): benchmarks.levers ablates each lever
    ("no_levers", "w/o recall levers (lexical, answer type, neighbours, titles, repeat guard)",
     {"lexical_weight": 0.0, "answer_type_weight": 0.0, "neighbour_weight": 0.0, "keep_titles": False,
      "repeat_guard": False}),
]


def semtoken_available() -> tuple[bool, str]:
    try:
        from semtoken_rag import SemToken  # noqa: F401
    except Exception as exc:  # noqa: BLE001  # the engine may not exist yet, or fail to import
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def ablation_methods(counter: TokenCounter, log=print) -> list[SemTokenMethod]:
    from semtoken_rag import SemTokenConfig

    fields = set(SemTokenConfig.model_fields)
    out = []
    for suffix, label, overrides in ABLATIONS:
        missing = sorted(set(overrides) - fields)
        if missing:
            log(f"[ablation] skipping '{label}': SemTokenConfig has no field {', '.join(missing)}")
            continue
        out.append(SemTokenMethod(counter, overrides, name=f"semtoken_{suffix}", label=f"semtoken {label}"))
    return out


class SemTokenMethod(Method):
    measures_warm = True
    description = ("semtoken_rag.SemToken().compress(chunks, query, rate=r). Cold = first call for a question "
                   "after clearing the engine's fingerprint cache and query-vector memo; warm = repeat calls on "
                   "the same chunks (the other budgets, and a repeat of the first).")

    def __init__(self, counter: TokenCounter, overrides: dict | None = None, name: str = "semtoken",
                 label: str = "semtoken-rag"):
        self.counter = counter
        self.overrides = dict(overrides or {})
        self.name, self.label = name, label
        self.token_mismatches = 0
        self.engine_budget_mismatches = 0

    def setup(self):
        from semtoken_rag import SemToken, SemTokenConfig

        # the same device as every other peer (benchmarks.encoder.device()), not the engine's auto choice
        self.engine = SemToken(SemTokenConfig(device=encoder.device(), **self.overrides))
        # Check once that the engine's budget tokenizer is ours (Llama 3 via quicktok).
        probe = "The first Nobel Prize in Physics was awarded in 1901 to Wilhelm Conrad Röntgen, of Germany."
        if self.engine.count_tokens(probe) != self.counter(probe):
            raise RuntimeError("engine.count_tokens disagrees with the benchmark's llama3 counter")

    def clear_cache(self):
        self.engine.clear_caches(disk=True)

    def compress(self, chunks: Sequence[str], query: str, rate: float, budget: int) -> Output:
        res = self.engine.compress(list(chunks), query, rate=rate)
        texts = list(res.texts)
        mine = self.counter.context_tokens(texts)
        if mine != res.compressed_tokens:
            self.token_mismatches += 1
        if res.budget != budget:
            self.engine_budget_mismatches += 1
        enc_tok = None
        if res.cache_hits < len(chunks):   # something was encoded: tokens the encoder saw (approx., no overlap)
            tok = self.engine.encoder.tokenizer
            enc_tok = sum(len(ids) for ids in tok([query, *chunks], truncation=False)["input_ids"])
        return Output(texts, encoder_tokens=enc_tok)

    def config(self):
        cfg = self.engine.config.model_dump(mode="json") if hasattr(self, "engine") else {}
        cfg = {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool, type(None)))}
        stats = {}
        if hasattr(self, "engine"):
            import dataclasses

            try:
                st = self.engine.cache_stats()
                stats = dataclasses.asdict(st) if dataclasses.is_dataclass(st) else dict(st)
            except Exception as exc:  # noqa: BLE001  # informative only
                stats = {"error": str(exc)}
        return {**super().config(), "overrides": self.overrides, "engine_config": cfg, "cache_stats": stats,
                "token_count_mismatches": self.token_mismatches,
                "engine_budget_mismatches": self.engine_budget_mismatches}
