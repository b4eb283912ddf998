"""benchmarks.gpu off the GPU: the precision agreement runs whenever the encoder runs below float32."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


def test_precision_agreement_is_measured_below_float32_only(tiny_encoder):
    from benchmarks.gpu import precision_agreement
    from semtoken_rag import SemToken, SemTokenConfig

    qs = [SimpleNamespace(chunks=("Paris is the capital of France. Bananas are yellow.",
                                  "The Seine flows through Paris. Berlin is in Germany."),
                          question="capital of France")]
    cfg = {"encoder": str(tiny_encoder), "device": "cpu", "max_length": 32, "window_overlap": 8}
    full = SemToken(SemTokenConfig(**cfg, dtype="float32"))
    assert full.encoder.dtype == torch.float32
    assert precision_agreement(full, None, qs, 0.5) is None
    low = SemToken(SemTokenConfig(**cfg, dtype="bfloat16"))
    assert low.encoder.dtype == torch.bfloat16
    out = precision_agreement(low, None, qs, 0.5)
    assert out["questions"] == 1 and out["identical_contexts"] in (0, 1)


def test_stage_breakdown_times_the_engines_own_steps_and_restores_them(tiny_encoder):
    import semtoken_rag.engine as en
    from benchmarks import stages
    from semtoken_rag import SemToken, SemTokenConfig

    engine = SemToken(SemTokenConfig(encoder=str(tiny_encoder), device="cpu", max_length=32, window_overlap=8))
    originals = [getattr(owner, name) for _label, owner, name, _parent in stages.STAGES]
    qs = [SimpleNamespace(chunks=("Paris is the capital of France. Bananas are yellow. " * 3,
                                  "The Seine flows through Paris. Berlin is in Germany. " * 3),
                          question="capital of France")]
    b = stages.breakdown(engine, qs, 0.5, engine.clear_caches)
    # the cold call encodes and analyses; the warm one finds both cached
    assert b["cold"]["encoder forward"] > 0 and b["warm"]["encoder forward"] == 0
    assert b["cold"]["per-chunk analysis"] > 0 and b["cold"]["selection"] > 0 and b["warm"]["selection"] > 0
    assert 0 < b["cold"]["encoder forward"] < b["cold"]["total"]
    assert b["cold"]["pooling"] <= b["cold"]["encoder forward"]  # (nested: counted in its parent too)
    top = sum(b["cold"][label] for label, *_rest, parent in stages.STAGES if parent is None)
    assert abs(top + b["cold"]["other"] - b["cold"]["total"]) < 1e-6
    assert [getattr(owner, name) for _label, owner, name, _parent in stages.STAGES] == originals
    assert en.select_under_budget is originals[[s[0] for s in stages.STAGES].index("selection")]
    rows = stages.markdown_rows(b)
    assert len(rows) == 2 + len(stages.STAGES) + 2 and "of which pooling" in "\n".join(rows)
    ref = stages.host_reference(lambda: SemToken(engine.config), qs, 0.5)
    assert ref["questions"] == 1 and ref["warm_ms"] > 0


def test_host_threads_compares_one_thread_side_by_side_and_restores_the_pools(tiny_encoder):
    import threadpoolctl

    from benchmarks import stages
    from semtoken_rag import SemToken, SemTokenConfig

    engine = SemToken(SemTokenConfig(encoder=str(tiny_encoder), device="cpu", max_length=32, window_overlap=8))
    qs = [SimpleNamespace(chunks=("Paris is the capital of France. Bananas are yellow. " * 3,
                                  "The Seine flows through Paris. Berlin is in Germany. " * 3),
                          question=question) for question in ("capital of France", "river in Paris")]
    before = torch.get_num_threads(), [p["num_threads"] for p in threadpoolctl.threadpool_info()]
    seen = []
    real = engine.compress
    engine.compress = lambda *a, **k: seen.append(
        (torch.get_num_threads(), max(p["num_threads"] for p in threadpoolctl.threadpool_info()))) or real(*a, **k)
    out = stages.host_threads(engine, qs, 0.5, engine.clear_caches)
    assert (torch.get_num_threads(), [p["num_threads"] for p in threadpoolctl.threadpool_info()]) == before
    assert out["questions"] == 2 and "cold" not in out  # (on CPU the forward's own threads would be limited)
    assert out["warm"]["default"] > 0 and out["warm"]["one_thread"] > 0 and out["warm"]["ratio"] > 0
    assert out["limited"][0] == f"torch ({before[0]})"
    # per question and setting: one untimed call, then 3 timed warm ones; half of them held to one thread
    assert len(seen) == 2 * 2 * 4 and seen.count((1, 1)) >= 8
    assert (1, 1) in seen and (before[0], max(before[1])) in seen


def test_store_writes_times_cold_calls_with_a_cache_dir_both_ways(tiny_encoder):
    from benchmarks import gpu
    from semtoken_rag import SemToken, SemTokenConfig

    engine = SemToken(SemTokenConfig(encoder=str(tiny_encoder), device="cpu", max_length=32, window_overlap=8))
    qs = [SimpleNamespace(chunks=(f"Paris is the capital of France. Question {i}.", "The Seine flows through Paris."),
                          question="capital of France") for i in range(3)]
    out = gpu.store_writes(engine, qs, 0.5, n=2)
    assert out["questions"] == 2 and out["behind_ms"] > 0 and out["in_call_ms"] > 0 and out["ratio"] > 0
    assert engine.config.cache_dir is None  # (the engine measured is left as it was)


def _sample() -> str:
    from pathlib import Path

    import semtoken_rag

    return str(Path(semtoken_rag.__file__).parent / "data" / "sample_nq.jsonl")


@pytest.mark.slow
def test_worker_processes_each_compress_and_the_wall_covers_them_all(tiny_encoder):
    """benchmarks.processes: K spawned workers, each with its own engine, time one workload from a shared
    barrier; every worker's calls are counted, and the counts' figures come out for each workload."""
    from benchmarks import processes

    cfg = {"encoder": str(tiny_encoder), "device": "cpu", "max_length": 32, "window_overlap": 8,
           "dtype": "float32"}
    out = processes.measure(cfg, _sample(), [1, 2], ["cached", "new"], n=3, rate=0.5, repeats=2, rounds=1,
                            cores=2, start=0)
    for workload, calls_each in (("cached", 3 * 2), ("new", 3)):
        one, two = out[workload]
        assert (one["workers"], two["workers"]) == (1, 2)
        assert (one["calls"], two["calls"]) == (calls_each, 2 * calls_each)
        assert one["over_first"] == 1.0 and two["over_first"] > 0
        for row in (one, two):
            assert row["queries_per_s"] == row["calls"] / row["wall_s"] and row["call_median_ms"] > 0
            assert row["dtype"] == "float32"
    text = processes.markdown({"device_name": "cpu", "date": "d", "cores": 2, "torch": "t", "encoder": "e",
                               "dtype": "float32", "device": "cpu", "n": 3, "rate": 0.5, "repeats": 2,
                               "rounds": 1, "command": "c", "results": out, "seconds": 1.0})
    assert "| cached chunks: workers |" in text and "| new chunks: workers |" in text


@pytest.mark.slow
def test_workers_that_fail_stop_the_timing_with_their_error(tiny_encoder, tmp_path):
    """Workers that cannot build their engine, or find no questions, end the timing with their error (not a
    hang, not a figure)."""
    import time

    from benchmarks import processes

    cfg = {"encoder": str(tmp_path / "no-such-model"), "device": "cpu"}
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="a worker failed"):
        processes.run_workers(2, cfg, _sample(), 2, 0.5, "cached", 1, 1, start=0)
    good = {"encoder": str(tiny_encoder), "device": "cpu", "max_length": 32, "window_overlap": 8}
    with pytest.raises(RuntimeError, match="no questions from 500 on"):
        processes.run_workers(2, good, _sample(), 2, 0.5, "cached", 1, 1, start=500)
    assert time.monotonic() - t < 45
