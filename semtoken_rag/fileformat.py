"""The fingerprint entry and its binary file format: versioned, checksummed, no pickle (storage layer).

* :class:`CacheEntry`: named read-only numpy arrays cached for one chunk, plus the encoder seconds
  they cost.
* :func:`encode_entry` / :func:`decode_entry`: bytes on disk (or in any byte store). A file that is
  truncated, overwritten, of another version or for another key raises :class:`CorruptEntry`.
* :func:`validate_fingerprints`: a checksum proves the bytes are what a writer wrote, not that the
  writer was right. The engine checks an entry against the chunk it is used for before trusting it.

Only numpy and the standard library are imported.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

MAGIC = b"SEMTKFP\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<HHdH")  # version, key length, encode_seconds, number of arrays
_DIGEST_SIZE = 16
_ENTRY_OVERHEAD = 256  # bytes charged per entry for Python objects and bookkeeping
_ARRAY_OVERHEAD = 112  # bytes charged per numpy array object
_KINDS = "biuf"  # bool, signed, unsigned, float: never object/str/void dtypes


class CorruptEntry(ValueError):
    """Bytes that do not decode to a valid entry for the requested key."""


@dataclass(frozen=True, eq=False)
class CacheEntry:
    """Named numpy arrays cached for one chunk, plus the encoder seconds they cost.

    Arrays are copied into read-only, C-ordered, little-endian arrays. An array named
    ``"fingerprints"`` must already be ``float16`` (``TypeError`` otherwise, so that warm and cold
    paths see the same rounded values); only bool/int/uint/float dtypes are allowed.

    >>> e = CacheEntry({"fingerprints": np.zeros((3, 4), np.float16),
    ...                 "offsets": np.zeros((3, 2), np.int32)}, encode_seconds=0.01)
    >>> e["fingerprints"].shape, e["offsets"].flags.writeable
    ((3, 4), False)
    """

    arrays: Mapping[str, np.ndarray]
    encode_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.arrays, Mapping):
            raise TypeError(f"arrays must map names to numpy arrays, got {type(self.arrays).__name__}")
        frozen: dict[str, np.ndarray] = {}
        for name, value in self.arrays.items():
            if not isinstance(name, str) or not name or len(name.encode("utf-8", "surrogatepass")) > 255:
                raise ValueError(f"array names must be non-empty str of at most 255 bytes, got {name!r}")
            if not isinstance(value, np.ndarray):
                raise TypeError(f"array {name!r} must be a numpy array, got {type(value).__name__}")
            if value.dtype.kind not in _KINDS or value.ndim > 32:
                raise TypeError(f"array {name!r} has dtype {value.dtype}, ndim {value.ndim}; "
                                "allowed: bool/int/uint/float, ndim <= 32")
            if name == "fingerprints" and value.dtype != np.float16:
                raise TypeError(f"fingerprints must be float16, got {value.dtype}; use .astype(np.float16)")
            arr = np.array(value, dtype=value.dtype.newbyteorder("<"), order="C", copy=True)
            arr.flags.writeable = False
            frozen[name] = arr
        seconds = float(self.encode_seconds)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"encode_seconds must be a finite number >= 0, got {self.encode_seconds!r}")
        object.__setattr__(self, "arrays", MappingProxyType(frozen))
        object.__setattr__(self, "encode_seconds", seconds)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self.arrays

    def get(self, name: str) -> np.ndarray | None:
        """The array called ``name``, or ``None`` when the entry has none."""
        return self.arrays.get(name)

    @property
    def nbytes(self) -> int:
        """Bytes charged against a memory bound: array payloads plus a fixed overhead."""
        return _ENTRY_OVERHEAD + sum(a.nbytes + _ARRAY_OVERHEAD for a in self.arrays.values())

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={a.dtype}{a.shape}" for k, a in self.arrays.items())
        return f"CacheEntry({parts}, encode_seconds={self.encode_seconds:.4g})"


def encode_entry(key: str, entry: CacheEntry) -> bytes:
    """Serialise ``entry`` for ``key``: magic, header, key, array specs, payloads, BLAKE2b digest.

    >>> e = CacheEntry({"fingerprints": np.ones((2, 3), np.float16)}, encode_seconds=0.5)
    >>> data = encode_entry("abcd1234", e)
    >>> data[:8] == MAGIC, decode_entry(data, "abcd1234").encode_seconds
    (True, 0.5)
    """
    kb = key.encode("ascii")
    parts = [MAGIC, _HEADER.pack(FORMAT_VERSION, len(kb), entry.encode_seconds, len(entry.arrays)), kb]
    for name, arr in entry.arrays.items():
        nb, ds = name.encode("utf-8", "surrogatepass"), arr.dtype.str.encode("ascii")
        parts += [struct.pack("<H", len(nb)), nb, struct.pack("<B", len(ds)), ds,
                  struct.pack(f"<B{arr.ndim}Q", arr.ndim, *arr.shape)]
    parts += [arr.tobytes() for arr in entry.arrays.values()]
    body = b"".join(parts)
    return body + hashlib.blake2b(body, digest_size=_DIGEST_SIZE).digest()


def decode_entry(data: bytes, key: str) -> CacheEntry:
    """Parse bytes written by :func:`encode_entry` for ``key``; :class:`CorruptEntry` if they are not.

    >>> decode_entry(b"garbage", "abcd1234")
    Traceback (most recent call last):
    ...
    semtoken_rag.fileformat.CorruptEntry: truncated (7 bytes)
    """
    try:
        return _decode(data, key)
    except CorruptEntry:
        raise
    except (struct.error, ValueError, TypeError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise CorruptEntry(f"{type(e).__name__}: {e}") from e


def _decode(data: bytes, key: str) -> CacheEntry:
    start = len(MAGIC) + _HEADER.size
    if len(data) < start + _DIGEST_SIZE:
        raise CorruptEntry(f"truncated ({len(data)} bytes)")
    if data[: len(MAGIC)] != MAGIC:
        raise CorruptEntry("not a fingerprint cache file (bad magic)")
    version, key_len, seconds, n_arrays = _HEADER.unpack_from(data, len(MAGIC))
    if version != FORMAT_VERSION:
        raise CorruptEntry(f"format version {version}, expected {FORMAT_VERSION}")
    body = memoryview(data)[:-_DIGEST_SIZE]
    if hashlib.blake2b(body, digest_size=_DIGEST_SIZE).digest() != data[-_DIGEST_SIZE:]:
        raise CorruptEntry("checksum mismatch (truncated or overwritten)")
    stored = bytes(body[start : start + key_len]).decode("ascii")
    if stored != key:
        raise CorruptEntry(f"file holds another key ({stored[:16]}...)")
    pos, specs = start + key_len, []
    for _ in range(n_arrays):
        (n,) = struct.unpack_from("<H", body, pos)
        name = bytes(body[pos + 2 : pos + 2 + n]).decode("utf-8", "surrogatepass")
        pos += 2 + n
        (n,) = struct.unpack_from("<B", body, pos)
        dtype = np.dtype(bytes(body[pos + 1 : pos + 1 + n]).decode("ascii"))
        pos += 1 + n
        (ndim,) = struct.unpack_from("<B", body, pos)
        shape = struct.unpack_from(f"<{ndim}Q", body, pos + 1)
        pos += 1 + 8 * ndim
        specs.append((name, dtype, shape))
    arrays: dict[str, np.ndarray] = {}
    for name, dtype, shape in specs:
        count = math.prod(shape)
        if dtype.kind not in _KINDS or pos + count * dtype.itemsize > len(body):
            raise CorruptEntry(f"array {name!r}: bad dtype or payload shorter than its shape {shape}")
        flat = np.frombuffer(body, dtype, count, pos) if count else np.empty(0, dtype)
        arrays[name] = flat.reshape(shape)
        pos += count * dtype.itemsize
    if pos != len(body) or len(arrays) != n_arrays:
        raise CorruptEntry("header and payload sizes disagree")
    return CacheEntry(arrays, seconds)


def validate_fingerprints(units: Any, vectors: Any, text_len: int, dim: int) -> bool:
    """True when ``units`` and ``vectors`` are usable fingerprints of a chunk of ``text_len`` characters.

    ``units`` must be an (n, 2) integer array of character spans with ``0 <= start < end <= text_len``,
    in text order without overlap; ``vectors`` an (n, dim) ``float16`` array of finite values. Anything
    else (``None`` for a missing array included) is ``False``; this function never raises.

    >>> u = np.array([[0, 5], [6, 11]], np.int32)
    >>> v = np.zeros((2, 4), np.float16)
    >>> validate_fingerprints(u, v, text_len=11, dim=4)
    True
    >>> validate_fingerprints(u, v, text_len=10, dim=4), validate_fingerprints(None, v, 11, 4)
    (False, False)
    >>> validate_fingerprints(u, np.full((2, 4), np.nan, np.float16), 11, 4)
    False
    """
    if not isinstance(units, np.ndarray) or not isinstance(vectors, np.ndarray):
        return False
    if units.dtype.kind not in "iu" or units.ndim != 2 or units.shape[1] != 2:
        return False
    if vectors.dtype != np.float16 or vectors.shape != (units.shape[0], dim):
        return False
    if units.shape[0] == 0:
        return True
    u = units.astype(np.int64)
    start, end = u[:, 0], u[:, 1]
    if start[0] < 0 or end[-1] > text_len or np.any(start >= end) or np.any(start[1:] < end[:-1]):
        return False
    try:  # float16 is finite unless its exponent bits are all ones (ten times faster than np.isfinite)
        bits = vectors.view(np.uint16)
    except ValueError:  # strides a view cannot reinterpret
        return bool(np.isfinite(vectors).all())
    return bool(((bits & 0x7C00) != 0x7C00).all())
