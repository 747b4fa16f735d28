"""Check a store against its own markers and the format's rules; list every problem found.

Rows still to do are not a problem (work not done yet: a re-run does it).  Problems: a marker
whose checksums do not match the bytes, or that names rows outside its block, failures outside
its done rows, sources the store does not record, or a uid that is not the row's; a row not
done that is marked valid; duplicate or empty uids; rows whose source is not recorded; an array
shorter than n_rows; NaN/inf in valid rows (features and int8 token scales, which must also be
positive); an int8 token layout that lacks its scale arrays; stored views without their view
axis, crops or flips (or a view 0 marked mirrored); attrs that break the format; an index entry
that disagrees with its marker file.
"""

from __future__ import annotations

import numpy as np

from featstore.core import format as fmt
from featstore.core.progress import done_ranges, mask_of
from featstore.store import Store
from featstore.core.strings import unique_counts
from featstore.core.writes import block_checksums


def verify(store: Store) -> dict:
    """Returns {"ok": bool, "problems": [...], "notes": [...], "checked_blocks": int}."""
    problems: list[str] = []
    notes: list[str] = []
    meta = store.meta
    n, r = store.n_rows, store.rows_per_shard
    if not isinstance(meta.get("rows_per_shard"), int) or r < 1:
        problems.append(f"attrs.featstore.rows_per_shard is {meta.get('rows_per_shard')!r}, not a positive int")
    if store.format < fmt.FORMAT_VERSION:
        notes.append(f"store format {store.format}: read-only here; `featstore upgrade --store {store.path}` converts it")
    _check_samples(store, problems, notes)
    checked = 0
    for name in store.feature_set_names():
        checked += _check_feature_set(store, name, problems, notes)
    for pname in store.pixels_names():
        owner = store.pixels(pname).attrs.get("feature_set")
        if owner not in store.feature_set_names():
            problems.append(f"pixels/{pname} belongs to feature set {owner!r}, which does not exist")
    _check_indexes(store, problems, notes)
    return {"ok": not problems, "problems": problems, "notes": notes, "checked_blocks": checked}


def _check_indexes(store: Store, problems: list, notes: list) -> None:
    """Each `indexes/<name>/meta.json`: readable, of an existing feature set with its identity, and
    covering no more rows than the store had then; stale (the store changed since) is a note."""
    from featstore.tools.inspect import index_metas

    for name, meta in index_metas(store).items():
        where = f"{fmt.INDEXES}/{name}"
        if isinstance(meta, str):
            problems.append(meta)
            continue
        if name not in store.feature_set_names():
            problems.append(f"{where} indexes feature set '{name}', which does not exist (`featstore rm` removes both)")
            continue
        fs = store.feature_set(name)
        if meta["identity"] != fs.identity:
            problems.append(f"{where} was built for another identity of '{name}': rebuild it with "
                            f"`featstore index --store {store.path} --features {name} --rebuild`")
        if not 0 <= meta["rows_indexed"] <= min(meta["store_rows"], meta["rows_done"]) or meta["store_rows"] > store.n_rows:
            problems.append(f"{where} covers {meta['rows_indexed']} rows of {meta['rows_done']} done of "
                            f"{meta['store_rows']} rows (the store has {store.n_rows:,}): more than there are")
            continue
        done = int(np.sum(fs.done_summary()[0]))
        if meta["store_rows"] != store.n_rows or meta["rows_done"] != done:
            notes.append(f"{where} is stale: built over {meta['store_rows']:,} rows ({meta['rows_done']:,} done), the "
                         f"store has {store.n_rows:,} ({done:,} done): `featstore index --store {store.path} "
                         f"--features {name}` extends it")


def _check_samples(store: Store, problems: list, notes: list) -> None:
    n = store.n_rows
    for field in store.sample_fields():
        length = store.root[f"{fmt.SAMPLES}/{field}"].shape[0]
        if length < n:
            problems.append(f"samples/{field} has {length} rows but the store has {n}")
        elif length > n:
            notes.append(f"samples/{field} has {length - n} rows past n_rows (an interrupted registration; "
                         "the next extract overwrites them)")
    if n and fmt.UID not in store.sample_fields():
        problems.append(f"the store has {n} rows but no samples/uid")
        return
    uids = store.uids()
    if n:
        values, counts = unique_counts(uids)  # not np.unique: see there
        if (counts > 1).any():
            dup = values[counts > 1]
            problems.append(f"{len(dup)} uids appear more than once, e.g. {', '.join(map(str, dup[:3]))}")
        if (uids == "").any():
            problems.append(f"{int((uids == '').sum())} registered rows have an empty uid")
        if store.format >= 3:
            _check_uid_index(store, uids, problems)
    sources = store.sources
    if store.format >= 2 and n:
        if fmt.SOURCE not in store.sample_fields():
            problems.append("samples/source is missing")
            return
        ids = np.asarray(store.samples(fmt.SOURCE), dtype=np.int64)
        known = {int(s["id"]) for s in sources}
        bad = ~np.isin(ids, list(known) + [-1])
        if bad.any():
            problems.append(f"{int(bad.sum())} rows name a source the store does not record, e.g. row {int(np.flatnonzero(bad)[0])}")
        for s in sources:
            have = int((ids == int(s["id"])).sum())
            if have != int(s.get("rows", have)):
                problems.append(f"source #{s['id']} ({s.get('location')}) registered {s.get('rows')} rows but "
                                f"{have} rows name it")
        if [int(s["id"]) for s in sources] != list(range(len(sources))):
            problems.append("attrs.featstore.sources ids are not 0..k-1 in order")
    record = store.manifest_record()
    registered_total = sum(int(x.get("registered", 0)) for x in record.get("registrations", []))
    if store.format >= 2 and registered_total > n:
        problems.append(f"the manifest record says {registered_total} rows were registered but the store has {n}")


def _layout_problem(fs) -> str | None:
    """The arrays the feature set's layout needs, with the right shapes and dimension names: an
    int8 token layout's scales (`featstore.tokens`), and with K stored views a view axis of K
    after `row` in every per-view array plus view_crops and view_flips (`featstore.core.format.dims`)."""
    k = fs.views
    per = (k,) if k > 1 else ()
    n = 0  # rows are checked against n_rows elsewhere; here only what one row holds
    need = {"pooled": (n,) + per + (int(fs.attrs.get("dim") or 0),)}
    tokens = fs.attrs.get("tokens")
    if tokens:
        t, d = (int(x) for x in tokens)
        need["tokens"] = (n,) + per + (t, d)
        if fs.token_scaling is not None:
            need["tokens_scale"] = (n,) + per + (t,)
            if fs.token_scaling == "token_channel":
                need["tokens_channel_scale"] = (n,) + per + (d,)
    if k > 1:
        need.update(view_crops=(n, k, len(fmt.BOX)), view_flips=(n, k))
    for key, shape in need.items():
        if key not in fs.group:
            what = (f"int8 tokens with {fs.token_scaling} scaling" if key.startswith("tokens_") else
                    f"{k} stored views" if key.startswith("view_") else "a layout")
            return f"features/{fs.name} has {what} but no '{key}' array"
        arr = fs.array(key)
        if not fs.attrs.get("dim") and key == "pooled":
            shape = shape[:-1] + tuple(arr.shape[-1:])
        if tuple(arr.shape[1:]) != shape[1:]:  # rows: the row-count check above
            return f"features/{fs.name}/{key} has rows of shape {tuple(arr.shape[1:])}, expected {shape[1:]}"
        dims = tuple(arr.metadata.dimension_names or ())
        if dims and dims != fmt.dims(key, k):
            return f"features/{fs.name}/{key} has dimensions {dims}, expected {fmt.dims(key, k)}"
    if k > 1 and fs.pixels_name and fs.pixels_name in fs.store.pixels_names():
        px = fs.store.pixels(fs.pixels_name)
        if tuple(px.shape[1:2]) != per:
            return f"pixels/{fs.pixels_name} has shape {tuple(px.shape)}: no view axis of {k} after row"
    return None


def _check_feature_set(store: Store, name: str, problems: list, notes: list) -> int:
    n = store.n_rows
    fs = store.feature_set(name)
    if not fs.identity:
        problems.append(f"features/{name} has no identity in its attrs")
    for path, arr in fs.arrays().items():
        if arr.shape[0] < n:
            problems.append(f"{path} has {arr.shape[0]} rows but the store has {n}")
        elif arr.shape[0] > n:
            notes.append(f"{path} has {arr.shape[0] - n} rows past n_rows (an interrupted registration)")
    layout = _layout_problem(fs)
    if layout:
        problems.append(layout)
        return 0
    if fs.pixels_name and fs.pixels_name not in store.pixels_names():
        problems.append(f"features/{name} names pixels/{fs.pixels_name}, which does not exist")
        return 0
    markers = fs.markers()
    index = (store.files.read_json(f"{fmt.PROGRESS}/{name}/{fmt.INDEX}") or {}).get("markers", {})
    known_sources = {str(s["id"]) for s in store.sources} | {"store", "upgraded"}
    uids = store.uids()
    valid_all = np.asarray(fs.array("valid")[:n]) if n else np.zeros(0, bool)
    checked = 0
    for b, m in sorted(markers.items()):
        where = f"features/{name} block {b}"
        start, stop = m["rows"]
        if start != b * store.rows_per_shard or stop > n or stop <= start or stop > start + store.rows_per_shard:
            problems.append(f"{where}: marker extent rows {start}-{stop} does not fit the block grid of {n} rows")
            continue
        done = mask_of(done_ranges(m), start, stop)
        outside = [x for x in done_ranges(m) if x[0] < start or x[1] > stop]
        if outside:
            problems.append(f"{where}: marker names rows {outside[0]} outside its extent {start}-{stop}")
        actual = block_checksums(store, name, b, (start, stop))
        expected = m.get("checksums", {})
        for path in sorted(set(actual) | set(expected)):
            if actual.get(path) != expected.get(path):
                problems.append(f"{where} (rows {start}-{stop}): {path} does not match its marker's checksum")
        valid = valid_all[start:stop]
        if (valid & ~done).any():
            problems.append(f"{where}: {int((valid & ~done).sum())} rows not done are marked valid")
        if int(valid[done].sum()) != m.get("n_valid"):
            problems.append(f"{where}: {int(valid[done].sum())} valid rows, marker says {m.get('n_valid')}")
        for f in m.get("failures", []):
            row = int(f["row"])
            if not (start <= row < stop) or not done[row - start]:
                problems.append(f"{where}: failure of row {row} is not a done row of the block")
                break
            if f.get("uid") is not None and str(uids[row]) != str(f["uid"]):
                problems.append(f"{where}: failure of row {row} names uid {f['uid']!r} but the row is {str(uids[row])!r}")
                break
        if "sources" in m:
            unknown = sorted(set(m["sources"]) - known_sources)
            if unknown:
                problems.append(f"{where}: marker names source(s) {', '.join(unknown)} the store does not record")
            covered = np.zeros(stop - start, bool)
            for ranges in m["sources"].values():
                covered |= mask_of(ranges, start, stop)
            if (covered != done).any():
                problems.append(f"{where}: the rows its sources computed are not the rows it names as done")
        cached = index.get(str(b))
        if cached is not None and cached.get("version") == m.get("version") and cached != m:
            problems.append(f"{where}: the progress index disagrees with marker version {m.get('version')}")
        for key in ("pooled", "tokens", "tokens_scale", "tokens_channel_scale", "view_crops"):
            if key in fs.group and fs.array(key).dtype.kind == "f":
                x = np.asarray(fs.array(key)[start:stop])[valid & done]
                if x.size and not np.isfinite(x).all():
                    problems.append(f"features/{name}/{key} block {b}: NaN or inf in valid rows")
                elif x.size and key.endswith("_scale") and not (x > 0).all():
                    problems.append(f"features/{name}/{key} block {b}: a scale <= 0 in valid rows")
                elif x.size and key == "view_crops" and not (x[..., 2:] > 0).all():
                    problems.append(f"features/{name}/view_crops block {b}: a view with no height or width in valid rows")
        if fs.views > 1 and np.asarray(fs.array("view_flips")[start:stop])[valid & done][:, :1].any():
            problems.append(f"features/{name}/view_flips block {b}: view 0 (the centre crop) is marked mirrored")
        checked += 1
    orphan = sorted(b for b in markers if b >= store.n_blocks)
    if orphan:
        problems.append(f"features/{name}: markers for blocks {orphan[:3]} past the store's {store.n_blocks} blocks")
    done_rows = int(fs.done_mask(markers).sum())
    if done_rows < n:
        notes.append(f"features/{name}: {n - done_rows:,} of {n:,} rows still to do")
    return checked


def _check_uid_index(store, uids, problems: list[str], batch: int = 1 << 20) -> None:
    """Every row is found at its own uid through the uid index (a batch of rows at a time)."""
    index = store.uid_index()
    if index is None:
        problems.append("the store is format 3 but has no uid index (_index/uid): run featstore upgrade")
        return
    lost = 0
    example = None
    for a in range(0, len(uids), batch):
        got = store.lookup_rows(uids[a : a + batch], index, store.n_rows)
        bad = np.flatnonzero(got != np.arange(a, a + len(got)))
        lost += len(bad)
        if len(bad) and example is None:
            example = int(a + bad[0])
    if lost:
        problems.append(f"the uid index does not lead to {lost} rows, e.g. row {example} ({str(uids[example])!r})")
