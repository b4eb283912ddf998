"""semtoken-rag: query-aware compression of retrieved chunks for RAG (SemToken).

>>> from semtoken_rag import SemToken, SemTokenConfig
>>> SemTokenConfig().rate
0.33
"""

from typing import TYPE_CHECKING

from .config import SemTokenConfig
from .results import CompressedChunk, CompressionResult, SpanInfo

if TYPE_CHECKING:
    from .engine import SemToken

__all__ = ["CompressedChunk", "CompressionResult", "SemToken", "SemTokenConfig", "SpanInfo"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # the engine imports torch and transformers (seconds); load it on first use, not on import, so
    # `semtoken-rag --version`, config validation and result types stay fast
    if name == "SemToken":
        from .engine import SemToken

        return SemToken
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
