"""SemTokenFingerprinter: an IngestionPipeline component that pre-warms the fingerprint store."""

from __future__ import annotations

import asyncio
import copy
import logging
import multiprocessing
from collections.abc import Sequence
from typing import Annotated, Any

from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.schema import BaseNode, MetadataMode, TransformComponent

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.config import NotBool, carried_config, picklable, sequence_of
from semtoken_rag.registry import shared_engine

logger = logging.getLogger(__name__)
_WARNED = False  # the child-process warning, once a process


def node_text(node: BaseNode) -> str:
    """The text of a node as the postprocessor compresses it: its content, without metadata."""
    return node.get_content(metadata_mode=MetadataMode.NONE)


class SemTokenFingerprinter(TransformComponent):
    """Store the fingerprints of nodes as they are indexed; the nodes come back unchanged.

    Put it last in an ``IngestionPipeline``'s transformations (after the splitter, so that the texts
    are the chunks the retriever will return). At query time
    :class:`~llama_index.postprocessor.semtoken.SemTokenNodePostprocessor` finds their fingerprints (in
    this process, from any registry engine with the same encoder settings, whatever its tokenizer or rate;
    across replicas, in a shared store, e.g. ``SemTokenConfig(store="redis://...")``) and encodes only the
    query. Nodes whose text is blank, repeated or already stored are not encoded (a stored entry gets the
    analysis of this config's settings when it lacks it: give the config the replicas' budget tokenizer).

    With ``IngestionPipeline.run(num_workers=N)`` each worker process has its own engine: what it stores
    reaches the caller only through a shared store (``store=`` or ``cache_dir=`` in the config, or of the
    ``engine=`` given: a pickle carries its config); without one a warning (once a process) says the
    fingerprints stay in the worker. ``copy.deepcopy`` shares a given engine.

    Example:
        >>> from llama_index.core.ingestion import IngestionPipeline
        >>> from llama_index.core.schema import TextNode
        >>> from llama_index.postprocessor.semtoken import SemTokenFingerprinter
        >>> nodes = [TextNode(text="The Eiffel Tower in Paris was completed in 1889.")]
        >>> pipeline = IngestionPipeline(transformations=[SemTokenFingerprinter()])
        >>> [n.text for n in pipeline.run(nodes=nodes)]
        ['The Eiffel Tower in Paris was completed in 1889.']
    """

    model_config = ConfigDict(validate_assignment=True)

    config: SemTokenConfig | None = Field(
        default=None, description="Engine configuration (its store is where fingerprints go); None: the "
                                  "process-wide default engine.")
    batch_size: Annotated[int, NotBool] = Field(default=256, ge=1, description="Texts fingerprinted per encoder pass group.")

    _engine: SemToken | None = PrivateAttr(default=None)
    _encoded: int = PrivateAttr(default=0)

    def __init__(self, *, engine: SemToken | None = None, **data: Any) -> None:
        if engine is not None and not isinstance(engine, SemToken):
            raise TypeError(f"engine must be a semtoken_rag.SemToken, got {type(engine).__name__}")
        super().__init__(**data)
        if engine is not None and self.config is not None:
            raise ValueError("give either engine= or config=, not both (the engine has its own config)")
        self._engine = engine

    @classmethod
    def class_name(cls) -> str:
        return "SemTokenFingerprinter"

    def get_engine(self) -> SemToken:
        """The engine whose cache and store are filled (as the postprocessor's ``get_engine()``)."""
        if self._engine is not None and self.config is not None:  # (config assigned after engine= was given)
            raise ValueError("give either engine= or config=, not both (the engine has its own config)")
        return self._engine if self._engine is not None else shared_engine(self.config)

    @property
    def engine(self) -> SemToken:
        """The engine whose cache and store are filled (:meth:`get_engine`)."""
        return self.get_engine()

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> SemTokenFingerprinter:
        new = type(self).model_construct(_fields_set=set(self.model_fields_set),
                                         **{k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        new._engine = self._engine  # (shared, as the postprocessor's)
        return new

    def __getstate__(self) -> dict[str, Any]:
        # not BaseComponent's, which drops the engine with a warning, and with it the store it fills (an
        # IngestionPipeline worker would fill none): the engine is left out and its config goes in its place
        # (a budget tokenizer that cannot be pickled is left out, and with it the analyses: carried_config)
        fields, fields_set = dict(self.__dict__), set(self.model_fields_set)
        config = self._engine.config if self._engine is not None else self.config
        if config is not None:
            fields["config"] = carried_config(config, picklable)
            fields_set.add("config")
        return {"__dict__": fields, "__pydantic_extra__": self.__pydantic_extra__,
                "__pydantic_fields_set__": fields_set, "__pydantic_private__": {"_engine": None, "_encoded": 0}}

    @property
    def last_encoded(self) -> int:
        """How many texts the last call encoded (the others were already stored, blank or repeated)."""
        return self._encoded

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """Fingerprint ``nodes`` into the store and return them as they are."""
        nodes = sequence_of(nodes, BaseNode, "nodes")
        global _WARNED
        engine = self.engine
        cfg = engine.config
        if multiprocessing.parent_process() is not None and cfg.store is None and cfg.cache_dir is None \
                and not _WARNED:
            _WARNED = True  # (once a process: a serving worker started by multiprocessing is fine as it is)
            logger.warning("SemTokenFingerprinter runs in a child process with no shared store: its fingerprints "
                           "serve this process only. In IngestionPipeline workers (num_workers > 1) they are "
                           "lost: give the config a store= or cache_dir=, or run with num_workers=1")
        self._encoded = engine.prewarm([node_text(n) for n in nodes], batch_size=self.batch_size)
        return nodes

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """:meth:`__call__` in a worker thread, keeping the event loop free."""
        return await asyncio.to_thread(self.__call__, nodes, **kwargs)
