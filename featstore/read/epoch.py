"""The epoch order computed lazily: any position of it, or any batch of a rank, on demand.

    order = EpochOrder(n, seed=0, epoch=3, rows_per_shard=4096, batch_size=1024, world_size=8,
                       window_rows=26624, mode="window")
    mine = RankEpoch(order, rank=1, drop_last=True)
    mine.rows(range(10, 20), select)      # batches 10..19 of rank 1, as store rows

Positions and indices here are in *served index* space: the i-th served row in store order is
served index i (`featstore.read.served.ServedSet.select` turns them into store rows).  The order is
the one `featstore.read.order.epoch_order` materializes (its docstring has the rules), computed in
O(asked positions) work and memory: the window of a position and its place among the window's
dealt groups are arithmetic, the run it falls in is one evaluation of the keyed run permutation
(`featstore.read.permute`).  A rank never builds the epoch, only the windows it reads, and resuming
computes the batch a saved offset falls in directly.
"""

from __future__ import annotations

import numpy as np

from featstore.read.order import MODES, batches_per_rank, full_permutation, run_permutation, window_shape

_PIECE = 1 << 16  # positions computed at once


class EpochOrder:
    """Served index at each global position of one epoch's order (the module doc)."""

    def __init__(self, n: int, *, seed: int, epoch: int, rows_per_shard: int, batch_size: int, world_size: int = 1,
                 window_rows: int | None = None, mode: str = "window"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.n, self.mode = int(n), mode
        self.batch_size, self.world_size = int(batch_size), int(world_size)
        self.g = self.batch_size * self.world_size
        self.k, self.run = window_shape(window_rows if window_rows is not None else max(1, self.n), batch_size,
                                        rows_per_shard)
        self.whole = self.n // self.run
        self.perm = run_permutation(self.whole, seed, epoch) if mode == "window" and self.whole else None
        # mode="full" is materialized (the RAM cache it goes with holds every column anyway)
        self.full = full_permutation(np.arange(self.n), seed, epoch) if mode == "full" else None

    def served_index(self, positions) -> np.ndarray:
        """The served index at each of `positions` (int64 array, 0 <= p < n)."""
        p = np.asarray(positions, dtype=np.int64)
        if self.mode == "sequential" or self.n == 0:
            return p.copy()
        if self.mode == "full":
            return self.full[p]
        w = self.k * self.g
        i = p // w
        at = p - i * w
        size = np.minimum(w, self.n - i * w)  # rows of this position's window
        nb = np.maximum(1, -(-size // self.g))  # its groups (global batches)
        base, extra = size // nb, size % nb
        big = extra * (base + 1)
        first = at < big
        q = np.where(first, at // (base + 1), extra + (at - big) // base)
        t = np.where(first, at % (base + 1), (at - big) % base)
        listed = i * w + q + nb * t  # the window's row j went to group j % nb (`order._deal`)
        r = listed // self.run
        whole = r < self.whole
        if self.perm is None:
            return listed
        runs = self.perm(np.where(whole, r, 0))
        return np.where(whole, runs * self.run + listed % self.run, listed)


class RankEpoch:
    """One rank's batches of an epoch, each computable alone (`featstore.read.order.rank_batches`'
    rule: the same number on every rank)."""

    def __init__(self, order: EpochOrder, *, rank: int, drop_last: bool):
        self.order, self.rank, self.drop_last = order, int(rank), bool(drop_last)
        self.n, self.b, self.w, self.g = order.n, order.batch_size, order.world_size, order.g
        self.full = self.n // self.g
        self.count = batches_per_rank(self.n, world_size=self.w, batch_size=self.b, drop_last=self.drop_last)

    def __len__(self) -> int:
        return self.count

    def _tail(self) -> np.ndarray:
        """Global positions of this rank's last, short batch (drop_last=False only)."""
        rest = self.n - self.full * self.g
        tail = np.arange(self.full * self.g, self.n)
        if rest < self.w:  # too few rows for every rank: repeat the epoch's first positions
            tail = np.concatenate([tail, np.arange(self.w - rest)]) if self.n >= self.w else np.resize(np.arange(self.n), self.w)
        return np.array_split(tail, self.w)[self.rank]

    def size(self, t: int) -> int:
        return self.b if t < self.full else len(self._tail())

    def offset_batch(self, offset: int) -> int | None:
        """The batch that starts after `offset` rows of this rank; None when no batch boundary is there."""
        offset = int(offset)
        if offset % self.b == 0 and offset // self.b <= self.full:
            return min(offset // self.b, self.count)
        if self.count > self.full and offset == self.full * self.b + self.size(self.full):
            return self.count
        return None

    def positions(self, batches) -> list[np.ndarray]:
        """Global positions of each of these batches."""
        lane = self.rank * self.b + np.arange(self.b)
        return [t * self.g + lane if t < self.full else self._tail() for t in batches]

    def rows(self, batches, select) -> list[np.ndarray]:
        """These batches as store rows, `select` mapping served indices to rows (one call)."""
        pos = self.positions(list(batches))
        if not pos:
            return []
        flat = np.concatenate(pos)
        for a in range(0, len(flat), _PIECE):  # in pieces: temporaries of one piece, not of the window
            flat[a : a + _PIECE] = select(self.order.served_index(flat[a : a + _PIECE]))
        return np.split(flat, np.cumsum([len(x) for x in pos])[:-1])


class RankWindows:
    """Batches `batch_ids` (a range) of one rank, in read windows of `k` batches, each window's
    store rows computed only when it is asked for (`featstore.read.stream.BatchStream` asks when it
    prepares the window): a rank holds O(window) of the epoch, never all of it."""

    def __init__(self, epoch: RankEpoch, batch_ids: range, k: int, select):
        self.epoch, self.ids, self.k, self.select = epoch, batch_ids, max(1, int(k)), select

    def __len__(self) -> int:
        return -(-len(self.ids) // self.k)

    def sizes(self) -> list[int]:
        n = len(self.ids)
        return [min(self.k, n - i * self.k) for i in range(len(self))]

    def __getitem__(self, i: int) -> list[np.ndarray]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.epoch.rows(self.ids[i * self.k : (i + 1) * self.k], self.select)

    def __iter__(self):
        return (self[i] for i in range(len(self)))
