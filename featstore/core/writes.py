"""Write rows of one row block of one feature set: every array's shard whole, then the block's marker.

This is the only place feature bytes enter the store.  Under the block's lock:

    re-open the store (n_rows and shapes as they are now) -> read the block's newest marker ->
    read back the rows it names as done -> place the new rows beside them -> write every array
    over the block's whole extent -> write marker version + 1 (done = old done + new rows)

The view under the lock is re-opened only when the store's committed layout changed (`_view`:
one read of zarr.json otherwise), and shards are written whole without reading the old ones
back (`_ShardsReplacedWhole`), so a block write on object storage costs its own requests: the
lock, zarr.json, the pointer and marker, one PUT per shard, the new marker and pointer.

So a block that gained rows, or gets rows from a second source, is rewritten with its done rows
copied byte for byte: growth never changes a computed row.  Rows a writer brings that are
already done are left as they are (two runs of one feature set lose nothing and never write a
row twice).  A kill before the marker leaves the old marker, still true for the rows it names
(zarr writes each shard file atomically: temp file + rename); a re-run computes the rest.
The marker's checksums over the extent let `verify` prove every byte.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import weakref

import numpy as np
import zarr
from zarr.storage import StorePath, WrapperStore

from featstore.core import format as fmt
from featstore.core.files import now, owner
from featstore.core.progress import done_ranges, mask_of, ranges_of
from featstore.tokens import merge_fidelity


def checksum(data: np.ndarray) -> str:
    """sha256 of an array's stored bytes (C order) plus its dtype and shape."""
    data = np.ascontiguousarray(data)
    h = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    h.update(data.view(np.uint8).reshape(-1) if data.size else b"")
    return h.hexdigest()


def block_checksums(store, name: str, block: int, extent: tuple[int, int] | None = None) -> dict[str, str]:
    """Checksums of what the store holds now for rows `extent` (default: the block) of a feature set."""
    start, stop = extent or store.block_range(block)
    return {path: checksum(np.asarray(arr[start:stop])) for path, arr in store.feature_set(name).arrays().items()}


def write_block(store, name: str, block: int, columns: dict[str, np.ndarray], valid: np.ndarray,
                failures: list[dict] | None = None, stats: dict | None = None, *, source: int | None = None,
                int8_fidelity: dict | None = None) -> dict:
    """Write every row of block `block` (as `store` sees the block now); see `write_rows`."""
    start, stop = store.block_range(block)
    return write_rows(store, name, block, np.arange(start, stop), columns, valid, failures, stats, source=source,
                      int8_fidelity=int8_fidelity)


def write_rows(store, name: str, block: int, rows, columns: dict[str, np.ndarray], valid: np.ndarray,
               failures: list[dict] | None = None, stats: dict | None = None, *, source: int | None = None,
               int8_fidelity: dict | None = None) -> dict:
    """Write `rows` (absolute, inside block `block`) of feature set `name`, then the block's marker.

    `columns` maps "pooled", "tokens" (+ "tokens_scale", "tokens_channel_scale" for int8
    tokens: `featstore.tokens.encode_tokens`) and "pixels" (if the feature set has pixels) to
    arrays with one entry per row of `rows`; rows where `valid` is false are zeroed
    so their bytes are deterministic.  `failures` are dicts with at least `row` (absolute) and
    `reason`; `source` is the id of the source the rows were computed from (None: from the
    store itself, e.g. its captions); `stats` go into the marker's `last_write`.  Returns the
    marker now in force; its `last_write` says what this call added (0 rows when every row was
    already done).  `int8_fidelity` (int8 tokens: mean/worst token cosine of the rows given) goes
    into `last_write`, and merged with the block's earlier writes into the marker's `int8_fidelity`.
    """
    rows = np.asarray(rows, dtype=np.int64)
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != rows.shape:
        raise ValueError(f"block {block}: {len(rows)} rows but valid has shape {valid.shape}")
    _, fs0, arrays0, _ = _view(store, name, check=False)
    expected = list(arrays0)
    given = {_path(fs0, k): np.asarray(v) for k, v in columns.items()}
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise ValueError(f"feature set '{name}' has no '{unknown[0].rsplit('/', 1)[-1]}' array")
    missing = sorted(set(expected) - set(given) - {f"{fmt.FEATURES}/{name}/valid"})
    if missing:
        raise ValueError(f"block {block} of '{name}' is missing arrays: {', '.join(missing)}")
    for path, value in given.items():
        tail = arrays0[path].shape[1:]
        if value.shape != (len(rows),) + tail:
            raise ValueError(f"{path}: expected shape {(len(rows),) + tail}, got {value.shape}")
    failures = list(failures or [])

    with store.block_lock(name, block):
        cur, fs, arrays, writers = _view(store, name, check=True)
        start, stop = cur.block_range(block)
        if len(rows) and (rows.min() < start or rows.max() >= stop):
            raise ValueError(f"rows {rows.min()}..{rows.max()} are not all in block {block} (rows {start}-{stop})")
        old = fs.progress.latest(block)
        done = mask_of(done_ranges(old), start, stop) if old else np.zeros(stop - start, bool)
        local = rows - start
        take = ~done[local]
        if not take.any():
            return {**(old or {}), "last_write": {"rows": 0, "valid": 0, "failures": {}, "at": now()}}
        new = np.zeros(stop - start, bool)
        new[local[take]] = True
        ok = valid[take]
        data = _read_back(arrays, start, stop, done)
        vpath = f"{fmt.FEATURES}/{name}/valid"
        data[vpath][local[take]] = ok
        for path, value in given.items():
            v = value[take].astype(data[path].dtype, copy=True)
            v[~ok] = 0
            data[path][local[take]] = v
        for path, value in data.items():
            writers[path][start:stop] = value  # the block's whole extent: one shard, written whole

        taken_rows = set(rows[take].tolist())
        added_failures = sorted((f for f in failures if f["row"] in taken_rows), key=lambda f: f["row"])
        if added_failures:
            uids = cur.samples(fmt.UID, start, stop)
            for f in added_failures:
                f.setdefault("uid", str(uids[f["row"] - start]))
        kept_failures = [f for f in (old or {}).get("failures", []) if done[f["row"] - start]] if old else []
        all_done = done | new
        sources = {k: list(v) for k, v in ((old or {}).get("sources") or {}).items()}
        key = "store" if source is None else str(int(source))
        sources[key] = _merge(sources.get(key, []), ranges_of(new, start))
        valid_all = data[vpath]
        marker = {
            "format": fmt.FORMAT_VERSION,
            "block": int(block),
            "rows": [int(start), int(stop)],
            "done": ranges_of(all_done, start),
            "n_done": int(all_done.sum()),
            "n_valid": int(valid_all[all_done].sum()),
            "n_invalid": int(all_done.sum() - valid_all[all_done].sum()),
            "sources": sources,
            "failures": sorted(kept_failures + added_failures, key=lambda f: f["row"]),
            "checksums": {path: checksum(value) for path, value in sorted(data.items())},
            "written_at": now(),
            "host": owner(),
            "last_write": {
                "rows": int(take.sum()), "valid": int(ok.sum()),
                "failures": dict(collections.Counter(f["reason"] for f in added_failures).most_common()),
                "source": None if source is None else int(source), "at": now(), **(stats or {}),
            },
        }
        if int8_fidelity is not None or (old or {}).get("int8_fidelity"):
            marker["int8_fidelity"] = merge_fidelity((old or {}).get("int8_fidelity"), int8_fidelity)
            if int8_fidelity is not None:
                marker["last_write"]["int8_fidelity"] = int8_fidelity
        return fs.progress.write(block, marker, old)


def reset_rows(store, name: str, block: int, rows) -> int:
    """Send `rows` of block `block` back to to-do (their bytes zeroed, the marker rewritten).
    Used when a row's input changed (a caption filled later).  Returns how many were done."""
    with store.block_lock(name, block):
        cur, fs, arrays, writers = _view(store, name, check=True)
        start, stop = cur.block_range(block)
        old = fs.progress.latest(block)
        if old is None:
            return 0
        done = mask_of(done_ranges(old), start, stop)
        local = np.asarray(rows, dtype=np.int64) - start
        local = local[(local >= 0) & (local < stop - start)]
        hit = local[done[local]]
        if not len(hit):
            return 0
        done[hit] = False
        data = _read_back(arrays, start, stop, done)
        for path, value in data.items():
            writers[path][start:stop] = value
        vpath = f"{fmt.FEATURES}/{name}/valid"
        sources = {k: ranges_of(mask_of(v, start, stop) & done, start) for k, v in (old.get("sources") or {}).items()}
        marker = {
            **old,
            "rows": [int(start), int(stop)],
            "done": ranges_of(done, start),
            "n_done": int(done.sum()),
            "n_valid": int(data[vpath][done].sum()),
            "n_invalid": int(done.sum() - data[vpath][done].sum()),
            "sources": {k: v for k, v in sources.items() if v},
            "failures": [f for f in old.get("failures", []) if start <= f["row"] < stop and done[f["row"] - start]],
            "checksums": {path: checksum(value) for path, value in sorted(data.items())},
            "written_at": now(),
            "host": owner(),
            "last_write": {"rows": 0, "reset": int(len(hit)), "at": now()},
        }
        fs.progress.write(block, marker, old)
        return int(len(hit))


def _read_back(arrays: dict, start: int, stop: int, done: np.ndarray) -> dict[str, np.ndarray]:
    """Every array of the feature set over [start, stop): the done rows as stored, the rest zero."""
    out = {}
    for path, arr in arrays.items():
        shape = (stop - start,) + arr.shape[1:]
        if done.any():
            value = np.array(arr[start:stop], copy=True)
            value[~done] = 0
        else:
            value = np.zeros(shape, dtype=arr.dtype)
        out[path] = value
    return out


_VIEWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # store -> {(thread, name): view}


def _view(store, name: str, *, check: bool):
    """(store view, feature set, its arrays, their whole-shard writers) for writing feature set
    `name`, kept per store and writer thread.  `check` (under the block lock): first read the committed identity from
    zarr.json (store id, generation, n_rows: every registration and every feature-set removal
    changes it) and re-open when it is not the view's.  Arrays are resized before a registration
    commits, so a kept view's arrays always span its n_rows, as a fresh open's do."""
    kept = _VIEWS.setdefault(store, {})
    key = (threading.get_ident(), name)
    got = kept.get(key)
    if got is not None and check and got[0] != store.committed_identity():
        got = None
    if got is None:
        cur = store.fresh()
        fs = cur.feature_set(name)
        arrays = fs.arrays()
        writers = {path: _whole_shard_writer(arr, cur.rows_per_shard) for path, arr in arrays.items()}
        got = kept[key] = (cur.identity, cur, fs, arrays, writers)
    return got[1:]


class _ShardsReplacedWhole(WrapperStore):
    """A store on which every shard reads as absent, for writing shards that are replaced whole.

    zarr reads a shard back before it writes any part of it, even a write that covers it whole:
    a GET of bytes about to be overwritten (and, for a new shard on S3, a HEAD and a listing).
    A block write covers each of its shards whole (one shard per row block, every column;
    `_read_back` has read the done rows already), so that read is only cost.  Never read
    through this store: it would return fill values."""

    async def get(self, key, prototype, byte_range=None):
        return None

    async def get_partial_values(self, prototype, key_ranges):
        return [None for _ in key_ranges]


def _whole_shard_writer(arr: zarr.Array, rows_per_shard: int) -> zarr.Array:
    """`arr` for writing whole row blocks without zarr's read-back (`_ShardsReplacedWhole`);
    `arr` itself where a shard is not exactly one row block of every column."""
    if arr.shards is None or arr.shards != (rows_per_shard,) + tuple(arr.shape[1:]):
        return arr
    a = arr._async_array
    path = StorePath(_ShardsReplacedWhole(a.store_path.store), a.store_path.path)
    return zarr.Array(zarr.AsyncArray(a.metadata, path, a.config))


def _path(fs, key: str) -> str:
    return f"{fmt.PIXELS}/{fs.pixels_name}" if key == "pixels" else f"{fmt.FEATURES}/{fs.name}/{key}"


def _merge(a: list, b: list) -> list[list[int]]:
    ranges = sorted([list(x) for x in a] + [list(x) for x in b])
    out: list[list[int]] = []
    for lo, hi in ranges:
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out
