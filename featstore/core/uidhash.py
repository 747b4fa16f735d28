"""The 64-bit hash of a uid that the uid index sorts by (`featstore.core.uidindex`).

    h = uid_hash(np.array(["https://a/1.jpg", "x"]))      # uint64, one per uid, vectorized

It is part of the store format (recorded as "featstore-uid64-v1" in the index), so it is defined
here in plain terms and never depends on the platform, Python's hash seed or a batch's width:

    bytes = uid.encode("utf-8"), zero-padded to a multiple of 8, read as little-endian uint64 words
    h = SEED ^ (len(bytes) * P1)
    for each word w that holds at least one byte of the uid:  h = rotl(h ^ mix(w), 27) * P2 + P3
    h = mix(h)                                     mix: the splitmix64 finalizer

`uid_hash_reference` computes the same thing one uid at a time in plain Python (tests compare
them).  `hash_bits` < 64 keeps only the top bits (tests force collisions with a tiny hash; the
index checks every candidate against the stored uid string, so a collision is never a wrong row).
"""

from __future__ import annotations

import numpy as np

NAME = "featstore-uid64-v1"
_M64 = (1 << 64) - 1
SEED = 0x9E3779B97F4A7C15
P1 = 0xC2B2AE3D27D4EB4F
P2 = 0x9FB21C651E98DF25
P3 = 0x165667B19E3779F9


def _mix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _utf8(uids) -> np.ndarray:
    """The uids as fixed-width utf-8 bytes (numpy 'S'), without a Python object per uid."""
    arr = np.asarray(uids)
    if arr.dtype.kind == "S":
        return arr
    if arr.dtype.kind == "O":
        arr = arr.astype(np.dtypes.StringDType())
    if arr.size == 0:
        return np.zeros(arr.shape, "S1")
    width = max(1, int(np.strings.str_len(arr).max()))
    try:  # ASCII (nearly every uid): a plain cast, several times faster than encoding
        return arr.astype(f"S{width}")
    except UnicodeEncodeError:
        return np.strings.encode(arr, "utf-8")


def uid_hash(uids, hash_bits: int = 64) -> np.ndarray:
    """uint64 hash of each uid (see the module doc), vectorized over the batch."""
    b = _utf8(uids).reshape(-1)
    n = len(b)
    if n == 0:
        return np.zeros(0, np.uint64)
    width = max(1, b.dtype.itemsize)
    words = -(-width // 8)
    buf = np.zeros((n, words * 8), np.uint8)
    buf[:, : b.dtype.itemsize] = b.view(np.uint8).reshape(n, b.dtype.itemsize)
    w = buf.view("<u8")
    lens = np.strings.str_len(b).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = np.uint64(SEED) ^ (lens * np.uint64(P1))
        for j in range(words):
            step = h ^ _mix(w[:, j].copy())
            step = ((step << np.uint64(27)) | (step >> np.uint64(37))) * np.uint64(P2) + np.uint64(P3)
            h = np.where(lens > np.uint64(8 * j), step, h)
        h = _mix(h)
    return truncate(h, hash_bits)


def truncate(h: np.ndarray, hash_bits: int) -> np.ndarray:
    """Keep the top `hash_bits` bits (the rest zero), so order and partitions by top bits hold."""
    if hash_bits >= 64:
        return h
    return h & np.uint64((_M64 >> (64 - hash_bits)) << (64 - hash_bits))


def uid_hash_reference(uid: str, hash_bits: int = 64) -> int:
    """The same hash of one uid in plain Python integers (the definition, for tests)."""

    def mix(x):
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & _M64
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & _M64
        return x ^ (x >> 31)

    data = str(uid).encode("utf-8").rstrip(b"\0")  # numpy 'S' drops trailing NULs: so does the definition
    h = SEED ^ ((len(data) * P1) & _M64)
    padded = data + b"\0" * (-len(data) % 8)
    for j in range(len(padded) // 8):
        step = h ^ mix(int.from_bytes(padded[8 * j : 8 * j + 8], "little"))
        step = ((((step << 27) | (step >> 37)) & _M64) * P2 + P3) & _M64
        h = step
    h = mix(h)
    if hash_bits < 64:
        h &= (_M64 >> (64 - hash_bits)) << (64 - hash_bits)
    return h
