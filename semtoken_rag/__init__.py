"""semtoken-rag: query-aware compression of retrieved chunks for RAG (SemToken).

>>> from semtoken_rag import SemToken, SemTokenConfig
>>> SemTokenConfig().rate
0.33
"""

from .config import SemTokenConfig
from .engine import SemToken
from .results import CompressedChunk, CompressionResult, SpanInfo

__all__ = ["SemToken", "SemTokenConfig", "CompressionResult", "CompressedChunk", "SpanInfo"]
__version__ = "0.1.0"
