"""The Loader as a torch data pipeline: pickling, DataLoader workers, torch.distributed ranks."""

import multiprocessing as mp
import os
import pickle
import socket

import numpy as np
import pytest
import torch

from featstore.loader import Loader
from featstore.store import Store
from storeutil import make_store

COLS = {"x": "features/a/pooled", "m": "features/m/pooled"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("torch") / "s.zarr", n=203, rows_per_shard=16, features={"a": 12, "m": 128},
                      invalid_every=13)


def rows(batches):
    return [b["row"].numpy() for b in batches]


def assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_a_loader_pickles_and_serves_the_same(store):
    loader = Loader(store, COLS, 8, seed=3, rank=1, world_size=2)
    it = iter(loader)
    next(it)
    del it
    copy = pickle.loads(pickle.dumps(loader))
    assert copy.state_dict() == loader.state_dict()
    assert_same_batches(rows(copy), rows(loader))


@pytest.mark.parametrize("world_size", [1, 2])
def test_dataloader_workers_split_batches_without_duplicates_or_omissions(store, world_size):
    """Two real worker processes per rank: together they serve exactly the rank's batches, in the
    same sequence as without workers."""
    for rank in range(world_size):
        want = rows(Loader(store, COLS, 8, seed=1, rank=rank, world_size=world_size))
        dl = torch.utils.data.DataLoader(Loader(store, COLS, 8, seed=1, rank=rank, world_size=world_size),
                                         batch_size=None, num_workers=2)
        got = rows(dl)
        assert_same_batches(got, want)
        flat = np.concatenate(got)
        assert len(np.unique(flat)) == len(flat)


def test_spawned_workers_unpickle_the_loader(store):
    want = rows(Loader(store, COLS, 16, seed=5))
    dl = torch.utils.data.DataLoader(Loader(store, COLS, 16, seed=5), batch_size=None, num_workers=2,
                                     multiprocessing_context="spawn")
    assert_same_batches(rows(dl), want)


def test_loader_dataloader_keeps_the_state_exact(store):
    """loader.dataloader(2): resuming from its state mid-epoch continues the same sequence."""
    full = rows(Loader(store, COLS, 8, seed=2))
    loader = Loader(store, COLS, 8, seed=2)
    got = []
    for batch in loader.dataloader(num_workers=2):
        got.append(batch["row"].numpy())
        if len(got) == 5:
            break
    state = loader.state_dict()
    assert state["offset"] == 40 and state["epoch"] == 0
    resumed = Loader(store, COLS, 8)
    resumed.load_state_dict(state)
    got += rows(resumed.dataloader(num_workers=2))
    assert_same_batches(got, full)
    assert resumed.state_dict()["epoch"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_rank(rank: int, world: int, port: int, path: str, out) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loader = Loader(Store.open(path), COLS, 8, seed=4)  # rank and world size from the process group
        out.put((rank, loader.rank, loader.world_size, [b["row"].numpy().tolist() for b in loader]))
    finally:
        torch.distributed.destroy_process_group()


def test_rank_and_world_size_come_from_torch_distributed(store):
    """Two real processes in a gloo process group on 127.0.0.1."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_distributed_rank, args=(r, 2, port, store.path, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, (lr, lw, b)) for r, lr, lw, b in (out.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for r in range(2):
        lr, lw, batches = got[r]
        assert (lr, lw) == (r, 2)
        want = rows(Loader(store, COLS, 8, seed=4, rank=r, world_size=2))
        assert_same_batches([np.array(b) for b in batches], want)
    assert len(got[0][2]) == len(got[1][2])


def test_without_a_process_group_a_loader_is_rank_0_of_1(store):
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    loader = Loader(store, COLS, 8)
    assert (loader.rank, loader.world_size) == (0, 1)
    assert os.getpid() == loader._pid
