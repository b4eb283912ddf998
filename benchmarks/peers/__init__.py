"""Peer methods, each behind :class:`benchmarks.peers.base.Method`. Heavy imports happen in setup()."""
from __future__ import annotations

from collections.abc import Callable

from ..metrics import TokenCounter

# name -> (factory, in --quick by default, runs on the small subset only)
QUICK = ["none", "truncation", "length_only", "rerank", "sentence_select", "semtoken"]
FULL = ["none", "truncation", "length_only", "rerank", "sentence_select", "llamaindex_sent_opt",
        "langchain_filter", "semtoken", "ablations", "longllmlingua"]
SLOW = {"longllmlingua"}


def _factories(counter: TokenCounter) -> dict[str, Callable[[], object]]:
    from . import simple

    def llamaindex():
        from .frameworks import LlamaIndexOptimizer
        return LlamaIndexOptimizer(counter)

    def langchain():
        from .frameworks import LangChainFilter
        return LangChainFilter()

    def longllmlingua():
        from .longllmlingua import LongLLMLingua
        return LongLLMLingua(counter)

    def semtoken():
        from .semtoken import SemTokenMethod
        return SemTokenMethod(counter)

    return {
        "none": simple.NoCompression,
        "truncation": lambda: simple.Truncation(counter),
        "length_only": lambda: simple.LengthOnly(counter),
        "rerank": lambda: simple.PassageRerank(counter),
        "sentence_select": lambda: simple.SentenceSelector(counter),
        "llamaindex_sent_opt": llamaindex,
        "langchain_filter": langchain,
        "semtoken": semtoken,
        "longllmlingua": longllmlingua,
    }


def known_names() -> list[str]:
    from .semtoken import ABLATIONS

    return [*FULL[:-2], *(f"semtoken_{s}" for s, _, _ in ABLATIONS), "ablations", "longllmlingua"]


def build_methods(names: list[str], counter: TokenCounter, log=print) -> list:
    """Instantiate methods by name ('ablations' expands to the semtoken config variants).

    semtoken and its ablations are skipped, with the reason printed, when the engine does not import.
    """
    from .semtoken import ABLATIONS, ablation_methods, semtoken_available

    factories = _factories(counter)
    ok, why = semtoken_available()
    methods, added = [], set()
    for name in names:
        if name == "ablations" or name.startswith("semtoken_"):
            known = {f"semtoken_{s}" for s, _, _ in ABLATIONS}
            if name != "ablations" and name not in known:
                raise ValueError(f"unknown method {name!r}; known: {', '.join(known_names())}")
            if not ok:
                log(f"[skip] {name}: semtoken_rag does not import ({why})")
                continue
            variants = ablation_methods(counter, log=log)
            if name != "ablations":
                variants = [v for v in variants if v.name == name]
        elif name not in factories:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(known_names())}")
        elif name == "semtoken" and not ok:
            log(f"[skip] semtoken: semtoken_rag does not import ({why})")
            continue
        else:
            variants = [factories[name]()]
        for v in variants:
            if v.name not in added:
                methods.append(v)
                added.add(v.name)
    return methods
