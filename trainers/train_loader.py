"""The training loops' data: the one place a trainer config meets the Loader's knobs.

    loader = train_loader(store, columns, cfg, run, rows=train_mask, pin_memory=True)

Both loops make their training loader here: this rank's share of each epoch's order (`rank`,
`world_size`), `cfg.batch_size / world_size` rows per batch, drop_last (every rank the same number
of full batches, so no rank waits alone in a collective), and the config's `shuffle_window`.
`without_duplicates` applies the config's `skip_duplicates` (a `featstore dedup` record) to the
train split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from featstore.loader import Loader
from featstore.read.dedup_record import keep_rows

if TYPE_CHECKING:
    from featstore.trainers.ddp import Dist


def shuffle_window(cfg) -> dict:
    """The Loader keyword for a config's `shuffle_window` (None: the Loader's own default, sized in
    bytes).  The window is this rank's read window in rows: batches mix rows from across the whole
    served set at any size (featstore/read/order.py); a larger window means longer contiguous reads and
    more memory."""
    value = getattr(cfg, "shuffle_window", None)
    return {} if value is None else {"window": int(value)}


def without_duplicates(store, cfg, train_mask: np.ndarray, notes: list) -> np.ndarray:
    """The train split less the duplicates of the config's `skip_duplicates` record (its unique rows
    and group representatives kept; a stale or missing record refused with one line).  Validation
    rows are left as split."""
    if not getattr(cfg, "skip_duplicates", None):
        return train_mask
    keep = keep_rows(store, cfg.skip_duplicates)
    out = train_mask & keep
    notes.append(f"{int(train_mask.sum() - out.sum()):,} duplicate rows of the train split left out "
                 f"(dedup record '{cfg.skip_duplicates}')")
    return out


def train_loader(store, columns: dict, cfg, run: Dist, *, rows, pin_memory: bool = False, **kwargs) -> Loader:
    """This rank's shuffled training batches of `columns` over `rows` (e.g. the train split)."""
    return Loader(store, columns, run.per_rank_batch(cfg.batch_size), shuffle=True, seed=cfg.seed, rows=rows,
                  rank=run.rank, world_size=run.world_size, drop_last=True, cache=cfg.cache, pin_memory=pin_memory,
                  **shuffle_window(cfg), **kwargs)
