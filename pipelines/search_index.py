"""Build a FAISS nearest-neighbour index over a feature set's pooled features (`featstore index`).

The index is a derived artifact kept inside the store directory, beside the zarr arrays:

    store.zarr/indexes/<feature set>/index.faiss   the FAISS index; its ids are store row numbers
                                     meta.json     what it covers: the feature set's identity, the store's
                                                   rows and done rows then, kind, parameters, faiss version

meta.json is written last (the commit): a folder without it holds no index.  Only rows that are
done and valid (`featstore.read.served.usable_in_block`) are indexed; a feature set with stored
views indexes view 0 (the recipe's centre crop).  Vectors are L2-normalized, so the inner product
is the cosine similarity.

Kinds and their parameters (`kind="auto"`, autofaiss's rules of thumb): `search_kinds.py`; the
nprobe of ivf / ivfpq is measured after the build (`search_tune.py`).

Rows are read one row block (`store.rows_per_shard` rows) at a time, never the whole column:
one pass for the training sample (ivf, ivfpq), one pass adding the rows.

Life-cycle: `covered-<generation>.npz` (named by meta.json) records, per row block, the block's
marker version, start and size when it was indexed and the rows indexed from it: O(blocks), never
per row.  When the store grew or more rows were done and the identity is unchanged, `build_index`
(`extend=True`, the default) re-reads only the blocks whose marker changed since: their old ids
are removed and their usable rows added (flat: added; ivf/ivfpq: added to the trained quantizer).
It rebuilds instead when the rows outgrew the trained parameters (`OUTGROWN` x the rows an ivf /
ivfpq was trained for: retrained as the same kind; an auto flat index past `FLAT_BELOW` rows: as
auto picks), when another kind is asked for, when its covered file is missing or damaged,
or when the index file is not the one meta.json describes (an interrupted extend: its row count
differs).  Another identity is refused (`--rebuild` / `extend=False` builds afresh).  The new
index is written to a temp file and renamed, then the covered file, then meta.json: a kill leaves
the old meta.json with its own covered file, and an index file whose row count tells.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from featstore.core.files import is_url, now
from featstore.errors import SearchIndexError
from featstore.read.served import usable_in_block
from featstore.store import Store

from .search_kinds import DEFAULT_MEMORY_MB, FLAT_BELOW, KINDS, choose, empty_index, factory_string, train  # noqa: F401
from .search_tune import CALIBRATION_QUERIES, DEFAULT_TARGET, ExactTopK, tune_nprobe
from .summary import progress_bar

OUTGROWN = 4  # an ivf/ivfpq index is rebuilt once the rows exceed this many times those it was trained for

INDEXES = "indexes"


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
    return fs.rows_done()


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


def _training_sample(store: Store, fs, blocks, n: int, size: int, seed: int,
                     progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, store rows) of `size` usable rows drawn at random (seeded), read block by block."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, size=size, replace=False))  # positions among the usable rows, in order
    parts, ids, seen = [], [], 0
    with progress_bar(len(blocks), f"sample {fs.name}", progress) as bar:
        for _, start, rows in blocks:
            lo, hi = np.searchsorted(pick, [seen, seen + len(rows)])
            if hi > lo:
                ids.append(rows[pick[lo:hi] - seen])
                parts.append(_read(fs, start, ids[-1]))
            seen += len(rows)
            bar.update(1)
    return np.concatenate(parts), np.concatenate(ids)


def block_state(store: Store, fs) -> dict:
    """Per row block now: marker version (-1: none), start, size (O(blocks), the block summary)."""
    rec = fs.progress.summary(store.n_blocks)
    return {"version": np.asarray(rec["version"], np.int64), "start": np.asarray(rec["start"], np.int64),
            "size": store.block_sizes().astype(np.int64)}


def changed_blocks(state: dict, covered: dict) -> np.ndarray:
    """Blocks whose marker, start or size differ from when they were indexed (new blocks included)."""
    nb, old = len(state["version"]), len(covered["version"])
    same = np.zeros(nb, bool)
    k = min(nb, old)
    same[:k] = ((state["version"][:k] == covered["version"][:k]) & (state["start"][:k] == covered["start"][:k])
                & (state["size"][:k] == covered["size"][:k]))
    return np.flatnonzero(~same)


def read_covered(folder: str, meta: dict) -> dict | None:
    name = meta.get("covered")
    path = os.path.join(folder, name) if name else None
    if not path or not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k], np.int64) for k in ("version", "start", "size", "indexed")}
    except Exception:  # a damaged covered file (zipfile.BadZipFile, KeyError, ValueError): the index is rebuilt
        return None


def build_index(store, feature_set: str, *, kind: str = "auto", memory_mb: float | None = None,
                progress: bool = True, seed: int = 0, extend: bool = True,
                target_recall: float = DEFAULT_TARGET) -> dict:
    """Index the done, valid rows of `feature_set` (cosine) and save it under
    `<store>/indexes/<feature_set>/`; returns meta.json's record plus `path`, `seconds`, `mode`
    (built / extended / unchanged), `rows_added` and `notes`.  `extend` (default): add only the
    rows of blocks changed since the existing index was built (the module docstring's rules);
    False: build afresh (`featstore index --rebuild`).  An ivf / ivfpq index's nprobe is the
    smallest measured to reach `target_recall` (search_tune.py)."""
    import faiss

    t0 = time.perf_counter()
    store = open_store(store)
    fs = store.feature_set(feature_set)
    folder = index_dir(store, feature_set)
    if not os.access(store.path, os.W_OK):
        raise SearchIndexError(f"{store.path} is not writable here: the index is kept inside the store")
    notes: list[str] = []
    if extend and os.path.exists(os.path.join(folder, "meta.json")):
        out = _extend(store, fs, folder, kind, memory_mb, progress, notes)
        if out is not None and "rebuild_as" in out:
            kind = out["rebuild_as"]
        elif out is not None:
            return {**out, "path": folder, "notes": notes, "seconds": round(time.perf_counter() - t0, 3)}
    done = rows_done(fs)
    state = block_state(store, fs)
    blocks = list(_blocks(store, fs))
    n = int(sum(len(rows) for _, _, rows in blocks))
    if n == 0:
        raise SearchIndexError(f"feature set '{feature_set}' has no done, valid rows to index: run `featstore extract` first")
    dim = int(fs.array("pooled").shape[-1])
    params = choose(kind, n, dim, memory_mb)
    params["factory"] = factory_string(params)
    index = empty_index(params, dim)
    truth = None
    if params["kind"] != "flat":
        sample, sample_rows = _training_sample(store, fs, blocks, n, params["train_rows"], seed, progress)
        params["trained_on"] = train(index, sample)
        pick = np.random.default_rng(seed + 1).permutation(len(sample))[:CALIBRATION_QUERIES]
        truth = ExactTopK(sample[pick], sample_rows[pick])
        del sample
    indexed = np.zeros(store.n_blocks, np.int64)
    with progress_bar(n, f"index {feature_set}", progress) as bar:
        for b, start, rows in blocks:
            vectors = _read(fs, start, rows)
            index.add_with_ids(vectors, rows.astype(np.int64))
            if truth is not None:
                truth.update(vectors, rows)
            indexed[b] = len(rows)
            bar.update(len(rows))
    if truth is not None:
        params["calibration"] = tune_nprobe(index, truth, params["nlist"], target_recall)
        params["nprobe"] = params["calibration"]["nprobe"]
        if not params["calibration"]["reached"]:
            notes.append(f"no nprobe reached recall@10 {target_recall} on {len(truth.q)} of the store's rows (best "
                         f"{params['calibration']['recall']} at nprobe {params['nprobe']}): --kind ivf or flat for more")
    os.makedirs(folder, exist_ok=True)
    meta_path = os.path.join(folder, "meta.json")
    old = _meta_or_none(meta_path)
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the old commit goes first: never a meta.json beside another index
    meta = {
        "feature_set": feature_set, "identity": fs.identity, "dim": dim, "metric": "cosine (inner product of "
        "L2-normalized vectors)", "view": 0 if fs.views > 1 else None, "views": fs.views, **params,
        "trained_for_rows": n, "rows_indexed": n, "store_rows": store.n_rows, "rows_done": done,
        "store_id": store.meta.get("store_id"), "faiss_version": faiss.__version__, "built": now(),
    }
    meta = _commit(folder, index, {**state, "indexed": indexed}, meta, old)
    return {**meta, "path": folder, "mode": "built", "rows_added": n, "blocks_read": len(blocks), "notes": notes,
            "seconds": round(time.perf_counter() - t0, 3)}


def _meta_or_none(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _commit(folder: str, index, covered: dict, meta: dict, old: dict | None) -> dict:
    """Write the index (temp file, renamed), then its covered file (a new generation), then
    meta.json naming both (the commit); the previous covered file goes last."""
    import faiss

    tmp = os.path.join(folder, f"index.faiss.tmp-{os.getpid()}")
    faiss.write_index(index, tmp)
    os.replace(tmp, os.path.join(folder, "index.faiss"))
    generation = int((old or {}).get("generation", 0)) + 1
    name = f"covered-{generation}.npz"
    with open(os.path.join(folder, name + ".tmp"), "wb") as f:
        np.savez(f, **covered)
    os.replace(os.path.join(folder, name + ".tmp"), os.path.join(folder, name))
    meta = {**meta, "generation": generation, "covered": name,
            "index_bytes": os.path.getsize(os.path.join(folder, "index.faiss"))}
    meta_path = os.path.join(folder, "meta.json")
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(meta_path + ".tmp", meta_path)
    for f in os.listdir(folder):  # earlier generations' covered files, temp files of killed runs
        if (f.startswith("covered-") and f != name) or f.startswith("index.faiss.tmp-"):
            os.remove(os.path.join(folder, f))
    return meta


def _extend(store: Store, fs, folder: str, kind: str, memory_mb, progress: bool, notes: list) -> dict | None:
    """Add the rows of changed blocks to the existing index; None when it must be rebuilt (why in
    `notes`), {"rebuild_as": kind} when it must be retrained as the same kind."""
    import faiss

    meta = _meta_or_none(os.path.join(folder, "meta.json"))
    if meta is None:
        notes.append("the index's meta.json is unreadable: rebuilt")
        return None
    if meta.get("identity") != fs.identity:
        raise SearchIndexError(f"the index of '{fs.name}' was built for another identity of the feature set (it was "
                               f"recomputed since): rebuild it with `featstore index --store {store.path} "
                               f"--features {fs.name} --rebuild`")
    covered = read_covered(folder, meta)
    if covered is None:
        notes.append("the index's record of the row blocks it covers is missing or damaged (or it was built by an "
                     "older featstore): rebuilt")
        return None
    if kind not in ("auto", meta.get("kind")):
        notes.append(f"kind {kind} asked for, the index is {meta.get('kind')}: rebuilt")
        return None
    state = block_state(store, fs)
    changed = changed_blocks(state, covered)
    if not len(changed) and meta.get("store_rows") == store.n_rows:
        return {**meta, "mode": "unchanged", "rows_added": 0, "blocks_read": 0}
    index = faiss.read_index(os.path.join(folder, "index.faiss"))
    if int(index.ntotal) != int(meta.get("rows_indexed", -1)):
        notes.append(f"the index file holds {index.ntotal:,} rows, its meta.json says {meta.get('rows_indexed')}: "
                     "an extend was interrupted; rebuilt")
        return None
    old = changed[changed < len(covered["indexed"])]
    removed = int(covered["indexed"][old].sum())
    blocks = [(b, start, start + np.flatnonzero(mask)) for b in changed.tolist()
              for start in [store.block_range(b)[0]] for mask in [usable_in_block(store, [fs.name], b)]]
    n = int(meta["rows_indexed"]) - removed + sum(len(rows) for _, _, rows in blocks)
    trained = int(meta.get("trained_for_rows") or meta["rows_indexed"])
    if meta["kind"] != "flat" and n > OUTGROWN * trained:
        notes.append(f"{n:,} rows outgrew the {meta['kind']} parameters trained for {trained:,} "
                     f"(more than {OUTGROWN}x): rebuilt as {meta['kind']}")
        return {"rebuild_as": meta["kind"]}  # the kind is kept: retrained with parameters for the rows now
    if meta["kind"] == "flat" and kind == "auto" and choose("auto", n, int(meta["dim"]), memory_mb)["kind"] != "flat":
        notes.append(f"{n:,} rows: auto picks {choose('auto', n, int(meta['dim']), memory_mb)['kind']} now, not flat: rebuilt")
        return None
    if removed:
        ids = np.concatenate([np.arange(covered["start"][b], covered["start"][b] + covered["size"][b]) for b in old.tolist()])
        index.remove_ids(faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids.astype(np.int64))))
    indexed = np.zeros(store.n_blocks, np.int64)
    keep = min(store.n_blocks, len(covered["indexed"]))
    indexed[:keep] = covered["indexed"][:keep]
    added = 0
    with progress_bar(sum(len(rows) for _, _, rows in blocks), f"extend {fs.name}", progress) as bar:
        for b, start, rows in blocks:
            indexed[b] = len(rows)
            if len(rows):
                index.add_with_ids(_read(fs, start, rows), rows.astype(np.int64))
            added += len(rows)
            bar.update(len(rows))
    if int(index.ntotal) != n:
        raise SearchIndexError(f"extending the index of '{fs.name}' gave {index.ntotal:,} rows, not {n:,}: "
                               f"rebuild it with `featstore index --store {store.path} --features {fs.name} --rebuild`")
    new = {**meta, "views": fs.views, "rows_indexed": n, "store_rows": store.n_rows, "rows_done": rows_done(fs),
           "faiss_version": faiss.__version__, "extended": now()}
    new = _commit(folder, index, {**state, "indexed": indexed}, new, meta)
    return {**new, "mode": "extended", "rows_added": n - int(meta["rows_indexed"]), "rows_read": added,
            "blocks_read": len(blocks)}


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

