"""Reading over S3: featstore, litdata and mosaic streaming against one local S3 server.

The server is moto's (`python -m moto.server`), a separate process bound to 127.0.0.1 only; it
speaks the S3 protocol and keeps objects in memory.  Every client finds it the usual way, through
environment variables (`AWS_ENDPOINT_URL` for boto3/s3fs, `S3_ENDPOINT_URL` for mosaic streaming,
litdata's `storage_options={"endpoint_url": ...}`), with dummy credentials.

The remote contenders read a subset of the rows (`rows`, whole row blocks) uploaded once (the
local contenders' own files when the subset is the whole data, as in --quick).  Each is timed
twice per round: its FIRST epoch (a fresh loader, its local cache emptied: everything comes over
S3) and a LATER epoch (`again()`: the same loader or dataset iterated once more, its cache as the
first epoch left it), because the peers download into a local cache and serve later epochs from
it.  Results keys: `<name>` (first epoch) and `<name>_later`.

  featstore_local   the featstore Loader over that subset's local store, warm (the baseline of
                    `remote_vs_local`); later = the same Loader's next epoch
  featstore_remote  the same Loader over the same store at s3://featstore-bench/store.zarr, with
                    `remote_loader_args` (contenders/featstore_loader.py: the one place for them)
  litdata_remote    litdata's StreamingDataset over s3://.../litdata (chunks downloaded into its
                    cache_dir; kept for later epochs by its default max_cache_size)
  mosaic_remote     mosaic's StreamingDataset(remote=s3://.../mds, local=cache) (shards downloaded
                    into `local`, kept)

Loopback has no latency and no bandwidth limit worth the name, so these figures show the cost of
each client's request pattern and copies, not of a network.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import Contender, Unavailable
from . import featstore_loader, litdata_stream, mosaic_mds

BUCKET = "featstore-bench"


@contextlib.contextmanager
def s3_server(latency_ms: int = 0, slow_bucket: str | None = None):
    """moto's S3 server on 127.0.0.1 in its own process; yields its endpoint url.  With
    `slow_bucket`, every request on that bucket (created too) waits `latency_ms` first
    (`slow_s3.py`: a store as far away as a region's S3), the others none."""
    try:
        import boto3  # noqa: F401
        import moto  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"{e.name} is not installed (pip install -e '.[bench]')") from None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_s3.py"), str(port),
            str(latency_ms), slow_bucket] if slow_bucket else [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, "S3_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "bench",
           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ALLOW_HTTP": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                break
            if proc.poll() is not None:
                raise Unavailable("moto's S3 server exited at start")
            time.sleep(0.05)
        client().create_bucket(Bucket=BUCKET)
        if slow_bucket:
            client().create_bucket(Bucket=slow_bucket)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def upload(local: Path, prefix: str) -> int:
    """Every file under `local` to s3://BUCKET/prefix/...; returns bytes sent."""
    c, total = client(), 0
    for root, _, names in os.walk(local):
        for name in names:
            path = Path(root) / name
            c.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(local).as_posix()}")
            total += path.stat().st_size
    return total


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).exists() else 0


class FeatstoreLocal(Contender):
    name = "featstore_local"
    settings = "featstore.Loader (as `featstore`) over the remote subset's local store, warm"

    def __init__(self, data, rows: int, whole=None):
        super().__init__(data)
        self.rows = rows
        self.whole = whole if rows == data.n else None  # the whole data's store, when that is the subset
        self.loader = None

    @property
    def path(self):
        return self.whole if self.whole is not None else self.dir / "store.zarr"

    def build(self) -> None:
        if self.whole is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            featstore_loader.build_store(self.path, self.data, n=self.rows)

    def files(self):
        return [self.path / "features"]

    def open(self):
        self.loader = featstore_loader.open_loader(self.path, self.data)
        return self.loader

    def again(self):
        return self.loader  # its epoch counter moved on at the end of the last one

    def close(self) -> None:
        self.loader = None


class FeatstoreRemote(FeatstoreLocal):
    name = "featstore_remote"
    cold = False

    def __init__(self, data, rows: int, local: FeatstoreLocal):
        super().__init__(data, rows)
        self.local = local
        self.args = featstore_loader.remote_loader_args(self.cache)
        self.settings = (f"the same featstore.Loader over the same store at s3://{BUCKET}/store.zarr (moto, 127.0.0.1)"
                         + (f", with {', '.join(f'{k}={v!r}' for k, v in self.args.items())}" if self.args else
                            ", no other arguments (no local cache: every epoch reads over S3)"))

    @property
    def cache(self) -> Path:
        return self.dir / "cache"

    def build(self) -> None:
        self.bytes = upload(self.local.path, "store.zarr")

    def files(self):
        return []

    def open(self):
        shutil.rmtree(self.cache, ignore_errors=True)
        self.loader = featstore_loader.open_loader(f"s3://{BUCKET}/store.zarr", self.data, **self.args)
        return self.loader

    def cache_bytes(self) -> int:
        return tree_bytes(self.cache)

    def describe(self) -> dict:
        return {"settings": self.settings, "loader_settings": {**featstore_loader.LOADER, **self.args}}


class LitdataRemote(Contender):
    name = "litdata_remote"
    cold = False

    def __init__(self, data, rows: int, whole=None):
        super().__init__(data)
        self.rows = rows
        self.src = whole if rows == data.n and whole is not None else self.dir / "src"
        self.dl = None
        self.settings = (f"litdata (as `litdata`) over s3://{BUCKET}/litdata, storage_options endpoint_url, its "
                         "cache_dir emptied before each first epoch; allow_http added to its obstore client options")

    def build(self) -> None:
        if not self.src.exists():
            litdata_stream.write(self.src, self.data, n=self.rows)
        self.bytes = upload(self.src, "litdata")

    def files(self):
        return []

    def open(self):
        # litdata downloads chunks with obstore, building its client options itself without
        # `allow_http`, so an http:// endpoint fails ("BadScheme"); add that one option (in the
        # parent: forked workers inherit it).  Nothing else of litdata is touched.
        from litdata.streaming import downloader

        downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = True
        shutil.rmtree(self.dir / "cache", ignore_errors=True)
        self.dl = litdata_stream.loader(f"s3://{BUCKET}/litdata", self.data, cache_dir=self.dir / "cache",
                                        storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
        return self.dl

    def again(self):
        return self.dl

    def close(self) -> None:
        self.dl = None

    def cache_bytes(self) -> int:
        return tree_bytes(self.dir / "cache")


class MosaicRemote(Contender):
    name = "mosaic_remote"
    cold = False

    def __init__(self, data, rows: int, whole=None):
        super().__init__(data)
        self.rows = rows
        self.src = whole if rows == data.n and whole is not None else self.dir / "src"
        self.ds = self.dl = None
        self.settings = (f"mosaic streaming (as `mosaic`) with remote=s3://{BUCKET}/mds, local=a cache emptied before "
                         "each first epoch")

    def build(self) -> None:
        if not self.src.exists():
            mosaic_mds.write(self.src, self.data, n=self.rows)
        self.bytes = upload(self.src, "mds")

    def files(self):
        return []

    def open(self):
        shutil.rmtree(self.dir / "cache", ignore_errors=True)
        self.ds, self.dl = mosaic_mds.loader(self.data, self.dir / "cache", remote=f"s3://{BUCKET}/mds")
        return self.dl

    def again(self):
        return self.dl

    def cache_bytes(self) -> int:
        return tree_bytes(self.dir / "cache")

    def close(self) -> None:
        self.ds = self.dl = None
        mosaic_mds.import_streaming().util.clean_stale_shared_memory()


class S3WholeObjects(Contender):
    """The server's own ceiling: every shard object of the featstore store's two columns fetched
    whole with s3fs (`GROUP` blocks' objects at a time, concurrently), no decoding, no batching.
    A client that reads these bytes over this server cannot do much better."""

    name = "s3_whole_objects"
    cold = False
    GROUP = 4  # blocks fetched at once (8 objects, ~160 MB at 4096 rows of 768 + 4096 float16)

    def __init__(self, data, rows: int, local: FeatstoreLocal):
        super().__init__(data)
        self.rows, self.local, self.fs = rows, local, None
        self.settings = (f"s3fs cat of the shard objects of both columns, whole, {self.GROUP} blocks at a time "
                         f"concurrently: what moto on 127.0.0.1 serves at most (a ceiling, not a loader)")

    def build(self) -> None:  # reads what FeatstoreRemote uploaded
        pass

    def files(self):
        return []

    def _objects(self) -> list[list[str]]:
        out = []
        for b in range(-(-self.rows // self.data.rows_per_shard)):
            out.append([f"{BUCKET}/store.zarr/features/{k}/pooled/c/{b}/0" for k in ("img", "txt")])
        return out

    def open(self):
        import s3fs
        import torch

        self.fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
        r = self.data.rows_per_shard

        def epoch():
            blocks = self._objects()
            for g in range(0, len(blocks), self.GROUP):
                got = self.fs.cat([p for paths in blocks[g : g + self.GROUP] for p in paths])
                assert all(len(v) > 0 for v in got.values())
                for b in range(g, min(g + self.GROUP, len(blocks))):
                    n = min(r, self.rows - b * r)
                    yield {"row": torch.arange(b * r, b * r + n), "img": torch.empty((n, 0)), "txt": torch.empty((n, 0))}

        return epoch()

    def again(self):  # nothing is cached: a later epoch is the same fetches
        return self.open()

    def check(self) -> int:
        """The objects exist and hold the local shard files' bytes."""
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], skip_instance_cache=True)
        path = self._objects()[0][0]
        local = self.local.path / path.split("/store.zarr/", 1)[1]
        assert fs.cat(path) == local.read_bytes(), f"{self.name}: {path} differs from {local}"
        return self.rows

    def close(self) -> None:
        self.fs = None
