"""SemTokenCompressor: semtoken-rag as a LangChain ``BaseDocumentCompressor``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManager, CallbackManager, Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from semtoken_rag import CompressionResult, SemToken, SemTokenConfig

EVENT_NAME = "semtoken_compression"
_LOCK = threading.Lock()
_SHARED: list[SemToken] = []  # the process-wide default engine, built on first use


def _rebuild(documents: Sequence[Document], result: CompressionResult) -> list[Document]:
    """New documents (same id, copied metadata) for the inputs that kept something, in input order."""
    return [
        doc.model_copy(update={"page_content": chunk.text,
                               "metadata": {**doc.metadata, "semtoken": chunk.to_dict()}})
        for doc, chunk in zip(documents, result.chunks)
        if not chunk.is_empty
    ]


def _event(result: CompressionResult, n_in: int, n_out: int) -> dict[str, Any]:
    return {"original_tokens": result.original_tokens, "compressed_tokens": result.compressed_tokens,
            "budget": result.budget, "documents_in": n_in, "documents_out": n_out}


class SemTokenCompressor(BaseDocumentCompressor):
    """Compress retrieved documents to a budget of downstream-LLM tokens with semtoken-rag.

    Each output document is a new ``Document`` with the input's ``id``, the kept text as
    ``page_content`` and a copy of the input's metadata plus ``metadata["semtoken"]``
    (``original_tokens``, ``compressed_tokens``, ``kept_spans`` as ``[start, end]`` character offsets
    into the input text, ``relevance``). Documents with nothing kept are left out; the others keep
    their order. Inputs are never modified. When called inside a run (e.g. by a
    ``ContextualCompressionRetriever``), a custom callback event ``"semtoken_compression"`` reports
    the token counts of the call.

    Without ``engine`` or ``config``, all compressors of the process share one default engine (one
    loaded encoder, one fingerprint cache); pass ``engine=SemToken(...)`` to share your own.

    Example:
        >>> from langchain_core.documents import Document
        >>> from langchain_semtoken import SemTokenCompressor
        >>> compressor = SemTokenCompressor(rate=0.5)
        >>> docs = [Document(id="a", page_content="The Eiffel Tower in Paris was completed in 1889. "
        ...                  "It was the tallest man-made structure in the world for 41 years.")]
        >>> out = compressor.compress_documents(docs, "When was the Eiffel Tower completed?")
        >>> out[0].id, sorted(out[0].metadata["semtoken"])
        ('a', ['compressed_tokens', 'kept_spans', 'original_tokens', 'relevance'])
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    rate: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="Fraction of downstream-LLM tokens kept, in (0, 1]. None: the engine's default.")
    target_tokens: int | None = Field(
        default=None, gt=0,
        description="Absolute budget in downstream-LLM tokens for all documents of a call (overrides rate).")
    config: SemTokenConfig | None = Field(
        default=None, description="Configuration of the engine built on first use (when engine is None).")
    engine: SemToken | None = Field(
        default=None, exclude=True,
        description="An existing engine to use (shares its encoder and cache); not serialized.")

    _built: SemToken | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _one_engine_source(self) -> SemTokenCompressor:
        if self.engine is not None and self.config is not None:
            raise ValueError("give either engine= or config=, not both (the engine has its own config)")
        return self

    def get_engine(self) -> SemToken:
        """The engine this compressor uses, built on first call when none was given."""
        if self.engine is not None:
            return self.engine
        with _LOCK:
            if self._built is None and self.config is not None:
                self._built = SemToken(self.config)
            elif self._built is None:
                if not _SHARED:
                    _SHARED.append(SemToken())
                self._built = _SHARED[0]
        return self._built

    def _kwargs(self) -> dict[str, Any]:
        return {"rate": self.rate, "target_tokens": self.target_tokens}

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """Compress ``documents`` for ``query`` (an empty query compresses by density alone)."""
        docs = list(documents)
        if not docs:
            return []
        result = self.get_engine().compress(
            [d.page_content for d in docs], query or None, **self._kwargs())
        out = _rebuild(docs, result)
        manager = CallbackManager.configure(inheritable_callbacks=callbacks)
        if manager.parent_run_id is not None:
            manager.on_custom_event(EVENT_NAME, _event(result, len(docs), len(out)),
                                    run_id=manager.parent_run_id)
        return out

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """Async :meth:`compress_documents`: the engine works in a thread, the event loop stays free."""
        docs = list(documents)
        if not docs:
            return []
        engine = self.engine if self.engine is not None else self._built
        if engine is None:  # first use: load the encoder off the event loop
            engine = await asyncio.to_thread(self.get_engine)
        result = await engine.acompress([d.page_content for d in docs], query or None, **self._kwargs())
        out = _rebuild(docs, result)
        manager = AsyncCallbackManager.configure(inheritable_callbacks=callbacks)
        if manager.parent_run_id is not None:
            await manager.on_custom_event(EVENT_NAME, _event(result, len(docs), len(out)),
                                          run_id=manager.parent_run_id)
        return out
