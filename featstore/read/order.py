"""The order an epoch serves rows in: a pure function, so resuming is "recompute and skip".

    order = epoch_order(served, seed=0, epoch=3, rows_per_shard=4096, batch_size=1024, world_size=2,
                        window_rows=26624)
    batches = rank_batches(order, rank=1, world_size=2, batch_size=1024, drop_last=True)

Everything below depends only on (seed, epoch, the served rows, rows_per_shard, batch size,
world size, window, mode); nothing on timing, workers or the read path.

Shuffled (the default), an epoch is built from *runs*: `run` consecutive served rows (reads stay
contiguous: a run is one read, or two where it crosses a block, never per-row indexing).  With
`k = window_rows // batch_size` batches in a window (per rank) and `run = min(k, rows_per_shard)`:

1. the whole runs are put in a seeded random order (a keyed bijection, `featstore.read.permute`, so any
   run's place is computable alone); a short last run stays last;
2. consecutive runs make a window of `k` global batches (`k * batch_size * world_size` rows);
3. the window's rows, listed run by run, are dealt round-robin to its `k` global batches, so a
   global batch holds at most one row of any run: its rows come from `batch_size * world_size`
   runs scattered over the whole store.  On a store sorted by class the label mix of a batch is
   then that of a full permutation (`shuffle_quality` measures it), while memory holds one
   window and reads are runs of `run` rows;
4. rank `r` takes the `r`-th `batch_size` slice of every global batch: the union of the ranks'
   batches of a step is the global batch, and each rank reads only its own runs.

`mode="full"` is a full random permutation (the RAM cache uses it: any order is free in RAM);
`mode="sequential"` serves rows in store order (evaluation).

Every rank gets the same number of batches (DDP never waits on a rank that ran out):

- `drop_last=True`: `n // (batch_size * world_size)` full batches each; the rest of the epoch's
  order (fewer than `batch_size * world_size` rows, different ones each epoch) is not served.
- `drop_last=False`: `ceil(n / (batch_size * world_size))` batches each, every served row once;
  the last step's rows are split between the ranks (sizes differ by at most one row).  Only when
  that last step has fewer rows than ranks do the ranks left without one repeat a row from the
  start of the epoch (at most `world_size - 1` repeats), so no rank gets an empty batch.
"""

from __future__ import annotations

import hashlib

import numpy as np

from featstore.read.permute import Permutation

MODES = ("window", "full", "sequential")


def window_shape(window_rows: int, batch_size: int, rows_per_shard: int) -> tuple[int, int]:
    """(batches per window `k`, rows per run) for a window of about `window_rows` rows per rank."""
    k = max(1, int(window_rows) // int(batch_size))
    return k, max(1, min(k, int(rows_per_shard)))


def epoch_order(served: np.ndarray, *, seed: int, epoch: int, rows_per_shard: int, batch_size: int,
                world_size: int = 1, window_rows: int | None = None, mode: str = "window") -> np.ndarray:
    """All served rows (sorted store rows) in this epoch's global order, each once: the
    materialized reference (O(rows)); `featstore.read.epoch.EpochOrder` computes the same order
    lazily, window by window, and the Loader uses that."""
    served = np.asarray(served, dtype=np.int64)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode == "sequential" or len(served) == 0:
        return served.copy()
    if mode == "full":
        return full_permutation(served, seed, epoch)
    n, g = len(served), int(batch_size) * int(world_size)
    k, run = window_shape(window_rows if window_rows is not None else n, batch_size, rows_per_shard)
    whole = n // run
    perm = run_permutation(whole, seed, epoch)(np.arange(whole))
    # the served rows, run after run in the permuted run order (the short last run stays last)
    listed = served[np.concatenate([(perm[:, None] * run + np.arange(run)).reshape(-1), np.arange(whole * run, n)])]
    out = np.empty_like(listed)
    w = k * g
    for a in range(0, n, w):
        out[a : a + w] = _deal(listed[a : a + w], max(1, -(-min(w, n - a) // g)))
    return out


def full_permutation(served: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """mode="full": a full random permutation of the served rows (materialized: the RAM cache
    holds every column anyway)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(served)


def run_permutation(n_runs: int, seed: int, epoch: int) -> Permutation:
    """The keyed bijection that orders an epoch's whole runs."""
    return Permutation(n_runs, (int(seed), int(epoch)))


def _deal(rows: np.ndarray, nb: int) -> np.ndarray:
    """Deal `rows` round-robin into `nb` consecutive groups (row j goes to group j % nb)."""
    if nb == 1:
        return rows
    if len(rows) % nb == 0:
        return rows.reshape(-1, nb).T.reshape(-1)
    return rows[np.argsort(np.arange(len(rows)) % nb, kind="stable")]


def rank_batches(order: np.ndarray, *, rank: int, world_size: int, batch_size: int, drop_last: bool) -> list[np.ndarray]:
    """This rank's batches of the epoch (the same number on every rank; see the module doc)."""
    n, w, b = len(order), int(world_size), int(batch_size)
    g = w * b
    full = n // g
    batches = [order[i * g + rank * b : i * g + (rank + 1) * b] for i in range(full)]
    rest = n - full * g
    if rest and not drop_last:
        tail = order[full * g :]
        if rest < w:  # too few rows for every rank: repeat the epoch's first rows
            tail = np.concatenate([tail, order[: w - rest]]) if n >= w else np.resize(order, w)
        batches.append(np.array_split(tail, w)[rank])
    return batches


def batches_per_rank(n: int, *, world_size: int, batch_size: int, drop_last: bool) -> int:
    g = int(world_size) * int(batch_size)
    return n // g if drop_last else -(-n // g)


def fingerprint(rows: np.ndarray) -> str:
    """A short stable digest of a set of rows (the served set a state replays against)."""
    return hashlib.blake2b(np.ascontiguousarray(rows, dtype="<i8").tobytes(), digest_size=8).hexdigest()


# ---- shuffle quality ----------------------------------------------------------------------------
def batch_label_entropy(labels_in_order: np.ndarray, batch_size: int) -> float:
    """Mean over full batches of the entropy (nats) of the labels in each batch."""
    labels = np.asarray(labels_in_order)
    nb = len(labels) // int(batch_size)
    if nb == 0:
        return 0.0
    _, codes = np.unique(labels[: nb * batch_size], return_inverse=True)
    codes = codes.reshape(nb, batch_size)
    counts = np.zeros((nb, int(codes.max()) + 1), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(nb), batch_size), codes.reshape(-1)), 1)
    p = counts / batch_size
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    return float(h.mean())


def shuffle_quality(labels_in_order: np.ndarray, batch_size: int, seed: int = 0) -> float:
    """Per-batch label entropy of an order over that of a full random permutation of the same
    labels (1.0: batches as mixed as a full shuffle's; a store sorted by class read in blocks
    gets far less).  Deterministic for a given seed."""
    labels = np.asarray(labels_in_order)
    full = batch_label_entropy(np.random.default_rng(seed).permutation(labels), batch_size)
    return batch_label_entropy(labels, batch_size) / full if full > 0 else 1.0
