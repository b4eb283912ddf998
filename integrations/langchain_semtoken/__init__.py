"""LangChain integration of semtoken-rag: :class:`SemTokenCompressor`, a ``BaseDocumentCompressor``.

Install with ``pip install 'semtoken-rag[langchain]'``.
"""

try:
    import langchain_core  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != "langchain_core":
        raise
    raise ImportError(
        "langchain_semtoken needs langchain-core, which is not installed: "
        "pip install 'semtoken-rag[langchain]'"
    ) from e

from langchain_semtoken.compressor import SemTokenCompressor
from langchain_semtoken.fingerprinter import SemTokenFingerprinter

__all__ = ["SemTokenCompressor", "SemTokenFingerprinter"]
