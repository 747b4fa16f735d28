"""trainers/train_loader.py: the training loader a trainer config makes (shuffle window, rank share,
per-rank batch), on a real store; the configs' `shuffle_window` key."""

import numpy as np
import pytest

from featstore.errors import ConfigError
from featstore.loader import Loader
from featstore.split import split_by_uid
from featstore.trainers.sharelock.config import Config, load_config
from featstore.trainers.ddp import Dist
from featstore.trainers.train_loader import shuffle_window, train_loader
from featstore.trainers.uta.config import UTAConfig

from sharelock_data import make_aligned_store

COLUMNS = {"image": "features/img/pooled", "text": "features/txt/pooled"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_aligned_store(tmp_path_factory.mktemp("loading") / "s.zarr", n=640, rows_per_shard=32)


def _epoch_rows(loader) -> np.ndarray:
    return np.concatenate([b["row"].numpy() for b in loader])


def test_shuffle_window_reaches_the_loader_and_changes_the_order(store):
    train, _ = split_by_uid(store.uids(), 0.1)
    default = train_loader(store, COLUMNS, Config(batch_size=64), Dist(), rows=train)
    assert default.window == Loader(store, COLUMNS, 64).window  # null: the loader's own default (by bytes)
    orders = {}
    for window in (32, 256):
        loader = train_loader(store, COLUMNS, Config(batch_size=64, shuffle_window=window), Dist(), rows=train)
        assert loader.window == window
        orders[window] = _epoch_rows(loader)
    assert sorted(orders[32]) != list(orders[32]) and not np.array_equal(orders[32], orders[256])
    # at any window, a batch mixes rows from across the store (20 blocks of 32 rows here)
    blocks_per_batch = {w: np.mean([len(np.unique(b // 32)) for b in o[: len(o) // 64 * 64].reshape(-1, 64)])
                        for w, o in orders.items()}
    assert min(blocks_per_batch.values()) >= 15, blocks_per_batch


def test_each_rank_reads_its_share_of_the_global_batch(store):
    train, _ = split_by_uid(store.uids(), 0.1)
    cfg = Config(batch_size=64, seed=3)
    ranks = [train_loader(store, COLUMNS, cfg, Dist(rank=r, world_size=2), rows=train) for r in (0, 1)]
    assert [ld.batch_size for ld in ranks] == [32, 32] and len(ranks[0]) == len(ranks[1]) > 0
    rows = [_epoch_rows(ld) for ld in ranks]
    assert len(rows[0]) == len(rows[1]) and not set(rows[0]) & set(rows[1])
    assert set(rows[0]) | set(rows[1]) <= set(np.flatnonzero(train))
    # each rank reads its slice of every global batch: together they are one process's batches
    one = [b["row"].numpy() for b in train_loader(store, COLUMNS, cfg, Dist(), rows=train)]
    per_rank = [[b["row"].numpy() for b in train_loader(store, COLUMNS, cfg, Dist(rank=r, world_size=2), rows=train)]
                for r in (0, 1)]
    assert len(one) == len(per_rank[0])
    assert all(np.array_equal(g, np.concatenate([a, b])) for g, a, b in zip(one, *per_rank))
    with pytest.raises(ConfigError, match="does not split evenly over 3 processes"):
        train_loader(store, COLUMNS, cfg, Dist(rank=0, world_size=3), rows=train)


@pytest.mark.parametrize("base", [Config(), UTAConfig()], ids=["sharelock", "uta"])
def test_shuffle_window_is_a_config_key_of_both_trainers(base):
    assert load_config(None, ["shuffle_window=8"], base=base).shuffle_window == 8
    assert load_config(None, [], base=base).shuffle_window is None and shuffle_window(base) == {}
    with pytest.raises(ConfigError, match="shuffle_window must be >= 1"):
        load_config(None, ["shuffle_window=0"], base=base)
