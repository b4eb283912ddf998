"""Open the fingerprint store a URL names: Redis (``redis://``, ``rediss://``, ``unix://``) or a directory.

Storage layer: imports only its siblings; the ``redis`` client is imported when a Redis URL is opened.

>>> import tempfile
>>> open_store(tempfile.mkdtemp(), namespace="enc")  # doctest: +ELLIPSIS
DirectoryStore('...', max_disk_bytes=1073741824)
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from .diskstore import DirectoryStore
from .store import FingerprintStore

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def open_store(url: str, *, namespace: str, ttl_seconds: float | None = None, timeout_seconds: float = 0.1,
               max_disk_bytes: int | None = 2**30) -> FingerprintStore:
    """A :class:`~semtoken_rag.store.FingerprintStore` for ``url``.

    ``namespace`` is the encoder's identity (it names the Redis keys); ``ttl_seconds`` and
    ``timeout_seconds`` apply to Redis, ``max_disk_bytes`` to a directory.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"store must be a non-empty str, got {url!r}")
    if url.lower().startswith(REDIS_SCHEMES):
        from .redis_store import RedisStore

        return RedisStore(url, namespace=namespace, ttl_seconds=ttl_seconds, timeout_seconds=timeout_seconds)
    if url.lower().startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"store={url!r}: a file:// URL must name a local directory")
        url = unquote(parsed.path)
    elif "://" in url:
        raise ValueError(f"store={url!r}: unsupported scheme (redis://, rediss://, unix://, file:// or a path)")
    return DirectoryStore(url, max_disk_bytes=max_disk_bytes, fsync=False, prune_in_background=True)
