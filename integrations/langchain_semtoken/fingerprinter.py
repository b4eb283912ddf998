"""SemTokenFingerprinter: pre-warm the fingerprint store as LangChain documents are indexed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Annotated, Any

from langchain_core.documents import BaseDocumentTransformer, Document
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from semtoken_rag import SemToken, SemTokenConfig
from semtoken_rag.config import NotBool
from semtoken_rag.registry import shared_engine

from ._support import deepcopy_sharing_engine, documents_of, state_without_engine


class SemTokenFingerprinter(BaseDocumentTransformer, BaseModel):
    """Store the fingerprints of documents as they are indexed; the documents come back unchanged.

    Use it on the chunks you are about to add to a vector store. Later, when a retriever returns those
    chunks, :class:`~langchain_semtoken.SemTokenCompressor` finds their fingerprints (in this process,
    from any registry engine with the same encoder settings, whatever its tokenizer or rate; across
    replicas, in a shared store, e.g. ``SemTokenConfig(store="redis://...")``) and encodes only the query.
    What is fingerprinted is ``page_content``, the text the compressor gets.

    Returns the same ``Document`` objects, in order, untouched. Blank and repeated texts are skipped;
    fingerprints already stored are not recomputed (a stored entry gets the analysis of this config's
    settings when it lacks it: give the config the replicas' budget tokenizer). ``copy.deepcopy`` shares a given ``engine``; a pickle
    carries its config instead (unpickled, the registry's engine for it fills the same store).

    Example:
        >>> from langchain_core.documents import Document
        >>> from langchain_semtoken import SemTokenFingerprinter
        >>> docs = [Document(page_content="The Eiffel Tower in Paris was completed in 1889.")]
        >>> fingerprinter = SemTokenFingerprinter()
        >>> fingerprinter.transform_documents(docs) == docs
        True
        >>> fingerprinter.last_encoded  # doctest: +SKIP
        1
        >>> # vector_store.add_documents(fingerprinter.transform_documents(docs))
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", validate_assignment=True)

    config: SemTokenConfig | None = Field(
        default=None, description="Engine configuration (its store is where fingerprints go); None: the "
                                  "process-wide default engine.")
    engine: SemToken | None = Field(
        default=None, exclude=True, description="An existing engine to fill (shares its cache and store).")
    batch_size: Annotated[int, NotBool] = Field(default=256, ge=1, description="Texts fingerprinted per encoder pass group.")

    _encoded: int = PrivateAttr(default=0)

    @model_validator(mode="after")
    def _one_engine_source(self) -> SemTokenFingerprinter:
        if self.engine is not None and self.config is not None:
            raise ValueError("give either engine= or config=, not both (the engine has its own config)")
        return self

    def get_engine(self) -> SemToken:
        """The engine whose cache and store are filled."""
        self._one_engine_source()  # (again: an assignment that failed validation has already been made)
        return self.engine if self.engine is not None else shared_engine(self.config)

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> SemTokenFingerprinter:
        return deepcopy_sharing_engine(self, memo)

    def __getstate__(self) -> dict[Any, Any]:  # (unpickled: the registry's engine for its config, same store)
        return state_without_engine(self, super().__getstate__(), {"_encoded": 0}, fingerprints_only=True)

    @property
    def last_encoded(self) -> int:
        """How many texts the last call encoded (the others were already stored, blank or repeated)."""
        return self._encoded

    def transform_documents(self, documents: Sequence[Document], **kwargs: Any) -> Sequence[Document]:
        """Fingerprint ``documents`` into the store and return them as they are."""
        docs = documents_of(documents)
        self._encoded = self.get_engine().prewarm([d.page_content for d in docs], batch_size=self.batch_size)
        return docs

    async def atransform_documents(self, documents: Sequence[Document], **kwargs: Any) -> Sequence[Document]:
        """:meth:`transform_documents` in a worker thread, keeping the event loop free."""
        return await asyncio.to_thread(self.transform_documents, documents, **kwargs)
