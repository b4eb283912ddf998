"""Two engines in one process, CUDA graphs on and off: forward, cold and warm medians over 40 NQ
questions, then a profile of cold and warm calls with graphs (the host-side cost of a call).

    python benchmarks/cuda/graphs_on_off.py    # repository root, .gpu/ prepared; writes $OUT/prof3.txt
"""
import cProfile
import io
import os
import pstats
import statistics
import time

import torch

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.datasets import load_nq

OUT = os.environ.get("OUT", "/tmp"); DEV = os.environ.get("DEV", "cuda"); N = int(os.environ.get("PN", "40"))
log = open(f"{OUT}/prof3.txt", "w")  # noqa: SIM115 - open for the whole script
def say(*a):
    s = " ".join(str(x) for x in a); print(s, flush=True); log.write(s + "\n"); log.flush()
recs = load_nq(None, ".gpu/data"); qs = recs[150:150 + N]
engs = {g: SemToken(SemTokenConfig(encoder=".gpu/model", device=DEV, cuda_graphs=g)) for g in (True, False)}
dev = engs[True].encoder.device
def sync():
    if dev.type == "cuda": torch.cuda.synchronize(dev)
m = lambda x: round(statistics.median(x) * 1e3, 2)
for eng in engs.values():
    for r in recs[:10]: eng.compress(list(r.chunks), r.question, rate=0.33)
res = {g: {"f": [], "c": [], "w": []} for g in engs}
for r in qs:
    for g, eng in engs.items():
        ch = list(r.chunks)
        eng.clear_caches(); sync(); t = time.perf_counter(); eng.encoder.forward_seconds(ch); sync(); res[g]["f"].append(time.perf_counter() - t)
        eng.clear_caches(); sync(); t = time.perf_counter(); eng.compress(ch, r.question, rate=0.33); sync(); res[g]["c"].append(time.perf_counter() - t)
        sync(); t = time.perf_counter(); eng.compress(ch, r.question, rate=0.33); sync(); res[g]["w"].append(time.perf_counter() - t)
for g, eng in engs.items():
    say(f"graphs={g}: forward {m(res[g]['f'])} ms, cold {m(res[g]['c'])} ms, warm {m(res[g]['w'])} ms, "
        f"captured {getattr(eng.encoder.graphs, 'captured', None)}")
eng = engs[True]
def prof(tag, fn, sort="tottime", k=35):
    pr = cProfile.Profile(); pr.enable(); fn(); sync(); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats(sort).print_stats(k)
    say(f"===== {tag} ({sort})"); say(s.getvalue()[:8000])
def colds():
    for r in qs: eng.clear_caches(); eng.compress(list(r.chunks), r.question, rate=0.33)
def warms():
    for r in qs: eng.compress(list(r.chunks), r.question, rate=0.33)
prof("cold", colds); prof("cold", colds, "cumtime", 50); warms(); prof("warm", warms)
