"""Which rows of a feature set are done: one marker per row block, and a compacted index.

    _progress/<feature set>/<block>-<version>.json    the block's marker, newest version wins
    _progress/<feature set>/index.json                 every marker as of the last job's end

A marker names the rows of its block that are done (`done`: absolute row ranges [a, b)), the
block's extent when it was written (`rows`: [start, stop)), which source computed which rows,
the failures with reasons, and checksums of every array over that extent.  A block that gains
rows or gets more rows computed is rewritten whole and its marker replaced by version + 1; until
then the old marker stays valid for the rows it names.

Reading costs O(1) requests, also on object storage: list the folder once, read the index, and
read only the markers that are newer than the index (written since the last compaction).
Markers are written without the store lock (each under its block's lock); the index is a cache
rewritten under the store lock at the end of each job, so a stale index only costs extra reads.
Format-1 markers (`<block>.json`, every row of `rows` done) read as version 0.
"""

from __future__ import annotations

import re

import numpy as np

from . import format as fmt
from .files import StoreFiles

_NAME = re.compile(r"^(\d+)(?:-(\d+))?\.json$")


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
        """The newest marker of one block, read now (writers call this under the block's lock)."""
        vs = self._versions(n for n in self.files.list(self.prefix) if n.split("-")[0].split(".")[0] == str(block))
        return self._read(block, vs[block][-1]) if block in vs else None

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
        """Write `marker` as the block's next version, then drop the one it replaces.
        The caller holds the block's lock."""
        version = (previous or {}).get("version", 0) + 1 if previous is not None else 1
        marker = {**marker, "version": version}
        self.files.write_json(self.key(block, version), marker)
        if previous is not None:
            self.files.remove(self.key(block, previous.get("version", 0)))
        return marker

    def compact(self) -> dict[int, dict]:
        """Rewrite the index with every current marker (only when it changed) and drop superseded
        versions (a writer killed between writing a version and removing the old one leaves one
        behind).  One listing and one index read; the caller holds the store lock."""
        versions = self._versions(self.files.list(self.prefix))
        index = self._index()
        markers = self._markers(versions, index)
        fresh = {str(b): m for b, m in sorted(markers.items())}
        if fresh != index:
            self.files.write_json(f"{self.prefix}/{fmt.INDEX}", {"format": fmt.FORMAT_VERSION, "markers": fresh})
        for block, vs in versions.items():
            for v in vs[:-1]:
                self.files.remove(self.key(block, v))
        return markers
