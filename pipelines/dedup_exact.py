"""Exact duplicates for `featstore dedup`: a content hash per row, grouped by sorting (no dicts over rows).

Steps and their costs (n rows, B = store.rows_per_shard, P buckets):

1. hash   per row block: samples/source and samples/source_ref of the block (O(B)), each recorded
          source re-opened once (`open_source` from `attrs.featstore.sources`, as extract's
          `plan.from_recorded` does), the block's refs read through `read_images` and hashed with
          blake2b-128 of the raw encoded bytes (no decoding).  O(bytes of the images) time, O(B)
          memory.  The 128-bit hash is kept as two uint64 (`hi` the prefix, `lo` the rest) and
          appended with the row to one of P bucket files by the top bits of `hi`
          (24 bytes/row on disk, beside the record, deleted at the end).
2. group  per bucket: its (hi, lo, row) read back and `np.lexsort`ed (O(n/P log) time, 24 n/P bytes of
          memory: P is the smallest power of two that keeps one bucket within the memory budget).
          Runs of equal (hi, lo) -- the prefix and then the full hash -- are one group; its
          representative is its lowest row.  Yields (duplicate rows, their representative).

Rows that have no recorded source (registered without one) or whose bytes cannot be read
(`BadSample`) get no hash and stay unique; they are counted.  A recorded source that cannot be
opened is refused (one line: give it back at its location); stored pixels are never hashed
instead (they are a crop of the image, not its content; a store without its sources gets
`--no-exact`).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from featstore.core import format as fmt
from featstore.errors import BadSample, FeatstoreError, SourceError
from featstore.store import Store

from .sources import open_source

ROW_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("row", "<i8")])


def n_buckets(n_rows: int, memory_bytes: int) -> int:
    """The smallest power of two P whose buckets (24 bytes/row, x3 while sorting) fit the budget."""
    want = max(1, -(-(3 * ROW_DTYPE.itemsize * max(n_rows, 1)) // max(memory_bytes, 1)))
    return 1 << int(np.ceil(np.log2(want)))


def digest(data: bytes) -> tuple[int, int]:
    """blake2b-128 of `data` as (hi, lo) uint64 values."""
    h = hashlib.blake2b(data, digest_size=16).digest()
    return int.from_bytes(h[:8], "big"), int.from_bytes(h[8:], "big")


class _Sources:
    """The store's recorded sources, each opened on first use (a gone one is refused, one line)."""

    def __init__(self, store: Store):
        self.entries = {int(s["id"]): s for s in store.sources}
        self.opened: dict[int, object] = {}
        self.changed: list[int] = []  # sources whose fingerprint differs from the registered one

    def get(self, sid: int):
        if sid not in self.opened:
            entry = self.entries.get(sid)
            try:
                if entry is None:
                    raise SourceError(f"source #{sid} is not recorded in the store")
                self.opened[sid] = open_source(entry["location"], entry["type"], **(entry.get("options") or {}))
            except FeatstoreError as err:
                raise SourceError(f"exact duplicates hash each row's source bytes, and source #{sid} "
                                  f"({(entry or {}).get('type')} {(entry or {}).get('location')}) cannot be opened "
                                  f"({err}): put it back there, or run with --no-exact") from None
            if self.opened[sid].fingerprint() != (entry or {}).get("fingerprint"):
                self.changed.append(sid)
        return self.opened[sid]


def hash_block(store: Store, sources: _Sources, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows hashed, their ROW_DTYPE records) of rows [start, stop), plus nothing else in memory."""
    sid = np.asarray(store.samples(fmt.SOURCE, start, stop), dtype=np.int64) \
        if fmt.SOURCE in store.sample_fields() else np.full(stop - start, -1, np.int64)
    refs = store.samples(fmt.SOURCE_REF, start, stop)
    out = np.zeros(stop - start, ROW_DTYPE)
    ok = np.zeros(stop - start, bool)
    for s in np.unique(sid[sid >= 0]):
        at = np.flatnonzero(sid == s)
        src = sources.get(int(s))
        for i, data in zip(at, src.read_images([str(r) for r in refs[at].tolist()])):
            if isinstance(data, BadSample):
                continue
            out["hi"][i], out["lo"][i] = digest(data)
            ok[i] = True
    out["row"] = np.arange(start, stop)
    return ok, out[ok]


def hash_rows(store: Store, folder: str, memory_bytes: int, bar) -> tuple[list[str], dict]:
    """Step 1: every row block hashed into bucket files under `folder`; (bucket paths,
    {"unhashed_rows", "sources_changed": ids of sources changed since registration, hashed as they are now})."""
    p = n_buckets(store.n_rows, memory_bytes)
    shift = np.uint64(64 - max(0, int(np.log2(p))))
    paths = [os.path.join(folder, f"hash-bucket-{i:05d}.bin") for i in range(p)]
    files = [open(path, "wb") for path in paths]
    sources, unhashed = _Sources(store), 0
    try:
        for b in range(store.n_blocks):
            start, stop = store.block_range(b)
            ok, recs = hash_block(store, sources, start, stop)
            unhashed += int((~ok).sum())
            bucket = (recs["hi"] >> shift).astype(np.int64) if p > 1 else np.zeros(len(recs), np.int64)
            order = np.argsort(bucket, kind="stable")
            edges = np.searchsorted(bucket[order], np.arange(p + 1))
            for i in np.flatnonzero(np.diff(edges)):
                recs[order[edges[i]:edges[i + 1]]].tofile(files[i])
            bar.update(stop - start)
    finally:
        for f in files:
            f.close()
    return paths, {"unhashed_rows": unhashed, "sources_changed": sources.changed}


def groups_in(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Step 2 for one bucket: (duplicate rows, their representative: the group's lowest row)."""
    recs = np.fromfile(path, ROW_DTYPE)
    if len(recs) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((recs["row"], recs["lo"], recs["hi"]))
    hi, lo, row = recs["hi"][order], recs["lo"][order], recs["row"][order]
    same = np.r_[False, (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])]  # equal prefix, then the full hash
    first = np.maximum.accumulate(np.where(same, 0, np.arange(len(row))))
    return row[same], row[first[same]]


def exact_pairs(store: Store, folder: str, memory_bytes: int, bar):
    """Yield (duplicate rows, representatives) per bucket, then remove the bucket files;
    the generator's return value (StopIteration.value) is hash_rows' counts."""
    paths, counts = hash_rows(store, folder, memory_bytes, bar)
    try:
        for path in paths:
            yield groups_in(path)
    finally:
        for path in paths:
            if os.path.exists(path):
                os.remove(path)
    return counts
