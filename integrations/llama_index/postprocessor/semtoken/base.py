"""SemTokenNodePostprocessor: semtoken-rag as a LlamaIndex node postprocessor."""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
from llama_index.postprocessor.semtoken import _support as sup

from semtoken_rag import CompressionResult, SemToken, SemTokenConfig
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
    node's original text, ``relevance``, and ``source_spans``, the same slices as offsets into the
    source document when the node has ``start_char_idx``), which the LLM and the embedder do not see.
    ``start_char_idx``/``end_char_idx`` keep pointing at the node's original span in its source
    document. Nodes with nothing kept are left out (one warning is logged when nothing at all is
    kept); the others keep their order. Inputs are never modified. Each call emits a
    ``SemTokenCompressionEvent`` (token counts) through LlamaIndex's instrumentation dispatcher.

    ``conversation_id`` drops text this conversation already received: only while that text is still
    in the LLM's view (LlamaIndex's context and condense chat engines rebuild the context each turn and
    must not use it; see the README). ``tokenizer``, ``device``, ``encoder`` override ``config``;
    without a tokenizer, one the user set through ``Settings.tokenizer`` is used (LlamaIndex's own
    tiktoken default is not). Same settings share one engine (``semtoken_rag.registry``);
    ``engine=SemToken(...)`` uses yours and ``copy.deepcopy`` shares it. Unknown arguments raise.

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

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    rate: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="Fraction of the context's downstream-LLM tokens kept, in (0, 1]. None: the engine's.")
    target_tokens: int | None = Field(
        default=None, gt=0,
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

    _engine: SemToken | None = PrivateAttr(default=None)
    _given: bool = PrivateAttr(default=False)

    def __init__(self, *, engine: SemToken | None = None, **data: Any) -> None:
        super().__init__(**data)
        given = [k for k in ("config", "tokenizer", "device", "encoder") if getattr(self, k) is not None]
        if engine is not None and given:
            raise ValueError(f"give either engine= or {'/'.join(given)}=, not both (the engine has its own)")
        self._engine, self._given = engine, engine is not None

    @classmethod
    def class_name(cls) -> str:
        return "SemTokenNodePostprocessor"

    def get_engine(self) -> SemToken:
        """The engine this postprocessor uses: the given one, else the registry's for these settings."""
        if self._engine is None:
            tokenizer = self.tokenizer
            if tokenizer is None and (self.config is None or "tokenizer" not in self.config.model_fields_set):
                tokenizer = sup.settings_tokenizer()
            self._engine = shared_engine(sup.engine_config(
                self.config, tokenizer=tokenizer, device=self.device, encoder=self.encoder))
        return self._engine

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

    def _finish(self, nodes: list[NodeWithScore], result: CompressionResult, p: dict) -> list[NodeWithScore]:
        out = sup.rebuild(nodes, result)
        if not out:
            logger.warning("semtoken-rag kept nothing of %d nodes (budget %d tokens)", len(nodes), p["budget"])
        dispatcher.event(sup.event(result, p, len(nodes), len(out)))
        return out

    def _call(self, p: dict, query_bundle: QueryBundle | None) -> dict[str, Any]:
        query = query_bundle.query_str if query_bundle is not None else None
        return {"chunks": p["texts"], "query": query or None, "target_tokens": max(p["budget"], 1),
                "chunk_overheads": p["overheads"], "conversation_id": self.conversation_id}

    @dispatcher.span
    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if not nodes:
            return []
        engine = self.get_engine()
        p = sup.plan(engine, nodes, self.metadata_mode, self.rate, self.target_tokens)
        return self._finish(nodes, engine.compress(**self._call(p, query_bundle)), p)

    @dispatcher.span
    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if not nodes:
            return []
        engine = self._engine or await asyncio.to_thread(self.get_engine)  # loads off the event loop
        p = await asyncio.to_thread(sup.plan, engine, nodes, self.metadata_mode, self.rate, self.target_tokens)
        return self._finish(nodes, await engine.acompress(**self._call(p, query_bundle)), p)
