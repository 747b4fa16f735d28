"""The epoch order (featstore.read.order): mixing, the rank rule, purity.  Pure functions, no store."""

import numpy as np
import pytest

from featstore.read.order import (batches_per_rank, epoch_order, rank_batches, shuffle_quality, window_shape)


def block_window_order(served, seed, r, blocks_per_window=4):
    """The order featstore used before: blocks permuted, rows shuffled inside windows of 4 blocks."""
    rng = np.random.default_rng([seed, 0])
    by_block = np.split(served, np.flatnonzero(np.diff(served // r)) + 1)
    perm = rng.permutation(len(by_block))
    return np.concatenate([rng.permutation(np.concatenate([by_block[j] for j in perm[i : i + blocks_per_window]]))
                           for i in range(0, len(perm), blocks_per_window)])


@pytest.mark.parametrize("n,classes,batch", [(120_000, 1000, 1024), (40_000, 100, 256)])
def test_a_class_sorted_store_mixes_like_a_full_permutation(n, classes, batch):
    """ImageNet-like: rows sorted by class, 4096-row blocks.  Default-sized windows (a 256 MiB
    window of 768+4096-d fp16 rows is ~27k rows) mix batches as well as a full permutation; the
    old 4-block windows did not, so this test can fail."""
    served = np.arange(n)
    labels = served * classes // n  # class-sorted
    r = 4096
    for window in (27_594, 4 * batch):  # the default, and a small one: quality does not depend on it
        order = epoch_order(served, seed=0, epoch=0, rows_per_shard=r, batch_size=batch, window_rows=window)
        assert np.array_equal(np.sort(order), served)
        assert shuffle_quality(labels[order], batch) >= 0.9
    assert shuffle_quality(labels[block_window_order(served, 0, r)], batch) < 0.85
    full = epoch_order(served, seed=0, epoch=0, rows_per_shard=r, batch_size=batch, mode="full")
    assert shuffle_quality(labels[full], batch) == pytest.approx(1.0, abs=0.02)


def test_reads_are_runs_and_a_global_batch_takes_one_row_per_run():
    r, batch, world = 64, 8, 2
    served = np.flatnonzero(np.random.default_rng(1).random(3000) < 0.9)  # a 90% split
    window = 5 * batch
    k, run = window_shape(window, batch, r)
    order = epoch_order(served, seed=3, epoch=2, rows_per_shard=r, batch_size=batch, world_size=world, window_rows=window)
    run_id = np.searchsorted(served, order) // run  # a run: `run` consecutive served rows
    g = batch * world
    full_windows = len(order) // (k * g) * (k * g)
    for i in range(0, full_windows, g):  # inside full windows: never two rows of one run in a global batch
        assert len(np.unique(run_id[i : i + g])) == g
    # each rank reads only its own runs: rank 0's first window touches about its share of them
    mine = np.concatenate(rank_batches(order, rank=0, world_size=world, batch_size=batch, drop_last=True)[:k])
    runs_of_mine = np.unique(np.searchsorted(served, mine) // run)
    assert len(runs_of_mine) <= 1.5 * batch < g  # interleaved ranks would each touch all g runs


def test_the_order_is_a_pure_function():
    served = np.arange(0, 5000, 3)
    kw = dict(rows_per_shard=128, batch_size=16, world_size=2, window_rows=64)
    a = epoch_order(served, seed=1, epoch=4, **kw)
    np.testing.assert_array_equal(a, epoch_order(served.copy(), seed=1, epoch=4, **kw))
    assert not np.array_equal(a, epoch_order(served, seed=1, epoch=5, **kw))
    assert not np.array_equal(a, epoch_order(served, seed=2, epoch=4, **kw))
    np.testing.assert_array_equal(epoch_order(served, seed=1, epoch=4, mode="sequential", **kw), served)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 3, 7, 64, 100, 1001])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_rank_gets_the_same_number_of_batches(world, n, drop_last):
    """The DDP rule: equal batch counts on every rank, for any row count.  Without drop_last every
    row is served, repeats only when the last step has fewer rows than ranks (< world repeats);
    with it, full batches only, nothing repeated."""
    batch = 8
    order = np.random.default_rng(n).permutation(n)
    per_rank = [rank_batches(order, rank=r, world_size=world, batch_size=batch, drop_last=drop_last) for r in range(world)]
    counts = {len(b) for b in per_rank}
    assert counts == {batches_per_rank(n, world_size=world, batch_size=batch, drop_last=drop_last)}
    served = np.concatenate([np.concatenate(b) if b else np.zeros(0, int) for b in per_rank])
    if drop_last:
        assert all(len(x) == batch for b in per_rank for x in b)
        assert len(np.unique(served)) == len(served) and n - len(served) < world * batch
    else:
        assert set(served) == set(order)
        assert len(served) - n == (world - n % world if 0 < n and 0 < n % (world * batch) < world else 0)
        assert all(len(x) > 0 for b in per_rank for x in b)
        for step in zip(*per_rank):  # a step's batch sizes differ by at most one row
            assert max(map(len, step)) - min(map(len, step)) <= 1
