"""Which rows a ShareLock run holds out for validation, and the same rows again at eval time.

Two ways, both by the uid hash of `featstore.split` (a row's side depends on its uid alone):

* ``val_fraction`` (featstore's default): the uids whose hash falls below the fraction;
* ``val_rows`` (ShareLock's official protocol holds out a fixed 50,000): the N usable rows with the
  smallest hash; the run records the hash threshold, so eval (`--split`) finds the same rows.

The record that says which (`{"kind": "fraction", ...}` or `{"kind": "count", ...}`) is kept in
every checkpoint as ``state["heldout"]``.
"""

from __future__ import annotations

import numpy as np

from featstore.errors import ConfigError
from featstore.split import split_by_uid, uid_fraction


def heldout(uids, val_fraction: float = 0.1, val_rows: int | None = None, usable=None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(train mask, val mask, record) over `uids`.  With `val_rows`, the held-out rows are chosen
    among `usable` (a mask; default every row) so that exactly `val_rows` of them are served."""
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


def heldout_rows(uids, record: dict) -> np.ndarray:
    """The val mask a checkpoint's `record` describes, over (possibly another order of) `uids`."""
    if record.get("kind") == "fraction":
        return split_by_uid(uids, record["val_fraction"])[1]
    if record.get("kind") == "count":
        return uid_fraction(uids) <= record["threshold"]
    raise ConfigError(f"unknown held-out record {record!r}")
