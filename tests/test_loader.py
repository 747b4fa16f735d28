import numpy as np
import pytest
import torch

from featstore.errors import UnknownFeatureSet
from featstore.loader import Loader
from featstore.split import split_by_uid
from storeutil import block_features, make_store

N, R = 203, 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # rows % 13 == 0 are invalid in "a"; "b" is missing its block 5: neither may be served
    path = tmp_path_factory.mktemp("loader") / "s.zarr"
    s = make_store(path, n=N, rows_per_shard=R, features={"a": 12}, invalid_every=13)
    from storeutil import fill_feature_set
    fill_feature_set(s, "b", 20, blocks=[b for b in range(s.n_blocks) if b != 5])
    return s


def served_rows(store):
    rows = np.arange(N)
    ok = (rows % 13 != 0) & ~((rows >= 5 * R) & (rows < 6 * R))
    return rows[ok]


def rows_of(loader):
    return [b["row"].numpy() for b in loader]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_served_row_exactly_once_across_ranks(store, world_size):
    per_rank = []
    for rank in range(world_size):
        loader = Loader(store, {"x": "features/a/pooled", "y": "features/b/pooled"}, 10,
                        seed=3, rank=rank, world_size=world_size)
        batches = rows_of(loader)
        assert len(batches) == len(loader)
        per_rank.append(batches)
    all_rows = np.concatenate([np.concatenate(b) for b in per_rank])
    np.testing.assert_array_equal(np.sort(all_rows), served_rows(store))
    counts = [len(b) for b in per_rank]
    assert max(counts) - min(counts) <= 1  # ranks differ by at most one batch


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_drop_last_gives_equal_full_batches(store, world_size):
    b = 10
    per_rank = [rows_of(Loader(store, ["features/a/pooled", "features/b/pooled"], b, seed=1, rank=r,
                               world_size=world_size, drop_last=True)) for r in range(world_size)]
    assert len({len(p) for p in per_rank}) == 1
    assert all(len(x) == b for p in per_rank for x in p)
    served = np.concatenate([np.concatenate(p) for p in per_rank])
    assert len(np.unique(served)) == len(served)
    assert len(served_rows(store)) - len(served) <= world_size * b - 1


def test_values_are_the_rows_features(store):
    loader = Loader(store, {"x": "features/a/pooled", "label": "samples/label"}, 7, seed=0, with_uids=True)
    for batch in loader:
        rows = batch["row"].numpy()
        for i, r in enumerate(rows):
            block, off = divmod(int(r), R)
            n = min(R, N - block * R)
            want = block_features("a", block, n, 12)[off].astype(np.float16)
            np.testing.assert_array_equal(batch["x"][i].numpy(), want)
        assert batch["x"].dtype == torch.float16
        np.testing.assert_array_equal(batch["label"].numpy(), rows % 10)
        assert batch["uid"] == [f"uid-{r:06d}" for r in rows]


def test_order_is_a_function_of_seed_and_epoch(store):
    cols = ["features/a/pooled"]
    first = np.concatenate(rows_of(Loader(store, cols, 8, seed=5, epoch=0)))
    again = np.concatenate(rows_of(Loader(store, cols, 8, seed=5, epoch=0)))
    other_epoch = np.concatenate(rows_of(Loader(store, cols, 8, seed=5, epoch=1)))
    other_seed = np.concatenate(rows_of(Loader(store, cols, 8, seed=6, epoch=0)))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_epoch) and not np.array_equal(first, other_seed)
    assert sorted(first) == sorted(other_epoch)
    unshuffled = np.concatenate(rows_of(Loader(store, cols, 8, shuffle=False)))
    np.testing.assert_array_equal(unshuffled, np.sort(unshuffled))


def test_iterating_again_moves_to_the_next_epoch(store):
    loader = Loader(store, ["features/a/pooled"], 8, seed=2)
    e0 = np.concatenate(rows_of(loader))
    assert loader.state_dict() == {"seed": 2, "epoch": 1, "offset": 0}
    e1 = np.concatenate(rows_of(loader))
    np.testing.assert_array_equal(e1, np.concatenate(rows_of(Loader(store, ["features/a/pooled"], 8, seed=2, epoch=1))))
    assert not np.array_equal(e0, e1)


@pytest.mark.parametrize("world_size,rank", [(1, 0), (3, 2)])
def test_mid_epoch_resume_continues_the_same_order(store, world_size, rank):
    kw = dict(seed=9, epoch=4, rank=rank, world_size=world_size)
    full = rows_of(Loader(store, ["features/a/pooled"], 6, **kw))
    loader = Loader(store, ["features/a/pooled"], 6, **kw)
    it = iter(loader)
    got = [next(it)["row"].numpy() for _ in range(3)]
    state = loader.state_dict()
    del it
    resumed = Loader(store, ["features/a/pooled"], 6, seed=0, rank=rank, world_size=world_size)
    resumed.load_state_dict(state)
    got += rows_of(resumed)
    assert len(got) == len(full)
    for a, b in zip(got, full):
        np.testing.assert_array_equal(a, b)


def test_row_subset_and_ram_cache(store):
    uids = store.uids()
    train, val = split_by_uid(uids, 0.25)
    tr = np.concatenate(rows_of(Loader(store, ["features/a/pooled"], 16, rows=train, cache="ram", seed=1)))
    va = np.concatenate(rows_of(Loader(store, ["features/a/pooled"], 16, rows=np.flatnonzero(val), seed=1)))
    assert set(tr).isdisjoint(va)
    assert set(tr) | set(va) == set(np.flatnonzero(store.feature_set("a").usable_rows()))
    a = [b["x"].numpy() for b in Loader(store, {"x": "features/a/pooled"}, 16, seed=4, cache="ram")]
    b = [b["x"].numpy() for b in Loader(store, {"x": "features/a/pooled"}, 16, seed=4)]
    np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))


def test_int8_tokens_come_back_dequantized(tmp_path):
    s = make_store(tmp_path / "t.zarr", n=40, rows_per_shard=16, features={"t": 8}, tokens=(4, 8), token_dtype="int8")
    rows, toks = [], []
    for batch in Loader(s, {"tok": "features/t/tokens"}, 16, shuffle=False):
        rows.append(batch["row"].numpy())
        toks.append(batch["tok"].numpy())
    toks = np.concatenate(toks).astype(np.float32)
    want = np.concatenate([block_features("t-tok", b, n, 32).reshape(n, 4, 8) for b, n in enumerate([16, 16, 8])])
    cos = (toks * want).sum(-1) / np.linalg.norm(toks, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() > 0.99 and cos.mean() > 0.999


def test_unknown_columns_are_clear(store):
    with pytest.raises(UnknownFeatureSet, match="no feature set 'nope'"):
        Loader(store, ["features/nope/pooled"], 4)
    with pytest.raises(UnknownFeatureSet, match="is not a column"):
        Loader(store, ["whatever"], 4)


def test_resuming_at_the_very_end_of_an_epoch_starts_the_next(store):
    loader = Loader(store, ["features/a/pooled"], 8, seed=2)
    n = sum(len(r) for r in rows_of(Loader(store, ["features/a/pooled"], 8, seed=2)))
    loader.load_state_dict({"seed": 2, "epoch": 0, "offset": n})
    got = np.concatenate(rows_of(loader))
    np.testing.assert_array_equal(got, np.concatenate(rows_of(Loader(store, ["features/a/pooled"], 8, seed=2, epoch=1))))
    assert loader.state_dict() == {"seed": 2, "epoch": 2, "offset": 0}


def test_direct_shard_reads_equal_zarrs_read_path(tmp_path):
    """The loader reads uncompressed shards straight from their files; zarr must agree, for
    pooled fp16, int8 tokens + scales, uint8 pixels, bool and str columns and a partial last block."""
    s = make_store(tmp_path / "d.zarr", n=45, rows_per_shard=16, features={"t": 8}, tokens=(4, 8), token_dtype="int8",
                   invalid_every=5)
    s.create_feature_set("px", {"model": "pixels"}, 2, pixels="crops", pixels_shape=(3, 4, 4))
    from featstore.writer import write_block
    for b in range(s.n_blocks):
        start, stop = s.block_range(b)
        rng = np.random.default_rng(b)
        write_block(s, "px", b, {"pooled": rng.standard_normal((stop - start, 2)),
                                 "pixels": rng.integers(0, 255, (stop - start, 3, 4, 4), dtype=np.uint8)},
                    np.ones(stop - start, bool))
    cols = {"pooled": "features/t/pooled", "tok": "features/t/tokens", "px": "pixels/crops",
            "valid": "features/t/valid", "cap": "samples/caption"}
    for dequantize in (True, False):
        a = list(Loader(s, cols, 7, seed=3, dequantize=dequantize, direct=True))
        b = list(Loader(s, cols, 7, seed=3, dequantize=dequantize, direct=False))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            for k in cols:
                np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]))
