"""A keyed permutation of [0, n) computable at any index: the epoch order's shuffle of runs.

    p = Permutation(n, key=(seed, epoch))
    p(np.arange(10))          # where the first ten runs go: O(len(index)) work and memory

A balanced Feistel network over the smallest 2^(2h) >= n (4 rounds of a 64-bit mix, round keys
from blake2b of the key), made a bijection of [0, n) by cycle walking: an index that lands
outside [0, n) is permuted again until it falls inside (fewer than 4 rounds on average, as the
domain is under 4n).  Nothing of size n is ever built, so a rank of a billion-row store
evaluates just the runs of its own window.
"""

from __future__ import annotations

import hashlib

import numpy as np

_ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray, k: np.uint64) -> np.ndarray:
    """splitmix64's finalizer of x ^ k (uint64, wrapping)."""
    x = x ^ k
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A bijection of [0, n) keyed by a tuple of ints; `p(index)` evaluates it elementwise."""

    def __init__(self, n: int, key: tuple):
        self.n = int(n)
        bits = max(1, (max(self.n - 1, 1)).bit_length())
        self.half = (bits + 1) // 2
        digest = hashlib.blake2b(repr(tuple(int(k) for k in key)).encode(), digest_size=8 * _ROUNDS).digest()
        self.keys = [np.uint64(int.from_bytes(digest[8 * i : 8 * i + 8], "little")) for i in range(_ROUNDS)]

    def _once(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        mask = np.uint64((1 << self.half) - 1)
        left, right = x >> h, x & mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right, k) & mask)
        return (left << h) | right

    def __call__(self, index) -> np.ndarray:
        with np.errstate(over="ignore"):
            x = self._once(np.asarray(index, dtype=np.uint64).reshape(-1))
            out = x >= np.uint64(self.n)
            while out.any():  # cycle walking: each index's orbit re-enters [0, n)
                x[out] = self._once(x[out])
                out[out] = x[out] >= np.uint64(self.n)
        return x.astype(np.int64).reshape(np.shape(index))
