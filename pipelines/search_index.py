"""Build a FAISS nearest-neighbour index over a feature set's pooled features (`featstore index`).

The index is a derived artifact kept inside the store directory, beside the zarr arrays:

    store.zarr/indexes/<feature set>/index.faiss   the FAISS index; its ids are store row numbers
                                     meta.json     what it covers: the feature set's identity, the store's
                                                   rows and done rows then, kind, parameters, faiss version

meta.json is written last (the commit): a folder without it holds no index.  Only rows that are
done and valid (`featstore.read.served.usable_in_block`) are indexed; a feature set with stored
views indexes view 0 (the recipe's centre crop).  Vectors are L2-normalized, so the inner product
is the cosine similarity.

Kinds (`kind="auto"` follows autofaiss's rules of thumb, simplified):

* flat   `IndexFlatIP` in an `IndexIDMap2`: exact; auto picks it below 200,000 rows.
* ivf    `IndexIVFFlat`: nlist = 4*sqrt(rows) lists (at most rows/39, faiss's minimum of training
         points per list), trained on a random sample of at most max(256*nlist, 50,000) rows, then
         the rows added block by block; queries probe nprobe = max(1, nlist/8) lists by default.
         Auto picks it from 200,000 rows when the float32 vectors fit `memory_mb` (4096 if not given).
* ivfpq  `IndexIVFPQ`: as ivf, each vector stored as m codes of nbits (8-bit PQ, fewer bits when
         the sample has under 256*39 rows: at least 39 training rows per centroid), m the largest
         divisor of dim <= min(64, dim/2) whose codes fit `memory_mb`.  Auto picks it otherwise.

Rows are read one row block (`store.rows_per_shard` rows) at a time, never the whole column:
one pass for the training sample (ivf, ivfpq), one pass adding the rows.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from featstore.core.files import is_url, now
from featstore.errors import ConfigError, SearchIndexError
from featstore.read.served import usable_in_block
from featstore.store import Store

from .summary import progress_bar

INDEXES = "indexes"
KINDS = ("auto", "flat", "ivf", "ivfpq")
FLAT_BELOW = 200_000  # rows: auto picks an exact index below this
DEFAULT_MEMORY_MB = 4096
MIN_POINTS_PER_LIST = 39  # faiss warns when k-means gets fewer training points per centroid


def open_store(store) -> Store:
    return store if isinstance(store, Store) else Store.open(store)


def index_dir(store: Store, name: str) -> str:
    """`<store>/indexes/<name>`; refused for a store on object storage."""
    if is_url(store.path):
        raise SearchIndexError(f"{store.path} is on object storage: indexes are built and queried only for "
                               "local stores (copy the store to a local disk first)")
    return os.path.join(store.path, INDEXES, name)


def rows_done(fs) -> int:
    """Rows of the feature set done now (block summary: O(blocks))."""
    done, _ = fs.done_summary()
    return int(np.sum(done))


def normalize(x) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1)


def _blocks(store: Store, fs):
    """(block, start, usable rows of the block as store rows) for every block with usable rows."""
    for b in range(store.n_blocks):
        start, _ = store.block_range(b)
        mask = usable_in_block(store, [fs.name], b)
        if mask.any():
            yield b, start, start + np.flatnonzero(mask)


def _read(fs, start: int, rows: np.ndarray) -> np.ndarray:
    """Pooled features (view 0) of `rows`, all in one row block starting at `start`, normalized."""
    block = np.asarray(fs.array("pooled")[start:int(rows[-1]) + 1])
    if fs.views > 1:
        block = block[:, 0]
    return normalize(block[rows - start])


def choose(kind: str, n: int, dim: int, memory_mb: float | None) -> dict:
    """The index kind and its parameters for `n` rows of width `dim` (the module docstring's rules)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; use one of {', '.join(KINDS)}")
    budget = float(memory_mb if memory_mb is not None else DEFAULT_MEMORY_MB) * 2**20
    if kind == "auto":
        kind = "flat" if n < FLAT_BELOW else ("ivf" if n * dim * 4 <= budget else "ivfpq")
    if kind == "flat":
        return {"kind": "flat"}
    nlist = max(1, min(int(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))
    out = {"kind": kind, "nlist": nlist, "nprobe": max(1, nlist // 8),
           "train_rows": min(n, max(256 * nlist, 50_000))}
    if kind == "ivfpq":
        per_row = max(1, int(budget // max(n, 1)))
        divisors = [m for m in range(1, dim + 1) if dim % m == 0 and m <= max(1, min(64, dim // 2, per_row))]
        # 8-bit codes (256 centroids per sub-vector) want 256*39 training rows; fewer get fewer bits
        nbits = int(min(8, max(4, math.floor(math.log2(max(out["train_rows"], 1) / MIN_POINTS_PER_LIST)))))
        out.update(m=max(divisors), nbits=nbits)
    return out


def factory_string(params: dict) -> str:
    """The faiss.index_factory description of an index kind (the factory owns every sub-index)."""
    if params["kind"] == "flat":
        return "IDMap2,Flat"
    if params["kind"] == "ivf":
        return f"IVF{params['nlist']},Flat"
    return f"IVF{params['nlist']},PQ{params['m']}x{params['nbits']}"


def _empty_index(params: dict, dim: int):
    import faiss

    return faiss.index_factory(dim, factory_string(params), faiss.METRIC_INNER_PRODUCT)


def _training_sample(store: Store, fs, blocks, n: int, size: int, seed: int, progress: bool) -> np.ndarray:
    """`size` usable rows drawn at random (seeded), read block by block."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, size=size, replace=False))  # positions among the usable rows, in order
    parts, seen = [], 0
    with progress_bar(len(blocks), f"sample {fs.name}", progress) as bar:
        for _, start, rows in blocks:
            lo, hi = np.searchsorted(pick, [seen, seen + len(rows)])
            if hi > lo:
                parts.append(_read(fs, start, rows[pick[lo:hi] - seen]))
            seen += len(rows)
            bar.update(1)
    return np.concatenate(parts)


def build_index(store, feature_set: str, *, kind: str = "auto", memory_mb: float | None = None,
                progress: bool = True, seed: int = 0) -> dict:
    """Index the done, valid rows of `feature_set` (cosine) and save it under
    `<store>/indexes/<feature_set>/`; returns meta.json's record plus `seconds`."""
    import faiss

    t0 = time.perf_counter()
    store = open_store(store)
    fs = store.feature_set(feature_set)
    folder = index_dir(store, feature_set)
    if not os.access(store.path, os.W_OK):
        raise SearchIndexError(f"{store.path} is not writable here: the index is kept inside the store")
    done = rows_done(fs)
    blocks = list(_blocks(store, fs))
    n = int(sum(len(rows) for _, _, rows in blocks))
    if n == 0:
        raise SearchIndexError(f"feature set '{feature_set}' has no done, valid rows to index: run `featstore extract` first")
    dim = int(fs.array("pooled").shape[-1])
    params = choose(kind, n, dim, memory_mb)
    params["factory"] = factory_string(params)
    index = _empty_index(params, dim)
    if params["kind"] != "flat":
        sample = _training_sample(store, fs, blocks, n, params["train_rows"], seed, progress)
        index.train(sample)
        del sample
        index.nprobe = params["nprobe"]
    with progress_bar(n, f"index {feature_set}", progress) as bar:
        for _, start, rows in blocks:
            index.add_with_ids(_read(fs, start, rows), rows.astype(np.int64))
            bar.update(len(rows))
    os.makedirs(folder, exist_ok=True)
    meta_path = os.path.join(folder, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the old commit goes first: never a meta.json beside another index
    tmp = os.path.join(folder, f"index.faiss.tmp-{os.getpid()}")
    faiss.write_index(index, tmp)
    os.replace(tmp, os.path.join(folder, "index.faiss"))
    meta = {
        "feature_set": feature_set, "identity": fs.identity, "dim": dim, "metric": "cosine (inner product of "
        "L2-normalized vectors)", "view": 0 if fs.views > 1 else None, **params, "rows_indexed": n,
        "store_rows": store.n_rows, "rows_done": done, "store_id": store.meta.get("store_id"),
        "faiss_version": faiss.__version__, "built": now(), "index_bytes": os.path.getsize(os.path.join(folder, "index.faiss")),
    }
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    return {**meta, "path": folder, "seconds": round(time.perf_counter() - t0, 3)}


def read_meta(store: Store, feature_set: str) -> dict:
    """meta.json of the feature set's index, or a one-line error saying how to build it."""
    path = os.path.join(index_dir(store, feature_set), "meta.json")
    if not os.path.exists(path):
        raise SearchIndexError(f"feature set '{feature_set}' of {store.path} has no index: build it with "
                               f"`featstore index --store {store.path} --features {feature_set}`")
    with open(path) as f:
        return json.load(f)


def check_current(store: Store, fs, meta: dict) -> None:
    """Refuse an index built for another identity, or before the store grew or more rows were done."""
    again = f"run `featstore index --store {store.path} --features {fs.name}` again"
    if meta.get("identity") != fs.identity:
        raise SearchIndexError(f"the index of '{fs.name}' was built for another identity of the feature set "
                               f"(it was recomputed since): {again}")
    if store.n_rows != meta.get("store_rows") or rows_done(fs) != meta.get("rows_done"):
        raise SearchIndexError(f"the index of '{fs.name}' covers {meta.get('store_rows'):,} rows "
                               f"({meta.get('rows_done'):,} done), the store now has {store.n_rows:,} "
                               f"({rows_done(fs):,} done): {again}")


def load_index(store: Store, feature_set: str):
    """(faiss index, meta) of a current index of `feature_set`."""
    import faiss

    fs = store.feature_set(feature_set)
    meta = read_meta(store, feature_set)
    check_current(store, fs, meta)
    index = faiss.read_index(os.path.join(index_dir(store, feature_set), "index.faiss"))
    return index, meta

