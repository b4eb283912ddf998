"""LlamaIndex integration of semtoken-rag: :class:`SemTokenNodePostprocessor`.

Install with ``pip install 'semtoken-rag[llamaindex]'``.
"""

try:
    import llama_index.core  # noqa: F401
except ModuleNotFoundError as e:
    if e.name not in ("llama_index", "llama_index.core"):
        raise
    raise ImportError(
        "llama_index.postprocessor.semtoken needs llama-index-core, which is not installed: "
        "pip install 'semtoken-rag[llamaindex]'"
    ) from e

from llama_index.postprocessor.semtoken._support import SemTokenCompressionEvent
from llama_index.postprocessor.semtoken.base import SemTokenNodePostprocessor
from llama_index.postprocessor.semtoken.fingerprinter import SemTokenFingerprinter

__all__ = ["SemTokenCompressionEvent", "SemTokenFingerprinter", "SemTokenNodePostprocessor"]
