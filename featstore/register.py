"""Registration: a source's uids become rows, under the store lock, and its provenance is kept.

    read n_rows -> append new uids (first occurrence wins) -> fill metadata of known uids ->
    resize every feature array -> commit n_rows, sources and generation in attrs.featstore

Provenance: `attrs.featstore.sources[i]` = {id, type, location, options, fingerprint,
registered_at, rows}; `samples/source[row]` = the id of the source that registered the row.
A source given again with the same type, location and options keeps its id; when its
fingerprint changed, the entry is updated and the caller is told (rows are always matched to a
source by uid, so a changed source can never lend its bytes to another uid).

Metadata later: captions and labels a run brings for uids already in the store fill the empty
ones; a value that differs from a stored non-empty one is refused (naming the uid and both
values) unless `update_metadata`.  A caption that changes (filled or updated) sends the row back
to *to do* in every feature set computed from captions, so no text feature outlives its text.
"""

from __future__ import annotations

import numpy as np

from . import format as fmt
from .errors import MetadataConflict
from .featureset import jsonable
from .files import now


def register(store, uids, *, captions=None, labels=None, source_refs=None, label_names=None,
             source: dict | None = None, update_metadata: bool = False) -> dict:
    """Register `uids` (one source's manifest, in its order) into `store`; returns counts.

    `captions`/`labels` of None mean "this source brings none"; an empty caption ("" or None)
    or a label of -1/None means "none for this uid"."""
    store._require_writable()
    uids = _strings(uids, len(uids), "")
    n_in = len(uids)
    refs = _strings(source_refs, n_in, "")
    caps = None if captions is None else _strings(captions, n_in, "")
    labs = None if labels is None else np.array([-1 if x is None else int(x) for x in labels], dtype=np.int64)
    if labs is not None and len(labs) != n_in:
        raise ValueError(f"expected {n_in} labels, got {len(labs)}")
    _, first = np.unique(uids, return_index=True)
    keep = np.zeros(n_in, dtype=bool)
    keep[first] = True
    duplicates = [{"uid": str(uids[i]), "source_ref": str(refs[i])} for i in np.flatnonzero(~keep)]

    with store.lock():
        cur = store.fresh()
        sources, source_id, changed = _source_entry(cur.sources, source)
        rows = cur.rows_of(uids)
        known = np.flatnonzero(keep & (rows >= 0))
        new = np.flatnonzero(keep & (rows < 0))
        n = cur.n_rows
        plans, conflicts = {}, []
        if caps is not None and len(known):
            plans[fmt.CAPTION] = _plan(cur, fmt.CAPTION, rows[known], caps[known], uids[known], "", conflicts)
        if labs is not None and len(known):
            plans[fmt.LABEL] = _plan(cur, fmt.LABEL, rows[known], labs[known], uids[known], -1, conflicts)
        names_conflict = _label_names_conflict(cur, label_names) if labs is not None else None
        if (conflicts or names_conflict) and not update_metadata:
            what = names_conflict or conflicts[0][1]
            count = sum(c for c, _ in conflicts)
            more = f" ({count} values differ)" if count > 1 else ""
            raise MetadataConflict(f"{what}{more}: pass --update-metadata to replace the stored values")
        reset = {}
        if fmt.CAPTION in plans and len(plans[fmt.CAPTION][0]):
            reset = _reset_caption_features(cur, plans[fmt.CAPTION][0])
        for name, (prows, values, _, _) in plans.items():
            _write_rows(cur, name, prows, values)
        add = len(new)
        if add:
            values = {fmt.UID: uids[new], fmt.SOURCE_REF: refs[new], fmt.SOURCE: np.full(add, source_id, np.int32)}
            if caps is not None:
                values[fmt.CAPTION] = caps[new]
            if labs is not None:
                values[fmt.LABEL] = labs[new]
            _append(cur, n, values)
            _resize_features(cur, n + add)
        if labs is not None and label_names is not None:
            _ensure(cur, fmt.LABEL, n + add).attrs["names"] = [str(x) for x in label_names]
        if source_id >= 0:
            sources[source_id]["rows"] = int(sources[source_id].get("rows", 0)) + add
        meta = cur.meta
        meta.update(n_rows=n + add, sources=sources, generation=int(meta.get("generation", 0)) + 1)
        cur.root.attrs["featstore"] = meta  # the commit point
        result = {
            "registered": int(add), "already_present": int(len(known)), "duplicates": duplicates,
            "n_rows": n + add, "source_id": source_id, "fingerprint_changed": changed,
            "filled": {k: p[2] for k, p in plans.items()},
            "updated": {k: p[3] for k, p in plans.items()},
            "reset": reset,
        }
        if source is not None:
            cur.record_manifest(source.get("location") or "", result)
        cur.keep_consolidated()
    store.root = cur.root
    store._uid_index = None
    return result


# ---- provenance -----------------------------------------------------------------------------
def source_key(entry: dict) -> tuple:
    return (entry.get("type"), entry.get("location"), repr(jsonable(entry.get("options") or {})))


def _source_entry(sources: list[dict], source: dict | None) -> tuple[list[dict], int, bool]:
    """(the sources list after this registration, this source's id, whether its fingerprint changed)."""
    if source is None:
        return sources, -1, False
    key = source_key(source)
    for entry in sources:
        if source_key(entry) == key:
            changed = entry.get("fingerprint") != source.get("fingerprint")
            if changed:
                entry["fingerprint"] = source.get("fingerprint")
                entry["changed_at"] = now()
            return sources, int(entry["id"]), changed
    entry = {"id": len(sources), "type": source.get("type"), "location": source.get("location"),
             "options": jsonable(source.get("options") or {}), "fingerprint": source.get("fingerprint"),
             "registered_at": now(), "rows": 0}
    return sources + [entry], entry["id"], False


# ---- metadata of known rows -------------------------------------------------------------------
def _plan(store, field: str, rows, values, uids, empty, conflicts: list):
    """(rows to write, their values, n filled, n updated) for one field of already-known rows."""
    given = values != empty
    rows, values, uids = rows[given], values[given], uids[given]
    if field in store.sample_fields() and store.n_rows:
        stored = np.asarray(store.root[f"{fmt.SAMPLES}/{field}"][: store.n_rows])[rows]
        stored = stored.astype(object) if field == fmt.CAPTION else stored
    else:
        stored = np.full(len(rows), empty, dtype=object)
    values_cmp = values.astype(object) if field == fmt.CAPTION else values
    same = stored == values_cmp
    filled = stored == empty
    differ = ~same & ~filled
    if differ.any():
        i = int(np.flatnonzero(differ)[0])
        show = (lambda v: repr(str(v))) if field == fmt.CAPTION else (lambda v: str(int(v)))
        conflicts.append((int(differ.sum()), f"uid {str(uids[i])!r}: {field} {show(stored[i])} in the store vs "
                                             f"{show(values[i])} now"))
    take = ~same
    return rows[take], values[take], int((filled & take).sum()), int(differ.sum())




def _label_names_conflict(store, names) -> str | None:
    if names is None or fmt.LABEL not in store.sample_fields():
        return None
    stored = store.root[f"{fmt.SAMPLES}/{fmt.LABEL}"].attrs.get("names")
    if stored is not None and [str(x) for x in stored] != [str(x) for x in names]:
        return f"label names {list(stored)[:5]}... in the store vs {list(names)[:5]}... now"
    return None


def _reset_caption_features(store, rows: np.ndarray) -> dict[str, int]:
    """Send `rows` back to to-do in every feature set computed from captions."""
    from .writer import reset_rows

    out = {}
    for name in store.feature_set_names():
        fs = store.feature_set(name)
        if fs.field != "caption":
            continue
        blocks = np.asarray(rows) // store.rows_per_shard
        total = 0
        for b in np.unique(blocks):
            total += reset_rows(store, name, int(b), np.asarray(rows)[blocks == b])
        if total:
            out[name] = total
    return out


# ---- arrays ------------------------------------------------------------------------------------
def _ensure(store, field: str, length: int):
    """samples/<field>, created (fill: "" or -1) if missing; at least `length` long."""
    group = store.root[fmt.SAMPLES]
    r = store.rows_per_shard
    if field in group:
        arr = group[field]
    else:
        is_str = field in fmt.STR_FIELDS
        dtype = str if is_str else ("int32" if field == fmt.SOURCE else "int64")
        arr = group.create_array(
            field, shape=(length,), dtype=dtype, chunks=(fmt.chunk_rows(64 if is_str else 8, r),), shards=(r,),
            fill_value="" if is_str else -1, dimension_names=fmt.DIMS["valid"],
        )
    if arr.shape[0] < length:
        arr.resize((length,))
    return arr


def _write_rows(store, field: str, rows: np.ndarray, values: np.ndarray) -> None:
    """Set samples/<field>[rows] = values, one row block at a time."""
    if not len(rows):
        return
    arr = _ensure(store, field, store.n_rows)
    blocks = rows // store.rows_per_shard
    for b in np.unique(blocks):
        start, stop = store.block_range(int(b))
        sel = blocks == b
        data = np.asarray(arr[start:stop])
        data = data.astype(object) if field == fmt.CAPTION else data
        data[rows[sel] - start] = values[sel]
        arr[start:stop] = data


def _append(store, start: int, values: dict) -> None:
    stop = start + len(values[fmt.UID])
    for field, data in values.items():
        arr = _ensure(store, field, start)
        arr.resize((stop,))
        arr[start:stop] = data
    for field in store.sample_fields():
        arr = store.root[f"{fmt.SAMPLES}/{field}"]
        if field not in values:  # a field this registration did not bring: keep arrays aligned
            arr.resize((stop,))
            fill = arr.fill_value
            arr[start:stop] = np.full(stop - start, fill, dtype=object if arr.dtype.kind not in "iub" else arr.dtype)


def _resize_features(store, n: int) -> None:
    for fs_name in store.feature_set_names():
        for _, arr in store.root[f"{fmt.FEATURES}/{fs_name}"].arrays():
            arr.resize((n,) + arr.shape[1:])
    if fmt.PIXELS in store.root:
        for _, arr in store.root[fmt.PIXELS].arrays():
            arr.resize((n,) + arr.shape[1:])


def _strings(values, n: int, fill: str) -> np.ndarray:
    if values is None:
        return np.full(n, fill, dtype=object).astype(str)
    out = np.array(["" if v is None else str(v) for v in values], dtype=object).astype(str)
    if len(out) != n:
        raise ValueError(f"expected {n} values, got {len(out)}")
    return out
