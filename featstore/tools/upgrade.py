"""`featstore upgrade`: convert a store of an older format to the current one in place, under the store lock.

Format 2 -> 3: samples/ arrays are re-sharded (one shard per SAMPLE_SHARD_MIN_ROWS rows, not
per row block) and the uid index (`featstore.core.uidindex`) is built from samples/uid; no row of
any array changes.  Format 1 -> 2 first, where needed:

What format 1 did not record is not invented:
- sources: one entry per path in the manifest record's registrations, type "auto" (detected
  when opened) and no options; rows map to them in registration order.  Rows are always matched
  to a source by uid, so a source whose options were different simply holds fewer of them.
- markers: each `<block>.json` becomes `<block>-1.json` naming its rows as done, computed from
  source "upgraded" (not recorded); a marker whose checksums no longer match its bytes is
  dropped, so its rows are to do again instead of served wrong.
- every array gets its dimension names.
"""

from __future__ import annotations

import uuid

import numpy as np

from featstore.core import format as fmt
from featstore.errors import ConfigError
from featstore.core.progress import Progress, upgrade_progress
from featstore.core.registration import BATCH_ROWS
from featstore.store import Store
from featstore.core.uidindex import COMPACT_FACTOR, UidIndex
from featstore.core.writes import block_checksums

_DIMS_BY_NAME = {"pooled": fmt.DIMS["pooled"], "valid": fmt.DIMS["valid"], "tokens": fmt.DIMS["tokens"],
                 "tokens_scale": fmt.DIMS["tokens_scale"], "tokens_channel_scale": fmt.DIMS["tokens_channel_scale"]}


def upgrade(path) -> dict:
    store = Store.open(path, mode="r+", allow_old=True)
    if store.format >= fmt.FORMAT_VERSION:
        raise ConfigError(f"{store.path} already has store format {store.format}: nothing to upgrade")
    out = {"from": store.format, "to": fmt.FORMAT_VERSION, "sources": len(store.sources), "markers": 0,
           "markers_dropped": 0, "arrays": 0}
    with store.lock():
        store = store.fresh()
        if store.format < 2:
            out.update(_to_format_2(store))
            store = store.fresh()
        out.update(_to_format_3(store))
    return out


def _to_format_2(store: Store) -> dict:
    old = store.format
    n = store.n_rows
    record = store.manifest_record()
    sources, ids = [], np.full(n, -1, dtype=np.int32)
    by_location: dict[str, int] = {}
    row = 0
    for reg in record.get("registrations", []):
        loc = str(reg.get("source", ""))
        if loc not in by_location:
            by_location[loc] = len(sources)
            sources.append({"id": len(sources), "type": "auto", "location": loc, "options": {},
                            "fingerprint": None, "registered_at": reg.get("at"), "rows": 0,
                            "upgraded_from_format": old})
        k = int(reg.get("registered", 0))
        sid = by_location[loc]
        ids[row:min(row + k, n)] = sid
        sources[sid]["rows"] += max(0, min(row + k, n) - row)
        row += k
    _set_samples_source(store, ids)
    arrays = _name_dimensions(store)
    converted, dropped = 0, 0
    for name in store.feature_set_names():
        c, d = _convert_markers(store, name)
        converted, dropped = converted + c, dropped + d
    meta = store.meta
    meta.update(format=2, sources=sources, store_id=meta.get("store_id") or uuid.uuid4().hex,
                generation=int(meta.get("generation", 0)) + 1)
    store.root.attrs["featstore"] = meta
    store.keep_consolidated()
    return {"sources": len(sources), "markers": converted, "markers_dropped": dropped, "arrays": arrays}


def _to_format_3(store: Store) -> dict:
    """samples/ arrays re-sharded to whole groups of row blocks (`fmt.sample_shard_rows`), and
    the uid index built from samples/uid, a batch of rows at a time (every row byte unchanged)."""
    resharded = sum(_reshard(store, field) for field in store.sample_fields())
    store.files.remove_tree(fmt.UID_INDEX)  # a partial index of an interrupted upgrade
    index = UidIndex.create(store.files)
    n = store.n_rows
    for a in range(0, n, BATCH_ROWS):
        b = min(n, a + BATCH_ROWS)
        index.add(index.hash(store.samples(fmt.UID, a, b)), np.arange(a, b))
    index.compact(COMPACT_FACTOR * max(1, n))
    index.commit(n)
    for name in store.feature_set_names():  # block pointers and blocks.npy (`featstore.core.progress`)
        upgrade_progress(store.files, name)
    meta = store.meta
    meta.update(format=3, generation=int(meta.get("generation", 0)) + 1)
    store.root.attrs["featstore"] = meta
    store.keep_consolidated()
    return {"resharded": resharded, "indexed": n}


def _reshard(store: Store, field: str) -> int:
    """Rewrite samples/<field> with the format-3 shards, through a complete copy beside it (a kill
    at any point leaves either the original or the finished copy, which a re-run resumes from)."""
    group = store.root[fmt.SAMPLES]
    tmp = f"_{field}_resharding"
    want = fmt.sample_shard_rows(store.rows_per_shard)
    if field in group and group[field].shards and group[field].shards[0] == want and tmp not in group:
        return 0
    if tmp in group and not group[tmp].attrs.get("complete"):
        del group[tmp]
    if tmp not in group:
        _copy(group[field], group, tmp, store.rows_per_shard, want).attrs["complete"] = True
    if field in group:
        del group[field]
    _copy(group[tmp], group, field, store.rows_per_shard, want)
    del group[tmp]
    return 1


def _copy(src, group, name: str, rows_per_shard: int, shard: int):
    is_str = src.dtype.kind not in "biuf"
    dst = group.create_array(name, shape=src.shape, dtype=str if is_str else src.dtype,
                             chunks=(fmt.sample_chunk_rows(rows_per_shard, is_str),), shards=(shard,),
                             fill_value=src.fill_value, dimension_names=fmt.DIMS["valid"],
                             attributes={k: v for k, v in src.attrs.items() if k != "complete"})
    for a in range(0, src.shape[0], shard):
        dst[a : a + shard] = src[a : a + shard]
    return dst


def _set_samples_source(store: Store, ids: np.ndarray) -> None:
    group = store.root[fmt.SAMPLES]
    if fmt.SOURCE in group:
        del group[fmt.SOURCE]
    r = store.rows_per_shard
    arr = group.create_array(fmt.SOURCE, shape=(len(ids),), dtype="int32", chunks=(fmt.chunk_rows(8, r),),
                             shards=(r,), fill_value=-1, dimension_names=fmt.DIMS["valid"])
    if len(ids):
        arr[:] = ids


def _name_dimensions(store: Store) -> int:
    """Add `dimension_names` to every array's zarr.json that lacks them."""
    count = 0
    paths = [f"{fmt.SAMPLES}/{k}" for k in store.sample_fields()]
    for name in store.feature_set_names():
        paths += [f"{fmt.FEATURES}/{name}/{k}" for k, _ in store.root[f"{fmt.FEATURES}/{name}"].arrays()]
    paths += [f"{fmt.PIXELS}/{k}" for k in store.pixels_names()]
    for path in paths:
        key = f"{path}/zarr.json"
        doc = store.files.read_json(key)
        if doc is None or doc.get("dimension_names"):
            continue
        base = path.rsplit("/", 1)[-1]
        if path.startswith(fmt.SAMPLES):
            dims = fmt.DIMS["valid"]
        elif path.startswith(fmt.PIXELS):
            dims = fmt.DIMS["pixels"]
        else:
            dims = _DIMS_BY_NAME.get(base)
        if dims is None or len(dims) != len(doc.get("shape", [])):
            continue
        doc["dimension_names"] = list(dims)
        store.files.write_json(key, doc)
        count += 1
    return count


def _convert_markers(store: Store, name: str) -> tuple[int, int]:
    store = store.fresh()
    progress = Progress(store.files, name)
    converted = dropped = 0
    for fname in store.files.list(progress.prefix):
        if not (fname.endswith(".json") and fname[:-5].isdigit()):
            continue
        block = int(fname[:-5])
        m = store.files.read_json(progress.key(block, 0))
        start, stop = m["rows"]
        ok = stop <= store.n_rows and block_checksums(store, name, block, (start, stop)) == m.get("checksums")
        if ok:
            marker = {**m, "format": fmt.FORMAT_VERSION, "done": [[start, stop]], "n_done": stop - start,
                      "sources": {"upgraded": [[start, stop]]}}
            marker.pop("version", None)
            store.files.write_json(progress.key(block, 1), {**marker, "version": 1})
            converted += 1
        else:
            dropped += 1
        store.files.remove(progress.key(block, 0))
    return converted, dropped
