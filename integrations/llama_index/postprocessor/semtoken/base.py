"""SemTokenNodePostprocessor: semtoken-rag as a LlamaIndex node postprocessor."""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Annotated, Any

from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr, field_serializer, model_validator
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
from llama_index.postprocessor.semtoken import _support as sup

from semtoken_rag import CompressionResult, SemToken, SemTokenConfig
from semtoken_rag.config import MAX_TOKENS, NotBool, picklable, tokenizer_label
from semtoken_rag.registry import shared_engine

logger = logging.getLogger(__name__)
dispatcher = get_dispatcher(__name__)


class SemTokenNodePostprocessor(BaseNodePostprocessor):
    """Compress retrieved nodes to a budget of downstream-LLM tokens with semtoken-rag.

    The budget is counted on what the LLM reads: each node's content in ``metadata_mode`` (its
    metadata header included) and the ``"\\n\\n"`` LlamaIndex puts between nodes. Without
    ``target_tokens`` it is ``floor(rate * tokens of the uncompressed context)``; the kept texts plus
    the header and separator of each kept node fit in it.

    Returns new ``NodeWithScore`` objects holding copies of the nodes (same id, metadata,
    relationships and score) whose text is the kept text, plus ``metadata["semtoken"]``
    (``original_tokens``, ``compressed_tokens``, ``kept_spans`` as ``[start, end]`` offsets into the
    node's original text, ``relevance`` (None when the budget held every node whole: nothing is scored
    then), and ``source_spans``, the same slices as offsets into the source document when the node's
    text is as long as its source span ``[start_char_idx:end_char_idx]``: not when a sentence window or
    an earlier compression replaced it), which the LLM and the embedder do not see.
    ``start_char_idx``/``end_char_idx`` keep pointing at the node's original span in its source
    document. Nodes with nothing kept are left out (one warning is logged when no text at all is
    kept); the others keep their order. Nodes without text but with media or a metadata header (an
    ``ImageNode``, a node of metadata only) have nothing to compress: they pass through in their
    place, as copies with ``metadata["semtoken"]``, and what the LLM reads of them (their metadata
    header) is taken from the budget first; the texts get what is left (nothing, when those headers
    alone fill the budget). Inputs are never modified. Each call given nodes emits a
    ``SemTokenCompressionEvent`` (token counts) through LlamaIndex's instrumentation dispatcher.

    ``conversation_id`` drops text this conversation already received: only while that text is still
    in the LLM's view (LlamaIndex's context and condense chat engines rebuild the context each turn and
    must not use it; see the README). ``tokenizer``, ``device``, ``encoder`` override ``config``;
    without a tokenizer, one the user set through ``Settings.tokenizer`` is used (LlamaIndex's own
    tiktoken default is not). Same settings share one engine (``semtoken_rag.registry``), looked up
    for the settings of each call (a copy with other settings, or a setting assigned later, gets the
    engine of those); ``engine=SemToken(...)`` uses yours and ``copy.deepcopy`` shares it; a pickle
    leaves it out and, unpickled, uses the registry's engine for its settings. Unknown arguments
    raise.

    Example:
        >>> from llama_index.core.schema import NodeWithScore, TextNode
        >>> from llama_index.postprocessor.semtoken import SemTokenNodePostprocessor
        >>> post = SemTokenNodePostprocessor(rate=0.5)
        >>> nodes = [NodeWithScore(node=TextNode(id_="a", text="The Eiffel Tower in Paris was "
        ...     "completed in 1889. It was the tallest man-made structure in the world for 41 years."),
        ...     score=0.8)]
        >>> out = post.postprocess_nodes(nodes, query_str="When was the Eiffel Tower completed?")
        >>> out[0].node.node_id, out[0].score, "semtoken" in out[0].node.excluded_llm_metadata_keys
        ('a', 0.8, True)
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", validate_assignment=True)

    rate: Annotated[float | None, NotBool] = Field(
        default=None, gt=0.0, le=1.0,
        description="Fraction of the context's downstream-LLM tokens kept, in (0, 1]. None: the engine's.")
    target_tokens: Annotated[int | None, NotBool] = Field(
        default=None, gt=0, le=MAX_TOKENS,
        description="Absolute budget in downstream-LLM tokens for the whole context of a call (overrides rate).")
    metadata_mode: MetadataMode = Field(
        default=MetadataMode.LLM, description="How the LLM reads a node (its metadata header counts).")
    conversation_id: str | None = Field(
        default=None, description="Drop text this conversation already received (see the class docs).")
    tokenizer: Any = Field(default=None, description="Budget tokenizer (the LLM's); see SemTokenConfig.")
    device: str | None = Field(default=None, description="Encoder device ('cpu', 'cuda'...). None: auto.")
    encoder: str | None = Field(default=None, description="Encoder model; see SemTokenConfig.encoder.")
    config: SemTokenConfig | None = Field(
        default=None, description="Engine configuration (the top-level knobs above override it).")

    _engine: SemToken | None = PrivateAttr(default=None)  # the given engine, or the last resolved
    _given: bool = PrivateAttr(default=False)
    _settings: tuple[Any, ...] | None = PrivateAttr(default=None)  # what the resolved engine was for

    def __init__(self, *, engine: SemToken | None = None, **data: Any) -> None:
        if engine is not None and not isinstance(engine, SemToken):
            raise TypeError(f"engine must be a semtoken_rag.SemToken, got {type(engine).__name__}")
        super().__init__(**data)
        self._engine, self._given = engine, engine is not None
        self._check_one_source()

    def _check_one_source(self) -> None:
        given = [k for k in ("config", "tokenizer", "device", "encoder") if getattr(self, k) is not None]
        if self._given and given:
            raise ValueError(f"give either engine= or {'/'.join(given)}=, not both (the engine has its own)")

    @model_validator(mode="after")
    def _valid_engine_settings(self) -> SemTokenNodePostprocessor:
        """The knobs that override ``config`` make a valid engine config (a bad tokenizer is an error when
        the postprocessor is made or assigned to, not at its first query)."""
        if any(v is not None for v in (self.tokenizer, self.device, self.encoder)):
            sup.engine_config(self.config, tokenizer=self.tokenizer, device=self.device, encoder=self.encoder)
        return self

    @field_serializer("tokenizer", when_used="json")
    def _tokenizer_json(self, value: Any) -> str | None:
        return None if value is None else tokenizer_label(value)

    def to_dict(self, **kwargs: Any) -> dict[str, Any]:
        """LlamaIndex's ``to_dict``, JSON-able (``to_json`` works with a tokenizer object too)."""
        return super().to_dict(**{"mode": "json", **kwargs})

    @classmethod
    def class_name(cls) -> str:
        return "SemTokenNodePostprocessor"

    def get_engine(self) -> SemToken:
        """The engine this postprocessor uses: the given one, else the registry's for these settings."""
        engine = self._loaded()
        if engine is None:
            settings = self._current()
            engine = shared_engine(sup.engine_config(
                self.config, tokenizer=settings[1], device=self.device, encoder=self.encoder))
            self._engine, self._settings = engine, settings
        return engine

    def _current(self) -> tuple[Any, ...]:
        """The settings an engine is made for (``Settings.tokenizer`` when no tokenizer is given)."""
        tokenizer = self.tokenizer
        if tokenizer is None and (self.config is None or "tokenizer" not in self.config.model_fields_set):
            tokenizer = sup.settings_tokenizer()
        return (self.config, tokenizer, self.device, self.encoder)

    def _loaded(self) -> SemToken | None:
        """The engine when it needs no loading: the given one, or the one resolved for these settings."""
        if self._given:
            self._check_one_source()  # (model_copy(update=...) skips validation)
            return self._engine
        held, now = self._settings, self._current()
        same = held is not None and all(a is b for a, b in zip(held, now))  # (identity: no user __eq__)
        return self._engine if self._engine is not None and same else None

    @property
    def engine(self) -> SemToken:
        """Alias of :meth:`get_engine`."""
        return self.get_engine()

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> SemTokenNodePostprocessor:
        new = type(self).model_construct(
            _fields_set=set(self.model_fields_set),
            **{k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        new._engine, new._given = (self._engine, True) if self._given else (None, False)
        return new

    def __getstate__(self) -> dict[str, Any]:
        # not BaseComponent's, which drops what cannot be pickled (the engine, a tokenizer object)
        # with a warning and a silent change of settings: the engine is left out and, when it was
        # given, its config goes in its place; a field that cannot be pickled raises
        fields, fields_set = dict(self.__dict__), set(self.model_fields_set)
        # (LlamaIndex's callback manager, not a setting of ours: BaseComponent's way, dropped if it must)
        if not picklable(fields.get("callback_manager")):
            logger.warning("pickling SemTokenNodePostprocessor without its callback_manager, which cannot be "
                           "pickled; unpickled, it has the default one")
            del fields["callback_manager"]  # (BaseComponent.__setstate__ re-inits: the field's default)
            fields_set.discard("callback_manager")
        if self._given:  # (its tokenizer marked as set: unpickled, Settings.tokenizer does not replace it)
            fields["config"] = self._engine.config.model_copy(update={"tokenizer": self._engine.config.tokenizer})
            fields_set.add("config")
        return {"__dict__": fields, "__pydantic_extra__": self.__pydantic_extra__,
                "__pydantic_fields_set__": fields_set,
                "__pydantic_private__": {"_engine": None, "_given": False, "_settings": None}}

    def _finish(self, nodes: list[NodeWithScore], result: CompressionResult, p: dict) -> list[NodeWithScore]:
        out = sup.rebuild(nodes, result, p["passed"], p["texts"])
        if len(out) == sum(p["passed"]) < len(nodes):
            logger.warning("semtoken-rag kept nothing of %d nodes (budget %d tokens)",
                           len(nodes) - len(out), p["budget"])
        dispatcher.event(sup.event(result, p, len(nodes), len(out)))
        return out

    @staticmethod
    def _query_bundle(query_bundle: Any) -> None:
        if query_bundle is not None and not isinstance(query_bundle, QueryBundle):
            raise TypeError(f"query_bundle must be a QueryBundle or None, got {type(query_bundle).__name__}"
                            + (" (for a plain question pass query_str=...)" if isinstance(query_bundle, str) else ""))

    def _call(self, p: dict, query_bundle: QueryBundle | None) -> dict[str, Any]:
        query = query_bundle.query_str if query_bundle is not None else None
        return {"chunks": p["texts"], "query": query or None, "target_tokens": p["text_budget"],
                "chunk_overheads": p["overheads"], "conversation_id": self.conversation_id,
                "context_excess": p["context_excess"]}

    def _compress(self, engine: SemToken, p: dict, query_bundle: QueryBundle | None) -> CompressionResult:
        if p["text_budget"] <= 0:  # (the engine takes a positive budget; 0 keeps no text)
            return CompressionResult.nothing_kept(p["counts"], self._call(p, query_bundle)["query"])
        return engine.compress(**self._call(p, query_bundle))

    async def _acompress(self, engine: SemToken, p: dict, query_bundle: QueryBundle | None) -> CompressionResult:
        if p["text_budget"] <= 0:
            return CompressionResult.nothing_kept(p["counts"], self._call(p, query_bundle)["query"])
        return await engine.acompress(**self._call(p, query_bundle))

    @dispatcher.span
    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        nodes = sup.scored_nodes(nodes)
        self._query_bundle(query_bundle)
        if not nodes:
            return []
        engine = self.get_engine()
        p = sup.plan(engine, nodes, self.metadata_mode, self.rate, self.target_tokens)
        return self._finish(nodes, self._compress(engine, p, query_bundle), p)

    @dispatcher.span
    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        nodes = sup.scored_nodes(nodes)
        self._query_bundle(query_bundle)
        if not nodes:
            return []
        engine = self._loaded() or await asyncio.to_thread(self.get_engine)  # loads off the event loop
        p = await asyncio.to_thread(sup.plan, engine, nodes, self.metadata_mode, self.rate, self.target_tokens)
        return self._finish(nodes, await self._acompress(engine, p, query_bundle), p)
