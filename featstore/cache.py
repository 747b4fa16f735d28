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
  (`featstore.mapping`), so batches are one np.take from the page cache: the local store's
  one-copy path (a layout that cannot be mapped is read with pread into window buffers).  The
  first epoch runs at the server's speed; later epochs, and later loaders, at local speed.
- **Bounded.** `cache_limit` bytes (default: no limit of its own; the disk keeps 1 GiB free).
  Making a loader marks its entries used, removes the entries of older versions of its objects,
  and evicts the least recently used others to make room for what it will fetch; a loader whose own shards cannot fit is refused in one line, before
  anything is fetched.  The whole loader's shards are kept (epochs re-read all of them).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import queue
import shutil
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, FeatstoreError
from .mapping import MappedArray
from .shardfile import LocalShards, ShardLayout

MARGIN = 1 << 30  # disk space the cache leaves free
STALE_TMP_S = 3600  # a temporary file this old is a killed download's
DOWNLOAD_THREADS = 8


class CacheFull(FeatstoreError, OSError):
    """The disk cache cannot hold the shards a loader reads (its limit, or the disk)."""


class FetchFailed(FeatstoreError, OSError):
    """A shard object could not be fetched into the disk cache, or changed while it was."""


def default_dir() -> str:
    """$FEATSTORE_CACHE_DIR, else $XDG_CACHE_HOME/featstore, else ~/.cache/featstore."""
    if os.environ.get("FEATSTORE_CACHE_DIR"):
        return os.environ["FEATSTORE_CACHE_DIR"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "featstore")


def object_version(info: dict) -> str | None:
    """What changes whenever an object's bytes do, from its listing entry (None: nothing does)."""
    for key in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified", "updated"):
        if info.get(key) not in (None, ""):
            return f"{key}={info[key]}"
    return None


@dataclass(frozen=True)
class Entry:
    """One shard object and its file in the cache."""

    remote: str  # the object's path on its filesystem
    size: int
    version: str
    path: str



class DiskCache:
    """A cache directory: where entries live, making room, fetching one entry."""

    def __init__(self, root: str | os.PathLike | None = None, limit: int | None = None,
                 threads: int = DOWNLOAD_THREADS):
        if limit is not None and int(limit) < 1:
            raise ConfigError(f"cache_limit must be a positive number of bytes, not {limit}")
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root) if root is not None else default_dir()))
        self.limit = None if limit is None else int(limit)
        self.downloads = Downloads(max(1, int(threads)))

    def array_dir(self, store, array_path: str) -> str:
        """Where the entries of one array of `store` live (the store's folder says what it caches)."""
        store_id = store.meta.get("store_id") or store.meta.get("created")
        folder = os.path.join(self.root, hashlib.sha256(f"{store.path}\n{store_id}".encode()).hexdigest()[:16])
        about = os.path.join(folder, "store.json")
        if not os.path.exists(about):
            os.makedirs(folder, exist_ok=True)
            _write_whole(about, json.dumps({"url": store.path, "store_id": store_id}).encode())
        return os.path.join(folder, *array_path.split("/"))

    @staticmethod
    def entry(array_dir: str, key: str, remote: str, size: int, version: str) -> Entry:
        tag = hashlib.sha256(f"{version}\n{size}".encode()).hexdigest()[:16]
        return Entry(remote, int(size), version, os.path.join(array_dir, *key.split("/")) + "@" + tag)

    def make_room(self, entries: list[Entry]) -> None:
        """Mark `entries` used now and evict the least recently used others until the missing
        ones fit the limit and the disk; refuse in one line when they cannot."""
        import filelock

        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot use {self.root} as the disk cache ({e.strerror}): give another cache_dir") from None
        total = sum(e.size for e in entries)
        if self.limit is not None and total > self.limit:
            raise CacheFull(f"this loader's shards need {_gb(total)} in the disk cache {self.root}, more than "
                            f"cache_limit ({_gb(self.limit)}): raise cache_limit, read fewer rows or columns, or use "
                            "cache=None")
        with filelock.FileLock(os.path.join(self.root, ".lock")):
            now = time.time()
            missing = 0
            for e in entries:
                _remove_superseded(e.path)
                if _size(e.path) == e.size:
                    os.utime(e.path, (now, now))
                else:
                    missing += e.size
            files = self._files(now)
            free = shutil.disk_usage(self.root).free
            over = sum(size for _, size, _ in files) + missing - self.limit if self.limit is not None else 0
            todo = max(over, missing + MARGIN - free)
            keep = {e.path for e in entries}
            for _, size, path in sorted(files):  # least recently used first
                if todo <= 0:
                    break
                if path not in keep:
                    _remove(path)
                    _remove(path + ".lock")
                    todo -= size
        if todo > 0:  # the limit always fits by now (checked above): the disk does not
            raise CacheFull(f"the disk of the cache {self.root} has {_gb(free)} free and this loader needs "
                            f"{_gb(missing)} more (+{_gb(MARGIN)} kept free), even with every other cached shard "
                            "evicted: give cache_dir on a larger disk, or use cache=None")

    def _files(self, now: float) -> list[tuple[float, int, str]]:
        """(last used, size, path) of every entry; temporary files of killed downloads removed."""
        out = []
        for folder, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(folder, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                if ".tmp-" in name:
                    if now - st.st_mtime > STALE_TMP_S:
                        _remove(path)
                elif "@" in name and not name.endswith(".lock"):
                    out.append((st.st_mtime, st.st_size, path))
        return out

    def fetch(self, fs, e: Entry, check) -> bool:
        """Make sure `e` is in the cache, fetching the object when it is not (or has the wrong
        size); True when this call fetched it.  `check(path)`: a reason the file is wrong, or None."""
        if _size(e.path) == e.size:
            return False
        import filelock

        os.makedirs(os.path.dirname(e.path), exist_ok=True)
        with filelock.FileLock(e.path + ".lock"):
            if _size(e.path) == e.size:  # another process fetched it while we waited
                return False
            tmp = f"{e.path}.tmp-{os.getpid()}-{threading.get_ident()}"
            url = fs.unstrip_protocol(e.remote)
            try:
                _download(fs, e.remote, tmp)
                problem = _verify(fs, tmp, e, check)
                if problem:
                    raise FetchFailed(f"{url} {problem} while it was fetched into the disk cache: the store is "
                                      "being rewritten; make the Loader again once it is not")
                os.replace(tmp, e.path)
            except FeatstoreError:
                raise
            except Exception as ex:
                raise FetchFailed(f"cannot fetch {url} into the disk cache {self.root}: {ex}") from ex
            finally:
                _remove(tmp)
        return True


def _download(fs, remote: str, local: str) -> None:
    """The whole object in one GET, streamed to `local` (s3fs would split a large object into
    concurrent ranged GETs: objects are fetched concurrently already, and one GET is one request)."""
    kw = {"max_concurrency": 1} if hasattr(fs, "max_concurrency") else {}
    fs.get_file(remote, local, **kw)


def _verify(fs, path: str, e: Entry, check) -> str | None:
    """Why the fetched file is not the listed object, or None.  The object's version is asked for
    again after the GET: had it changed since the listing, its bytes could be another version's."""
    size = _size(path)
    if size != e.size:
        return f"changed (it is {size} bytes, {e.size} when listed)"
    fs.invalidate_cache(e.remote)
    if object_version(fs.info(e.remote)) != e.version:
        return "changed (its version is not the one it was listed with)"
    return check(path)


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
                _remove(e.path)
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


class Downloads:
    """Fetches run by up to `threads` daemon threads, first submitted first.  Daemon threads: a
    program that exits mid-epoch does not wait for the rest of it to download."""

    def __init__(self, threads: int):
        self.threads = threads
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = 0

    def submit(self, fn, *args) -> Future:
        f: Future = Future()
        self._queue.put((f, fn, args))
        with self._lock:
            if self._running < self.threads:
                self._running += 1
                threading.Thread(target=_work, args=(weakref.ref(self),), name="featstore-fetch", daemon=True).start()
        return f


def _work(ref) -> None:
    """One fetch thread: runs queued fetches; leaves after a few idle seconds (or once its
    `Downloads` is gone)."""
    while (owner := ref()) is not None:
        q = owner._queue
        del owner
        try:
            f, fn, args = q.get(timeout=5)
        except queue.Empty:
            owner = ref()
            if owner is not None:
                with owner._lock:
                    if q.empty():
                        owner._running -= 1
                        return
            continue
        if f.set_running_or_notify_cancel():
            try:
                f.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on it
                f.set_exception(e)
        del f, fn, args


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
    source (a window's reads wait for all of its blocks, so their order inside it is free)."""
    cached = [s.cached for s in sources if getattr(s, "cached", None) is not None]
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


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _remove_superseded(path: str) -> None:
    """Remove the entries of other versions of this entry's object (it was rewritten since)."""
    folder, name = os.path.split(path)
    key = name.split("@")[0] + "@"
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for other in names:
        if other.startswith(key) and not other.startswith(name) and ".tmp-" not in other:
            _remove(os.path.join(folder, other))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _write_whole(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
