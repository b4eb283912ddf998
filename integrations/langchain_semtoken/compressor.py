"""SemTokenCompressor: semtoken-rag as a LangChain ``BaseDocumentCompressor``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Annotated, Any

from langchain_core.callbacks import AsyncCallbackManager, CallbackManager, Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from pydantic import ConfigDict, Field, PrivateAttr, field_serializer, model_validator

from langchain_semtoken import _support as sup
from semtoken_rag import CompressionResult, SemToken, SemTokenConfig
from semtoken_rag.config import MAX_TOKENS, NotBool, tokenizer_label
from semtoken_rag.registry import shared_engine

logger = logging.getLogger(__name__)
EVENT_NAME = sup.EVENT_NAME


class SemTokenCompressor(BaseDocumentCompressor):
    """Compress retrieved documents to a budget of downstream-LLM tokens with semtoken-rag.

    The budget is counted on what the LLM reads: the documents' text joined by
    ``document_separator`` (``"\\n\\n"``, as ``create_stuff_documents_chain`` joins them). Without
    ``target_tokens`` it is ``floor(rate * tokens of the uncompressed joined context)``, and the kept
    texts plus one separator per kept document fit in it.

    Each output document is a new ``Document`` with the input's ``id``, the kept text as
    ``page_content`` and a copy of the input's metadata plus ``metadata["semtoken"]``
    (``original_tokens``, ``compressed_tokens``, ``kept_spans`` as ``[start, end]`` character offsets
    into the input text, ``relevance``: None when the budget held every document whole, nothing is scored
    then). Documents with nothing kept are left out (a warning is logged when nothing at all is kept);
    the others keep their order. Inputs are never modified. Every call given documents and callbacks
    (``callbacks=`` given directly, else those of the run it is called in) emits the custom callback
    event ``"semtoken_compression"`` with the token counts.

    ``conversation_id`` (a field, or per call ``config={"metadata": {"semtoken_conversation_id": ...}}``; a
    ``configurable`` entry works when the retriever is a step of a chain) drops text this conversation
    already received. Use it only while that text is still in the LLM's view (e.g. in the message
    history); see the README. Same settings share one engine (``semtoken_rag.registry``);
    ``engine=SemToken(...)`` uses yours. ``copy.deepcopy`` shares the engine; a pickle leaves it out
    and, unpickled, uses the registry's engine for the same settings.

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

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", validate_assignment=True)

    rate: Annotated[float | None, NotBool] = Field(
        default=None, gt=0.0, le=1.0,
        description="Fraction of the context's downstream-LLM tokens kept, in (0, 1]. None: the engine's.")
    target_tokens: Annotated[int | None, NotBool] = Field(
        default=None, gt=0, le=MAX_TOKENS,
        description="Absolute budget in downstream-LLM tokens for the whole context of a call (overrides rate).")
    document_separator: str = Field(
        default="\n\n", description="What joins documents in the prompt (create_stuff_documents_chain's "
                                    "default); its tokens count against the budget.")
    conversation_id: str | None = Field(
        default=None, description="Drop text this conversation already received (see the class docs).")
    tokenizer: Any = Field(default=None, description="Budget tokenizer (the LLM's); see SemTokenConfig.")
    device: str | None = Field(default=None, description="Encoder device ('cpu', 'cuda'...). None: auto.")
    encoder: str | None = Field(default=None, description="Encoder model; see SemTokenConfig.encoder.")
    config: SemTokenConfig | None = Field(
        default=None, description="Engine configuration (the top-level knobs above override it).")
    engine: SemToken | None = Field(
        default=None, exclude=True, description="An existing engine to use; not serialized.")

    _resolved: tuple[tuple[Any, ...], SemToken] | None = PrivateAttr(default=None)  # (settings, engine)

    @model_validator(mode="after")
    def _one_engine_source(self) -> SemTokenCompressor:
        given = [k for k in ("config", "tokenizer", "device", "encoder") if getattr(self, k) is not None]
        if self.engine is not None and given:
            raise ValueError(f"give either engine= or {'/'.join(given)}=, not both (the engine has its own)")
        if any(v is not None for v in (self.tokenizer, self.device, self.encoder)):  # (a valid engine config:
            # a bad tokenizer is an error when the compressor is made or assigned to, not at its first call)
            sup.engine_config(self.config, tokenizer=self.tokenizer, device=self.device, encoder=self.encoder)
        return self

    @field_serializer("tokenizer", when_used="json")
    def _tokenizer_json(self, value: Any) -> str | None:
        return None if value is None else tokenizer_label(value)

    def get_engine(self) -> SemToken:
        """The engine this compressor uses: the given one, else the registry's for the current settings
        (a copy with other settings, or a setting assigned later, gets the engine of those)."""
        engine = self._loaded()
        if engine is None:
            settings = (self.config, self.tokenizer, self.device, self.encoder)
            engine = shared_engine(sup.engine_config(
                self.config, tokenizer=self.tokenizer, device=self.device, encoder=self.encoder))
            self._resolved = (settings, engine)
        return engine

    def _loaded(self) -> SemToken | None:
        """The engine when it needs no loading: the given one, or the one resolved for these settings."""
        if self.engine is not None:
            if any(v is not None for v in (self.config, self.tokenizer, self.device, self.encoder)):
                self._one_engine_source()  # (raises: model_copy(update=...) skips validation)
            return self.engine
        held = self._resolved
        now = (self.config, self.tokenizer, self.device, self.encoder)
        same = held is not None and all(a is b for a, b in zip(held[0], now))  # (identity: no user __eq__)
        return held[1] if same else None

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> SemTokenCompressor:
        return sup.deepcopy_sharing_engine(self, memo)

    def __getstate__(self) -> dict[Any, Any]:
        return sup.state_without_engine(self, super().__getstate__(), {"_resolved": None})

    def _finish(self, docs: list[Document], result: CompressionResult, plan: dict[str, Any]):
        out = sup.rebuild(docs, result)
        if not out:
            logger.warning("semtoken-rag kept nothing of %d documents (budget %d tokens)", len(docs), plan["budget"])
        return out, sup.event(result, plan, len(docs), len(out))

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """Compress ``documents`` for ``query`` (an empty query compresses by density alone)."""
        docs = sup.documents_of(documents)
        if not docs:
            return []
        callbacks = sup.run_callbacks(callbacks)
        engine = self.get_engine()
        p = sup.plan(engine, docs, self.document_separator, self.rate, self.target_tokens,
                     sup.call_conversation(callbacks) or self.conversation_id)
        result = sup.compress(engine, p, query or None)
        out, data = self._finish(docs, result, p)
        manager = CallbackManager.configure(inheritable_callbacks=callbacks)
        manager.on_custom_event(EVENT_NAME, data, run_id=manager.parent_run_id)
        return out

    async def acompress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        """Async :meth:`compress_documents`: the engine works in a thread, the event loop stays free."""
        docs = sup.documents_of(documents)
        if not docs:
            return []
        callbacks = sup.run_callbacks(callbacks)
        engine = self._loaded() or await asyncio.to_thread(self.get_engine)  # (loads off the event loop)
        p = await asyncio.to_thread(sup.plan, engine, docs, self.document_separator, self.rate, self.target_tokens,
                                    sup.call_conversation(callbacks) or self.conversation_id)
        result = await sup.acompress(engine, p, query or None)
        out, data = self._finish(docs, result, p)
        manager = AsyncCallbackManager.configure(inheritable_callbacks=callbacks)
        await manager.on_custom_event(EVENT_NAME, data, run_id=manager.parent_run_id)
        return out
