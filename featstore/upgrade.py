"""`featstore upgrade`: convert a format-1 store to format 2 in place, under the store lock.

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

from . import format as fmt
from .errors import ConfigError
from .progress import Progress
from .store import Store
from .writer import block_checksums

_DIMS_BY_NAME = {"pooled": fmt.DIMS["pooled"], "valid": fmt.DIMS["valid"], "tokens": fmt.DIMS["tokens"],
                 "tokens_scale": fmt.DIMS["tokens_scale"], "tokens_channel_scale": fmt.DIMS["tokens_channel_scale"]}


def upgrade(path) -> dict:
    store = Store.open(path, mode="r+", allow_old=True)
    if store.format >= fmt.FORMAT_VERSION:
        raise ConfigError(f"{store.path} already has store format {store.format}: nothing to upgrade")
    with store.lock():
        store = store.fresh()
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
        meta.update(format=fmt.FORMAT_VERSION, sources=sources, store_id=meta.get("store_id") or uuid.uuid4().hex,
                    generation=int(meta.get("generation", 0)) + 1)
        store.root.attrs["featstore"] = meta
        store.keep_consolidated()
    return {"from": old, "to": fmt.FORMAT_VERSION, "sources": len(sources), "markers": converted,
            "markers_dropped": dropped, "arrays": arrays}


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
