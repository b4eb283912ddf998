"""GPU-only checks (marked ``gpu``, skipped without CUDA). Run on a CUDA machine with either

    python -m pytest -q -m gpu tests/test_gpu.py
    python tests/test_gpu.py            # without pytest: a plain runner that prints each result

The encoder is ``$SEMTOKEN_GPU_ENCODER``, else ``.gpu/model`` (the fp16 copy the GPU runs carry) when
present, else the bundled MiniLM. faiss is optional: without it the device search is compared with
an exact float64 search in numpy instead of faiss-cpu.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "integrations")]

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.datasets import load_nq
from semtoken_rag.device_search import find_repeats_torch, range_pairs

try:
    import pytest
except ImportError:  # the plain runner below needs no pytest
    pytest = None

if pytest is not None:
    pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HAS_CUDA = torch.cuda.is_available()


def encoder_name() -> str:
    if os.environ.get("SEMTOKEN_GPU_ENCODER"):
        return os.environ["SEMTOKEN_GPU_ENCODER"]
    local = ROOT / ".gpu" / "model"
    return str(local) if local.is_dir() else "all-MiniLM-L6-v2"


_ENGINES: dict[str, SemToken] = {}


def cuda_engine(dtype: str = "auto") -> SemToken:
    if dtype not in _ENGINES:
        _ENGINES[dtype] = SemToken(SemTokenConfig(encoder=encoder_name(), device="cuda", dtype=dtype))
    return _ENGINES[dtype]


def sample() -> list:
    return load_nq(6)


def test_device_placement_and_fp16():
    eng = cuda_engine()
    param = next(eng.encoder.model.parameters())
    assert eng.encoder.device.type == "cuda" and param.device.type == "cuda"
    assert param.dtype == torch.float16 and eng.encoder.dtype == torch.float16
    assert eng.repeat_search in ("torch", "faiss-gpu")
    assert eng.batcher is not None  # micro-batching is on by default on CUDA
    assert eng.encoder.batch_size == 512  # batch_size None: 512 on CUDA
    q = sample()[0]
    res = eng.compress(list(q.chunks), q.question, rate=0.33)
    assert 0 < res.compressed_tokens <= res.budget
    print(f"device {torch.cuda.get_device_name(0)}, repeat search {eng.repeat_search}, "
          f"batch size {eng.encoder.batch_size}, window {eng.batcher.window * 1000:g} ms")


def test_device_search_equals_faiss_cpu():
    eng = cuda_engine()
    chunks = [c for q in sample() for c in q.chunks]
    fps = eng.encoder.fingerprint(chunks + chunks[:5])
    x = torch.nn.functional.normalize(torch.cat([f.vectors for f in fps]).float(), dim=-1)
    host = x.numpy()
    for threshold in (0.5, 0.8, 0.95):
        i, j, _ = range_pairs(x.cuda(), threshold)
        got = set(zip(i.cpu().tolist(), j.cpu().tolist()))
        try:
            import faiss

            index = faiss.IndexFlatIP(host.shape[1])
            index.add(host)
            lims, sims, ids = index.range_search(host, float(np.nextafter(np.float32(threshold), -np.inf)))
            qi = np.repeat(np.arange(len(host)), np.diff(lims.astype(np.int64)))
            ok = sims >= np.float32(threshold)
            want, ref = set(zip(qi[ok].tolist(), ids[ok].tolist())), "faiss-cpu"
        except ImportError:
            sims64 = host.astype(np.float64) @ host.astype(np.float64).T
            want, ref = set(zip(*map(np.ndarray.tolist, np.nonzero(sims64 >= np.float32(threshold))))), "numpy"
        diff = got ^ want
        print(f"threshold {threshold}: {len(got)} pairs on CUDA, {len(want)} by {ref}, {len(diff)} differ")
        # float32 sums in another order may put a pair that sits on the threshold (within float32
        # rounding) on the other side; any other difference is a bug
        exact = {(a, b): float(host[a].astype(np.float64) @ host[b].astype(np.float64)) for a, b in diff}
        assert all(abs(s - threshold) < 1e-5 for s in exact.values()), exact


def test_find_repeats_on_cuda_equals_cpu():
    eng = cuda_engine()
    chunks = [c for q in sample() for c in q.chunks]
    fps = eng.encoder.fingerprint(chunks + chunks[:5])
    x = torch.nn.functional.normalize(torch.cat([f.vectors for f in fps]).float(), dim=-1)
    n = len(x)
    rng = np.random.default_rng(0)
    groups, order = np.arange(n) // 7, rng.permutation(n)
    a = find_repeats_torch(x.cuda(), groups, order, 0.9)
    b = find_repeats_torch(x, groups, order, 0.9)
    print(f"{int((a >= 0).sum())} repeats among {n} spans on CUDA, {int((b >= 0).sum())} on CPU")
    assert np.array_equal(a, b) and (a >= 0).any()


def same_kept(a, b) -> bool:
    return [c.kept_spans for c in a.chunks] == [c.kept_spans for c in b.chunks] and a.texts == b.texts


def test_compress_many_equals_single_calls_on_cuda():
    qs = sample()
    lists = [list(q.chunks) for q in qs] + [list(qs[0].chunks[:3]) + ["", "  "]]
    queries = [q.question for q in qs] + [None]
    many = SemToken(SemTokenConfig(encoder=encoder_name(), device="cuda")).compress_many(lists, queries, rate=0.33)
    single = cuda_engine()
    equal = [same_kept(m, single.compress(c, q, rate=0.33)) for m, c, q in zip(many, lists, queries)]
    print(f"compress_many == single calls on CUDA: {sum(equal)} of {len(equal)}")
    assert all(equal)


def test_concurrent_acompress_equal_sequential_on_cuda():
    qs = sample()
    eng = SemToken(SemTokenConfig(encoder=encoder_name(), device="cuda"))
    batches = eng.batcher.batches

    async def together():
        return await asyncio.gather(*(eng.acompress(list(q.chunks), q.question, rate=0.33) for q in qs))

    out = asyncio.run(together())
    single = cuda_engine()
    equal = [same_kept(r, single.compress(list(q.chunks), q.question, rate=0.33)) for r, q in zip(out, qs)]
    print(f"{len(qs)} concurrent acompress in {eng.batcher.batches - batches} encoder batches; "
          f"equal to sequential: {sum(equal)} of {len(equal)}")
    eng.close()
    assert all(equal)


def test_fp16_and_fp32_agreement():
    qs = sample()
    half, full = cuda_engine(), cuda_engine("float32")
    same = sum(same_kept(half.compress(list(q.chunks), q.question, rate=0.33),
                         full.compress(list(q.chunks), q.question, rate=0.33)) for q in qs)
    print(f"fp16 vs fp32: identical kept contexts in {same} of {len(qs)} questions")
    assert same >= len(qs) - 2  # fp16 rounding may move a near-tie; most must agree


def test_cuda_graphs_equal_eager():
    """Replayed graphs give the eager pass's fingerprints and query vectors bit for bit, whatever batch
    ran in the graph's rows before (spare rows hold an earlier, longer batch's tokens), and the same kept
    contexts; a call's 20 chunks take one batch."""
    qs = sample()
    graphed, eager = cuda_engine(), SemToken(SemTokenConfig(encoder=encoder_name(), device="cuda", cuda_graphs=False))
    assert graphed.encoder.graphs is not None and eager.encoder.graphs is None
    assert graphed.encoder.bucket == graphed.encoder.max_length
    big = [c for q in qs for c in q.chunks][:30]
    graphed.encoder.fingerprint(big)  # fills 30 of the 32-row graph's rows; the smaller batches reuse it
    for q in qs:
        a, qa, sa = graphed.encoder.encode(list(q.chunks[:17]), [q.question])
        b, qb, sb = eager.encoder.encode(list(q.chunks[:17]), [q.question])
        assert sa.batches == sb.batches == 1
        assert all(np.array_equal(x.units, y.units) and torch.equal(x.vectors, y.vectors) for x, y in zip(a, b))
        assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(qa, qb))
    equal = [same_kept(graphed.compress(list(q.chunks), q.question, rate=0.33),
                       eager.compress(list(q.chunks), q.question, rate=0.33)) for q in qs]
    print(f"CUDA graphs captured: {graphed.encoder.graphs.captured}; kept contexts equal to eager: "
          f"{sum(equal)} of {len(equal)}")
    eager.close()
    assert all(equal) and graphed.encoder.graphs.enabled


def test_cuda_graphs_capture_failure_falls_back_to_eager():
    """A graph that cannot be captured turns graphs off for that encoder, with a warning, and the encoder
    runs eagerly with the same fingerprints."""
    import semtoken_rag.graphs as graphs_module

    eng = SemToken(SemTokenConfig(encoder=encoder_name(), device="cuda"))
    texts = [c for q in sample() for c in q.chunks][:9]
    real = graphs_module.torch.cuda.graph

    def broken(*a, **kw):
        raise RuntimeError("capture refused (test)")

    graphs_module.torch.cuda.graph = broken
    try:
        got = eng.encoder.fingerprint(texts)
    finally:
        graphs_module.torch.cuda.graph = real
    assert eng.encoder.graphs is not None and not eng.encoder.graphs.enabled and eng.encoder.graphs.captured == 0
    want = cuda_engine().encoder.fingerprint(texts)
    assert all(torch.equal(x.vectors, y.vectors) for x, y in zip(got, want))
    eng.close()


def test_cuda_graphs_from_threads():
    """Threads fingerprinting through one encoder's graphs get what one thread gets."""
    import concurrent.futures

    enc = cuda_engine().encoder
    texts = [c for q in sample() for c in q.chunks]
    parts = [texts[k::8] for k in range(8)]
    want = [enc.fingerprint(p) for p in parts]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(enc.fingerprint, parts * 4))
    assert all(torch.equal(x.vectors, y.vectors) for g, w in zip(got, want * 4) for x, y in zip(g, w))


def test_clusters_on_the_device_equal_the_host_scan():
    """Local clustering on CUDA (the full band of cosines) finds the spans the CPU's read-only-what-the-
    scan-reads path finds, from the same vectors."""
    from semtoken_rag import spans as sp

    enc = cuda_engine().encoder
    same, total = 0, 0
    for q in sample():
        for fp, text in zip(enc.fingerprint(list(q.chunks)), q.chunks):
            v = fp.vectors.float()
            breaks = sp.sentence_break_after(text, fp.units)
            on_gpu = sp.local_clusters(v.to("cuda"), breaks, 0.9, 16)
            on_cpu = sp.local_clusters(v.cpu(), breaks, 0.9, 16)
            same += int(np.array_equal(on_gpu, on_cpu))
            total += 1
    print(f"clusters on CUDA equal to the CPU's: {same} of {total} chunks")
    assert same >= total - 1  # a cosine within rounding of tau may fall either way on another device


def test_stage_breakdown_on_cuda_beside_a_cpu_engine():
    """benchmarks.gpu's breakdown on CUDA: the forward is timed to its end, and an engine on the host's CPU
    does the same warm calls (what the host alone takes)."""
    from benchmarks import gpu

    eng = cuda_engine()
    qs = sample()[:3]
    b = gpu.stages(eng, qs, 0.33, n=3)
    print("stage breakdown on CUDA:", {k: round(v, 2) for k, v in b["cold"].items()},
          {k: round(v, 2) for k, v in b["warm"].items()}, b["cpu_engine_warm"])
    assert 0 < b["cold"]["encoder forward"] < b["cold"]["total"] and b["warm"]["encoder forward"] == 0
    assert b["cpu_engine_warm"]["questions"] == 3 and b["cpu_engine_warm"]["warm_ms"] > 0


def test_host_threads_and_store_writes_on_cuda():
    """benchmarks.gpu's thread probe on CUDA: warm and cold calls (the forward on the device) with the host's
    pools as they are and held to one thread, the pools restored after; and its cold calls with a cache_dir
    written behind the call and in it."""
    from benchmarks import gpu

    eng = cuda_engine()
    threads = torch.get_num_threads()
    t = gpu.host_threads(eng, sample()[:3], 0.33, n=3)
    print("host threads on CUDA:", t)
    assert torch.get_num_threads() == threads
    assert t["questions"] == 3 and t["cold"]["default"] > 0 and t["warm"]["one_thread"] > 0
    w = gpu.store_writes(eng, sample()[:4], 0.33, n=3)
    print("cache_dir writes on CUDA, behind the call against in it:", w)
    assert w["questions"] == 3 and w["behind_ms"] > 0


def test_store_writes_go_behind_the_call_on_cuda_by_default():
    """On CUDA a cache_dir's files are written on a worker thread (store_write_behind=None); close() waits."""
    import tempfile

    folder = Path(tempfile.mkdtemp())
    chunks = list(sample()[0].chunks)
    eng = SemToken(SemTokenConfig(encoder=encoder_name(), device="cuda", cache_dir=folder))
    assert eng.cache._behind is not None
    eng.compress(chunks, "who", rate=0.33)
    eng.close()
    assert len(list(folder.rglob("*.stfp"))) == len({c for c in chunks if c.strip()})


def test_stored_analyses_on_cuda_equal_a_fresh_engine():
    """Pre-warmed on CUDA (the analysis worked out on the device, as calls do), a replica's calls adopt every
    chunk's analysis and give what a fresh CUDA engine gives: kept spans, texts and every span's figures."""
    import tempfile

    folder = Path(tempfile.mkdtemp())
    qs = sample()
    cfg = SemTokenConfig(encoder=encoder_name(), device="cuda", cache_dir=folder)
    warmer = SemToken(cfg)
    warmer.prewarm([c for q in qs for c in q.chunks])
    warmer.close()
    replica, fresh = SemToken(cfg), cuda_engine()
    for q in qs:
        a = replica.compress(list(q.chunks), q.question, rate=0.33)
        b = fresh.compress(list(q.chunks), q.question, rate=0.33)
        for x, y in zip(a.chunks, b.chunks):
            assert (x.text, x.kept_spans) == (y.text, y.kept_spans)
            assert [(s.start, s.end, s.status, s.entropy, s.relevance, s.score) for s in x.spans] == \
                [(s.start, s.end, s.status, s.entropy, s.relevance, s.score) for s in y.spans]
    assert replica.analyses.misses == 0
    print(f"stored analyses on CUDA: {len(replica.analyses)} adopted, results equal on {len(qs)} questions")


def _run_plain() -> int:
    if not HAS_CUDA:
        print("no CUDA device: GPU tests skipped")
        return 0
    failed = 0
    for name, fn in [(k, v) for k, v in globals().items() if k.startswith("test_") and callable(v)]:
        try:
            fn()
            print(f"PASS {name}")
        except Exception as e:  # noqa: BLE001 - report every test, then fail the run
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_run_plain())
