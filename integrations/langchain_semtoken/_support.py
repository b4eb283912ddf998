"""Helpers of :class:`SemTokenCompressor`: engine settings, the budget of what the LLM reads, per-call
settings from LangChain's config (internal)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.callbacks import BaseCallbackManager
from langchain_core.documents import Document
from langchain_core.runnables.config import ensure_config

from semtoken_rag import CompressionResult, SemToken, SemTokenConfig
from semtoken_rag.config import carried_config, check_budget, picklable, sequence_of

EVENT_NAME = "semtoken_compression"
CONVERSATION_KEY = "semtoken_conversation_id"  # namespaced: LangSmith groups threads by "conversation_id"


def documents_of(documents: Any) -> list[Document]:
    """``documents`` as a list, each checked to be a ``Document`` with a str ``page_content`` (a clear error
    naming the first that is not: a ``Document`` takes any value assigned to it)."""
    docs = sequence_of(documents, Document, "documents")
    for i, d in enumerate(docs):
        if not isinstance(d.page_content, str):
            raise TypeError(f"documents[{i}].page_content must be a str, got {type(d.page_content).__name__}")
    return docs


def deepcopy_sharing_engine(model: Any, memo: dict[int, Any] | None) -> Any:
    """A deep copy of a component with an ``engine`` field that shares its engine (a loaded model)."""
    fields = {k: copy.deepcopy(v, memo) for k, v in model.__dict__.items() if k != "engine"}
    return type(model).model_construct(_fields_set=set(model.model_fields_set), engine=model.engine, **fields)


def state_without_engine(model: Any, state: dict[Any, Any], private: dict[str, Any], *,
                         fingerprints_only: bool = False) -> dict[Any, Any]:
    """A component's pickle ``state`` without its engine, whose config goes in its place (unpickled: the
    registry's engine for it), and with ``private`` as its private attributes. ``fingerprints_only`` (a
    fingerprinter): a budget tokenizer that cannot be pickled is left out, and the analyses with it
    (:func:`~semtoken_rag.config.carried_config`)."""
    state["__dict__"] = {**state["__dict__"], "engine": None}
    config = model.engine.config if model.engine is not None else state["__dict__"].get("config")
    if config is not None:
        state["__dict__"]["config"] = carried_config(config, picklable) if fingerprints_only else config
        state["__pydantic_fields_set__"] = {*state["__pydantic_fields_set__"], "config"}
    state["__pydantic_private__"] = private
    return state


def engine_config(config: SemTokenConfig | None, **overrides: Any) -> SemTokenConfig:
    """``config`` (default settings when None) with the non-None ``overrides`` applied, re-validated."""
    base = config if config is not None else SemTokenConfig()
    given = {k: v for k, v in overrides.items() if v is not None}
    return SemTokenConfig(**{**dict(base), **given}) if given else base


def plan(engine: SemToken, docs: list[Document], separator: str, rate: float | None, target: int | None,
         conversation_id: str | None) -> dict[str, Any]:
    """Texts, per-document overheads (one separator per kept document but the first: charging every
    document but document 0 is never short) and the budget of one call."""
    texts = [d.page_content for d in docs]
    overheads = [0] + [engine.count_tokens(separator)] * (len(docs) - 1)
    context = engine.count_tokens(separator.join(texts))
    limit = budget(engine, context, rate, target, lambda: sum(map(engine.count_tokens, texts)) + sum(overheads))
    return {"texts": texts, "overheads": overheads, "conversation_id": conversation_id, "context_tokens": context,
            "budget": limit, "context_excess": context_excess(engine, separator, limit)}


def context_excess(engine: SemToken, separator: str, limit: int) -> Callable[[list[str]], int]:
    """The engine's check of what the LLM reads: the kept texts joined by ``separator`` (a stuff chain's
    context), counted whole, minus the budget. The per-document charges are an estimate: a separator
    that the tokenizer merges with the text beside it (``""``, ``" "``) can cost more joined."""
    def excess(texts: list[str]) -> int:
        return engine.count_tokens(separator.join(t for t in texts if t)) - limit
    return excess


def budget(engine: SemToken, context_tokens: int, rate: float | None, target: int | None,
           everything: Callable[[], int]) -> int:
    """``target`` (or the engine's ``target_tokens``), else ``floor(rate * context_tokens)``; a rate of
    1.0 keeps everything (``everything()``: what the texts and overheads are charged, which can pass the
    joined context's own count by a few tokens)."""
    check_budget(rate, target)  # (again: model_copy(update=...) skips the fields' validation)
    cfg = engine.config
    if target is None and rate is None:
        target = cfg.target_tokens
    if target is not None:
        return int(target)
    rate = rate if rate is not None else cfg.rate
    share = math.floor(rate * context_tokens + 1e-9)
    return max(share, everything()) if rate >= 1.0 else share


def run_callbacks(callbacks: Any) -> Any:
    """``callbacks``, else those of the run this call is made in (a step of a chain that called the
    compressor without passing them on), as LangChain's ``dispatch_custom_event`` finds them."""
    return callbacks if callbacks is not None else ensure_config().get("callbacks")


def call_conversation(callbacks: Any) -> str | None:
    """The per-call ``conversation_id``: ``configurable`` of the current run's config, else the run's
    metadata (``config={"metadata": {...}}`` reaches a compressor through its callback manager)."""
    value = ensure_config().get("configurable", {}).get(CONVERSATION_KEY)
    if value is None and isinstance(callbacks, BaseCallbackManager):
        value = callbacks.inheritable_metadata.get(CONVERSATION_KEY)
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{CONVERSATION_KEY} must be a str, got {type(value).__name__}")
    return value


def rebuild(documents: Sequence[Document], result: CompressionResult) -> list[Document]:
    """New documents (same id, copied metadata) for the inputs that kept something, in input order."""
    return [
        doc.model_copy(update={"page_content": chunk.text,
                               "metadata": {**doc.metadata, "semtoken": chunk.to_dict()}})
        for doc, chunk in zip(documents, result.chunks)
        if not chunk.is_empty
    ]


def event(result: CompressionResult, plan: dict[str, Any], n_in: int, n_out: int) -> dict[str, Any]:
    """The payload of the custom callback event: chunk tokens before/after, the budget of the whole
    context, and the uncompressed context's tokens (separators included)."""
    return {"original_tokens": result.original_tokens, "compressed_tokens": result.compressed_tokens,
            "budget": plan["budget"], "context_tokens": plan["context_tokens"], "documents_in": n_in,
            "documents_out": n_out}


def _args(plan: dict[str, Any]) -> dict[str, Any]:
    return {"target_tokens": plan["budget"], "chunk_overheads": plan["overheads"],
            "conversation_id": plan["conversation_id"], "context_excess": plan["context_excess"]}


def compress(engine: SemToken, plan: dict[str, Any], query: str | None) -> CompressionResult:
    """Compress ``plan["texts"]`` to ``plan["budget"]``, each kept text paying its overhead (a budget
    of 0 tokens keeps nothing)."""
    if plan["budget"] <= 0:
        return nothing(engine, plan, query)
    return engine.compress(plan["texts"], query, **_args(plan))


async def acompress(engine: SemToken, plan: dict[str, Any], query: str | None) -> CompressionResult:
    """Async :func:`compress` (the engine works in a thread)."""
    if plan["budget"] <= 0:
        return nothing(engine, plan, query)
    return await engine.acompress(plan["texts"], query, **_args(plan))


def nothing(engine: SemToken, plan: dict[str, Any], query: str | None) -> CompressionResult:
    """The result of a budget of 0 tokens: every chunk empty."""
    return CompressionResult.nothing_kept([engine.count_tokens(t) for t in plan["texts"]], query)
