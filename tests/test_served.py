"""The Loader's O(blocks) setup: served rows from block summaries (featstore.read.served) and the
epoch order computed lazily per rank and window (featstore.read.epoch), each checked against its
O(rows) reference: the masks read whole, and order.epoch_order materialized."""

import numpy as np
import pytest

from featstore.read import order as order_
from featstore.read.epoch import EpochOrder, RankEpoch
from featstore.loader import Loader
from featstore.read.served import served_set
from featstore.core.writes import write_rows
from storeutil import block_features, fill_feature_set, make_store

N, R = 331, 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Every kind of block: "a" has rows % 7 invalid, "b" rows % 11 (blocks invalid in both need
    masks read at setup), "b" lacks block 4 (empty) and has only part of block 9 done (still
    being extracted), "c" is all valid (its blocks are full)."""
    s = make_store(tmp_path_factory.mktemp("served") / "s.zarr", n=N, rows_per_shard=R)
    fill_feature_set(s, "a", 4, invalid_every=7)
    fill_feature_set(s, "b", 4, invalid_every=11, blocks=[b for b in range(s.n_blocks) if b not in (4, 9)])
    fill_feature_set(s, "c", 4)
    start = 9 * R
    rows = np.arange(start + 3, start + 12)
    write_rows(s, "b", 9, rows, {"pooled": block_features("b", 9, len(rows), 4)}, np.ones(len(rows), bool))
    return s


def brute(store, names, rows=None):
    mask = np.ones(store.n_rows, bool)
    for name in names:
        mask &= store.feature_set(name).usable_rows()
    if rows is not None:
        sub = np.zeros(store.n_rows, bool)
        sub[rows] = True
        mask &= sub
    return np.flatnonzero(mask)


@pytest.mark.parametrize("names", [["a"], ["b"], ["c"], ["a", "b"], ["a", "b", "c"], []])
def test_served_rows_equal_the_masks_read_whole(store, names):
    served = served_set(store, names)
    want = brute(store, names)
    assert len(served) == len(want) == served.usable
    np.testing.assert_array_equal(served.rows(), want)
    idx = np.random.default_rng(0).integers(0, len(want), 500)  # any order, repeats
    np.testing.assert_array_equal(served.select(idx), want[idx])
    np.testing.assert_array_equal(served.blocks(), np.unique(want // R))


def test_a_row_subset(store):
    rows = np.random.default_rng(1).choice(N, 150, replace=False)
    served = served_set(store, ["a", "b"], rows)
    np.testing.assert_array_equal(served.rows(), brute(store, ["a", "b"], rows))
    assert served.usable == len(brute(store, ["a", "b"]))
    mask = np.zeros(N, bool)
    mask[rows] = True
    np.testing.assert_array_equal(served_set(store, ["a", "b"], mask).rows(), served.rows())


@pytest.mark.parametrize("n", [0, 1, 5, 100, 1000, 4099])
@pytest.mark.parametrize("world,batch,window,drop_last", [(1, 8, 64, False), (3, 8, 40, True), (4, 5, 23, False),
                                                         (8, 16, 1000, True), (2, 7, None, False)])
@pytest.mark.parametrize("mode", ["window", "full", "sequential"])
def test_the_lazy_order_equals_its_materialized_reference(n, world, batch, window, drop_last, mode):
    served = np.flatnonzero(np.random.default_rng(n).random(int(n * 1.3) + 1) < 0.77)[:n]
    n = len(served)
    ref = order_.epoch_order(served, seed=5, epoch=2, rows_per_shard=64, batch_size=batch, world_size=world,
                             window_rows=window, mode=mode)
    lazy = EpochOrder(n, seed=5, epoch=2, rows_per_shard=64, batch_size=batch, world_size=world,
                      window_rows=window, mode=mode)
    np.testing.assert_array_equal(served[lazy.served_index(np.arange(n))], ref)
    for rank in range(world):
        want = order_.rank_batches(ref, rank=rank, world_size=world, batch_size=batch, drop_last=drop_last)
        mine = RankEpoch(lazy, rank=rank, drop_last=drop_last)
        assert len(mine) == len(want)
        got = mine.rows(range(len(mine)), lambda i: served[i])
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
        for t in sorted({0, len(want) // 2, len(want) - 1}) if want else []:  # any batch alone, as a resume does
            np.testing.assert_array_equal(mine.rows([t], lambda i: served[i])[0], want[t])


def test_the_loader_serves_the_reference_order(store):
    """Iterating (windows computed one at a time) gives what the materialized order deals out."""
    for world in (1, 3):
        for rank in range(world):
            loader = Loader(store, {"x": "features/a/pooled", "y": "features/b/pooled"}, 8, seed=2, epoch=1,
                            rank=rank, world_size=world, window=24)
            ref = order_.rank_batches(loader.order(), rank=rank, world_size=world, batch_size=8, drop_last=False)
            got = [b["row"].numpy() for b in loader]
            assert len(got) == len(ref) and all(np.array_equal(a, b) for a, b in zip(got, ref))


def test_a_class_sorted_store_still_mixes(tmp_path):
    s = make_store(tmp_path / "s.zarr", n=4000, rows_per_shard=256, labels=False)
    fill_feature_set(s, "f", 4)
    loader = Loader(s, ["features/f/pooled"], 64, seed=0)
    labels = np.arange(4000) * 40 // 4000  # sorted by class
    assert loader.shuffle_quality(labels) >= 0.95


def test_a_block_rewritten_after_setup_is_refused_not_served_wrong(tmp_path):
    """A partial block's rows are read when a batch needs them: if an extract rewrote the block
    since the loader counted it, iterating stops with one line instead of serving other rows."""
    from featstore.errors import StoreChanged

    s = make_store(tmp_path / "s.zarr", n=64, rows_per_shard=16)
    fill_feature_set(s, "f", 4, blocks=[0, 1, 3])
    rows = np.arange(32, 40)
    write_rows(s, "f", 2, rows, {"pooled": block_features("f", 2, 8, 4)}, np.ones(8, bool))
    loader = Loader(s, ["features/f/pooled"], 8, seed=0)
    assert len(loader.served) == 56
    rest = np.arange(40, 48)
    write_rows(s, "f", 2, rest, {"pooled": block_features("f", 2, 8, 4)}, np.ones(8, bool))
    with pytest.raises(StoreChanged, match="block 2 was rewritten"):
        list(loader)
    assert len(list(Loader(s, ["features/f/pooled"], 8, seed=0))) == 8  # a new loader serves all 64
