"""Check a store against its own markers and the format's rules; list every problem found.

An unmarked block is not a problem (it is work not done yet: a re-run does it); a marker whose
checksums do not match the bytes, duplicate uids, NaN/inf in finished valid rows, or attrs
that break the format are.
"""

from __future__ import annotations

import numpy as np

from . import format as fmt
from .store import Store
from .writer import block_checksums


def verify(store: Store) -> dict:
    """Returns {"ok": bool, "problems": [...], "notes": [...], "checked_blocks": int}."""
    problems: list[str] = []
    notes: list[str] = []
    meta = store.meta
    n, r = store.n_rows, store.rows_per_shard
    if not isinstance(meta.get("rows_per_shard"), int) or r < 1:
        problems.append(f"attrs.featstore.rows_per_shard is {meta.get('rows_per_shard')!r}, not a positive int")
    for field in store.sample_fields():
        length = store.root[f"{fmt.SAMPLES}/{field}"].shape[0]
        if length < n:
            problems.append(f"samples/{field} has {length} rows but the store has {n}")
        elif length > n:
            notes.append(f"samples/{field} has {length - n} rows past n_rows (an interrupted registration; the next extract overwrites them)")
    uids = store.uids()
    if n:
        values, counts = np.unique(uids.astype(object).astype(str), return_counts=True)
        if (counts > 1).any():
            dup = values[counts > 1]
            problems.append(f"{len(dup)} uids appear more than once, e.g. {', '.join(map(str, dup[:3]))}")
        if (values == "").any():
            problems.append("some registered rows have an empty uid")

    checked = 0
    for name in store.feature_set_names():
        fs = store.feature_set(name)
        if not fs.identity:
            problems.append(f"features/{name} has no identity in its attrs")
        for path, arr in fs.arrays().items():
            if arr.shape[0] != n:
                problems.append(f"{path} has {arr.shape[0]} rows but the store has {n}")
        if fs.pixels_name and fs.pixels_name not in store.pixels_names():
            problems.append(f"features/{name} names pixels/{fs.pixels_name}, which does not exist")
        markers = fs.markers()
        done = fs.done_blocks(markers)
        stale = sorted(set(markers) - set(done))
        if stale:
            notes.append(f"features/{name}: {len(stale)} block(s) grew since they were written and will be recomputed")
        for b in done:
            m = markers[b]
            start, stop = store.block_range(b)
            actual = block_checksums(store, name, b)
            expected = m.get("checksums", {})
            for path in sorted(set(actual) | set(expected)):
                if actual.get(path) != expected.get(path):
                    problems.append(f"features/{name} block {b} (rows {start}-{stop}): {path} does not match its marker's checksum")
            valid = np.asarray(fs.array("valid")[start:stop])
            if int(valid.sum()) != m.get("n_valid"):
                problems.append(f"features/{name} block {b}: {int(valid.sum())} valid rows, marker says {m.get('n_valid')}")
            for key in ("pooled", "tokens"):
                if key in fs.group and fs.array(key).dtype.kind == "f":
                    x = np.asarray(fs.array(key)[start:stop])[valid]
                    if x.size and not np.isfinite(x).all():
                        problems.append(f"features/{name}/{key} block {b}: NaN or inf in valid rows")
            checked += 1
        missing = store.n_blocks - len(done)
        if missing:
            notes.append(f"features/{name}: {missing} of {store.n_blocks} blocks not written yet")
    for pname in store.pixels_names():
        owner = store.pixels(pname).attrs.get("feature_set")
        if owner not in store.feature_set_names():
            problems.append(f"pixels/{pname} belongs to feature set {owner!r}, which does not exist")
    return {"ok": not problems, "problems": problems, "notes": notes, "checked_blocks": checked}
