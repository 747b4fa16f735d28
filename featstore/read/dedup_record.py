"""Reading a `featstore dedup` record: the per-row mask a trainer or a Loader takes as `rows=`.

    store.zarr/dedup/<name>/group.npy  int64 per row: its group's representative (a unique row: itself)
                            kind.npy   int8 per row: 0 unique or representative, 1 exact, 2 near duplicate
                            meta.json  what it covers (written last: the commit)

`pipelines/dedup.py` writes records; this module only reads them, so trainers (which never import
pipelines) can skip duplicates with their `skip_duplicates` key.  A record made before the store
grew, before more rows of its feature set were done, or for another identity of the feature set
is refused with one line saying how to redo it.
"""

from __future__ import annotations

import json
import os

import numpy as np

from featstore.core.files import is_url
from featstore.errors import DedupError

DEDUP = "dedup"
EXACT = "exact"  # the record's name when only exact duplicates are searched
UNIQUE, EXACT_DUP, NEAR_DUP = 0, 1, 2


def record_dir(store, name: str) -> str:
    """`<store>/dedup/<name>`; refused for a store on object storage."""
    if is_url(store.path):
        raise DedupError(f"{store.path} is on object storage: duplicate records are kept only for local stores "
                         "(copy the store to a local disk first)")
    return os.path.join(store.path, DEDUP, name)


def read_record(store, name: str) -> dict:
    """meta.json of the record `name` (a feature set, or 'exact'), refused when missing or stale."""
    path = os.path.join(record_dir(store, name), "meta.json")
    again = f"run `featstore dedup --store {store.path}" + ("" if name == EXACT else f" --features {name}") + "`"
    if not os.path.exists(path):
        raise DedupError(f"{store.path} has no duplicate record '{name}': {again}")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("store_id") != store.meta.get("store_id") or meta.get("store_rows") != store.n_rows:
        raise DedupError(f"the duplicate record '{name}' covers {meta.get('store_rows'):,} rows, the store now has "
                         f"{store.n_rows:,}: it is stale, {again} again")
    if meta.get("feature_set"):
        if meta["feature_set"] not in store.feature_set_names():
            raise DedupError(f"the duplicate record '{name}' was made from feature set '{meta['feature_set']}', "
                             f"which the store no longer has: {again} again")
        fs = store.feature_set(meta["feature_set"])
        if fs.identity != meta.get("identity") or fs.rows_done() != meta.get("rows_done"):
            raise DedupError(f"the duplicate record '{name}' was made before feature set '{fs.name}' was recomputed "
                             f"or more of its rows were done: it is stale, {again} again")
    return meta


def load(store, name: str) -> tuple[dict, np.ndarray, np.ndarray]:
    """(meta, group, kind) of a current record; the arrays are read-only memory maps (O(1) to open)."""
    meta = read_record(store, name)
    folder = record_dir(store, name)
    return (meta, np.load(os.path.join(folder, "group.npy"), mmap_mode="r"),
            np.load(os.path.join(folder, "kind.npy"), mmap_mode="r"))


def keep_rows(store, name: str) -> np.ndarray:
    """Boolean mask of the store's rows: True for unique rows and group representatives.  Pass it
    as `Loader(..., rows=keep_rows(store, name))`; one byte per row."""
    _, _, kind = load(store, name)
    return np.asarray(kind == UNIQUE)
