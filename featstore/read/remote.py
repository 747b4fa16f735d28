"""Read row runs of a store on object storage (s3://, gs://, any fsspec URL) by ranged requests.

For the shard layout `ShardLayout` reads, a remote shard is read like a local one: its index
(the object's last bytes, one suffix-range request) is fetched once per shard and kept, then
the runs of rows are read by ranged GETs.  Runs of one shard less than `MERGE_GAP` apart are one
GET (`merge_ranges`, as Arrow's read coalescing does: on object storage a request's latency
costs more than reading a small gap), up to `MERGE_MAX` bytes a GET.  All the ranges of a
window go out at once (fsspec's `cat_ranges`: concurrent requests on fsspec's event loop) while
the loader cuts the previous window into batches: the read-ahead.  Anything else is read
through zarr.

Every ranged GET is a request of its own, and some servers pay for each as for the whole object
(moto copies it: examples/remote_ratios.py measures these reads at a fraction of whole-object
GETs).  To read a store epoch after epoch, `Loader(cache="disk")` (`featstore.read.cache`) fetches
each shard object whole, once, and reads it from local disk.

Credentials and endpoints come from where fsspec's backend looks for them (for s3fs/botocore:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ~/.aws, ...), as for `Store.open`.
"""

from __future__ import annotations

import os
import posixpath
import threading

import numpy as np

from featstore.core.shardfile import ShardLayout

# Ranges of one object at most this far apart are read by one GET: about what S3 streams in the
# time to its first byte (10-20 ms at ~100 MB/s a connection; Arrow's S3 default hole is 8 KiB
# with range_size_limit 32 MiB, and it derives a hole from latency x bandwidth the same way).
MERGE_GAP = 1 << 20
MERGE_MAX = 32 << 20  # one GET's bytes at most when merging: larger ones go out in parallel


def merge_ranges(paths, starts, ends, gap: int = MERGE_GAP, most: int = MERGE_MAX):
    """Ranges to GET for the byte ranges (path, start, end), and for each given range the
    (merged range, offset inside it).  Ranges of one path at most `gap` bytes apart merge while
    the merged range stays within `most` bytes (a range larger than that is read alone)."""
    order = sorted(range(len(paths)), key=lambda i: (paths[i], starts[i]))
    out_paths, out_starts, out_ends, where = [], [], [], [None] * len(paths)
    for i in order:
        p, a, b = paths[i], starts[i], ends[i]
        if out_paths and out_paths[-1] == p and a - out_ends[-1] <= gap and max(b, out_ends[-1]) - out_starts[-1] <= most:
            out_ends[-1] = max(out_ends[-1], b)
        else:
            out_paths.append(p)
            out_starts.append(a)
            out_ends.append(b)
        where[i] = (len(out_paths) - 1, a - out_starts[-1])
    return out_paths, out_starts, out_ends, where


def _sync_fs(url: str):
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return fs, root


class RemoteShards:
    """Row runs of one array from its shard objects on an fsspec file system."""

    def __init__(self, layout: ShardLayout, url: str):
        self.layout, self.url = layout, url
        self._fs = None  # made on first use in each process (file systems do not survive fork)
        self._pid = None
        self._indexes: dict[int, list | None] = {}  # block -> chunk index (None: no such shard)
        self._lock = threading.Lock()
        self.requests = 0  # ranged requests made (index fetches included)
        self.index_fetches = 0

    @classmethod
    def of(cls, array, rows_per_shard: int, store_url: str, views: int = 1) -> "RemoteShards | None":
        """`views` K > 1: one view per row of an array with a view axis (view rows,
        `ShardLayout.split_views`): ranged GETs of runs of views (`merge_ranges`)."""
        from zarr.storage import FsspecStore

        if not isinstance(array.store_path.store, FsspecStore) or "://" not in str(store_url):
            return None
        layout = ShardLayout.of(array, rows_per_shard)
        if layout is None:
            return None
        return cls(layout.split_views(views), posixpath.join(str(store_url).rstrip("/"), array.store_path.path))

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._root = _sync_fs(self.url)
            self._pid = os.getpid()
            self._indexes = {}
        return self._fs

    def _path(self, block: int) -> str:
        return posixpath.join(self._root, self.layout.key(block))

    def fetch_indexes(self, blocks) -> None:
        """Fetch (concurrently) the index of every shard in `blocks` not fetched yet; windows read
        ahead at the same time wait for it rather than fetching it again."""
        fs = self.fs
        with self._lock:
            todo = sorted({int(b) for b in blocks} - set(self._indexes))
            if not todo:
                return
            n = self.layout.index_bytes
            got = fs.cat_ranges([self._path(b) for b in todo], [-n] * len(todo), [None] * len(todo), on_error="return")
            self.requests += len(todo)
            self.index_fetches += len(todo)
            for b, raw in zip(todo, got):
                if isinstance(raw, FileNotFoundError):
                    self._indexes[b] = None
                elif isinstance(raw, BaseException):
                    raise raw
                else:
                    self._indexes[b] = self.layout.parse_index(bytes(raw)) or "bad"

    def read_runs(self, runs, out: np.ndarray, offsets) -> list:
        """Read each run (block, lo, hi) (rows relative to the block) into `out` at row
        `offsets[i]`; returns the runs it could not read (left to zarr)."""
        runs = list(runs)
        self.fetch_indexes(b for b, _, _ in runs)
        rb, fill = self.layout.row_bytes, self.layout.fill
        flat = out.reshape(len(out), -1).view(np.uint8).reshape(-1) if out.size else out.view(np.uint8)
        paths, starts, ends, dests, failed = [], [], [], [], []
        for (b, lo, hi), o in zip(runs, offsets):
            index = self._indexes.get(int(b))
            if index is None:
                out[o : o + hi - lo] = fill  # no such object: all fill value, as zarr reads it
                continue
            pieces = self.layout.pieces(index, lo, hi) if index != "bad" else None
            if pieces is None:
                failed.append((b, lo, hi, o))
                continue
            for off, nbytes, row in pieces:
                dst = (o + row - lo) * rb
                if off is None:
                    out[o + row - lo : o + row - lo + nbytes // rb] = fill
                else:
                    paths.append(self._path(int(b)))
                    starts.append(int(off))
                    ends.append(int(off + nbytes))
                    dests.append((dst, nbytes, (b, lo, hi, o)))
        if paths:
            m_paths, m_starts, m_ends, where = merge_ranges(paths, starts, ends)
            got = self.fs.cat_ranges(m_paths, m_starts, m_ends, on_error="return")
            self.requests += len(m_paths)
            for (k, at), (dst, nbytes, run) in zip(where, dests):
                data = got[k]
                if isinstance(data, BaseException) or len(data) < at + nbytes:
                    if run not in failed:
                        failed.append(run)
                    continue
                flat[dst : dst + nbytes] = np.frombuffer(data, dtype=np.uint8, count=nbytes, offset=at)
        return failed
