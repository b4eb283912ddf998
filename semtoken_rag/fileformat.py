"""The fingerprint entry and its binary file format: versioned, checksummed, no pickle (storage layer).

* :class:`CacheEntry`: named read-only numpy arrays cached for one chunk, plus the encoder seconds
  they cost.
* :func:`encode_entry` / :func:`decode_entry`: bytes on disk (or in any byte store). A file that is
  truncated, overwritten, of another version or for another key raises :class:`CorruptEntry` Decoding is
  cheap (it sits on every Redis round trip): an XXH3-64 checksum, and arrays that are read-only
  views of the bytes, aligned to 8 bytes, not copies.
* :func:`validate_fingerprints`: a checksum proves the bytes are what a writer wrote, not that the
  writer was right. The engine checks an entry against the chunk it is used for before trusting it.

Only numpy, xxhash and the standard library are imported.

Format 2 (little-endian): ``MAGIC``; version u16, key length u16, number of arrays u16, reserved u16
(0), encode_seconds f64; the key (ASCII); per array its name (u16 length, UTF-8), dtype string (u8
length) and shape (u8 ndim, u64 per axis); zeros up to a multiple of 8; the payloads, each padded with
zeros to a multiple of 8; then XXH3-64 of everything before it (8 bytes). Format 1 (BLAKE2b, unpadded)
is no longer read: its entries are misses and get rewritten.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import xxhash

MAGIC = b"SEMTKFP\x00"
FORMAT_VERSION = 2
_HEADER = struct.Struct("<HHHHd")  # version, key length, number of arrays, reserved (0), encode_seconds
_START = len(MAGIC) + _HEADER.size
DIGEST_SIZE = 8
_ALIGN = 8  # payloads start at multiples of 8 bytes: aligned numpy views of the value
_U16, _U8 = struct.Struct("<H"), struct.Struct("<B")
_F16_EXPONENT = 0x7C00  # all exponent bits set: inf or NaN
_ENTRY_OVERHEAD = 256  # bytes charged per entry for Python objects and bookkeeping
_ARRAY_OVERHEAD = 112  # bytes charged per numpy array object
_KINDS = "biuf"  # bool, signed, unsigned, float: never object/str/void dtypes


class CorruptEntry(ValueError):
    """Bytes that do not decode to a valid entry for the requested key."""


def checksum(body: bytes | memoryview) -> bytes:
    """The digest that ends an encoded entry: XXH3-64 of the bytes before it (8 bytes).

    A check against truncation and overwrites, not against an adversary: whoever can write the store
    can write any fingerprints, which is why :func:`validate_fingerprints` checks them again.

    >>> len(checksum(b"abc")), checksum(b"abc") == checksum(b"abc"), checksum(b"abc") == checksum(b"abd")
    (8, True, False)
    """
    return xxhash.xxh3_64_digest(body)


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
        bases: dict[str, np.ndarray] = {}  # the same memory, writable: see shared_array
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
            base = np.array(value, dtype=value.dtype.newbyteorder("<"), order="C", copy=True)
            arr = base.view()
            arr.flags.writeable = False
            frozen[name] = arr
            bases[name] = base
        seconds = float(self.encode_seconds)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"encode_seconds must be a finite number >= 0, got {self.encode_seconds!r}")
        object.__setattr__(self, "arrays", MappingProxyType(frozen))
        object.__setattr__(self, "encode_seconds", seconds)
        object.__setattr__(self, "_bases", bases)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: object) -> bool:
        return name in self.arrays

    def get(self, name: str) -> np.ndarray | None:
        """The array called ``name``, or ``None`` when the entry has none."""
        return self.arrays.get(name)

    def shared_array(self, name: str) -> np.ndarray | None:
        """The array called ``name`` as a writable alias of the same memory, for code that wraps it without a
        copy (a torch tensor of cached fingerprints) and never writes to it; ``None`` when the entry has no
        such array or was decoded from bytes (its arrays are views of a read-only buffer).

        >>> e = CacheEntry({"fingerprints": np.zeros((2, 3), np.float16)})
        >>> shared = e.shared_array("fingerprints")
        >>> bool(np.shares_memory(shared, e["fingerprints"])), shared.flags.writeable
        (True, True)
        """
        return self.__dict__.get("_bases", {}).get(name)

    @property
    def nbytes(self) -> int:
        """Bytes charged against a memory bound: array payloads plus a fixed overhead."""
        return _ENTRY_OVERHEAD + sum(a.nbytes + _ARRAY_OVERHEAD for a in self.arrays.values())

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={a.dtype}{a.shape}" for k, a in self.arrays.items())
        return f"CacheEntry({parts}, encode_seconds={self.encode_seconds:.4g})"


def _trusted(arrays: dict[str, np.ndarray], seconds: float) -> CacheEntry:
    """A :class:`CacheEntry` of arrays already read-only, C-ordered and little-endian (no copies)."""
    entry = object.__new__(CacheEntry)
    object.__setattr__(entry, "arrays", MappingProxyType(arrays))
    object.__setattr__(entry, "encode_seconds", seconds)
    return entry


def _pad(n: int) -> int:
    return -n % _ALIGN


def encode_entry(key: str, entry: CacheEntry) -> bytes:
    """Serialise ``entry`` for ``key``: magic, header, key, array specs, padded payloads, XXH3 digest.

    >>> e = CacheEntry({"fingerprints": np.ones((2, 3), np.float16)}, encode_seconds=0.5)
    >>> data = encode_entry("abcd1234", e)
    >>> data[:8] == MAGIC, decode_entry(data, "abcd1234").encode_seconds
    (True, 0.5)
    """
    kb = key.encode("ascii")
    parts = [MAGIC, _HEADER.pack(FORMAT_VERSION, len(kb), len(entry.arrays), 0, entry.encode_seconds), kb]
    size = _START + len(kb)
    for name, arr in entry.arrays.items():
        nb, ds = name.encode("utf-8", "surrogatepass"), arr.dtype.str.encode("ascii")
        spec = b"".join([_U16.pack(len(nb)), nb, _U8.pack(len(ds)), ds,
                         struct.pack(f"<B{arr.ndim}Q", arr.ndim, *arr.shape)])
        parts.append(spec)
        size += len(spec)
    parts.append(bytes(_pad(size)))
    for arr in entry.arrays.values():
        parts += [arr.tobytes(), bytes(_pad(arr.nbytes))]
    body = b"".join(parts)
    return body + checksum(body)


def header_size(key: str) -> int:
    """Bytes at the start of an entry for ``key`` that :func:`starts_entry` reads (magic, header, key)."""
    return _START + len(key)


def starts_entry(data: bytes, key: str) -> bool:
    """Whether ``data`` (an entry's first :func:`header_size` bytes, or more) begins an entry of this
    format version for ``key``: what a store checks to tell a usable entry from one of an older version,
    of another key or garbage without reading it all (the checksum is checked when it is read).

    >>> import numpy as np
    >>> data = encode_entry("abcd1234", CacheEntry({"units": np.zeros((1, 2), np.int32)}))
    >>> starts_entry(data[:header_size("abcd1234")], "abcd1234"), starts_entry(data, "dcba4321")
    (True, False)
    >>> starts_entry(b"garbage", "abcd1234"), starts_entry(data[:10], "abcd1234")
    (False, False)
    """
    kb = key.encode("ascii")
    if len(data) < _START + len(kb) or data[:len(MAGIC)] != MAGIC:
        return False
    version, key_len, _, _, _ = _HEADER.unpack_from(data, len(MAGIC))
    return version == FORMAT_VERSION and key_len == len(kb) and data[_START:_START + len(kb)] == kb


# bytes past header_size that a store reads to tell which arrays an entry holds (array_names): the
# descriptors of its first arrays; an NQ entry's first three (fingerprints, units, a stored analysis's
# first array) take about 100
NAMES_PEEK = 256


def array_names(data: bytes, key: str) -> list[str]:
    """The names of the arrays of an entry for ``key`` whose names lie whole in ``data`` (the entry's first
    bytes: ``header_size(key) + NAMES_PEEK`` of them tell its first few arrays), in the entry's order; ``[]``
    unless :func:`starts_entry`. Unchecked (the checksum is checked when the entry is read): a name found
    here may still belong to a damaged entry, and one missing may lie past ``data``.

    >>> data = encode_entry("abcd1234", CacheEntry({"units": np.zeros((1, 2), np.int32),
    ...                                             "extra": np.zeros(3, np.float32)}))
    >>> array_names(data[:header_size("abcd1234") + NAMES_PEEK], "abcd1234")
    ['units', 'extra']
    >>> array_names(data[:header_size("abcd1234") + 8], "abcd1234"), array_names(data, "dcba4321")
    (['units'], [])
    """
    if not starts_entry(data, key):
        return []
    _, key_len, n_arrays, _, _ = _HEADER.unpack_from(data, len(MAGIC))
    pos, end, names = _START + key_len, len(data), []
    for _ in range(n_arrays):
        if pos + 2 > end:
            break
        (n,) = _U16.unpack_from(data, pos)
        if pos + 2 + n > end:
            break
        names.append(data[pos + 2:pos + 2 + n].decode("utf-8", "replace"))
        pos += 2 + n  # then: dtype string (u8 length), ndim (u8), u64 per axis
        if pos >= end or pos + 1 + data[pos] >= end:
            break
        pos += 1 + data[pos]
        pos += 1 + 8 * data[pos]
    return names


def has_array(names: Iterable[str], prefix: str) -> bool:
    """Whether one of ``names`` (an entry's arrays, or :func:`array_names`) starts with ``prefix``.

    >>> has_array({"units": None, "analysis.ab.costs": None}, "analysis.ab."), has_array([], "x")
    (True, False)
    """
    return any(name.startswith(prefix) for name in names)


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
    except (struct.error, ValueError, TypeError, IndexError, OverflowError, MemoryError) as e:
        raise CorruptEntry(f"{type(e).__name__}: {e}") from e


_FLOAT16 = np.dtype(np.float16)
_DTYPES: dict[bytes, np.dtype] = {}  # dtype strings seen (a handful: "<f2", "<i4", ...) parsed once
_SHAPES = [struct.Struct(f"<{ndim}Q") for ndim in range(33)]


def _spec(data: bytes, pos: int) -> tuple[int, np.dtype, int]:
    """(length of the dtype string, the dtype, ndim) of the array spec at ``pos``."""
    n = data[pos]
    text = data[pos + 1 : pos + 1 + n]
    dtype = _DTYPES.get(text)
    if dtype is None:
        dtype = np.dtype(text.decode("ascii"))
        if dtype.kind not in _KINDS or dtype.byteorder == ">" or dtype.ndim or dtype.fields is not None:
            raise CorruptEntry(f"array of dtype {dtype}: allowed are little-endian bool/int/uint/float")
        if len(_DTYPES) < 64:
            _DTYPES[text] = dtype
    return n, dtype, data[pos + 1 + n]


def _shape(ndim: int) -> struct.Struct:
    if ndim > 32:
        raise CorruptEntry(f"{ndim} dimensions")
    return _SHAPES[ndim]


def _decode(data: bytes, key: str) -> CacheEntry:
    if not isinstance(data, bytes):  # views must not change under the entry: own an immutable copy
        data = bytes(data)
    end = len(data) - DIGEST_SIZE
    if end < _START:
        raise CorruptEntry(f"truncated ({len(data)} bytes)")
    if not data.startswith(MAGIC):
        raise CorruptEntry("not a fingerprint cache file (bad magic)")
    version, key_len, n_arrays, _, seconds = _HEADER.unpack_from(data, len(MAGIC))
    if version != FORMAT_VERSION:
        raise CorruptEntry(f"format version {version}, expected {FORMAT_VERSION}")
    body = memoryview(data)[:end]
    if checksum(body) != data[end:]:
        raise CorruptEntry("checksum mismatch (truncated or overwritten)")
    pos = _START + key_len
    if data[_START:pos] != key.encode("ascii"):
        raise CorruptEntry(f"file holds another key ({data[_START:pos][:16]!r}...)")
    specs = []
    for _ in range(n_arrays):
        (n,) = _U16.unpack_from(data, pos)
        name = data[pos + 2 : pos + 2 + n].decode("utf-8", "surrogatepass")
        pos += 2 + n
        n, dtype, ndim = _spec(data, pos)
        pos += 1 + n + 1
        shape = _shape(ndim).unpack_from(data, pos)
        pos += 8 * ndim
        specs.append((name, dtype, shape))
    pos += _pad(pos)
    arrays: dict[str, np.ndarray] = {}
    for name, dtype, shape in specs:
        count = math.prod(shape)
        size = count * dtype.itemsize
        if pos + size > end or name in arrays or (name == "fingerprints" and dtype != _FLOAT16):
            raise CorruptEntry(f"array {name!r}: payload shorter than its shape {shape}, repeated name or "
                               f"fingerprints not float16")
        arrays[name] = np.frombuffer(data, dtype, count, pos).reshape(shape)  # read-only: data is bytes
        pos += size + _pad(size)
    if pos != end:
        raise CorruptEntry("header and payload sizes disagree")
    if not 0 <= seconds < math.inf:
        raise CorruptEntry(f"encode_seconds {seconds!r}")
    return _trusted(arrays, seconds)


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
    if units.dtype.itemsize > 4 and (units.min() < 0 or units.max() > text_len):
        return False  # 64-bit values checked for range first: their differences could overflow
    flat = units.astype(np.int64).reshape(-1)  # s0, e0, s1, e1, ...: 0 <= s0 < e0 <= s1 < e1 ... <= len
    if flat[0] < 0 or flat[-1] > text_len:
        return False
    steps = flat[1:] - flat[:-1]  # e_i - s_i must be > 0, s_i+1 - e_i >= 0 (one check: + 1 on those)
    steps[1::2] += 1
    if steps.size and steps.min() <= 0:
        return False
    try:  # finite unless every exponent bit is set (inf, NaN)
        bits = vectors.view(np.uint16)
    except ValueError:  # strides a view cannot reinterpret
        return bool(np.isfinite(vectors).all())
    return bool(np.bitwise_and(bits, _F16_EXPONENT).max() != _F16_EXPONENT)
