"""Plain (non-zarr) files inside a store: markers, the progress index, the manifest record, locks.

Local paths are written atomically (temp file + fsync + rename), so a kill never leaves half a
file; other fsspec URLs go through fsspec (an object PUT is atomic by itself).

Locks serialize the writers of one store:

- local stores: an OS file lock (`filelock`, fcntl/msvcrt underneath) under `_progress/_locks/`;
  the OS drops it when its process dies, so a kill -9 never leaves a store locked;
- object storage: a lease object created with a conditional create (`If-None-Match: *` through
  fsspec's `pipe_file(mode="create")`); a filesystem that cannot create conditionally is refused
  for writing, and a lease left by a killed writer is named in the refusal with how to clear it.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import time

from featstore.errors import ReadOnlyStore, StoreBusy


def is_url(path: str) -> bool:
    return "://" in str(path)


def now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def owner() -> str:
    """Who holds a lock: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def one_get(fs) -> dict:
    """Keyword arguments for fsspec's cat_file/get_file that fetch a whole object in one GET.
    s3fs otherwise asks for the object's size first (a HEAD, and a listing when it is absent) to
    split a large object into concurrent ranged GETs: files here are small or fetched concurrently
    already, so that is one or two needless requests per read."""
    return {"max_concurrency": 1} if hasattr(fs, "max_concurrency") else {}


class StoreFiles:
    """The plain files under a store's root (local path or fsspec URL)."""

    def __init__(self, root: str):
        self.root = str(root)
        # seconds a writer waits for another one before refusing (FEATSTORE_LOCK_TIMEOUT overrides)
        self.lock_timeout = float(os.environ.get("FEATSTORE_LOCK_TIMEOUT", 600))
        if is_url(self.root):
            import fsspec

            self.fs, self.base = fsspec.core.url_to_fs(self.root)
        else:
            self.fs, self.base = None, os.path.abspath(self.root)

    def path(self, key: str) -> str:
        return posixpath.join(self.base, key)

    # ---- json files ------------------------------------------------------------------------
    def write_json(self, key: str, obj) -> None:
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        path = self.path(key)
        if self.fs is not None:
            self.fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def write_bytes(self, key: str, data) -> None:
        """Write a binary file whole (atomically, like write_json)."""
        path = self.path(key)
        if self.fs is not None:
            self.fs.pipe_file(path, bytes(data))
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(memoryview(data).cast("B") if not isinstance(data, bytes) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def read_bytes(self, key: str, start: int | None = None, stop: int | None = None) -> bytes:
        """Bytes [start, stop) of a file (all of it by default): one ranged request remotely."""
        path = self.path(key)
        if self.fs is not None:
            whole = start is None and stop is None
            return self.fs.cat_file(path, start=start, end=stop, **(one_get(self.fs) if whole else {}))
        with open(path, "rb") as f:
            f.seek(start or 0)
            return f.read(-1 if stop is None else stop - (start or 0))

    def read_ranges(self, key: str, starts, stops) -> list[bytes]:
        """Bytes [start, stop) of one file for each pair: one open and a pread each locally, ranged
        requests sent together remotely (fsspec's cat_ranges)."""
        path = self.path(key)
        starts, stops = [int(a) for a in starts], [int(b) for b in stops]
        if self.fs is not None:
            return self.fs.cat_ranges([path] * len(starts), starts, stops) if starts else []
        fd = os.open(path, os.O_RDONLY)
        try:
            return [os.pread(fd, b - a, a) for a, b in zip(starts, stops)]
        finally:
            os.close(fd)

    @property
    def local(self) -> bool:
        return self.fs is None

    def read_json(self, key: str):
        """The parsed file, or None when it does not exist."""
        path = self.path(key)
        try:
            if self.fs is not None:
                return json.loads(self.fs.cat_file(path, **one_get(self.fs)))
            with open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def list(self, prefix: str) -> list[str]:
        """Names (not paths) directly under folder `prefix`; one listing request remotely."""
        path = self.path(prefix)
        try:
            if self.fs is not None:
                self.fs.invalidate_cache(path)  # other writers add markers: never a cached listing
                return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []

    def remove(self, key: str) -> None:
        path = self.path(key)
        try:
            if self.fs is not None:
                self.fs.rm_file(path)
            else:
                os.remove(path)
        except FileNotFoundError:
            pass

    def remove_tree(self, prefix: str) -> None:
        path = self.path(prefix)
        if self.fs is not None:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
            return
        import shutil

        shutil.rmtree(path, ignore_errors=True)

    # ---- locks -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, what: str):
        """Hold lock `name` (e.g. "store", "dino.3") for the block; `what` says what it guards
        in the refusal when another writer keeps it past `lock_timeout`."""
        key = f"{_locks()}/{name}.lock"
        if self.fs is None:
            from filelock import FileLock, Timeout

            path = self.path(key)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            except PermissionError:
                raise ReadOnlyStore(f"{self.root} is not writable here (cannot create its lock folder)") from None
            lock = FileLock(path, timeout=self.lock_timeout)
            try:
                lock.acquire()
            except Timeout:
                raise StoreBusy(f"another writer has held the lock on {what} of {self.root} for "
                                f"{self.lock_timeout:.0f}s: try again when it is done") from None
            except PermissionError:
                raise ReadOnlyStore(f"{self.root} is not writable here (cannot take its lock)") from None
            try:
                yield
            finally:
                lock.release()
            return
        with _remote_lease(self, key, what):
            yield


def _locks() -> str:
    from featstore.core.format import LOCKS

    return LOCKS


@contextlib.contextmanager
def _remote_lease(files: StoreFiles, key: str, what: str):
    path = files.path(key)
    body = json.dumps({"owner": owner(), "since": now()}).encode()
    deadline = time.monotonic() + files.lock_timeout
    while True:
        try:
            files.fs.pipe_file(path, body, mode="create")
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                held = files.read_json(key) or {}
                raise StoreBusy(
                    f"{what} of {files.root} is held by {held.get('owner', '?')} since {held.get('since', '?')}: "
                    f"if that writer is gone, delete {files.root}/{key} and run again") from None
            time.sleep(0.5)
        except (TypeError, NotImplementedError, ValueError):
            raise ReadOnlyStore(
                f"{files.root}: this filesystem cannot create files conditionally, so featstore cannot lock it "
                "against a concurrent writer; write the store locally and copy it there") from None
    try:
        yield
    finally:
        files.fs.rm_file(path)

