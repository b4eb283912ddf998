"""CUDA experiments behind the encoder's one width and CUDA graphs (2026-11-23, on the lent H100).

    python benchmarks/cuda/experiments.py      # from the repository root, with .gpu/ prepared by
                                                # ../shared/gpu/prepare-carry.sh .gpu; writes $OUT/exp.txt

It prints: the forward of 20 NQ passages at padded-width buckets of 32/64/128/256 tokens (batches a call,
tokens/s over every passage), a MiniLM pass's host launch time against its total, whether a row's hidden
states depend on the batch's row count or width, the replay time of a CUDA graph of the model (2D and 4D
masks) against eager and bit-equality with it, and a profile of pre-warming every passage.
"""
import cProfile
import io
import os
import pstats
import statistics
import time
import traceback

import torch

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.datasets import load_nq

OUT = os.environ.get("OUT", "/tmp"); DEV = os.environ.get("DEV", "cuda"); NQ = int(os.environ.get("PN", "40"))
log = open(f"{OUT}/exp.txt", "w")  # noqa: SIM115 - open for the whole script
def say(*a):
    s = " ".join(str(x) for x in a); print(s, flush=True); log.write(s + "\n"); log.flush()
recs = load_nq(None, ".gpu/data")
texts = sorted({p for r in recs for p in r.chunks})
eng = SemToken(SemTokenConfig(encoder=".gpu/model", device=DEV))
enc = eng.encoder; dev = enc.device; model = enc.model
def sync():
    if dev.type == "cuda": torch.cuda.synchronize(dev)
med = lambda x: round(statistics.median(x) * 1e3, 2)
calls = [list(r.chunks) for r in recs[150:150 + NQ]]
# 1. bucket sweep
for b in (32, 64, 128, 256):
    enc.bucket = b  # (graphs run only at the full width: narrower buckets run eagerly)
    for c in calls[:5]: enc.forward_seconds(c)
    n0 = enc.forward_calls
    ts = [enc.forward_seconds(c) for c in calls]
    nb = (enc.forward_calls - n0) / len(calls)
    seqs, _, _ = enc._plan(texts if dev.type == "cuda" else texts[:300])
    ntok = sum(len(s) for s in seqs)
    tt = []
    for _ in range(2):
        sync(); t = time.perf_counter(); enc._forward(seqs); sync(); tt.append(time.perf_counter() - t)
    say(f"bucket {b}: forward of 20 passages median {med(ts)} ms, p90 {round(sorted(ts)[int(.9*len(ts))]*1e3,2)}, "
        f"{nb:.2f} batches/call; all {len(seqs)} seqs: {ntok/min(tt):,.0f} real tokens/s")
enc.bucket = enc.max_length
# 2. host launch vs total for one batch of 20x256
ids_all = enc._wrap(enc._plan(calls[0])[0])[0]
W = 256
def batch(rows, seqs):
    ids = torch.zeros((rows, W), dtype=torch.long); mask = torch.zeros((rows, W), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s); mask[i, :len(s)] = 1
    return ids.to(dev), mask.to(dev)
with torch.inference_mode():
    ids, mask = batch(20, ids_all)
    for _ in range(3): model(input_ids=ids, attention_mask=mask)
    la, tot = [], []
    for _ in range(20):
        sync(); t = time.perf_counter(); out = model(input_ids=ids, attention_mask=mask).last_hidden_state; la.append(time.perf_counter() - t); sync(); tot.append(time.perf_counter() - t)
    say(f"eager 20x256: launch (host) {med(la)} ms, total {med(tot)} ms")
    ref20 = out.clone()
    ids32, mask32 = batch(32, ids_all)
    out32 = model(input_ids=ids32, attention_mask=mask32).last_hidden_state
    rowsame = all(torch.equal(ref20[i, :len(s)], out32[i, :len(s)]) for i, s in enumerate(ids_all))
    say(f"rows 20 vs 32 eager: real tokens bit-identical {rowsame}; max diff {max(float((ref20[i,:len(s)]-out32[i,:len(s)]).abs().max()) for i,s in enumerate(ids_all))}")
    ids1 = [batch(1, [s]) for s in ids_all]
    one = all(torch.equal(ref20[i, :len(s)], model(input_ids=a, attention_mask=m).last_hidden_state[0, :len(s)]) for i, (s, (a, m)) in enumerate(zip(ids_all, ids1)))
    say(f"rows 20 vs 1 eager: bit-identical {one}")
    o128 = enc.model(input_ids=ids[:, :128].contiguous(), attention_mask=mask[:, :128].contiguous()).last_hidden_state
    short = [i for i, s in enumerate(ids_all) if len(s) <= 128]
    say(f"width 256 vs 128 (rows {len(short)}): bit-identical {all(torch.equal(ref20[i,:len(ids_all[i])], o128[i,:len(ids_all[i])]) for i in short)}")
# 3. CUDA graph of the model at (32, 256), 2D and 4D masks
if dev.type == "cuda":
    for kind in ("2d", "4d"):
        try:
            with torch.inference_mode():
                s_ids, s_mask = batch(32, ids_all)
                if kind == "4d":
                    s_mask = (s_mask[:, None, :] * s_mask[:, :, None]).bool().unsqueeze(1) | torch.eye(W, dtype=torch.bool, device=dev)
                st = torch.cuda.Stream(); st.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(st):
                    for _ in range(3): model(input_ids=s_ids, attention_mask=s_mask)
                torch.cuda.current_stream().wait_stream(st)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    s_out = model(input_ids=s_ids, attention_mask=s_mask).last_hidden_state
                g.replay(); sync()
                same = all(torch.equal(ref20[i, :len(s)], s_out[i, :len(s)]) for i, s in enumerate(ids_all))
                md = max(float((ref20[i,:len(s)] - s_out[i,:len(s)]).abs().max()) for i, s in enumerate(ids_all))
                la, tot = [], []
                for _ in range(50):
                    sync(); t = time.perf_counter(); g.replay(); la.append(time.perf_counter() - t); sync(); tot.append(time.perf_counter() - t)
                say(f"graph {kind} 32x256: replay host {med(la)} ms, total {med(tot)} ms; equal to eager {same} (max diff {md})")
        except Exception:  # noqa: BLE001 - report any capture failure and go on
            say(f"graph {kind} failed:\n" + traceback.format_exc()[-2500:])
# 4. prewarm profile
eng.clear_caches(); eng.prewarm(texts[:256]); eng.clear_caches()
part = texts if dev.type == "cuda" else texts[:200]
pr = cProfile.Profile(); sync(); t = time.perf_counter(); pr.enable(); eng.prewarm(part, batch_size=4096); sync(); pr.disable()
say(f"prewarm {len(part)} passages: {len(part)/(time.perf_counter()-t):.0f}/s (under cProfile)")
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30); say(s.getvalue()[:7000])
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("cumtime").print_stats(40); say(s.getvalue()[:8000])
