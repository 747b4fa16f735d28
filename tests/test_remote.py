"""A store on S3 (moto's server on 127.0.0.1), read by the Loader's remote shard reader."""

import numpy as np
import pytest
import torch

from featstore.loader import Loader
from featstore.store import Store
from loaderutil import assert_same, batches, mixed_store
from servers import s3_server

s3fs = pytest.importorskip("s3fs")

COLUMNS = {"pooled": "features/t/pooled", "tok": "features/t/tokens", "wide": "features/w/pooled",
           "valid": "features/t/valid", "label": "samples/label", "cap": "samples/caption"}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """(local store, the same store uploaded to S3), 45 rows in blocks of 16, a partial last
    block, invalid rows, int8 tokens with scales, a 128-d column (mapped when local)."""
    path = tmp_path_factory.mktemp("remote") / "s.zarr"
    local = mixed_store(path)
    with s3_server():
        fs = s3fs.S3FileSystem()
        fs.mkdir("bucket")
        fs.put(str(path), "bucket/s.zarr", recursive=True)
        yield local, Store.open("s3://bucket/s.zarr")


def test_the_remote_store_is_read_by_ranged_shard_reads(stores):
    local, remote = stores
    kinds = {c.alias: c.source.kind for c in Loader(remote, COLUMNS, 8).columns}
    assert kinds == {"pooled": "remote", "tok": "remote", "wide": "remote", "valid": "remote", "label": "zarr",
                     "cap": "zarr"}
    assert Loader(local, COLUMNS, 8).columns[2].source.kind == "mapped"


@pytest.mark.parametrize("kw", [{"seed": 3}, {"shuffle": False, "window": 8}, {"seed": 1, "rank": 1, "world_size": 2,
                                                                              "dequantize": False}])
def test_remote_batches_are_the_local_bytes(stores, kw):
    """Remote direct reads == zarr's remote read path == the local store (mapped and preadv)."""
    local, remote = stores
    want = batches(Loader(local, COLUMNS, 7, **kw))
    assert_same(batches(Loader(remote, COLUMNS, 7, **kw)), want)
    assert_same(batches(Loader(remote, COLUMNS, 7, direct=False, **kw)), want)


def test_each_shard_index_is_fetched_once_and_runs_are_single_requests(stores):
    _, remote = stores
    loader = Loader(remote, {"pooled": "features/t/pooled"}, 4, seed=0, window=8)  # runs of 2 rows
    reader = loader.columns[0].source.remote
    for _ in range(2):  # two epochs
        assert sum(len(b["row"]) for b in loader) == len(loader.served)
    index_requests = remote.n_blocks  # one per shard, over both epochs
    runs = 2 * len(np.unique(loader.served.rows() // 2))  # runs of two epochs
    assert reader.index_fetches == index_requests
    assert reader.requests - index_requests < runs  # a window's runs of one (small) shard are one GET


def test_ranges_of_one_object_close_together_are_one_get():
    from featstore.read.remote import merge_ranges

    paths, starts, ends = ["b", "a", "a", "a", "a"], [0, 100, 0, 5000, 10**8], [10, 200, 50, 6000, 10**8 + 5]
    got_paths, got_starts, got_ends, where = merge_ranges(paths, starts, ends, gap=4096, most=1 << 20)
    assert list(zip(got_paths, got_starts, got_ends)) == [("a", 0, 200), ("a", 5000, 6000),
                                                         ("a", 10**8, 10**8 + 5), ("b", 0, 10)]
    assert where == [(3, 0), (0, 100), (0, 0), (1, 0), (2, 0)]  # (merged range, offset in it) of each
    _, got_starts, got_ends, _ = merge_ranges(["a"] * 3, [0, 10, 20], [10, 20, 30], gap=0, most=20)
    assert list(zip(got_starts, got_ends)) == [(0, 20), (20, 30)]  # a GET stays within `most` bytes


def test_remote_store_through_dataloader_workers(stores):
    """Forked DataLoader workers reopen the S3 file system (fsspec's loop does not survive fork)."""
    local, remote = stores
    want = batches(Loader(local, COLUMNS, 5, seed=2))
    dl = torch.utils.data.DataLoader(Loader(remote, COLUMNS, 5, seed=2), batch_size=None, num_workers=2)
    assert_same(batches(dl), want)
