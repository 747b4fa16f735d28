"""Which rows a ShareLock run holds out for validation, and the same rows again at eval time.

Three ways.  The first two go by the uid hash of `featstore.split` (a row's side depends on its
uid alone, so they hold under growth and any row order):

* ``val_fraction`` (featstore's default): the uids whose hash falls below the fraction;
* ``val_rows`` (ShareLock's official protocol holds out a fixed 50,000): the N usable rows with the
  smallest hash; the run records the hash threshold, so eval (`--split`) finds the same rows.

The third is ShareLock's own rule (``val_split: official``, with ``val_rows``): its dataset takes
FeatureUtils' ``list_keys()`` (the keys in the order precompute saved them), shuffles that list with
``random.Random(seed).shuffle`` (seed 42, its ``config.seed``) and holds out the first
``val_split_num``.  A shuffle's permutation depends only on the list's length and the seed, so
shuffling the positions 0..n-1 of the usable rows (in row order) picks the same samples whenever
the store's row order is the official save order (a store extracted in the same sample order);
otherwise it is still a seed-42 uniform choice, just not the same one.  Like the official code it
shuffles a Python list of every usable row: O(n) time and ~40 bytes a row, so it is refused above
`OFFICIAL_MAX_ROWS` (ShareLock's datasets, CC3M and CC12M, are far below).  The chosen uids are
recorded (one newline-joined string), and `heldout_rows` finds them again through the store's uid
index: O(held-out rows), however large the store grew since.

The record that says which (`{"kind": "fraction"|"count"|"official", ...}`) is kept in every
checkpoint as ``state["heldout"]``.
"""

from __future__ import annotations

import random

import numpy as np

from featstore.errors import ConfigError
from featstore.split import split_by_uid, uid_fraction


OFFICIAL_MAX_ROWS = 50_000_000  # the official shuffle's Python list of every row: ~2 GB here


def official_positions(n: int, val_rows: int, seed: int = 42) -> np.ndarray:
    """Positions (into the n keys, in their order) that ShareLock's split holds out, in its order:
    `random.Random(seed).shuffle(keys)` then `keys[:val_rows]`."""
    if n > OFFICIAL_MAX_ROWS:
        raise ConfigError(f"val_split official shuffles a Python list of all {n:,} usable rows, as ShareLock's code "
                          f"does; above {OFFICIAL_MAX_ROWS:,} use val_split hash (the smallest uid hashes)")
    positions = list(range(n))
    random.Random(seed).shuffle(positions)
    return np.asarray(positions[:val_rows], dtype=np.int64)


def heldout(uids, val_fraction: float = 0.1, val_rows: int | None = None, usable=None, *, split: str = "hash",
            seed: int = 42) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train mask, val mask, record) over `uids`.  With `val_rows`, the held-out rows are chosen
    among `usable` (a mask; default every row) so that exactly `val_rows` of them are served: by
    smallest uid hash (`split="hash"`) or by ShareLock's seeded shuffle (`split="official"`)."""
    if split == "official":
        usable = np.ones(len(uids), bool) if usable is None else np.asarray(usable, bool)
        candidates = np.flatnonzero(usable)
        if val_rows is None or val_rows >= len(candidates):
            raise ConfigError(f"val_split official needs val_rows below the {len(candidates):,} usable rows, got {val_rows}")
        rows = candidates[official_positions(len(candidates), val_rows, seed)]
        val = np.zeros(len(usable), bool)
        val[rows] = True
        chosen = "\n".join(str(u) for u in np.asarray(uids)[np.sort(rows, kind="stable")])
        if chosen.count("\n") != val_rows - 1:
            raise ConfigError("val_split official records the held-out uids one per line: a uid holds a newline")
        record = {"kind": "official", "val_rows": int(val_rows), "seed": int(seed), "of_rows": int(len(candidates)),
                  "uids": chosen}
        return usable & ~val, val, record
    if val_rows is None:
        train, val = split_by_uid(uids, val_fraction)
        return train, val, {"kind": "fraction", "val_fraction": float(val_fraction)}
    frac = uid_fraction(uids)
    usable = np.ones(len(frac), bool) if usable is None else np.asarray(usable, bool)
    candidates = np.flatnonzero(usable)
    if val_rows >= len(candidates):
        raise ConfigError(f"val_rows {val_rows} would hold out every one of the {len(candidates):,} usable rows: "
                          "set val_rows lower, or null to hold out val_fraction")
    threshold = float(np.sort(frac[candidates])[val_rows - 1])
    val = frac <= threshold
    return usable & ~val, val, {"kind": "count", "val_rows": int(val_rows), "threshold": threshold}


def heldout_rows(store, record: dict) -> np.ndarray:
    """The val mask a checkpoint's `record` describes, over `store`'s rows (possibly grown or in
    another order since)."""
    if record.get("kind") == "official":
        mask = np.zeros(store.n_rows, bool)
        uids = np.array(record["uids"].split("\n"), dtype=np.dtypes.StringDType())
        rows = store.rows_of(uids)
        mask[rows[rows >= 0]] = True
        return mask
    uids = store.uids()
    if record.get("kind") == "fraction":
        return split_by_uid(uids, record["val_fraction"])[1]
    if record.get("kind") == "count":
        return uid_fraction(uids) <= record["threshold"]
    raise ConfigError(f"unknown held-out record {record!r}")
