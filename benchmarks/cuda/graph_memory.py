"""GPU memory held by the encoder's CUDA graphs: memory reserved after batches of 1 to 512 rows, with
and without a riding query, graphs on and off.

    python benchmarks/cuda/graph_memory.py     # repository root, .gpu/ prepared
"""
import torch

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.datasets import load_nq

recs = load_nq(None, ".gpu/data"); texts = sorted({p for r in recs for p in r.chunks})
mib = lambda b: round(b / 2**20)
for graphs in (False, True):
    torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    eng = SemToken(SemTokenConfig(encoder=".gpu/model", device="cuda", cuda_graphs=graphs))
    base = torch.cuda.memory_reserved()
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
        eng.encoder.encode(texts[:n], ["who wrote it"])
        eng.encoder.fingerprint(texts[:n])
    torch.cuda.synchronize()
    print(f"graphs={graphs}: reserved {mib(base)} -> {mib(torch.cuda.memory_reserved())} MiB, peak allocated "
          f"{mib(torch.cuda.max_memory_allocated())} MiB, captured {getattr(eng.encoder.graphs, 'captured', 0)}", flush=True)
    eng.close(); del eng
