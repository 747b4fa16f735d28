"""The uid index: which row holds a uid, on disk, at a cost that follows the lookup, not the store.

    _index/uid/current.json        {"format", "hash", "hash_bits", "version", "rows", "next_file", "cursors", "garbage"}
    _index/uid/table-<version>.npy every live file: (level, file, n, lo, hi), one row each
    _index/uid/runs/<file>.bin     n uint64 hashes (sorted) then their n int64 rows: one sorted run

A small LSM tree over `featstore.core.uidhash` hashes.  A registration writes its new (hash, row)
pairs as one sorted run in level 0; runs of level 0 span the whole hash space.  Levels 1, 2, ...
hold files of disjoint hash ranges, level i up to `L1_ROWS * FANOUT**(i-1)` entries.  Compaction
(under the store lock, after a registration) merges level 0 into level 1, or one file of an
overfull level into the files of the next level that overlap it; each merge reads its inputs
range by range (memory: one output file), so a step costs about FANOUT + 1 files, whatever the
store's size.  A registration does at least one step when one is due and more while it has done
less than `COMPACT_FACTOR` x its own rows; when level 0 holds as much as everything else (a bulk
registration, a young store), everything is merged once into one level instead.

A lookup hashes its k uids and, in every file whose range holds one of them, finds the equal
hashes (one read, a pread or a ranged GET, of the hashes around the interpolated position:
hashes are uniform): O(k x levels) small reads.  The index only proposes rows: the caller keeps a
candidate only where the stored uid string equals the query (`featstore.store`), so a hash
collision, or an entry left by a registration killed before its commit, is never a wrong row.

Commit order: run files, then table-<v+1>, then current.json (atomic), then the replaced files
are deleted.  A reader that finds a file gone re-reads current.json and looks up again.
"""

from __future__ import annotations

import io
import math
import os
import tempfile

import numpy as np

from featstore.core import uidhash
from featstore.core.files import StoreFiles, one_get

PREFIX = "_index/uid"
FORMAT = 1
FILE_ROWS = 1 << 17  # entries per file of a level (2 MiB)
L0_FILES = 4  # more level-0 runs than this: merge them into level 1
L1_ROWS = 4 * FILE_ROWS
FANOUT = 10
COMPACT_FACTOR = 64  # a registration of k rows rewrites at least this x k entries when work is due
TABLE = np.dtype([("level", "<i4"), ("file", "<i8"), ("n", "<i8"), ("lo", "<u8"), ("hi", "<u8")])
_TOP = 1 << 64


def level_capacity(level: int) -> int:
    return L1_ROWS * FANOUT ** (level - 1)


class UidIndex:
    """The index of one store (`open` it; `add` + `compact` + `commit` under the store lock)."""

    def __init__(self, files: StoreFiles, state: dict, table: np.ndarray):
        self.files = files
        self.state = state
        self.table = table
        self.hash_bits = int(state.get("hash_bits", 64))
        self._pending: list[int] = []  # files written since open, not yet committed
        self.covered = self.rows  # store rows [0, covered) this index holds, with runs not yet committed
        self._replaced: list[int] = []
        self.rewritten = 0  # entries written by compaction since open

    # ---- open / create --------------------------------------------------------------------
    @classmethod
    def open(cls, files: StoreFiles) -> "UidIndex | None":
        """The committed index, or None when the store has none (a store made before format 3)."""
        for _ in range(5):
            state = files.read_json(f"{PREFIX}/current.json")
            if state is None:
                return None
            try:
                raw = files.read_bytes(f"{PREFIX}/table-{int(state['version'])}.npy")
            except FileNotFoundError:  # replaced between the two reads: read the new one
                continue
            return cls(files, state, np.load(io.BytesIO(raw)))
        raise RuntimeError(f"{files.root}: the uid index keeps changing under this reader")

    @classmethod
    def create(cls, files: StoreFiles, hash_bits: int = 64) -> "UidIndex":
        if not 1 <= int(hash_bits) <= 64:
            raise ValueError(f"hash_bits must be in 1..64, not {hash_bits}")
        state = {"format": FORMAT, "hash": uidhash.NAME, "hash_bits": int(hash_bits), "version": 0, "rows": 0,
                 "next_file": 0, "cursors": {}, "garbage": []}
        index = cls(files, state, np.zeros(0, TABLE))
        index.commit(0)
        return index

    @property
    def rows(self) -> int:
        """Store rows [0, rows) the committed index covers."""
        return int(self.state["rows"])

    @property
    def size(self) -> int:
        return int(self.table["n"].sum())

    def levels(self) -> dict[int, int]:
        """level -> entries (inspect and the benchmark show the tree's shape)."""
        return {int(lv): int(self.table["n"][self.table["level"] == lv].sum()) for lv in np.unique(self.table["level"])}

    def hash(self, uids) -> np.ndarray:
        return uidhash.uid_hash(uids, self.hash_bits)

    # ---- lookup -----------------------------------------------------------------------------
    def candidates(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query positions, rows): every indexed row whose hash equals a query's hash."""
        order = np.argsort(np.asarray(hashes, np.uint64), kind="stable")
        hashes = np.asarray(hashes, np.uint64)[order]  # sorted queries: each file's search walks forward
        qs, rs = [], []
        for entry, sel in self._files_holding(hashes):
            q, r = _find(self.files, int(entry["file"]), int(entry["n"]), int(entry["lo"]), int(entry["hi"]), hashes[sel])
            qs.append(order[sel[q]])
            rs.append(r)
        if not qs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(qs), np.concatenate(rs)

    def _files_holding(self, hashes: np.ndarray):
        """(table entry, positions of the queries in its range) for every file that may hold one:
        every level-0 run, and in each deeper level the one file whose range covers a query."""
        for level in np.unique(self.table["level"]).tolist():
            at = np.flatnonzero(self.table["level"] == level)
            if level == 0:
                for i in at:
                    e = self.table[i]
                    sel = np.flatnonzero((hashes >= e["lo"]) & (hashes <= e["hi"]))
                    if len(sel):
                        yield e, sel
                continue
            at = at[np.argsort(self.table["lo"][at], kind="stable")]
            k = np.searchsorted(self.table["lo"][at], hashes, "right") - 1
            ok = k >= 0
            ok[ok] = hashes[ok] <= self.table["hi"][at[k[ok]]]
            owner = np.where(ok, k, -1)
            by = np.argsort(owner, kind="stable")
            bounds = np.searchsorted(owner[by], np.arange(len(at) + 1))
            for j in np.flatnonzero(np.diff(bounds)):
                yield self.table[at[j]], np.sort(by[bounds[j]:bounds[j + 1]])

    # ---- writing (the caller holds the store lock) ---------------------------------------------
    def add(self, hashes: np.ndarray, rows: np.ndarray) -> None:
        """A new level-0 run of (hash, row) pairs: looked up from now on, committed by `commit`."""
        if not len(hashes):
            return
        self.covered = max(self.covered, int(np.max(rows)) + 1)
        order = np.argsort(hashes, kind="stable")
        self._append_file(0, np.asarray(hashes, np.uint64)[order], np.asarray(rows, np.int64)[order])

    def compact(self, budget: int) -> int:
        """Compaction steps while one is due: at least one, more while fewer than `budget`
        entries were rewritten.  Returns the entries rewritten."""
        done = steps = 0
        while True:
            task = self._due()
            if task is None or (steps and done >= budget):
                return done
            done += self._merge(*task)
            steps += 1

    def commit(self, rows: int) -> None:
        """Publish the table (atomically), then delete what it no longer names."""
        version = int(self.state["version"]) + 1
        buf = io.BytesIO()
        np.save(buf, self.table)
        self.files.write_bytes(f"{PREFIX}/table-{version}.npy", buf.getvalue())
        garbage = [int(g) for g in self.state.get("garbage", [])] + self._replaced
        old = int(self.state["version"])
        self.state = {**self.state, "version": version, "rows": int(rows), "garbage": garbage}
        self.files.write_json(f"{PREFIX}/current.json", self.state)
        self.files.remove(f"{PREFIX}/table-{old}.npy")
        for f in garbage:
            self.files.remove(_run_key(f))
        self.state["garbage"], self._replaced, self._pending = [], [], []
        self.covered = int(rows)

    # ---- compaction ---------------------------------------------------------------------------
    def _due(self):
        lv = self.table["level"]
        n0 = int(self.table["n"][lv == 0].sum())
        rest = int(self.table["n"][lv > 0].sum())
        files0 = int((lv == 0).sum())
        if files0 and n0 >= rest and (files0 > 1 or rest):
            total = n0 + rest
            level = 1
            while level_capacity(level) < total:
                level += 1
            return (np.arange(len(self.table)), level)  # everything, once, into one level
        if files0 > 2 * L0_FILES:  # lookups search every level-0 run: never let them pile up
            return (np.flatnonzero(lv <= 1), 1)
        for level in sorted(set(lv.tolist()) - {0}):  # an overfull level spills first, so that
            if int(self.table["n"][lv == level].sum()) > level_capacity(level):  # merging level 0
                return (self._pick(level), level + 1)  # into 1 rewrites at most L1_ROWS entries
        if files0 > L0_FILES:
            return (np.flatnonzero(lv <= 1), 1)
        return None

    def _pick(self, level: int) -> np.ndarray:
        """The next file of `level` in round-robin order, and the files of level + 1 it overlaps."""
        at = np.flatnonzero(self.table["level"] == level)
        at = at[np.argsort(self.table["lo"][at])]
        cursor = self.state["cursors"].get(str(level))
        after = at if cursor is None else at[self.table["lo"][at] > np.uint64(int(cursor))]
        pick = int(after[0] if len(after) else at[0])
        lo, hi = self.table["lo"][pick], self.table["hi"][pick]
        self.state["cursors"][str(level)] = int(hi)
        below = np.flatnonzero((self.table["level"] == level + 1) & (self.table["hi"] >= lo) & (self.table["lo"] <= hi))
        return np.r_[pick, below]

    def _merge(self, which: np.ndarray, level: int) -> int:
        """Merge table entries `which` into `level`: range by range over their hash span, one
        output file per range of about FILE_ROWS entries (hashes are uniform)."""
        inputs = self.table[which]
        keep = np.ones(len(self.table), bool)
        keep[which] = False
        self.table = self.table[keep]
        total = int(inputs["n"].sum())
        lo, hi = int(inputs["lo"].min()), int(inputs["hi"].max())
        parts = max(1, math.ceil(total / FILE_ROWS))
        edges = [lo + (hi - lo + 1) * j // parts for j in range(parts)] + [hi + 1]
        with _Inputs(self.files, inputs) as runs:
            for a, b in zip(edges[:-1], edges[1:]):
                hs, rs = runs.slice(a, b)
                if len(hs):
                    order = np.argsort(hs, kind="stable")
                    self._append_file(level, hs[order], rs[order])
        self._replaced += [int(f) for f in inputs["file"]]
        self.rewritten += total
        return total

    def _append_file(self, level: int, hashes: np.ndarray, rows: np.ndarray) -> None:
        fid = int(self.state["next_file"])
        self.state["next_file"] = fid + 1
        self.files.write_bytes(_run_key(fid), hashes.astype("<u8").tobytes() + rows.astype("<i8").tobytes())
        entry = np.array([(level, fid, len(hashes), int(hashes[0]), int(hashes[-1]))], TABLE)
        self.table = np.concatenate([self.table, entry])
        self._pending.append(fid)


def _run_key(fid: int) -> str:
    return f"{PREFIX}/runs/{fid}.bin"


def _find(files: StoreFiles, fid: int, n: int, lo: int, hi: int, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in q, rows) of the entries of run `fid` whose hash equals a query hash."""
    key = _run_key(fid)
    w = int(4 * math.sqrt(n) + 64)
    if 2 * w * len(q) >= n:  # many queries (a bulk registration): one read of the hash section
        whole = np.frombuffer(files.read_bytes(key, 0, 8 * n), "<u8")
        pos_a, pos_b = np.searchsorted(whole, q, "left"), np.searchsorted(whole, q, "right")
    else:
        pos_a, pos_b = _find_few(files, key, n, lo, hi, q, w)

    def rows_at(idx):
        if len(idx) > 64:  # many hits (a source registered again): one read of the span
            a, b = int(idx.min()), int(idx.max()) + 1
            return np.frombuffer(files.read_bytes(key, 8 * (n + a), 8 * (n + b)), "<i8")[idx - a].astype(np.int64)
        got = files.read_ranges(key, 8 * (n + idx), 8 * (n + idx + 1))
        return np.frombuffer(b"".join(got), "<i8").astype(np.int64)

    return _expand(pos_a, pos_b, rows_at)


def _find_few(files: StoreFiles, key: str, n: int, lo: int, hi: int, q: np.ndarray, w: int):
    """Equal-hash ranges [a, b) for a few queries: each reads the hashes around its interpolated
    position (hashes are uniform in [lo, hi]), one small read (a pread locally, a ranged GET on
    object storage) instead of a binary search through a fresh mapping's page faults; a query its
    window does not bracket reads the whole hash section."""
    est = ((q.astype(np.float64) - lo) / max(1.0, float(hi - lo)) * n).astype(np.int64)
    pos_a, pos_b = np.zeros(len(q), np.int64), np.zeros(len(q), np.int64)
    starts, stops = np.clip(est - w, 0, n), np.clip(est + w, 0, n)
    windows = files.read_ranges(key, 8 * starts, 8 * stops)  # sent together (ranged GETs remotely)
    whole = None
    for i, (s, t, raw) in enumerate(zip(starts.tolist(), stops.tolist(), windows)):
        h = np.frombuffer(raw, "<u8")
        if len(h) and (s == 0 or h[0] < q[i]) and (t == n or h[-1] > q[i]):
            pos_a[i], pos_b[i] = s + np.searchsorted(h, q[i], "left"), s + np.searchsorted(h, q[i], "right")
            continue
        if whole is None:
            whole = np.frombuffer(files.read_bytes(key, 0, 8 * n), "<u8")
        pos_a[i], pos_b[i] = np.searchsorted(whole, q[i], "left"), np.searchsorted(whole, q[i], "right")
    return pos_a, pos_b


def equal_pairs(sorted_hashes: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in q, positions in sorted_hashes) of every pair of equal hashes."""
    a, b = np.searchsorted(sorted_hashes, q, "left"), np.searchsorted(sorted_hashes, q, "right")
    return _expand(a, b, lambda idx: idx)


def _expand(a: np.ndarray, b: np.ndarray, rows_at) -> tuple[np.ndarray, np.ndarray]:
    counts = b - a
    hit = np.flatnonzero(counts > 0)
    if not len(hit):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    c = counts[hit]
    qpos = np.repeat(hit, c)
    idx = np.repeat(a[hit], c) + (np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c))
    return qpos, rows_at(idx)


class _Inputs:
    """The runs a merge reads, mapped (local), or copied to a temporary folder first (object
    storage), so each output range reads only its slice of every input."""

    def __init__(self, files: StoreFiles, entries: np.ndarray):
        self.files, self.entries = files, entries
        self.tmp = None
        self.maps = []

    def __enter__(self):
        if not self.files.local:
            self.tmp = tempfile.TemporaryDirectory(prefix="featstore-uidindex-")
        for e in self.entries:
            key, n = _run_key(int(e["file"])), int(e["n"])
            path = self.files.path(key)
            if self.tmp is not None:
                path = os.path.join(self.tmp.name, f"{int(e['file'])}.bin")
                self.files.fs.get_file(self.files.path(key), path, **one_get(self.files.fs))
            mm = np.memmap(path, dtype="<u8", mode="r", shape=(2 * n,))
            self.maps.append((mm[:n], mm[n:]))
        return self

    def slice(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Every input entry with a <= hash < b."""
        hs, rs = [], []
        for h, r in self.maps:
            i, j = np.searchsorted(h, np.uint64(a), "left"), (len(h) if b >= _TOP else np.searchsorted(h, np.uint64(b), "left"))
            if j > i:
                hs.append(np.asarray(h[i:j]))
                rs.append(np.asarray(r[i:j]).astype(np.int64))
        if not hs:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        return np.concatenate(hs), np.concatenate(rs)

    def __exit__(self, *exc):
        self.maps = []
        if self.tmp is not None:
            self.tmp.cleanup()
