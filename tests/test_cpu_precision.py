"""Encoder precision on CPU: what dtype="auto" picks, and bfloat16's fixed-shape down-projections, which keep
a chunk's fingerprints independent of what it is batched with (as float32's are)."""

from __future__ import annotations

import pytest
import torch
from conftest import NOBEL

import semtoken_rag.encoder as enc_mod
from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.encoder import (
    Encoder,
    _row_block_down_projections,
    _RowBlockedLinear,
    _same_rows,
    auto_dtype,
)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_row_blocked_linear_computes_the_linear_layer(bias, rows):
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 8, bias=bias)
    blocked = _RowBlockedLinear(lin, rows)
    for shape in [(1, 24), (3, 5, 24), (64, 24), (2, 65, 24), (0, 24)]:
        x = torch.randn(shape)
        got = blocked(x)
        assert got.shape == (*shape[:-1], 8)
        torch.testing.assert_close(got, lin(x), rtol=1e-5, atol=1e-6)


def test_row_blocked_rows_do_not_depend_on_their_neighbours():
    torch.manual_seed(1)
    lin = torch.nn.Linear(1536, 384).to(torch.bfloat16)
    blocked = _RowBlockedLinear(lin, 1024)
    x = torch.randn(4096, 1536).to(torch.bfloat16)
    full = blocked(x)
    for m in (1, 64, 160, 320, 1024, 1500):  # oneDNN splits plain products of 64-320 rows otherwise
        assert torch.equal(blocked(x[:m]), full[:m])
        assert torch.equal(blocked(x[100:100 + m]), full[100:100 + m])


@pytest.mark.parametrize("tails", [(), (2,), (2, 5), (5, 200)])
def test_row_blocked_tails_compute_the_linear_layer(tails):
    torch.manual_seed(2)
    lin = torch.nn.Linear(24, 8)
    blocked = _RowBlockedLinear(lin, 16, tails)
    assert blocked.tails == tuple(t for t in sorted(tails) if t < 16)
    for n in (0, 1, 2, 3, 5, 6, 15, 16, 17, 18, 21, 40):
        x = torch.randn(n, 24)
        torch.testing.assert_close(blocked(x), lin(x), rtol=1e-5, atol=1e-6)


def test_probed_tails_keep_every_row_independent_of_its_neighbours():
    """The tails the probe accepts (on this machine) give each row the bits of a full block's product: a
    query alone (a 32-row product) equals that query inside a long batch."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(1536, 384)).to(torch.bfloat16)
    assert _row_block_down_projections(model, 1024) == 1
    blocked = model[0]
    assert all(_same_rows(torch.nn.Linear(1536, 384).to(torch.bfloat16), 1024, t) for t in blocked.tails)
    x = torch.randn(3000, 1536).to(torch.bfloat16)
    full = blocked(x)
    for m in (1, 12, 32, 33, 160, 512, 513, 700, 1024, 1500, 2100):
        assert torch.equal(blocked(x[:m]), full[:m]), m
        assert torch.equal(blocked(x[200:200 + m]), full[200:200 + m]), m


def test_a_tail_that_rounds_otherwise_is_not_used(monkeypatch):
    """The probe rejects a row count whose products differ from the full block's (here made to differ)."""
    lin = torch.nn.Linear(64, 16).to(torch.bfloat16)
    real = _RowBlockedLinear.padded

    def off_by_a_bit(self, x, size):
        out = real(self, x, size)
        return out + 1 if size == 8 else out

    monkeypatch.setattr(_RowBlockedLinear, "padded", off_by_a_bit)
    assert not _same_rows(lin, 32, 8)
    model = torch.nn.Sequential(lin)
    _row_block_down_projections(model, 32, tails=(4, 8, 64))
    assert 8 not in model[0].tails and set(model[0].tails) <= {4}  # (64: not below the full block)


def test_only_the_narrowing_projections_are_replaced():
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4),
                                torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(8, 2)))
    assert _row_block_down_projections(model, 32) == 2
    kinds = [type(m).__name__ for m in (model[0], model[2], model[3][0], model[3][1])]
    assert kinds == ["Linear", "_RowBlockedLinear", "Linear", "_RowBlockedLinear"]


@pytest.mark.parametrize("amx, avx512_bf16", [(True, False), (True, True), (False, True), (False, False)])
def test_auto_dtype_on_cpu_follows_the_matrix_units(amx, avx512_bf16, monkeypatch, tiny_encoder):
    probes = {"_is_amx_tile_supported": lambda: amx, "_is_avx512_bf16_supported": lambda: avx512_bf16}
    for name, probe in probes.items():
        monkeypatch.setattr(torch.cpu, name, probe, raising=False)
    assert enc_mod.cpu_bf16_units() == ("amx" if amx else "avx512_bf16" if avx512_bf16 else None)
    bf16 = amx or avx512_bf16  # (either unit: bfloat16)
    assert auto_dtype(torch.device("cpu")) == ("bfloat16" if bf16 else "float32")
    assert auto_dtype(torch.device("cuda")) == "float16"
    enc = Encoder(str(tiny_encoder), device="cpu", max_length=32, window_overlap=8)
    assert enc.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert enc.row_blocked and "|rows-" in enc.identity  # (both CPU precisions, see below)
    assert next(enc.model.parameters()).dtype == enc.dtype
    pinned = Encoder(str(tiny_encoder), device="cpu", dtype="float32", max_length=32, window_overlap=8)
    assert pinned.dtype == torch.float32 and pinned.row_blocked == enc.row_blocked
    assert (pinned.identity != enc.identity) == bf16  # fingerprints of the two precisions are cached apart


def test_cpu_probes_answer_even_without_torch_support(monkeypatch):
    assert isinstance(enc_mod.cpu_has_amx(), bool)
    assert enc_mod.cpu_bf16_units() in ("amx", "avx512_bf16", None)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: 1 / 0, raising=False)  # (a broken probe)
    assert enc_mod.cpu_has_amx() is False and enc_mod.cpu_bf16_units() is None
    assert auto_dtype(torch.device("cpu")) == "float32"


def _same_results(a, b) -> bool:
    """Two results alike in what they kept and why: texts, counts, relevances (unrounded) and every span's
    status, entropy, relevance and score, bit for bit (not timings or cache counters)."""
    def judged(r):
        return [r.budget, r.compressed_tokens, r.overhead_tokens] + [
            (c.text, c.compressed_tokens, c.kept_spans, c.relevance, [vars(s) for s in c.spans]) for c in r.chunks]
    return judged(a) == judged(b)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cpu_fingerprints_do_not_depend_on_batch_composition(dtype):
    """The real encoder on CPU in either precision (bfloat16 on any CPU: slower without AMX, the same
    rounding rule): each text's fingerprints alone equal its fingerprints in batches of any make-up, a
    query's vectors are the same alone, with others or riding in a chunk's row, and compress_many equals
    single calls in every figure of every span."""
    engine = SemToken(SemTokenConfig(device="cpu", dtype=dtype))
    assert engine.encoder.row_blocked == 6  # MiniLM: one down-projection a layer
    _assert_independent_of_batches(engine)
    requests = [_TEXTS[:8], _TEXTS[4:12], _TEXTS[10:]]
    many = engine.compress_many(requests, [*_QUERIES[:2], None], rate=0.4)
    single = SemToken(SemTokenConfig(device="cpu", dtype=dtype))
    for r, c, q in zip(many, requests, [*_QUERIES[:2], None]):
        assert _same_results(r, single.compress(c, q, rate=0.4))


@pytest.mark.slow
def test_row_blocking_follows_the_torch_thread_count():
    """Tails are probed per thread count: an engine loaded at 1 thread and run at 2 stays independent of its
    batches (the tails found at 1 thread, 64 and 128 rows among them, rounded otherwise at 2)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        engine = SemToken(SemTokenConfig(device="cpu", dtype="float32"))
        torch.set_num_threads(2)
        _assert_independent_of_batches(engine)
        layer = next(m for m in engine.encoder.model.modules() if isinstance(m, _RowBlockedLinear))
        assert set(layer._tails.by_threads) == {1, 2}
    finally:
        torch.set_num_threads(threads)


# texts of many lengths (16-170 tokens): batches of several widths and row counts
_TEXTS = [*NOBEL, *(NOBEL[i] + " " + NOBEL[j] for i, j in [(0, 1), (2, 3), (1, 2)]),
          *(t[:n] for t in NOBEL[:2] for n in (40, 120, 250)), "Short one.", "Two words"]
_QUERIES = ["who won the prize", "river in england", "when was the first nobel prize in physics awarded"]


def _assert_independent_of_batches(engine) -> None:
    texts, queries = _TEXTS, _QUERIES
    alone = [engine.encoder.fingerprint([t])[0].vectors for t in texts]
    for size in (3, 7, len(texts)):
        for k in range(0, len(texts), size):
            batch = texts[k:k + size][::-1]
            for t, fp in zip(batch, engine.encoder.fingerprint(batch)):
                assert torch.equal(fp.vectors, alone[texts.index(t)])
    own = [engine.encoder.embed_queries([q])[0] for q in queries]
    for got in (engine.encoder.embed_queries(queries), engine.encoder.encode(texts, queries)[1],
                engine.encoder.encode(texts[:2], queries[::-1])[1][::-1]):
        for (pooled, tokens), (pooled1, tokens1) in zip(got, own):
            assert torch.equal(pooled, pooled1) and torch.equal(tokens, tokens1)


@pytest.mark.slow
def test_precision_benchmark_runs_and_its_blocked_variants_keep_batch_independence(tmp_path):
    """``python -m benchmarks.precision`` on one held-out question: every variant timed, and the row-blocked
    ones (the engine's default) give each passage the same fingerprints alone and in its batch."""
    from benchmarks.data import resolve_data_dir
    from benchmarks.precision import _unblocked, main

    try:
        resolve_data_dir()
    except FileNotFoundError:
        pytest.skip("NQ data not found (../shared/data next to the clone)")
    plain = _unblocked(SemToken(SemTokenConfig(device="cpu", dtype="float32")))
    assert not any(isinstance(m, enc_mod._RowBlockedLinear) for m in plain.encoder.model.modules())
    out = main(["--n", "1", "--identity-n", "1", "--json", str(tmp_path / "p.json")])
    assert out["questions"] == "150-150" and (tmp_path / "p.json").is_file()
    for name, v in out["variants"].items():
        assert v["pass_median_ms"] > 0 and v["query_pass_median_ms"] > 0
        if name.endswith(" blocked"):
            assert v["identical_alone_and_batched"] == "20/20", name
