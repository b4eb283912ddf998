"""Device selection and fallbacks on a CPU machine: CUDA absent, faiss absent."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import NOBEL

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.device_search import DeviceConversationMemory
from semtoken_rag.engine import choose_repeat_search
from semtoken_rag.repeats import ConversationMemory

pytestmark = pytest.mark.slow  # real engines


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_but_absent_is_a_clear_error():
    with pytest.raises(ValueError, match="asked for CUDA, but torch sees no CUDA device"):
        SemToken(SemTokenConfig(device="cuda"))


def test_a_bad_device_name_is_a_clear_error():
    with pytest.raises(ValueError, match="not a torch device"):
        SemToken(SemTokenConfig(device="gpu-please"))


def test_cpu_engine_uses_faiss_cpu(engine):
    assert engine.repeat_search == "faiss-cpu"
    assert isinstance(engine.memory, ConversationMemory)
    assert engine.batcher is None  # micro-batching is off on CPU unless configured
    assert engine.encoder.batch_size == 16  # batch_size None: 16 windows a pass on CPU


def test_without_faiss_the_torch_path_runs_and_finds_the_same_repeats(engine, monkeypatch):
    # a chunk repeated inside a call, and a conversation that already received the first chunk
    chunks = [NOBEL[0], NOBEL[2], NOBEL[0] + " Extra words at the end."]

    def run(eng):
        eng.memory.forget("fallback-conv")
        eng.compress([NOBEL[1]], "nobel prize", rate=0.9, conversation_id="fallback-conv")
        return eng.compress(chunks, "nobel prize in physics", rate=0.6, conversation_id="fallback-conv")

    a = run(engine)  # faiss-cpu
    monkeypatch.setitem(sys.modules, "faiss", None)  # from here on `import faiss` raises ImportError
    assert choose_repeat_search(torch.device("cpu")) == "torch"
    no_faiss = SemToken(SemTokenConfig(device="cpu"))
    assert no_faiss.repeat_search == "torch" and isinstance(no_faiss.memory, DeviceConversationMemory)
    b = run(no_faiss)
    assert any(c.repeat_spans for c in a.chunks)  # repeats were there to find
    assert [c.repeat_spans for c in a.chunks] == [c.repeat_spans for c in b.chunks]
    assert [c.kept_spans for c in a.chunks] == [c.kept_spans for c in b.chunks]
