"""The disk cache's directory (`featstore.read.cache`, the Loader's `cache="disk"`): where an entry
lives, making room (least recently used first, under `cache_limit` and the disk), and fetching one
shard object whole, checked, into place.

    cache = DiskCache("/nvme/featstore", limit=200 << 30)
    e = cache.entry(cache.array_dir(store, "features/dino/pooled"), "c/0/0", remote, size, version)
    cache.make_room([e]); cache.fetch(fs, e, check)
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass

from featstore.core.files import one_get
from featstore.errors import CacheFull, ConfigError, FeatstoreError, FetchFailed

MARGIN = 1 << 30  # disk space the cache leaves free
STALE_TMP_S = 3600  # a temporary file this old is a killed download's
DOWNLOAD_THREADS = 8


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
                    remove(path)
                    remove(path + ".lock")
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
                        remove(path)
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
                remove(tmp)
        return True


# a fetched object is written into the cache in pieces of this size (a multiple of 2 MiB): see _download
WRITE_BYTES = 8 << 20


def _download(fs, remote: str, local: str) -> None:
    """The whole object in one GET (objects are fetched concurrently already: `one_get`), then
    copied into `local` by writes of `WRITE_BYTES`.  The page cache keeps a file as folios the
    size of the writes that filled it: s3fs writes 64 KiB pieces, whose small folios the Loader's
    mapping can only map as 4 KiB pages, while large writes give large folios it maps as 2 MiB
    pages (`read/mapping.py`), as it does a local store's shards (zarr writes each whole): later
    epochs from the cache ran slower than from a local store before this copy (their gather
    time, examples/remote_ratios.py's store, 65,536 rows)."""
    part = f"{local}.part"
    try:
        fs.get_file(remote, part, **one_get(fs))
        buf = bytearray(WRITE_BYTES)
        with open(part, "rb", buffering=0) as src, open(local, "wb", buffering=0) as dst:
            while n := src.readinto(buf):
                view, done = memoryview(buf)[:n], 0
                while done < n:
                    done += dst.write(view[done:])
    finally:
        remove(part)


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
            remove(os.path.join(folder, other))


def remove(path: str) -> None:
    """Remove a file that may be gone already."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _write_whole(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
