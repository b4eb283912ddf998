"""benchmarks.gpu off the GPU: the precision agreement runs whenever the encoder runs below float32."""

from __future__ import annotations

from types import SimpleNamespace

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
