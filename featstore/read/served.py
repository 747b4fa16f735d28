"""The rows a Loader serves, without an array of them: per-block counts, masks read per block.

    served = served_set(store, ["dino", "llama"], rows=None)
    len(served)                    # rows served (finished and valid in every asked feature set)
    served.select(np.arange(10))   # the 0th..9th served rows in store order, as store rows

Served index i is the i-th served row in store order; the epoch order (`featstore.read.epoch`) is
computed in served-index space and `select` turns the indices a batch needs into store rows.

What a Loader pays to set up: each feature set's block summary (`Progress.summary`: 40 bytes a
block and the markers newer than it), so O(blocks), never O(rows).  A block is *full* (every row
served: its count is the block's size), *empty*, or *partial*: its count is the feature set's
`n_valid` when one set is partial there and the block is done; otherwise (a block still being
extracted, or invalid rows in several sets) its mask is read at setup.  A partial block's mask
(marker `done` ranges and `valid` of that block only) is read again when a batch needs its rows,
and a few are kept.  With `rows=` (a subset the caller holds: O(its size) already) the served
rows are kept as one sorted array, as before.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from featstore.errors import StoreChanged
from featstore.core.progress import done_ranges, mask_of

_KEEP_MASKS = 256  # partial-block masks kept between selects


class ServedSet:
    """Served rows as per-block counts (or one explicit sorted array with `rows=`)."""

    def __init__(self, store, names: list[str], counts: np.ndarray, masked: np.ndarray, usable: int,
                 explicit: np.ndarray | None = None, versions: np.ndarray | None = None):
        self.store, self.names = store, list(names)
        self.r, self.n_rows = int(store.rows_per_shard), int(store.n_rows)
        self.counts, self.masked, self.usable, self.explicit = counts, masked, int(usable), explicit
        self.cum = np.cumsum(counts) if explicit is None else None
        # the marker version of each masked block in each set, as counted: a mask read later must match
        self._versions = {} if versions is None else dict(zip(np.flatnonzero(masked).tolist(),
                                                             map(tuple, versions[:, masked].T.tolist())))
        self._masks: OrderedDict[int, np.ndarray] = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "store": None, "_masks": OrderedDict()}  # the loader rebinds its store

    def rebind(self, store) -> None:
        """Read partial blocks through `store` from now on (a forked or unpickled loader's own)."""
        self.store = store
        self._masks = OrderedDict()

    def __len__(self) -> int:
        return int(len(self.explicit)) if self.explicit is not None else int(self.cum[-1]) if len(self.cum) else 0

    def block_mask(self, b: int) -> np.ndarray:
        """Boolean mask of block `b`'s rows that are served (read per feature set, kept a while)."""
        m = self._masks.get(b)
        if m is None:
            m = usable_in_block(self.store, self.names, b, self._versions.get(b))
            if int(m.sum()) != int(self.counts[b]):
                raise StoreChanged(b, self.store.path)
            self._masks[b] = m
            if len(self._masks) > _KEEP_MASKS:
                self._masks.popitem(last=False)
        else:
            self._masks.move_to_end(b)
        return m

    def select(self, index) -> np.ndarray:
        """Store rows of the served indices `index` (int64, each in [0, len(self)))."""
        idx = np.asarray(index, dtype=np.int64)
        if self.explicit is not None:
            return self.explicit[idx]
        b = np.searchsorted(self.cum, idx, side="right")
        within = idx - (self.cum[b] - self.counts[b])
        rows = b * self.r + within
        hit = self.masked[b]
        if hit.any():
            for blk in np.unique(b[hit]).tolist():
                at = np.flatnonzero(hit & (b == blk))
                rows[at] = blk * self.r + np.flatnonzero(self.block_mask(blk))[within[at]]
        return rows

    def blocks(self) -> np.ndarray:
        """Blocks holding at least one served row."""
        if self.explicit is not None:
            return np.unique(self.explicit // self.r)
        return np.flatnonzero(self.counts > 0)

    def rows(self) -> np.ndarray:
        """Every served row (O(rows): tools and the materialized reference only)."""
        return self.explicit.copy() if self.explicit is not None else self.select(np.arange(len(self)))

    def fingerprint(self) -> str:
        """A short digest of what is served (the set a loader state replays against): the rows
        themselves with `rows=`, else the per-block counts and the marker versions of the
        blocks served in part (a full or empty block serves the same rows whatever rewrote it)."""
        if self.explicit is not None:
            return hashlib.blake2b(np.ascontiguousarray(self.explicit, dtype="<i8").tobytes(), digest_size=8).hexdigest()
        h = hashlib.blake2b(b"served-v2", digest_size=8)
        h.update(np.ascontiguousarray(self.counts, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray([[b, *v] for b, v in sorted(self._versions.items())], "<i8").tobytes())
        return h.hexdigest()


def usable_in_block(store, names: list[str], b: int, versions: tuple | None = None) -> np.ndarray:
    """Rows of block `b` done and valid in every feature set of `names` (one block read each);
    `versions`: the marker version each set must still have there (else `StoreChanged`)."""
    start, stop = store.block_range(b)
    mask = np.ones(stop - start, dtype=bool)
    for i, name in enumerate(names):
        fs = store.feature_set(name)
        marker = fs.progress.latest(b)
        if versions is not None and (marker or {}).get("version", -1) != versions[i]:
            raise StoreChanged(b, store.path)
        if marker is None:
            return np.zeros(stop - start, dtype=bool)
        mask &= mask_of(done_ranges(marker), start, stop)
        if mask.any():
            mask &= np.asarray(fs.group["valid"][start:stop])
    return mask


def served_set(store, names, rows=None) -> ServedSet:
    """What a Loader over feature sets `names` serves (`rows`: an optional subset, a boolean
    mask or store rows)."""
    names = sorted(set(names))
    n, r = store.n_rows, store.rows_per_shard
    nb = store.n_blocks
    size = store.block_sizes()
    full = np.ones(nb, bool)
    empty = np.zeros(nb, bool)
    partial_sets = np.zeros(nb, np.int64)  # sets in which the block is served in part
    count_if_one = size.copy()  # the block's count when one set is partial there (its n_valid)
    exact = np.ones(nb, bool)  # that count is known without reading a mask
    versions = np.zeros((len(names), nb), np.int64)
    for i, name in enumerate(names):
        rec = store.feature_set(name).progress.summary(nb)
        versions[i] = rec["version"]
        has = (rec["version"] >= 0) & (rec["start"] == np.arange(nb) * r)
        whole = has & (rec["stop"] - rec["start"] == size)
        done_all = whole & (rec["n_done"] == size)
        valid_all = done_all & (rec["n_valid"] == size)
        none = ~has | (rec["n_done"] == 0) | (done_all & (rec["n_valid"] == 0))
        part = ~valid_all & ~none
        empty |= none
        full &= valid_all
        partial_sets += part
        count_if_one = np.where(part, rec["n_valid"], count_if_one)
        exact &= ~part | (done_all & (rec["n_valid"] >= 0))
    counts = np.where(empty, 0, np.where(full, size, count_if_one))
    masked = ~empty & ~full
    for b in np.flatnonzero(masked & ((partial_sets > 1) | ~exact)).tolist():
        counts[b] = int(usable_in_block(store, names, b).sum())  # counted now; its rows read when needed
    masked &= counts > 0
    usable = int(counts.sum())
    if rows is None:
        return ServedSet(store, names, counts, masked, usable, versions=versions)
    rows = np.asarray(rows)
    if rows.dtype == bool:
        rows = np.flatnonzero(rows[:n])
    rows = np.unique(rows[(rows >= 0) & (rows < n)].astype(np.int64))
    blk = rows // r if nb else rows
    keep = full[blk] if len(rows) else np.zeros(0, bool)
    for b in np.unique(blk[masked[blk]]).tolist():
        sel = np.flatnonzero(blk == b)
        keep[sel] = usable_in_block(store, names, b)[rows[sel] - b * r]
    return ServedSet(store, names, counts, masked, usable, explicit=rows[keep])
