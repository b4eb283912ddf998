"""Cache keys: a strong hash of a chunk's text under the encoder's namespace (storage layer)."""

from __future__ import annotations

import hashlib
import re
import struct

KEY_RE = re.compile(r"[0-9A-Za-z_-]{4,128}\Z")


def cache_key(text: str, namespace: str) -> str:
    """Return a 64-hex-digit BLAKE2b key for ``text`` under ``namespace``.

    ``namespace`` names everything that changes the fingerprints (encoder identity and revision,
    window and pooling settings). Any ``str`` works, including lone surrogates.

    >>> k = cache_key("Paris is in France.", "all-MiniLM-L6-v2|win=256")
    >>> len(k), k == cache_key("Paris is in France.", "other-encoder")
    (64, False)
    """
    if not isinstance(text, str) or not isinstance(namespace, str):
        raise TypeError(f"text and namespace must be str, got {type(text).__name__}, "
                        f"{type(namespace).__name__}")
    ns = namespace.encode("utf-8", "surrogatepass")
    h = hashlib.blake2b(digest_size=32, person=b"semtoken-rag-fp")
    h.update(struct.pack("<Q", len(ns)))  # length prefix: ("ab", "c") and ("a", "bc") differ
    h.update(ns)
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def is_key(key: object) -> bool:
    """True when ``key`` is a well-formed cache key (4-128 chars of ``[0-9A-Za-z_-]``).

    >>> is_key(cache_key("x", "ns")), is_key("../../etc/passwd")
    (True, False)
    """
    return isinstance(key, str) and KEY_RE.match(key) is not None


def check_key(key: object) -> str:
    """Return ``key`` if well formed, else raise ``ValueError`` naming it."""
    if not is_key(key):
        raise ValueError(f"cache keys must be 4-128 chars of [0-9A-Za-z_-] (see cache_key()), got {key!r}")
    return key  # type: ignore[return-value]
