"""Reading over S3: featstore, litdata and mosaic streaming against one local S3 server.

The server is moto's (`python -m moto.server`), a separate process bound to 127.0.0.1 only; it
speaks the S3 protocol and keeps objects in memory.  Every client finds it the usual way, through
environment variables (`AWS_ENDPOINT_URL` for boto3/s3fs, `S3_ENDPOINT_URL` for mosaic streaming,
litdata's `storage_options={"endpoint_url": ...}`), with dummy credentials.

The remote contenders read a subset of the rows (`rows`, whole row blocks) uploaded once (the
local contenders' own files when the subset is the whole data, as in --quick):

  featstore_local   the featstore Loader over that subset's local store (the baseline of
                    `remote_vs_local`)
  featstore_remote  the same Loader over the same store uploaded to s3://featstore-bench/store.zarr
  litdata_remote    litdata's StreamingDataset over s3://.../litdata, its chunk cache emptied
                    before each epoch (so every epoch downloads)
  mosaic_remote     mosaic's StreamingDataset(remote=s3://.../mds, local=cache), cache emptied
                    before each epoch

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
def s3_server():
    """moto's S3 server on 127.0.0.1 in its own process; yields its endpoint url."""
    try:
        import boto3  # noqa: F401
        import moto  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"{e.name} is not installed (pip install -e '.[bench]')") from None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


class FeatstoreLocal(Contender):
    name = "featstore_local"
    settings = "featstore.Loader (as `featstore`) over the remote subset's local store"

    def __init__(self, data, rows: int, whole=None):
        super().__init__(data)
        self.rows = rows
        self.whole = whole if rows == data.n else None  # the whole data's store, when that is the subset

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
        return featstore_loader.open_loader(self.path, self.data)


class FeatstoreRemote(FeatstoreLocal):
    name = "featstore_remote"
    settings = f"the same featstore.Loader over the same store at s3://{BUCKET}/store.zarr (moto, 127.0.0.1)"
    cold = False

    def __init__(self, data, rows: int, local: FeatstoreLocal):
        super().__init__(data, rows)
        self.local = local

    def build(self) -> None:
        self.bytes = upload(self.local.path, "store.zarr")

    def files(self):
        return []

    def open(self):
        return featstore_loader.open_loader(f"s3://{BUCKET}/store.zarr", self.data)


class LitdataRemote(Contender):
    name = "litdata_remote"
    cold = False

    def __init__(self, data, rows: int, whole=None):
        super().__init__(data)
        self.rows = rows
        self.src = whole if rows == data.n and whole is not None else self.dir / "src"
        self.settings = (f"litdata (as `litdata`) over s3://{BUCKET}/litdata, storage_options endpoint_url, cache emptied "
                         "per epoch; allow_http added to its obstore client options (see open)")

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
        return litdata_stream.loader(f"s3://{BUCKET}/litdata", self.data, cache_dir=self.dir / "cache",
                                     storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})


class MosaicRemote(Contender):
    name = "mosaic_remote"
    cold = False

    def __init__(self, data, rows: int, whole=None):
        super().__init__(data)
        self.rows = rows
        self.src = whole if rows == data.n and whole is not None else self.dir / "src"
        self.ds = None
        self.settings = f"mosaic streaming (as `mosaic`) with remote=s3://{BUCKET}/mds, local=cache emptied per epoch"

    def build(self) -> None:
        if not self.src.exists():
            mosaic_mds.write(self.src, self.data, n=self.rows)
        self.bytes = upload(self.src, "mds")

    def files(self):
        return []

    def open(self):
        shutil.rmtree(self.dir / "cache", ignore_errors=True)
        self.ds, dl = mosaic_mds.loader(self.data, self.dir / "cache", remote=f"s3://{BUCKET}/mds")
        return dl

    def close(self) -> None:
        self.ds = None
        mosaic_mds.import_streaming().util.clean_stale_shared_memory()
