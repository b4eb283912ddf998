"""Where one ``compress`` call's time goes, stage by stage: what ``benchmarks.gpu`` reports beside a call's
total, so that a run on another machine says which part of the host work to cut.

The stages are the engine's own steps, timed from outside: while :func:`timed_stages` is open, each step's
function is wrapped by one that adds its wall time to a counter (the engine's code is not changed, and the
functions are restored when it closes). Times are inclusive: a stage's nested work (the pooling inside the
forward) is listed under it and also counted in it. On CUDA the forward stage ends with a synchronisation,
so that the device's work is counted there rather than in the next step that waits for it; the other
steps are timed as they run (a transfer back to the host waits inside the step that asks for it).

``other`` is the call's time that no top-level stage holds: argument checks, the plan, the budget's
arithmetic, the scoring's numpy work between steps.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from semtoken_rag import analysis as an
from semtoken_rag import budget as bu
from semtoken_rag import encoder as ec
from semtoken_rag import engine as en
from semtoken_rag import spans as sp

# (label, owner, attribute, nested in): the stages in the order a call meets them
STAGES: tuple[tuple[str, object, str, str | None], ...] = (
    ("token counts (plan)", an.AnalysisMemo, "counts", None),
    ("tokenize and window", ec.Encoder, "_plan", None),
    ("encoder forward", ec.Encoder, "_forward", None),
    ("pooling", ec._Pooling, "add", "encoder forward"),
    ("per-chunk analysis", an.AnalysisMemo, "analyse", None),
    ("unit costs (downstream tokens)", bu.BudgetTokenizer, "count_pieces", "per-chunk analysis"),
    ("local clustering", sp, "local_clusters", "per-chunk analysis"),
    ("vector statistics", an, "call_stats", None),
    ("query relevance (maxsim)", sp, "maxsim", None),
    ("search terms", an, "unit_term_codes", None),
    ("answer types", an, "type_hits", None),
    ("repeats", en.SemToken, "_repeats", None),
    ("selection", en, "select_under_budget", None),
    ("render and count", en.SemToken, "_render", None),
    ("partial fit", en.SemToken, "_best_partial", None),
    ("result", en.SemToken, "_result", None),
)


@contextlib.contextmanager
def timed_stages(device: torch.device | None = None) -> Iterator[dict[str, float]]:
    """Seconds per stage label (:data:`STAGES`), summed over every call made while open."""
    seconds: dict[str, float] = collections.defaultdict(float)
    saved = []
    for label, owner, name, _parent in STAGES:
        original = getattr(owner, name, None)
        if original is None:  # (a step renamed or gone: the table loses a row, the run goes on)
            continue
        sync = device is not None and device.type == "cuda" and label == "encoder forward"
        saved.append((owner, name, original))
        setattr(owner, name, _timer(original, label, seconds, device if sync else None))
    try:
        yield seconds
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def _timer(fn: Callable, label: str, seconds: dict[str, float], sync: torch.device | None) -> Callable:
    @functools.wraps(fn)
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if sync is not None:
                torch.cuda.synchronize(sync)
            seconds[label] += time.perf_counter() - started
    return timed


def _timed_call(engine, q, rate: float) -> float:
    """Seconds of one ``compress`` of question ``q`` (on CUDA, from an idle device to its end)."""
    dev = engine.encoder.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    started = time.perf_counter()
    engine.compress(list(q.chunks), q.question, rate=rate)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - started


def breakdown(engine, questions, rate: float, clear: Callable[[], None]) -> dict:
    """Median ms per stage over ``questions`` (objects with ``chunks`` and ``question``), for a cold call
    (after ``clear()``) and a warm one (the same call again), with each call's total and ``other``."""
    dev = engine.encoder.device
    rows: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    for q in questions:
        clear()
        for kind in ("cold", "warm"):
            with timed_stages(dev) as seconds:
                total = _timed_call(engine, q, rate)
            row = dict(seconds)
            row["total"] = total
            row["other"] = total - sum(row.get(label, 0.0) for label, _o, _n, parent in STAGES if parent is None)
            rows[kind].append(row)
    labels = [label for label, *_ in STAGES] + ["other", "total"]
    out: dict = {kind: {label: 1000 * statistics.median(r.get(label, 0.0) for r in found) for label in labels}
                 for kind, found in rows.items()}
    out["questions"] = len(questions)
    out["nested"] = {label: parent for label, _o, _n, parent in STAGES if parent}
    return out


def host_reference(engine_factory: Callable[[], object], questions, rate: float) -> dict:
    """Warm calls of an engine made by ``engine_factory`` (on the CPU): the host's own speed at the
    same work, beside the device engine's warm calls (median ms, 3 warm calls a question after a cold one)."""
    engine = engine_factory()
    warm = []
    for q in questions:
        engine.compress(list(q.chunks), q.question, rate=rate)
        warm.append(statistics.median(_timed_call(engine, q, rate) for _ in range(3)))
    close = getattr(engine, "close", None)
    if callable(close):
        close()
    return {"warm_ms": 1000 * statistics.median(warm), "questions": len(questions)}


@contextlib.contextmanager
def one_thread() -> Iterator[dict]:
    """torch's CPU ops, and the BLAS and OpenMP pools that numpy and torch load, held to one thread while
    open (threadpoolctl; torch's own count only, when it is missing); yields what was limited, with the
    thread counts each had."""
    torch_threads = torch.get_num_threads()
    try:
        import threadpoolctl
    except ImportError:  # (the bench extra has it; a bare CUDA image may not)
        threadpoolctl = None
    pools = [f"torch ({torch_threads})"]
    limits: contextlib.AbstractContextManager = contextlib.nullcontext()
    if threadpoolctl is not None:
        pools += sorted({f"{p['internal_api']} ({p['num_threads']})" for p in threadpoolctl.threadpool_info()})
        limits = threadpoolctl.threadpool_limits(limits=1)
    torch.set_num_threads(1)
    try:
        with limits:
            yield {"pools": pools}
    finally:
        torch.set_num_threads(torch_threads)


def host_threads(engine, questions, rate: float, clear: Callable[[], None]) -> dict:
    """A call's host work with the host's thread pools as they are against held to one thread
    (:func:`one_thread`), side by side: per question and setting, the median of 3 warm calls after an
    untimed one (and, on CUDA, where the forward runs on the device, a cold call too), the settings' order
    swapped from one question to the next.
    Many cores can slow small host steps (a BLAS or OpenMP pool woken for a product of a few hundred rows):
    this says whether they do on this machine."""
    dev = engine.encoder.device
    kinds = ("warm", "cold") if dev.type == "cuda" else ("warm",)
    seconds: dict[str, dict[str, list[float]]] = {kind: {"default": [], "one_thread": []} for kind in kinds}
    limited: dict = {}

    for k, q in enumerate(questions):
        clear()
        for mode in ("default", "one_thread") if k % 2 else ("one_thread", "default"):
            with one_thread() if mode == "one_thread" else contextlib.nullcontext() as what:
                _timed_call(engine, q, rate)  # (untimed: a pool resized by the switch starts its threads here)
                seconds["warm"][mode].append(statistics.median(_timed_call(engine, q, rate) for _ in range(3)))
                if "cold" in seconds:
                    clear()
                    seconds["cold"][mode].append(_timed_call(engine, q, rate))
            limited = what or limited
    out: dict = {"questions": len(questions), "limited": limited.get("pools", [])}
    for kind, got in seconds.items():
        out[kind] = {mode: 1000 * statistics.median(v) for mode, v in got.items()}
        out[kind]["ratio"] = statistics.median(a / b for a, b in zip(got["one_thread"], got["default"]))
    return out


def markdown_rows(b: dict) -> list[str]:
    """The breakdown as a markdown table (stages nested in another are indented)."""
    lines = ["| stage | cold ms | warm ms |", "| --- | --- | --- |"]
    for label in [label for label, *_ in STAGES] + ["other", "total"]:
        shown = ("&nbsp;&nbsp;of which " + label) if label in b.get("nested", {}) else label
        if label == "total":
            shown = "**call**"
        lines.append(f"| {shown} | {b['cold'][label]:.2f} | {b['warm'][label]:.2f} |")
    return lines
