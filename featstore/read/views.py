"""Stored views on the read side: which arrays have a view axis, and which view a row serves.

A feature set extracted with `--views K` holds K views per image on a `view` axis right after
`row` (`featstore.core.format.dims`).  A reader asks for one of four things (`Loader(view=...)`):

    None      the plain layout; refused for a column with a view axis (say which view you mean)
    "all"     every view: the column as stored, (batch, K, ...)
    k (int)   view k of every row (0: the recipe's centre crop, what evaluation reads)
    "epoch"   one view per row per epoch: view = (epoch + h(seed, row)) mod K

"epoch" is a pure function of (seed, epoch, row), so every row sees each of its K views once in
any K consecutive epochs, rows start at different views (h is a hash: an epoch mixes views),
every column of a batch serves the same view of a row (pixels, tokens, pooled: one crop), and
resuming recomputes the same views.  A column without a view axis serves its row as it is.
"""

from __future__ import annotations

import numpy as np

from featstore.core import format as fmt
from featstore.errors import ConfigError

MODES = ("all", "epoch")
_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def view_count(array) -> int:
    """K for an array with a view axis (dimension 1 named `view`), else 1."""
    names = tuple(getattr(array.metadata, "dimension_names", None) or ())
    return int(array.shape[1]) if len(names) > 1 and names[1] == fmt.VIEW else 1


def check_mode(view) -> object:
    """`view` as given to the Loader, checked: None, "all", "epoch" or an int >= 0."""
    if view is None or view in MODES:
        return view
    if isinstance(view, (int, np.integer)) and not isinstance(view, bool) and view >= 0:
        return int(view)
    raise ConfigError(f"view must be None, 'all', 'epoch' or a view number >= 0, not {view!r}")


def row_hash(rows: np.ndarray, seed: int) -> np.ndarray:
    """A 64-bit mix (splitmix64's finalizer) of (seed, row) for each row: uint64."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the hash means it to
        x = np.asarray(rows, dtype=np.int64).astype(np.uint64) + np.uint64(int(seed) % 2**64) * _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def epoch_views(rows, *, seed: int, epoch: int, views: int) -> np.ndarray:
    """The view each row serves in `epoch` (int64): (epoch + h(seed, row)) mod K."""
    rows = np.asarray(rows, dtype=np.int64)
    if views <= 1:
        return np.zeros(rows.shape, np.int64)
    k = np.uint64(views)
    return ((row_hash(rows, seed) % k + np.uint64(int(epoch) % views)) % k).astype(np.int64)


def views_of(mode, *, seed: int, epoch: int, views: int):
    """The function rows -> views (int64) for one epoch under `mode` (an int or "epoch")."""
    if mode == "epoch":
        return lambda rows: epoch_views(rows, seed=seed, epoch=epoch, views=views)
    fixed = int(mode)
    return lambda rows: np.full(np.shape(rows), fixed, np.int64)
