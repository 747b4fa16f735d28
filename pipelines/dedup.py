"""`featstore dedup`: exact and near duplicates of a store's rows, recorded per row beside the store.

    store.zarr/dedup/<feature set, or "exact">/group.npy  int64 per row: its group's representative
                                                          (the group's lowest row; a unique row: itself)
                                               kind.npy   int8 per row: 0 unique or representative,
                                                          1 exact duplicate, 2 near duplicate
                                               meta.json  threshold, the feature set's identity, the
                                                          rows covered, counts (written last: the commit)

`keep_rows(store, name)` is the boolean mask (True: unique rows and representatives) a trainer
passes as `Loader(..., rows=mask)` (the trainers' `skip_duplicates` key; reading a record is
`featstore/read/dedup_record.py`, which trainers may import).  A record made before the store
grew, before more rows of the feature set were done, or for another identity of the feature set
is refused by every reader (one line); a re-run recomputes the record from scratch (it does not extend it).

Steps and their costs (n rows, B = store.rows_per_shard rows per block, read one block at a time):

1. exact (`dedup_exact`, with --exact): blake2b-128 of each row's raw source bytes, read through
   its recorded source; grouped by sorting the hashes in memory-bounded buckets.  O(image bytes)
   reading, O(n) bytes of bucket files on disk, O(memory budget) in memory.
2. union-find: `parent`, one int64 per row (8 n bytes, the one O(n) array in memory, plus one
   bool per row marking exact duplicates).  Exact groups are merged first (a duplicate's parent
   is its representative), so their members are never compared again.
3. near (with --features F): the done, valid rows of F that are not exact duplicates, view 0,
   L2-normalized (`search_index` helpers).  The FAISS index is `featstore index`'s when it is
   current (flat or IVF: `indexes/F/`), else a flat index built here, which needs 4 * dim bytes
   per compared row and is refused above `search_index.FLAT_BELOW` rows (build the IVF index
   first).  Each block's rows are range-searched at the cosine `threshold`; every pair found is
   unioned.  O(n * cost of one range search) time, O(B * matches) memory per block.
4. record: per block, each row's root (pointer chasing in `parent`) and kind into memory-mapped
   .npy files; the source of each duplicate and of its representative (`samples/source`) tell
   which groups span several sources.  O(n) time, O(duplicate rows) memory for the group counts.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from featstore.core import format as fmt
from featstore.core.files import now
from featstore.errors import ConfigError, DedupError
from featstore.read import dedup_record as _record
from featstore.read.dedup_record import EXACT, EXACT_DUP, NEAR_DUP, UNIQUE, record_dir  # noqa: F401 (re-exported)
from featstore.read.served import usable_in_block
from featstore.store import Store

from . import search_index as si
from .dedup_exact import exact_pairs
from .summary import progress_bar

DEFAULT_THRESHOLD = 0.95
DEFAULT_MEMORY_MB = 1024


# ---- union-find over a numpy parent array --------------------------------------------------
def find(parent: np.ndarray, x) -> np.ndarray:
    """Roots of rows `x` (vectorized pointer chasing), compressing their paths."""
    x = np.asarray(x, dtype=np.int64)
    root = parent[x]
    while True:
        up = parent[root]
        if np.array_equal(up, root):
            break
        root = up
    parent[x] = root
    return root


def union(parent: np.ndarray, a, b) -> None:
    """Join the groups of each pair (a[i], b[i]); every root is its group's lowest row."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    while len(a):
        ra, rb = find(parent, a), find(parent, b)
        apart = ra != rb
        if not apart.any():
            return
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


# ---- the near pass ---------------------------------------------------------------------------
def usable_blocks(store: Store, fs):
    """(start, usable rows of the block as store rows) for every block with usable rows (one block read each)."""
    for b in range(store.n_blocks):
        start, _ = store.block_range(b)
        mask = usable_in_block(store, [fs.name], b)
        if mask.any():
            yield start, start + np.flatnonzero(mask)


def pooled(fs, start: int, rows: np.ndarray) -> np.ndarray:
    """L2-normalized pooled features (view 0) of `rows`, all in the row block starting at `start`."""
    block = np.asarray(fs.array("pooled")[start:int(rows[-1]) + 1])
    return si.normalize((block[:, 0] if fs.views > 1 else block)[rows - start])


def _index_for(store: Store, fs, exact_dup: np.ndarray, bar_enabled: bool):
    """(faiss index, description): `featstore index`'s when current, else a flat one built here."""
    import faiss

    try:
        index, meta = si.load_index(store, fs.name)
        if meta.get("nprobe"):
            faiss.extract_index_ivf(index).nprobe = int(meta["nprobe"])
        return index, f"indexes/{fs.name} ({meta['kind']})"
    except si.SearchIndexError:
        pass
    done = si.rows_done(fs)  # O(blocks): an upper bound of the rows to compare
    if done >= si.FLAT_BELOW:
        raise DedupError(f"feature set '{fs.name}' has {done:,} rows to compare: build its index first with "
                         f"`featstore index --store {store.path} --features {fs.name}` (dedup uses it)")
    dim = int(fs.array("pooled").shape[-1])
    index = faiss.index_factory(dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
    with progress_bar(done, f"flat index {fs.name}", bar_enabled) as bar:
        for start, rows in usable_blocks(store, fs):
            keep = rows[~exact_dup[rows]]
            if len(keep):
                index.add_with_ids(pooled(fs, start, keep), keep.astype(np.int64))
            bar.update(len(rows))
    return index, "flat (built here)"


def near_pass(store: Store, fs, parent: np.ndarray, exact_dup: np.ndarray, threshold: float,
              progress: bool) -> dict:
    """Step 3: range-search every compared row at `threshold`, union the pairs."""
    index, used = _index_for(store, fs, exact_dup, progress)
    compared = pairs = 0
    with progress_bar(si.rows_done(fs), f"near {fs.name}", progress) as bar:
        for start, rows in usable_blocks(store, fs):
            bar.update(len(rows))
            rows = rows[~exact_dup[rows]]
            if not len(rows):
                continue
            compared += len(rows)
            lims, sims, ids = index.range_search(pooled(fs, start, rows), float(threshold) - 1e-6)
            q = np.repeat(rows, np.diff(lims).astype(np.int64))
            hit = (ids >= 0) & (ids != q) & (sims >= threshold)
            pairs += int(hit.sum())  # each pair once from each side (less where one side is an exact copy)
            union(parent, q[hit], ids[hit])
    return {"index": used, "rows_compared": compared, "matches": pairs}


# ---- the job ---------------------------------------------------------------------------------
def run_dedup(store, features: str | None = None, *, threshold: float = DEFAULT_THRESHOLD, exact: bool = True,
              memory_mb: float | None = None, progress: bool = True) -> dict:
    """Find exact (`exact`) and near (`features`, cosine >= `threshold`) duplicates and record them
    under `<store>/dedup/<features or 'exact'>/`; returns meta.json's record plus path and seconds."""
    t0 = time.perf_counter()
    store = si.open_store(store)
    if features is None and not exact:
        raise ConfigError("nothing to do: give --features F for near duplicates, or keep --exact")
    if not 0 < float(threshold) <= 1:
        raise ConfigError(f"--threshold is a cosine similarity in (0, 1], not {threshold}")
    if memory_mb is not None and memory_mb <= 0:
        raise ConfigError(f"--memory-mb must be > 0, not {memory_mb}")
    if features == EXACT:
        raise ConfigError(f"a feature set named '{EXACT}' cannot be deduplicated: the name is the exact-only record's")
    fs = store.feature_set(features) if features is not None else None
    name = features or EXACT
    folder = record_dir(store, name)
    if not os.access(store.path, os.W_OK):
        raise DedupError(f"{store.path} is not writable here: the duplicate record is kept inside the store")
    n = store.n_rows
    if n == 0:
        raise DedupError(f"{store.path} has no rows yet: run `featstore extract` first")
    os.makedirs(folder, exist_ok=True)
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the old commit goes first: a re-run recomputes the whole record
    done = si.rows_done(fs) if fs is not None else None
    parent = np.arange(n, dtype=np.int64)
    exact_dup = np.zeros(n, dtype=bool)
    hashed = {"unhashed_rows": None, "sources_changed": None}
    if exact:
        with progress_bar(n, "hash", progress) as bar:
            gen = exact_pairs(store, folder, int(float(memory_mb or DEFAULT_MEMORY_MB) * 2**20), bar)
            while True:
                try:
                    dup, rep = next(gen)
                except StopIteration as stop:
                    hashed = stop.value
                    break
                parent[dup] = rep  # the representative is the group's lowest row: a root
                exact_dup[dup] = True
    near = near_pass(store, fs, parent, exact_dup, threshold, progress) if fs is not None else {}
    counts = _write_arrays(store, folder, parent, exact_dup, progress)
    meta = {
        "name": name, "feature_set": features, "identity": fs.identity if fs is not None else None,
        "threshold": float(threshold) if fs is not None else None, "exact": bool(exact),
        "store_rows": n, "rows_done": done, "store_id": store.meta.get("store_id"), **counts,
        **hashed, **near, "built": now(),
    }
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    return {**meta, "path": folder, "seconds": round(time.perf_counter() - t0, 3)}


def _write_arrays(store: Store, folder: str, parent: np.ndarray, exact_dup: np.ndarray, progress: bool) -> dict:
    """Step 4: group.npy and kind.npy block by block, and the counts."""
    n = store.n_rows
    tmp = {k: os.path.join(folder, f"{k}.tmp-{os.getpid()}.npy") for k in ("group", "kind")}
    group = np.lib.format.open_memmap(tmp["group"], mode="w+", dtype=np.int64, shape=(n,))
    kind = np.lib.format.open_memmap(tmp["kind"], mode="w+", dtype=np.int8, shape=(n,))
    has_source = fmt.SOURCE in store.sample_fields()
    reps, crossing = [], []
    with progress_bar(n, "record", progress) as bar:
        for b in range(store.n_blocks):
            start, stop = store.block_range(b)
            rows = np.arange(start, stop)
            g = find(parent, rows)
            k = np.where(g == rows, UNIQUE, np.where(exact_dup[start:stop], EXACT_DUP, NEAR_DUP)).astype(np.int8)
            group[start:stop], kind[start:stop] = g, k
            member = g != rows
            if member.any():
                reps.append(g[member])
                if has_source:
                    mine = np.asarray(store.samples(fmt.SOURCE, start, stop))[member]
                    theirs = np.asarray(store.samples_at(fmt.SOURCE, g[member]))
                    crossing.append(g[member][mine != theirs])
            bar.update(stop - start)
    group.flush()
    kind.flush()
    del group, kind
    for k, path in tmp.items():
        os.replace(path, os.path.join(folder, f"{k}.npy"))
    all_reps = np.unique(np.concatenate(reps)) if reps else np.zeros(0, np.int64)
    cross = np.unique(np.concatenate(crossing)) if crossing else np.zeros(0, np.int64)
    dup_rows = int(sum(len(r) for r in reps))
    exact_rows = int(exact_dup.sum())
    return {"rows": n, "exact_dup_rows": exact_rows, "near_dup_rows": dup_rows - exact_rows,
            "groups": int(len(all_reps)), "cross_source_groups": int(len(cross))}


# ---- readers -----------------------------------------------------------------------------------
def read_record(store, name: str) -> dict:
    return _record.read_record(si.open_store(store), name)


def load(store, name: str) -> tuple[dict, np.ndarray, np.ndarray]:
    return _record.load(si.open_store(store), name)


def keep_rows(store, name: str) -> np.ndarray:
    return _record.keep_rows(si.open_store(store), name)


def format_result(r: dict) -> str:
    """The one-line summary of a run."""
    near = (f", {r['near_dup_rows']:,} near-duplicate rows (cosine >= {r['threshold']:g} on '{r['feature_set']}')"
            if r.get("feature_set") else "")
    exact = f", {r['exact_dup_rows']:,} exact duplicate rows" if r.get("exact") else ""
    unhashed = f", {r['unhashed_rows']:,} rows without source bytes left unhashed" if r.get("unhashed_rows") else ""
    if r.get("sources_changed"):
        unhashed += (f" (sources {', '.join('#' + str(i) for i in r['sources_changed'])} changed since they were "
                     "registered: hashed as they are now)")
    return (f"dedup {r['name']}: {r['rows']:,} rows{exact}{near}, {r['groups']:,} groups "
            f"({r['cross_source_groups']:,} span several sources){unhashed}; recorded in {r['path']} "
            f"({r['seconds']:.1f}s)")
