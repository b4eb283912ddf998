"""SemTokenNodePostprocessor: semtoken-rag as a LlamaIndex node postprocessor."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from semtoken_rag import CompressionResult, SemToken, SemTokenConfig

METADATA_KEY = "semtoken"
_LOCK = threading.Lock()
_SHARED: list[SemToken] = []  # the process-wide default engine, built on first use


def _excluded(keys: list[str]) -> list[str]:
    return [*keys] if METADATA_KEY in keys else [*keys, METADATA_KEY]


def _rebuild(nodes: list[NodeWithScore], result: CompressionResult) -> list[NodeWithScore]:
    """Copies of the nodes that kept something, text replaced, in input order; inputs untouched."""
    out = []
    for nws, chunk in zip(nodes, result.chunks):
        if chunk.is_empty:
            continue
        node = nws.node
        new = node.model_copy(update={
            "metadata": {**node.metadata, METADATA_KEY: chunk.to_dict()},
            "excluded_llm_metadata_keys": _excluded(node.excluded_llm_metadata_keys),
            "excluded_embed_metadata_keys": _excluded(node.excluded_embed_metadata_keys),
            "relationships": dict(node.relationships),
        })
        new.set_content(chunk.text)
        out.append(nws.model_copy(update={"node": new}))
    return out


class SemTokenNodePostprocessor(BaseNodePostprocessor):
    """Compress retrieved nodes to a budget of downstream-LLM tokens with semtoken-rag.

    Returns new ``NodeWithScore`` objects holding copies of the nodes (same id, metadata,
    relationships and score) whose text is the kept text, plus ``metadata["semtoken"]``
    (``original_tokens``, ``compressed_tokens``, ``kept_spans`` as ``[start, end]`` character offsets
    into the node's text, ``relevance``), which is excluded from what the LLM and the embedder see.
    Nodes with nothing kept are left out; the others keep their order. Inputs are never modified.
    Without a query bundle, nodes are compressed by semantic density alone.

    Without ``engine`` or ``config``, all postprocessors of the process share one default engine
    (one loaded encoder, one fingerprint cache); pass ``engine=SemToken(...)`` to share your own.

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

    rate: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="Fraction of downstream-LLM tokens kept, in (0, 1]. None: the engine's default.")
    target_tokens: int | None = Field(
        default=None, gt=0,
        description="Absolute budget in downstream-LLM tokens for all nodes of a call (overrides rate).")
    config: SemTokenConfig | None = Field(
        default=None, description="Configuration of the engine built on first use (when no engine is given).")

    _engine: SemToken | None = PrivateAttr(default=None)

    def __init__(self, *, engine: SemToken | None = None, **data: Any) -> None:
        super().__init__(**data)
        if engine is not None and self.config is not None:
            raise ValueError("give either engine= or config=, not both (the engine has its own config)")
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "SemTokenNodePostprocessor"

    @property
    def engine(self) -> SemToken:
        """The engine this postprocessor uses, built on first use when none was given."""
        with _LOCK:
            if self._engine is None and self.config is not None:
                self._engine = SemToken(self.config)
            elif self._engine is None:
                if not _SHARED:
                    _SHARED.append(SemToken())
                self._engine = _SHARED[0]
        return self._engine

    def _args(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None) -> tuple:
        texts = [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in nodes]
        query = query_bundle.query_str if query_bundle is not None else None
        return texts, query or None

    def _postprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if not nodes:
            return []
        texts, query = self._args(nodes, query_bundle)
        result = self.engine.compress(texts, query, rate=self.rate, target_tokens=self.target_tokens)
        return _rebuild(nodes, result)

    async def _apostprocess_nodes(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None = None
    ) -> list[NodeWithScore]:
        if not nodes:
            return []
        texts, query = self._args(nodes, query_bundle)
        engine = self._engine
        if engine is None:  # first use: load the encoder off the event loop
            engine = await asyncio.to_thread(lambda: self.engine)
        result = await engine.acompress(texts, query, rate=self.rate, target_tokens=self.target_tokens)
        return _rebuild(nodes, result)
