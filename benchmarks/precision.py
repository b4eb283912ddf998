"""The encoder's precision and row blocking on CPU, side by side in one process.

    python -m benchmarks.precision [--n 30] [--data DIR] [--json benchmarks/results/precision_cpu.json]

On NQ questions 150 on (20 passages each) it times, alternating the variants question by question:
the encoder pass over a question's passages (``Encoder.forward_seconds``) and one query's own pass
(``Encoder.embed_queries``), for float32 and, on a CPU with bfloat16 matrix instructions (AMX or
AVX-512 BF16), bfloat16, each row-blocked (the engine's default on CPU, ``_RowBlockedLinear``) and
unblocked (plain ``torch.nn.Linear``). It also counts the
passages whose fingerprints are bit-identical alone and inside their question's batch, the property row
blocking is there for. Medians and medians of per-question ratios; needs ``../shared/data``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.encoder import _RowBlockedLinear, auto_dtype, cpu_bf16_units

from .data import EVAL, load_nq, main_guard


def _unblocked(engine: SemToken) -> SemToken:
    """``engine`` with its row-blocked down-projections put back as plain linear layers."""
    model = engine.encoder.model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _RowBlockedLinear):
                plain = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
    return engine


def _same_alone_and_batched(engine: SemToken, chunks: list[str]) -> int:
    """Passages whose fingerprint vectors alone equal those computed in the batch of all of them."""
    together = engine.encoder.fingerprint(chunks)
    return sum(torch.equal(engine.encoder.fingerprint([c])[0].vectors, fp.vectors)
               for c, fp in zip(chunks, together))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.precision", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30, help="questions from 150 on (default 30)")
    ap.add_argument("--identity-n", type=int, default=3, help="questions whose passages are checked alone "
                                                              "against batched (default 3)")
    ap.add_argument("--data-dir", default=None, help="folder of the NQ file (default ../shared/data)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)
    records = load_nq(args.n + 1, "random", args.data_dir, start=EVAL.start)
    dtypes = ["float32"] + (["bfloat16"] if auto_dtype(torch.device("cpu")) == "bfloat16" else [])
    variants: dict[str, SemToken] = {}
    for dtype in dtypes:
        variants[f"{dtype} blocked"] = SemToken(SemTokenConfig(device="cpu", dtype=dtype))
        variants[f"{dtype} unblocked"] = _unblocked(SemToken(SemTokenConfig(device="cpu", dtype=dtype)))
    warm = records[-1]
    for engine in variants.values():  # first passes (and the tails' probes) outside the timings
        engine.encoder.forward_seconds(list(warm.chunks))
        engine.encoder.embed_queries([warm.question])
    names = list(variants)
    passes: dict[str, list[float]] = {k: [] for k in names}
    queries: dict[str, list[float]] = {k: [] for k in names}
    for i, rec in enumerate(records[:-1]):
        order = names[i % len(names):] + names[:i % len(names)]  # a different variant first each question
        for name in order:
            enc = variants[name].encoder
            passes[name].append(enc.forward_seconds(list(rec.chunks)))
            t = time.perf_counter()
            enc.embed_queries([rec.question])
            queries[name].append(time.perf_counter() - t)
    identical = {name: sum(_same_alone_and_batched(variants[name], list(r.chunks)) for r in records[:args.identity_n])
                 for name in names}
    checked = sum(len(r.chunks) for r in records[:args.identity_n])
    ref = "float32 blocked"

    def ratio(a: list[float], b: list[float]) -> float:
        return statistics.median(x / y for x, y in zip(a, b))

    out = {
        "questions": f"{records[0].index}-{records[-2].index}", "n": len(records) - 1,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.precision " + " ".join(shlex.quote(a) for a in
                                                              (sys.argv[1:] if argv is None else argv)),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
                    "bf16_units": cpu_bf16_units()},
        "variants": {name: {
            "pass_median_ms": statistics.median(passes[name]) * 1000,
            "query_pass_median_ms": statistics.median(queries[name]) * 1000,
            "pass_over_float32_blocked": ratio(passes[name], passes[ref]),
            "pass_over_own_unblocked": ratio(passes[name], passes[name.replace("blocked", "unblocked")])
            if name.endswith(" blocked") else None,
            "identical_alone_and_batched": f"{identical[name]}/{checked}"} for name in names},
    }
    print(f"NQ questions {out['questions']}, 20 passages each; {out['machine']['torch_threads']} torch threads, "
          f"load average {out['machine']['load_average']}")
    print("| variant | pass median ms | / float32 blocked | / its unblocked | query pass ms | passages alone = batched |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, v in out["variants"].items():
        own = "–" if v["pass_over_own_unblocked"] is None else f"{v['pass_over_own_unblocked']:.3f}"
        print(f"| {name} | {v['pass_median_ms']:.1f} | {v['pass_over_float32_blocked']:.3f} | {own} | "
              f"{v['query_pass_median_ms']:.2f} | {v['identical_alone_and_batched']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    raise SystemExit(main_guard(main))
