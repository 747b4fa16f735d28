"""Where a webdataset source's tars live: a local folder, or object storage through fsspec.

    tars = open_tars("shards/")            # or "s3://bucket/shards/", "s3://bucket/one.tar", any fsspec URL
    tars.names                             # the .tar files, sorted
    with tars.scan(name) as (tar, read):   # tar headers in order; read(member) -> a small member's bytes
    tars.read_spans([(name, offset, size), ...])   # member bytes by offset (one entry per span)

Local tars are scanned with seeks (only headers and small members are read) and read with
seek + read.  Remote tars are *streamed* once each for the manifest (tarfile's stream mode over
a read-ahead file: a few large sequential GETs, never a request per member) and their images
read by ranged GETs of the members, neighbouring members merged into one request and the
requests of a batch issued concurrently (`cat_ranges`); a remote source is never downloaded whole
to read a block.  Endpoint and credentials come from the usual environment variables of the
filesystem (for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
from pathlib import Path

from featstore.core.files import is_url
from featstore.errors import SourceError

from .base import files_fingerprint

STREAM_BLOCK = 16 << 20  # bytes per GET while streaming a remote tar for its manifest
MERGE_GAP = 256 << 10  # members closer than this are read in one ranged GET
MAX_RANGE = 32 << 20  # ... up to this many bytes per GET


def open_tars(path) -> "LocalTars | RemoteTars":
    return RemoteTars(str(path)) if is_url(path) else LocalTars(Path(path))


class LocalTars:
    remote = False

    def __init__(self, path: Path):
        if path.is_file():
            self.root, self.names = path.parent, [path.name]
        else:
            self.root = path
            self.names = sorted(n for n in os.listdir(path) if n.endswith(".tar") and (path / n).is_file())

    def fingerprint(self) -> str:
        return files_fingerprint([self.root / name for name in self.names])

    def size(self, name: str) -> int:
        return os.stat(self.root / name).st_size

    @contextlib.contextmanager
    def scan(self, name: str):
        with open(self.root / name, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            def read(member):
                f.seek(member.offset_data)
                return f.read(member.size)

            yield tar, read

    def opener(self, name: str):
        return open(self.root / name, "rb")


class RemoteTars:
    remote = True

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        try:
            import fsspec

            self.fs, base = fsspec.core.url_to_fs(self.url)
        except ImportError as err:
            raise SourceError(f"cannot read {self.url}: {err} (e.g. pip install s3fs for s3://)") from None
        except ValueError as err:
            raise SourceError(f"cannot read {self.url}: {err}") from None
        self.base = base.rstrip("/")
        try:
            if self.base.endswith(".tar"):
                info = self.fs.info(self.base)
                self.folder, entries = self.base.rsplit("/", 1)[0], [info]
            else:
                self.fs.invalidate_cache(self.base)  # what the folder holds now, not a cached listing
                self.folder, entries = self.base, self.fs.ls(self.base, detail=True)
        except FileNotFoundError:
            raise SourceError(f"source not found: {self.url}") from None
        except Exception as err:  # noqa: BLE001 - credentials, endpoint, permissions: one line
            raise SourceError(f"cannot list {self.url} ({type(err).__name__}: {_first_line(err)}): check the URL and "
                              "the storage's endpoint and credentials (e.g. AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID)") from None
        files = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries if e.get("type", "file") == "file"}
        self.entries = {n: e for n, e in files.items() if n.endswith(".tar")}
        self.names = sorted(self.entries)

    def key(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def fingerprint(self) -> str:
        """Names, sizes and ETags (else modification times) from the one listing made at open."""
        h = hashlib.sha256()
        for name in self.names:
            e = self.entries[name]
            tag = e.get("ETag") or e.get("etag") or e.get("LastModified") or e.get("mtime") or ""
            h.update(f"{name}\0{e.get('size')}\0{tag}\n".encode())
        return h.hexdigest()[:16]

    def size(self, name: str) -> int:
        return int(self.entries[name]["size"])

    @contextlib.contextmanager
    def scan(self, name: str):
        """Stream the tar once, front to back: headers and small members as they pass."""
        try:
            f = self.fs.open(self.key(name), "rb", block_size=STREAM_BLOCK, cache_type="readahead")
        except Exception as err:  # noqa: BLE001
            raise OSError(f"cannot open {self.url}/{name}: {_first_line(err)}") from None
        with f, tarfile.open(fileobj=f, mode="r|") as tar:
            yield tar, lambda member: tar.extractfile(member).read()

    def read_spans(self, spans: list[tuple[str, int, int]]) -> list[bytes]:
        """The bytes of each (tar name, offset, size), fetched as few merged ranged GETs, all at
        once.  A storage error raises SourceError (a network failure must not be recorded as bad
        samples); a member shorter than its span comes back short (the caller names it truncated)."""
        order = sorted(range(len(spans)), key=lambda i: (spans[i][0], spans[i][1]))
        ranges: list[list] = []  # [name, start, end, [span indexes]]
        for i in order:
            name, offset, size = spans[i]
            last = ranges[-1] if ranges else None
            if (last is not None and last[0] == name and offset - last[2] <= MERGE_GAP
                    and max(last[2], offset + size) - last[1] <= MAX_RANGE):
                last[2] = max(last[2], offset + size)
                last[3].append(i)
            else:
                ranges.append([name, offset, offset + size, [i]])
        if not ranges:
            return []
        try:
            got = self.fs.cat_ranges([self.key(r[0]) for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges],
                                     on_error="raise")
        except Exception as err:  # noqa: BLE001
            raise SourceError(f"reading images from {self.url} failed ({type(err).__name__}: {_first_line(err)}); "
                              "the blocks written before it are kept: run the same command again") from None
        out: list[bytes] = [b""] * len(spans)
        for (_, start, _, members), data in zip(ranges, got):
            for i in members:
                _, offset, size = spans[i]
                out[i] = data[offset - start : offset - start + size]
        return out


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]
