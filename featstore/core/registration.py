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

from featstore.core import format as fmt
from featstore.errors import FormatTooOld, MetadataConflict
from featstore.core.files import now
from featstore.core.identity import jsonable
from featstore.core.uidindex import COMPACT_FACTOR, UidIndex


BATCH_ROWS = 1 << 20  # uids looked up, appended and indexed at a time: memory follows the batch


def register(store, uids, *, captions=None, labels=None, source_refs=None, label_names=None,
             source: dict | None = None, update_metadata: bool = False, batch_rows: int = BATCH_ROWS) -> dict:
    """Register `uids` (one source's manifest, in its order) into `store`; returns counts.

    `captions`/`labels` of None mean "this source brings none"; an empty caption ("" or None)
    or a label of -1/None means "none for this uid".  The uids go through in batches of
    `batch_rows`: each batch is looked up in the uid index (with the runs of earlier batches),
    its new uids appended and indexed; everything commits together at the end (index, then
    n_rows), so a kill at any point registers nothing twice and loses nothing committed."""
    store.require_writable()
    n_in = len(uids)
    for name, values in (("source_refs", source_refs), ("captions", captions), ("labels", labels)):
        if values is not None and len(values) != n_in:
            raise ValueError(f"expected {n_in} {name}, got {len(values)}")
    with store.lock():
        cur = store.fresh()
        index = _index_for_write(cur)
        sources, source_id, changed = _source_entry(cur.sources, source)
        n0 = n = cur.n_rows
        plans: dict[str, list] = {}
        conflicts, duplicates = [], []
        names_conflict = _label_names_conflict(cur, label_names) if labels is not None else None
        known_total = 0
        for a in range(0, n_in, max(1, int(batch_rows))):
            b = min(n_in, a + max(1, int(batch_rows)))
            u = _strings(uids[a:b], b - a, "")
            refs = _strings(None if source_refs is None else source_refs[a:b], b - a, "")
            caps = None if captions is None else _strings(captions[a:b], b - a, "")
            labs = None if labels is None else _ints(labels[a:b])
            h = index.hash(u)
            keep = first_of_each(u, h)
            rows = cur.lookup_rows(u, index, n, hashes=h)
            again = keep & (rows >= n0)  # a uid this same call registered in an earlier batch
            keep &= ~again
            duplicates += [{"uid": str(u[i]), "source_ref": str(refs[i])} for i in np.flatnonzero(~keep)]
            known = np.flatnonzero(keep & (rows >= 0))
            new = np.flatnonzero(keep & (rows < 0))
            known_total += len(known)
            if caps is not None and len(known):
                plans.setdefault(fmt.CAPTION, []).append(
                    _plan(cur, fmt.CAPTION, rows[known], caps[known], u[known], "", conflicts))
            if labs is not None and len(known):
                plans.setdefault(fmt.LABEL, []).append(
                    _plan(cur, fmt.LABEL, rows[known], labs[known], u[known], -1, conflicts))
            if (conflicts or names_conflict) and not update_metadata:
                break  # refused below; nothing committed
            if len(new):
                values = {fmt.UID: u[new], fmt.SOURCE_REF: refs[new], fmt.SOURCE: np.full(len(new), source_id, np.int32)}
                if caps is not None:
                    values[fmt.CAPTION] = caps[new]
                if labs is not None:
                    values[fmt.LABEL] = labs[new]
                _append(cur, n, values)
                index.add(h[new], np.arange(n, n + len(new)))
                n += len(new)
        if (conflicts or names_conflict) and not update_metadata:
            what = names_conflict or conflicts[0][1]
            count = sum(c for c, _ in conflicts)
            more = f" ({count} values differ)" if count > 1 else ""
            raise MetadataConflict(f"{what}{more}: pass --update-metadata to replace the stored values")
        merged = {k: _concat_plans(v) for k, v in plans.items()}
        reset = {}
        if fmt.CAPTION in merged and len(merged[fmt.CAPTION][0]):
            reset = _reset_caption_features(cur, merged[fmt.CAPTION][0])
        for name, (prows, values, _, _) in merged.items():
            _write_rows(cur, name, prows, values)
        add = n - n0
        if add:
            _resize_features(cur, n)
        if labels is not None and label_names is not None:
            _ensure(cur, fmt.LABEL, n).attrs["names"] = [str(x) for x in label_names]
        index.compact(COMPACT_FACTOR * max(1, add))
        index.commit(n)  # the index first: entries past n_rows are ignored until n_rows commits
        if source_id >= 0:
            sources[source_id]["rows"] = int(sources[source_id].get("rows", 0)) + add
        meta = cur.meta
        generation = int(meta.get("generation", 0)) + 1
        meta.update(n_rows=n, sources=sources, generation=generation)
        cur.root.attrs["featstore"] = meta  # the commit point
        result = {
            "registered": int(add), "already_present": int(known_total), "duplicates": duplicates,
            "n_rows": n, "source_id": source_id, "fingerprint_changed": changed,
            "filled": {k: p[2] for k, p in merged.items()},
            "updated": {k: p[3] for k, p in merged.items()},
            "reset": reset,
        }
        if source is not None:
            cur.record_manifest(source.get("location") or "", result, generation)
        cur.keep_consolidated()
    store.root = cur.root
    return result


def first_of_each(uids: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Mask of each uid's first occurrence.  Only uids whose hash another uid shares (duplicates,
    and the rare collision) have their strings compared: sorting a million strings costs 1.5 s,
    sorting their hashes 0.1 s."""
    keep = np.ones(len(uids), dtype=bool)
    order = np.argsort(hashes, kind="stable")
    hs = hashes[order]
    same = np.flatnonzero(hs[1:] == hs[:-1])
    if len(same):
        members = np.sort(order[np.unique(np.r_[same, same + 1])])  # every uid of a shared hash
        _, first = np.unique(uids[members], return_index=True)  # first: the earliest of each string
        keep[members] = False
        keep[members[first]] = True
    return keep


def _index_for_write(store) -> UidIndex:
    """The store's uid index, holding every registered row: rows registered but not yet indexed
    (a store upgraded from format 2, mid-way) are indexed first, a block of rows at a time."""
    index = store.uid_index()
    if index is None:
        raise FormatTooOld(f"{store.path} has no uid index: convert it once with `featstore upgrade --store {store.path}`")
    step = BATCH_ROWS
    for a in range(index.rows, store.n_rows, step):
        b = min(store.n_rows, a + step)
        index.add(index.hash(store.samples(fmt.UID, a, b)), np.arange(a, b))
    return index


def _concat_plans(parts: list) -> tuple:
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            sum(p[2] for p in parts), sum(p[3] for p in parts))


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
    if field in store.sample_fields() and store.n_rows and len(rows):
        wanted, inverse = np.unique(rows, return_inverse=True)  # only these rows' chunks are read
        stored = np.asarray(store.root[f"{fmt.SAMPLES}/{field}"].get_coordinate_selection(wanted))[inverse]
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
    from featstore.core.writes import reset_rows

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
            field, shape=(length,), dtype=dtype, chunks=(fmt.sample_chunk_rows(r, is_str),),
            shards=(fmt.sample_shard_rows(r),),
            fill_value="" if is_str else -1, dimension_names=fmt.DIMS["valid"],
        )
    if arr.shape[0] < length:
        arr.resize((length,))
    return arr


def _write_rows(store, field: str, rows: np.ndarray, values: np.ndarray) -> None:
    """Set samples/<field>[rows] = values (only the chunks holding those rows are rewritten)."""
    if not len(rows):
        return
    arr = _ensure(store, field, store.n_rows)
    order = np.argsort(rows, kind="stable")
    arr.set_coordinate_selection(np.asarray(rows)[order], np.asarray(values)[order])


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
    """`values` as a numpy string array (StringDType), None as ""; numpy strings stay as they are."""
    if values is None:
        return np.full(n, fill, dtype=np.dtypes.StringDType())
    arr = values if isinstance(values, np.ndarray) and values.dtype.kind in "TU" else None
    if arr is None:
        arr = np.array(["" if v is None else str(v) for v in values], dtype=np.dtypes.StringDType())
    elif arr.dtype.kind == "U":
        arr = arr.astype(np.dtypes.StringDType())
    if len(arr) != n:
        raise ValueError(f"expected {n} values, got {len(arr)}")
    return arr


def _ints(values) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        return values.astype(np.int64)
    return np.array([-1 if x is None else int(x) for x in values], dtype=np.int64)
