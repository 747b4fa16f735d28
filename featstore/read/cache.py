"""A local disk cache of a remote store's shard objects: the Loader's `cache="disk"`.

    Loader(Store.open("s3://bucket/cc.zarr"), columns, 1024, cache="disk")   # $XDG_CACHE_HOME/featstore
    Loader(..., cache="disk", cache_dir="/nvme/featstore", cache_limit=200 << 30)

What litdata and mosaic streaming do with their shards (download them into a local directory and
serve from there), for featstore's own shard objects:

- **Which objects.** Every array the loader would read by featstore's shard layout (pooled,
  tokens and their scales, valid, pixels) is listed once when the loader is made (one LIST per
  1000 objects) for the size and version (the ETag, else the filesystem's generation or
  modification time) of each shard object.  Other arrays (strings) are read through zarr.
- **Never stale.** An entry is a whole object, kept as
  `<cache_dir>/<store>/<array>/<shard key>@<hash of version and size>`, `<store>` a hash of the
  store's URL and id: an object rewritten since (the store grew, a feature set was recomputed)
  has another ETag, so it is fetched again and the old entry is never read.  A download is
  checked (its size, a valid shard index, and the object's version asked again after the GET, so
  an object rewritten while it was fetched is refused) before it is renamed into place whole: a
  kill leaves at most a temporary file.  An entry of the wrong size is fetched again.
- **Fetched once, in read order.** One GET per object (a server that copies the whole object
  for every ranged GET, as moto does, pays once), `download_threads` at a time, in the order the
  epoch reads the blocks: a read window waits only for its own.  Processes sharing a cache
  (DataLoader workers, the ranks of a node) lock each entry while one of them fetches it.
- **Read like a local store.** A fetched shard is mapped into its array's view
  (`featstore.read.mapping`), so batches are one np.take from the page cache: the local store's
  one-copy path (a layout that cannot be mapped is read with pread into window buffers).  It is
  written into the cache in large writes, so its pages map as 2 MiB pages, as a local store's
  shards do (`disk_cache._download`).  The
  first epoch runs at the server's speed; later epochs, and later loaders, at local speed.
- **Bounded.** `cache_limit` bytes (default: no limit of its own; the disk keeps 1 GiB free).
  Making a loader marks its entries used, removes the entries of older versions of its objects,
  and evicts the least recently used others to make room for what it will fetch; a loader whose own shards cannot fit is refused in one line, before
  anything is fetched.  The whole loader's shards are kept (epochs re-read all of them).

This module reads arrays from the cache (`CachedShards`, `attach`); the directory itself (entries,
room, one object's fetch) is `featstore.read.disk_cache`.
"""

from __future__ import annotations

import os
import posixpath
import threading
from concurrent.futures import Future

import numpy as np

from featstore.errors import FetchFailed
from featstore.read.disk_cache import DiskCache, object_version, remove
from featstore.errors import ConfigError
from featstore.read.mapping import MappedArray
from featstore.core.shardfile import LocalShards, ShardLayout


class CachedShards:
    """One array of a remote store, read from its shard objects fetched into a `DiskCache`."""

    def __init__(self, layout: ShardLayout, rows_per_shard: int, n_rows: int, fs, entries: dict, cache: DiskCache,
                 views: int = 1):
        self.layout, self.fs, self.entries, self.cache = layout, fs, entries, cache
        self.mapped = MappedArray.reserve(layout, rows_per_shard, n_rows)  # None: read into buffers
        self._files = LocalShards(layout.split_views(views), "")  # rows: view rows where views > 1
        self._futures: dict[int, Future] = {}
        self._lock = threading.Lock()
        self.fetched = 0  # objects this process fetched for it

    @classmethod
    def of(cls, array, store, blocks, cache: DiskCache, views: int = 1) -> "CachedShards | None":
        """The array's shards of `blocks` in the cache (listed now); None for an array that is not
        on an fsspec store or not in featstore's shard layout (read it as without the cache)."""
        from zarr.storage import FsspecStore

        if not isinstance(array.store_path.store, FsspecStore):
            return None
        layout = ShardLayout.of(array, store.rows_per_shard)
        if layout is None:
            return None
        import fsspec

        fs, root = fsspec.core.url_to_fs(posixpath.join(store.path.rstrip("/"), array.store_path.path))
        root = root.rstrip("/")
        fs.invalidate_cache(root)  # a listing cached earlier in this process could be stale
        listed = fs.find(root, detail=True)
        folder = cache.array_dir(store, array.store_path.path)
        entries = {}
        for b in blocks:
            key = layout.key(int(b))
            info = listed.get(posixpath.join(root, key))
            if info is None:
                continue  # never written: all fill value, as zarr reads it
            version = object_version(info)
            if version is None:
                raise ConfigError(f"cache='disk' needs to know when a shard object changes, and "
                                  f"{fs.unstrip_protocol(root)} lists no ETag or modification time: use cache=None")
            entries[int(b)] = cache.entry(folder, key, posixpath.join(root, key), int(info["size"]), version)
        return cls(layout, store.rows_per_shard, store.n_rows, fs, entries, cache, views)

    def schedule(self, blocks) -> None:
        """Fetch these blocks' objects (in this order) unless fetched or on their way already."""
        for b in blocks:
            self._future(int(b))

    def fetched_all(self) -> bool:
        """Every object of this array fetched (and mapped) already: a later epoch schedules nothing."""
        with self._lock:
            return all((f := self._futures.get(b)) is not None and f.done() and not f.cancelled()
                       and f.exception() is None for b in self.entries)

    def wait(self, blocks) -> None:
        """Return once these blocks can be read (raises what their fetch raised)."""
        for b in blocks:
            self._future(int(b)).result()

    def cancel(self) -> None:
        """Drop the fetches not started (an epoch ended early); `schedule` asks for them again."""
        with self._lock:
            for b, f in list(self._futures.items()):
                if f.cancel():
                    del self._futures[b]

    def _future(self, b: int) -> Future:
        with self._lock:
            f = self._futures.get(b)
            if f is None:
                f = self._futures[b] = self.cache.downloads.submit(self._load, b)
            return f

    def _check(self, path: str) -> str | None:
        fd = os.open(path, os.O_RDONLY)
        try:
            return None if self._files.index(fd) is not None else "is not a shard (no valid shard index at its end)"
        finally:
            os.close(fd)

    def _load(self, b: int) -> None:
        """Fetch block `b`'s object if needed; map it into the view when the view is mapped."""
        e = self.entries.get(b)
        if e is None:
            return  # no object: the view's zeros, or `read`'s fill value
        for attempt in range(2):
            got = self.cache.fetch(self.fs, e, self._check)
            with self._lock:
                self.fetched += got
            if self.mapped is None:
                return
            try:
                fd = os.open(e.path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # evicted by another process meanwhile: fetch it again
            try:
                if self.mapped.map_shard(b, fd):
                    return
            finally:
                os.close(fd)
            if attempt == 0 and not got:  # an entry from earlier that does not check out: fetch it again
                remove(e.path)
                continue
            break
        raise FetchFailed(f"{self.fs.unstrip_protocol(e.remote)} does not hold its rows the way featstore writes "
                          "shards, so it cannot be mapped from the disk cache: read this store with cache=None")

    def read(self, block: int, lo: int, hi: int, out) -> bool:
        """Rows [lo, hi) of `block` (view rows of a split view axis) from its cached file (after
        `wait`); False: leave it to zarr."""
        e = self.entries.get(block)
        if e is None:
            out[...] = self.layout.fill
            return True
        for _ in range(2):
            try:
                fd = os.open(e.path, os.O_RDONLY)
            except FileNotFoundError:  # evicted by another process since: fetch it again
                self.cache.fetch(self.fs, e, self._check)
                continue
            try:
                return self._files.read_fd(fd, lo, hi, out)
            finally:
                os.close(fd)
        return False


def attach(sources, store, blocks, cache: DiskCache) -> None:
    """Serve every source it can from the disk cache: `s.cached`, and `s.mapped` (mapped view) or
    `s.local` (pread into buffers); makes room for them all, or refuses."""
    entries = []
    for s in sources:
        if s.ram is not None:
            continue
        s.cached = CachedShards.of(s.array, store, blocks, cache, views=s.views)
        if s.cached is not None:
            s.mapped = s.cached.mapped
            s.local = s.cached if s.mapped is None else None
            entries += s.cached.entries.values()
    if not any(s.cached is not None for s in sources):
        raise ConfigError("cache='disk' caches shard objects featstore reads directly (features, pixels) of a "
                          "store on object storage; none of these columns is one: use cache=None")
    cache.make_room(entries)


def fetch_in_read_order(sources, windows, rows_per_shard: int) -> None:
    """Start fetching the blocks these windows read, the first window's first, for every cached
    source (a window's reads wait for all of its blocks, so their order inside it is free).  Once
    every object is fetched (later epochs) the windows are not walked: the epoch starts at once."""
    cached = [c for s in sources if (c := getattr(s, "cached", None)) is not None and not c.fetched_all()]
    seen: set = set()
    for w in windows if cached else ():
        for b in np.unique(np.concatenate(w) // rows_per_shard).tolist():
            if b not in seen:
                seen.add(b)
                for c in cached:
                    c.schedule([b])


def cancel(sources) -> None:
    for s in sources:
        if getattr(s, "cached", None) is not None:
            s.cached.cancel()
