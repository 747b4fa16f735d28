"""Which rows of a feature set are done: one marker per row block, a pointer to it, and two
compacted indexes.

    _progress/<feature set>/<block>-<version>.json    the block's marker, newest version wins
    _progress/<feature set>/latest/<block>.json        {"version": v}: the block's newest marker
    _progress/<feature set>/layout                     {"pointers": 1}: every marker has its pointer
    _progress/<feature set>/blocks.npy                 per-block records as of the last job's end
    _progress/<feature set>/index.json                 every marker as of the last job's end

A marker names the rows of its block that are done (`done`: absolute row ranges [a, b)), the
block's extent when it was written (`rows`: [start, stop)), which source computed which rows,
the failures with reasons, and checksums of every array over that extent.  A block that gains
rows or gets more rows computed is rewritten whole and its marker replaced by version + 1; until
then the old marker stays valid for the rows it names.

What each reader pays (also on object storage):

- a block write (`latest`, `write`): O(1) requests: its pointer, its marker, the new marker and
  pointer, the old marker's removal; never a listing (a block with no pointer in a folder with
  `layout` has no marker).
- a Loader, planning (`summary`): `blocks.npy` (`BLOCK_RECORD` per block: 40 bytes, numpy
  .npy, no pickle), one listing of the folder (block names), and the markers newer than their
  record; a partial block's `done` ranges are read later, only when its rows are needed.
- verify, inspect, export (`markers`: every row): one listing, `index.json`, and the markers
  newer than the index.

Markers are written without the store lock (each under its block's lock); the indexes are
caches rewritten under the store lock at the end of each job (`compact`), so a stale index only
costs extra reads.  Stores written before the pointers (no `layout`: markers only, perhaps
an index.json) read the same; their writes list the folder to find a block's newest marker
until the first `compact` (or `upgrade_progress`) writes every pointer and `layout`.
Format-1 markers (`<block>.json`, every row of `rows` done) read as version 0.
"""

from __future__ import annotations

import io
import re

import numpy as np

from featstore.core import format as fmt
from featstore.core.files import StoreFiles

_NAME = re.compile(r"^(\d+)(?:-(\d+))?\.json$")
BLOCKS = "blocks.npy"
LAYOUT = "layout"  # JSON, named without .json: tests and tools take *.json here for markers
POINTERS = "latest"
# one record per block of blocks.npy (version -1: no marker; n_valid -1: not recorded)
BLOCK_RECORD = np.dtype([("version", "<i8"), ("start", "<i8"), ("stop", "<i8"), ("n_done", "<i8"), ("n_valid", "<i8")])


def ranges_of(mask: np.ndarray, offset: int = 0) -> list[list[int]]:
    """[[a, b), ...] absolute row ranges where `mask` is true (`offset` = row of mask[0])."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.view(np.int8), [0]])))
    return [[int(a) + offset, int(b) + offset] for a, b in zip(edges[::2], edges[1::2])]


def mask_of(ranges, start: int, stop: int) -> np.ndarray:
    """Boolean mask of rows [start, stop) covered by `ranges`."""
    mask = np.zeros(max(0, stop - start), dtype=bool)
    for a, b in ranges or []:
        a, b = max(int(a), start), min(int(b), stop)
        if b > a:
            mask[a - start : b - start] = True
    return mask


def done_ranges(marker: dict) -> list[list[int]]:
    """The row ranges a marker says are done (a format-1 marker: its whole extent)."""
    if "done" in marker:
        return [list(r) for r in marker["done"]]
    return [list(marker["rows"])]


class Progress:
    """The markers of feature set `name` in a store's files."""

    def __init__(self, files: StoreFiles, name: str):
        self.files = files
        self.name = name
        self.prefix = f"{fmt.PROGRESS}/{name}"
        self._pointers = False  # `layout` seen: it is never removed but with the folder

    def _versions(self, names: list[str]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for n in names:
            m = _NAME.match(n)
            if m:
                out.setdefault(int(m.group(1)), []).append(int(m.group(2) or 0))
        return {b: sorted(v) for b, v in out.items()}

    def key(self, block: int, version: int) -> str:
        return f"{self.prefix}/{block}.json" if version == 0 else f"{self.prefix}/{block}-{version}.json"

    def markers(self) -> dict[int, dict]:
        """block -> its newest marker: one listing + the index + markers newer than the index."""
        return self._markers(self._versions(self.files.list(self.prefix)), self._index())

    def _index(self) -> dict:
        return (self.files.read_json(f"{self.prefix}/{fmt.INDEX}") or {}).get("markers", {})

    def _markers(self, versions: dict[int, list[int]], index: dict) -> dict[int, dict]:
        out = {}
        for block, vs in versions.items():
            cached = index.get(str(block))
            if cached is not None and cached.get("version", 0) == vs[-1]:
                out[block] = cached
                continue
            marker = self._read(block, vs[-1])
            if marker is not None:
                out[block] = marker
        return out

    def latest(self, block: int) -> dict | None:
        """The newest marker of one block, read now (writers call this under the block's lock):
        its pointer and its marker; a folder without pointers (written before them) is listed."""
        pointer = self.files.read_json(self._pointer(block))
        if pointer is not None:
            marker = self._read(block, int(pointer["version"]))
            if marker is not None:
                return marker
        elif self.has_pointers():
            return None
        vs = self._versions(n for n in self.files.list(self.prefix) if n.split("-")[0].split(".")[0] == str(block))
        return self._read(block, vs[block][-1]) if block in vs else None

    def _pointer(self, block: int) -> str:
        return f"{self.prefix}/{POINTERS}/{block}.json"

    def has_pointers(self) -> bool:
        """Whether every marker of this folder has its pointer (`layout`); read until it is seen."""
        self._pointers = self._pointers or self.files.read_json(f"{self.prefix}/{LAYOUT}") is not None
        return self._pointers

    def start(self) -> None:
        """Mark a new (empty) folder as one whose markers all have pointers."""
        self.files.write_json(f"{self.prefix}/{LAYOUT}", {"pointers": 1})

    def _read(self, block: int, version: int) -> dict | None:
        marker = self.files.read_json(self.key(block, version))
        if marker is None:  # superseded between the listing and the read: take the newest now
            vs = self._versions(self.files.list(self.prefix)).get(block)
            if vs and vs[-1] != version:
                return self._read(block, vs[-1])
            return None
        marker.setdefault("version", version)
        marker.setdefault("done", done_ranges(marker))
        return marker

    def write(self, block: int, marker: dict, previous: dict | None) -> dict:
        """Write `marker` as the block's next version, point the block at it, then drop the one
        it replaces.  The caller holds the block's lock."""
        version = (previous or {}).get("version", 0) + 1 if previous is not None else 1
        marker = {**marker, "version": version}
        self.files.write_json(self.key(block, version), marker)
        self.files.write_json(self._pointer(block), {"version": version})
        if previous is not None:
            self.files.remove(self.key(block, previous.get("version", 0)))
        return marker

    def compact(self) -> dict[int, dict]:
        """Rewrite the indexes with every current marker (only when they changed) and drop
        superseded versions (a writer killed between writing a version and removing the old one
        leaves one behind); in a folder without pointers, write them all first.  One listing,
        the index and `layout` read; the caller holds the store lock."""
        versions = self._versions(self.files.list(self.prefix))
        index = self._index()
        markers = self._markers(versions, index)
        fresh = {str(b): m for b, m in sorted(markers.items())}
        pointers = self.has_pointers()
        if not pointers:
            for block, m in markers.items():
                self.files.write_json(self._pointer(block), {"version": m["version"]})
        if fresh != index or not pointers:
            self.files.write_bytes(f"{self.prefix}/{BLOCKS}", _npy(records(markers)))
            self.files.write_json(f"{self.prefix}/{fmt.INDEX}", {"format": fmt.FORMAT_VERSION, "markers": fresh})
        if not pointers:
            self.start()
        for block, vs in versions.items():
            for v in vs[:-1]:
                self.files.remove(self.key(block, v))
        return markers

    # ---- per-block summaries: what a Loader reads ----------------------------------------
    def summary(self, n_blocks: int) -> np.ndarray:
        """`BLOCK_RECORD` per block [0, n_blocks) as of now: `blocks.npy`, one listing, and the
        markers newer than their record (a folder never compacted by this featstore: every
        marker, as `markers()` reads them)."""
        try:
            data = self.files.read_bytes(f"{self.prefix}/{BLOCKS}")
        except FileNotFoundError:
            data = None
        if data is None:
            return _fit(records(self.markers()), n_blocks)
        out = _fit(np.load(io.BytesIO(data), allow_pickle=False), n_blocks)
        versions = self._versions(self.files.list(self.prefix))
        listed = np.full(n_blocks, -1, np.int64)
        for b, vs in versions.items():
            if b < n_blocks:
                listed[b] = vs[-1]
        for b in np.flatnonzero(listed != out["version"]).tolist():
            m = self._read(b, int(listed[b])) if listed[b] >= 0 else None
            out[b] = _record(m) if m is not None else (-1, 0, 0, 0, 0)
        return out


def upgrade_progress(files: StoreFiles, name: str) -> None:
    """Bring feature set `name`'s progress folder to this layout (pointers, `layout`,
    `blocks.npy`) from any earlier one; `featstore upgrade` calls it under the store lock.
    Reading works without it; it only spares the first job's writes their listings."""
    Progress(files, name).compact()


def _record(m: dict) -> tuple:
    start, stop = m["rows"]
    done = m.get("n_done")
    if done is None:
        done = sum(min(int(b), stop) - max(int(a), start) for a, b in done_ranges(m) if min(int(b), stop) > max(int(a), start))
    return (int(m.get("version", 0)), int(start), int(stop), int(done), int(m.get("n_valid", -1)))


def records(markers: dict[int, dict]) -> np.ndarray:
    """`BLOCK_RECORD` per block 0..max block of `markers` (version -1 where none)."""
    n = max(markers) + 1 if markers else 0
    out = np.zeros(n, BLOCK_RECORD)
    out["version"] = -1
    for b, m in markers.items():
        out[b] = _record(m)
    return out


def _fit(rec: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, BLOCK_RECORD)
    out["version"] = -1
    m = min(n, len(rec))
    out[:m] = rec[:m]
    return out


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()
