"""Cache keys, the entry type, the binary file format and the check of an entry against its chunk."""

from __future__ import annotations

import numpy as np
import pytest

from semtoken_rag.fileformat import (
    DIGEST_SIZE,
    FORMAT_VERSION,
    MAGIC,
    CacheEntry,
    CorruptEntry,
    checksum,
    decode_entry,
    encode_entry,
    validate_fingerprints,
)
from semtoken_rag.keys import cache_key, check_key, is_key


def test_cache_key_is_strong_and_separates_namespace() -> None:
    k = cache_key("hello", "enc")
    assert len(k) == 64 and int(k, 16) >= 0
    assert k == cache_key("hello", "enc")
    assert k != cache_key("hello", "enc2") != cache_key("hello!", "enc")
    assert cache_key("bc", "a") != cache_key("c", "ab")  # no ambiguity at the boundary
    odd = cache_key("lone \ud800 surrogate \x00 and emoji \U0001f600", "ns \udfff")
    assert len(odd) == 64 and is_key(odd)
    with pytest.raises(TypeError, match="str"):
        cache_key(b"bytes", "ns")  # type: ignore[arg-type]
    assert not is_key("../../etc/passwd") and not is_key(None) and not is_key("abc")
    with pytest.raises(ValueError, match="cache keys"):
        check_key("../../etc/passwd")


def test_entry_validation_and_immutability() -> None:
    fp = np.ones((2, 3), np.float16)
    entry = CacheEntry({"fingerprints": fp}, encode_seconds=1)
    fp[0, 0] = 7  # the caller's array is copied
    assert entry["fingerprints"][0, 0] == 1
    assert not entry["fingerprints"].flags.writeable
    assert "fingerprints" in entry and entry.encode_seconds == 1.0
    assert entry.get("units") is None
    with pytest.raises(TypeError, match="float16"):
        CacheEntry({"fingerprints": np.ones((2, 3), np.float32)})
    with pytest.raises(TypeError, match="dtype object"):
        CacheEntry({"x": np.array([None])})
    with pytest.raises(TypeError, match="numpy array"):
        CacheEntry({"x": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="encode_seconds"):
        CacheEntry({}, encode_seconds=-1)
    with pytest.raises(ValueError, match="encode_seconds"):
        CacheEntry({}, encode_seconds=float("nan"))


def test_encode_decode_round_trip_is_bit_identical() -> None:
    rng = np.random.default_rng(0)
    entry = CacheEntry({"fingerprints": rng.standard_normal((7, 5)).astype(np.float16),
                        "units": rng.integers(0, 99, (7, 2)).astype(np.int32),
                        "empty": np.zeros((0, 3), np.uint8)}, encode_seconds=0.125)
    data = encode_entry("abcd1234", entry)
    assert data.startswith(MAGIC) and b"pickle" not in data
    back = decode_entry(data, "abcd1234")
    assert list(back.arrays) == list(entry.arrays) and back.encode_seconds == 0.125
    for name in entry.arrays:
        assert back[name].dtype == entry[name].dtype and back[name].tobytes() == entry[name].tobytes()
    with pytest.raises(CorruptEntry, match="another key"):
        decode_entry(data, "zzzz9999")
    with pytest.raises(CorruptEntry, match="checksum"):
        decode_entry(data[:-1] + bytes([data[-1] ^ 1]), "abcd1234")
    with pytest.raises(CorruptEntry, match="truncated"):
        decode_entry(data[:20], "abcd1234")


# ----------------------------------------------------------------------------- validate_fingerprints

UNITS = np.array([[0, 3], [4, 9], [10, 12]], np.int32)
VECS = np.ones((3, 8), np.float16)


def test_valid_fingerprints_pass() -> None:
    assert validate_fingerprints(UNITS, VECS, text_len=12, dim=8)
    assert validate_fingerprints(UNITS.astype(np.int64), VECS, text_len=40, dim=8)
    assert validate_fingerprints(np.array([[0, 2], [2, 4]]), np.zeros((2, 8), np.float16), 4, 8)  # touching
    assert validate_fingerprints(np.zeros((0, 2), np.int32), np.zeros((0, 8), np.float16), 0, 8)


BAD = {
    "units missing": (None, VECS, 12, 8),
    "fingerprints missing": (UNITS, None, 12, 8),
    "units not an array": (UNITS.tolist(), VECS, 12, 8),
    "units float": (UNITS.astype(np.float32), VECS, 12, 8),
    "units 1-d": (UNITS[:, 0], VECS, 12, 8),
    "units (n, 3)": (np.zeros((3, 3), np.int32), VECS, 12, 8),
    "vectors float32": (UNITS, VECS.astype(np.float32), 12, 8),
    "vectors other dim": (UNITS, np.ones((3, 4), np.float16), 12, 8),
    "vectors other count": (UNITS, np.ones((2, 8), np.float16), 12, 8),
    "vectors 3-d": (UNITS, np.ones((3, 8, 1), np.float16), 12, 8),
    "end past text": (UNITS, VECS, 11, 8),
    "negative start": (np.array([[-1, 3], [4, 9], [10, 12]], np.int32), VECS, 12, 8),
    "empty unit": (np.array([[0, 3], [4, 4], [10, 12]], np.int32), VECS, 12, 8),
    "reversed unit": (np.array([[0, 3], [9, 4], [10, 12]], np.int32), VECS, 12, 8),
    "starts decrease": (np.array([[4, 9], [0, 3], [10, 12]], np.int32), VECS, 12, 8),
    "overlap": (np.array([[0, 5], [4, 9], [10, 12]], np.int32), VECS, 12, 8),
    "huge uint": (np.array([[0, 3], [4, 9], [10, 2**63 + 5]], np.uint64), VECS, 12, 8),
    "nan": (UNITS, np.where(np.eye(3, 8, dtype=bool), np.float16("nan"), VECS), 12, 8),
    "inf": (UNITS, np.full((3, 8), np.inf, np.float16), 12, 8),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_fingerprints_are_rejected_without_raising(case: str) -> None:
    assert validate_fingerprints(*BAD[case]) is False


def test_decoded_arrays_are_aligned_read_only_views_of_the_value() -> None:
    rng = np.random.default_rng(1)
    entry = CacheEntry({"units": np.array([[0, 3], [4, 9], [10, 12]], np.int32),  # 24 bytes: pads after
                        "odd": np.ones(3, np.uint8),  # 3 bytes: the next payload is padded to 8
                        "fingerprints": rng.standard_normal((3, 5)).astype(np.float16)}, 0.25)
    data = encode_entry("abcd1234", entry)
    back = decode_entry(data, "abcd1234")
    for name, arr in back.arrays.items():
        assert not arr.flags.writeable and arr.tobytes() == entry[name].tobytes()
        assert arr.base is not None and np.shares_memory(arr, np.frombuffer(data, np.uint8))  # no copy
        assert arr.__array_interface__["data"][0] % 8 == 0
    writable = bytearray(data)
    copy = decode_entry(writable, "abcd1234")  # a mutable buffer is copied: later writes do not leak in
    writable[len(writable) // 2] ^= 0xFF
    assert copy["fingerprints"].tobytes() == entry["fingerprints"].tobytes()


def _reseal(out: bytearray) -> bytes:
    out[-DIGEST_SIZE:] = checksum(bytes(out[:-DIGEST_SIZE]))
    return bytes(out)


def test_lying_headers_with_valid_checksums_are_corrupt_never_a_crash() -> None:
    entry = CacheEntry({"fingerprints": np.ones((4, 6), np.float16), "units": np.zeros((4, 2), np.int32)}, 0.5)
    data = encode_entry("abcd1234", entry)
    payload_start = len(data) - DIGEST_SIZE - 4 * 6 * 2 - 4 * 2 * 4
    outcomes = set()
    for pos in range(len(MAGIC), payload_start):  # every header byte, set to a few values, resealed
        for value in (0x00, 0x01, 0x7F, 0x80, 0xFF):
            out = bytearray(data)
            out[pos] = value
            try:
                back = decode_entry(_reseal(out), "abcd1234")
            except CorruptEntry:
                outcomes.add("corrupt")
                continue
            outcomes.add("decoded")  # a harmless change (e.g. encode_seconds): arrays still consistent
            for arr in back.arrays.values():
                assert arr.nbytes == int(np.prod(arr.shape)) * arr.dtype.itemsize
    assert outcomes == {"corrupt", "decoded"}
    for cut in range(len(data) - DIGEST_SIZE):  # cut anywhere, resealed: still only CorruptEntry
        with pytest.raises(CorruptEntry):
            decode_entry(data[:cut] + checksum(data[:cut]), "abcd1234")
    big_fp = bytearray(encode_entry("abcd1234", CacheEntry({"fingerprints": np.ones((2, 2), np.float16)})))
    spec = big_fp.index(b"<f2")
    big_fp[spec:spec + 3] = b"<f4"  # a float32 "fingerprints" array is refused even with a valid checksum
    with pytest.raises(CorruptEntry):
        decode_entry(_reseal(big_fp), "abcd1234")


def test_other_format_versions_are_corrupt() -> None:
    data = bytearray(encode_entry("abcd1234", CacheEntry({"fingerprints": np.ones((2, 3), np.float16)})))
    data[len(MAGIC)] = FORMAT_VERSION - 1
    with pytest.raises(CorruptEntry, match="format version"):
        decode_entry(_reseal(data), "abcd1234")


def test_finiteness_is_read_from_the_float16_bits() -> None:
    units = np.array([[0, 1]], np.int32)
    edge = np.array([[65504, -65504, 6e-8, -0.0, 0.0, 1.0, -1.0, np.finfo(np.float16).tiny]], np.float16)
    assert validate_fingerprints(units, edge, 1, 8)  # largest, subnormal, signed zeros: all finite
    for bad in (np.inf, -np.inf, np.nan, -np.nan):
        v = edge.copy()
        v[0, 3] = bad
        assert not validate_fingerprints(units, v, 1, 8)
    nan_payload = edge.view(np.uint16).copy()
    nan_payload[0, 5] = 0xFE01  # a negative NaN with a payload
    assert not validate_fingerprints(units, nan_payload.view(np.float16), 1, 8)
    strided = np.ones((3, 16), np.float16)[:, ::2]  # a non-contiguous view is judged too
    strided_bad = strided.copy()
    strided_bad[2, 7] = np.nan
    u3 = np.array([[0, 1], [1, 2], [2, 3]], np.int64)
    assert validate_fingerprints(u3, strided, 3, 8) and not validate_fingerprints(u3, strided_bad[:, :], 3, 8)
