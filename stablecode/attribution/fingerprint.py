"""Whitespace normalisation and 64-bit fingerprints of fixed-length character windows, in numpy.

Text is compared after every run of whitespace is collapsed to one space, so re-indented or
re-wrapped copies still match. `normalise` keeps, for each normalised character, where it came
from in the original text, so matches are reported as exact ranges of the original.

A window's fingerprint is a polynomial hash over its code points, modulo 2**64, followed by the
splitmix64 finaliser to spread the bits (the Bloom filter and the sort partitions use them).
All windows of a text are hashed at once from prefix sums, in O(1) numpy passes per character.
"""

from __future__ import annotations

import numpy as np

HASH_BASE = 0x9E3779B97F4A7C15  # odd, so invertible modulo 2**64
HASH_BASE_INVERSE = pow(HASH_BASE, -1, 1 << 64)

# Code points for which str.isspace() is true all lie below U+3001.
_SPACE_LIMIT = 0x3001
_IS_SPACE = np.array([chr(c).isspace() for c in range(_SPACE_LIMIT)], dtype=bool)
SPACE = 32

_power_tables_cache = (np.ones(1, dtype=np.uint64), np.ones(1, dtype=np.uint64))


def code_points(text: str) -> np.ndarray:
    """The text's code points: uint8 for ASCII text (the common case, and 10x faster), else uint32."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    try:
        data = text.encode("utf-32-le")
    except UnicodeEncodeError:  # lone surrogates from badly decoded data pass through as they are
        data = text.encode("utf-32-le", "surrogatepass")
    return np.frombuffer(data, dtype="<u4")


def is_space(cp: np.ndarray) -> np.ndarray:
    """str.isspace() for each code point."""
    space = (cp == SPACE) | ((cp - 9) <= 4) | ((cp - 0x1C) <= 3)  # unsigned wrap-around keeps cp < 9 out
    if cp.dtype != np.uint8:
        high = np.flatnonzero(cp >= 0x80)
        if len(high):
            space[high] = _IS_SPACE[np.minimum(cp[high], _SPACE_LIMIT - 1)] & (cp[high] < _SPACE_LIMIT)
    return space


def normalise(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, starts): the text's code points with each whitespace run replaced by one space,
    and for each normalised character the offset in `text` where it (or its run) starts."""
    cp = code_points(text)
    space = is_space(cp)
    repeat = space.copy()
    repeat[1:] &= space[:-1]  # whitespace that continues a run is dropped
    repeat[:1] = False
    starts = np.flatnonzero(~repeat)
    codes = cp[starts]
    codes[space[starts]] = SPACE
    return codes, starts


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """base**i and base**-i (mod 2**64) for i < n, grown on demand and kept per process."""
    global _power_tables_cache
    powers, inverse = _power_tables_cache  # one read: server threads may grow the tables concurrently
    if len(powers) < n:
        size = max(n, 2 * len(powers), 1 << 16)
        powers, inverse = _geometric(HASH_BASE, size), _geometric(HASH_BASE_INVERSE, size)
        _power_tables_cache = (powers, inverse)
    return powers[:n], inverse[:n]


def _geometric(ratio: int, size: int) -> np.ndarray:
    powers = np.full(size, ratio, dtype=np.uint64)
    powers[0] = 1
    return np.cumprod(powers, dtype=np.uint64)  # wraps modulo 2**64, which is the arithmetic we want


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 that spreads every input bit over the output."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def window_hashes(codes: np.ndarray, window: int, positions: np.ndarray | None = None) -> np.ndarray:
    """Fingerprints of codes[p : p + window] for each p in `positions` (default: every window)."""
    count = len(codes) - window + 1
    if count <= 0:
        return np.zeros(0, dtype=np.uint64)
    if positions is None:
        positions = np.arange(count)
    powers, inverse = _power_tables(len(codes))
    prefix = np.zeros(len(codes) + 1, dtype=np.uint64)
    np.cumsum(codes.astype(np.uint64) * powers, dtype=np.uint64, out=prefix[1:])
    # sum_j codes[p+j] * base**j  ==  (prefix[p+window] - prefix[p]) * base**-p
    raw = (prefix[positions + window] - prefix[positions]) * inverse[positions]
    return mix64(raw)


def sampled_positions(length: int, window: int, stride: int) -> np.ndarray:
    """Window starts 0, stride, 2·stride, ... that fit in a normalised text of `length` characters.

    Every stretch of at least window + stride - 1 characters contains one of these windows whole,
    which is what guarantees that the index finds any shared stretch that long.
    """
    if length < window:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, length - window + 1, stride, dtype=np.int64)


BLOOM_SEGMENT_BITS = 8  # the filter is 256 equal segments, chosen by a fingerprint's top byte


def bloom_positions(hashes: np.ndarray, num_bits: int, num_hashes: int) -> np.ndarray:
    """Bit positions [len(hashes), num_hashes] by double hashing, all inside the segment that the
    fingerprint's top byte selects (so the build fills the filter one sorted partition at a time).
    num_bits is a power of two of at least 2**14."""
    segment_bits = num_bits >> BLOOM_SEGMENT_BITS
    segment = (hashes >> np.uint64(64 - BLOOM_SEGMENT_BITS)) * np.uint64(segment_bits)
    second = mix64(hashes ^ np.uint64(0x5851F42D4C957F2D)) | np.uint64(1)
    steps = np.arange(num_hashes, dtype=np.uint64)
    within = (hashes[:, None] + steps[None, :] * second[:, None]) & np.uint64(segment_bits - 1)
    return segment[:, None] + within
