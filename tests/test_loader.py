import numpy as np
import pytest
import torch

from featstore.errors import CheckpointError, ConfigError, FeatstoreError, UnknownArray, UnknownFeatureSet
from featstore.read import state as loader_state
from featstore.loader import Loader
from featstore.split import split_by_uid
from featstore.core.writes import write_block
from storeutil import block_features, fill_feature_set, make_store

N, R = 203, 16


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    # rows % 13 == 0 are invalid in "a"; "b" is missing its block 5: neither may be served.
    # "m" (128-d fp16: a 16-row block is one 4 KiB page) is read from mapped shard files, "a"
    # (12-d) and "b" (20-d) with preadv into buffers.
    path = tmp_path_factory.mktemp("loader") / "s.zarr"
    s = make_store(path, n=N, rows_per_shard=R, features={"a": 12, "m": 128}, invalid_every=13)
    fill_feature_set(s, "b", 20, blocks=[b for b in range(s.n_blocks) if b != 5])
    return s


def served_rows(store):
    rows = np.arange(N)
    ok = (rows % 13 != 0) & ~((rows >= 5 * R) & (rows < 6 * R))
    return rows[ok]


def rows_of(loader):
    return [b["row"].numpy() for b in loader]


def test_the_sources_are_what_this_file_tests(store):
    loader = Loader(store, {"x": "features/a/pooled", "m": "features/m/pooled", "lab": "samples/label"}, 8)
    assert [c.source.kind for c in loader.columns] == ["local", "mapped", "zarr"]
    assert Loader(store, ["features/a/pooled"], 8, cache="ram").columns[0].source.kind == "ram"
    assert Loader(store, ["features/m/pooled"], 8, direct=False).columns[0].source.kind == "zarr"


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_served_row_exactly_once_across_ranks(store, world_size):
    per_rank = []
    for rank in range(world_size):
        loader = Loader(store, {"x": "features/a/pooled", "y": "features/b/pooled"}, 10,
                        seed=3, rank=rank, world_size=world_size)
        batches = rows_of(loader)
        assert len(batches) == len(loader) and sum(map(len, batches)) == loader.num_rows
        per_rank.append(batches)
    all_rows = np.concatenate([np.concatenate(b) for b in per_rank])
    np.testing.assert_array_equal(np.sort(all_rows), served_rows(store))
    assert len({len(b) for b in per_rank}) == 1  # every rank the same number of batches (DDP)


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


@pytest.mark.parametrize("column,dim", [("a", 12), ("m", 128)])
def test_values_are_the_rows_features(store, column, dim):
    loader = Loader(store, {"x": f"features/{column}/pooled", "label": "samples/label"}, 7, seed=0, with_uids=True)
    for batch in loader:
        rows = batch["row"].numpy()
        for i, r in enumerate(rows):
            block, off = divmod(int(r), R)
            n = min(R, N - block * R)
            want = block_features(column, block, n, dim)[off].astype(np.float16)
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
    # the read path never changes the order: mapped, preadv, zarr and RAM give the same rows
    for kw in ({"direct": False}, {"read_threads": 1, "read_ahead": 0}):
        np.testing.assert_array_equal(np.concatenate(rows_of(Loader(store, cols, 8, seed=5, **kw))), first)


def test_iterating_again_moves_to_the_next_epoch(store):
    loader = Loader(store, ["features/a/pooled"], 8, seed=2)
    e0 = np.concatenate(rows_of(loader))
    assert {k: loader.state_dict()[k] for k in ("seed", "epoch", "offset")} == {"seed": 2, "epoch": 1, "offset": 0}
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


def test_resuming_at_the_very_end_of_an_epoch_starts_the_next(store):
    done = Loader(store, ["features/a/pooled"], 8, seed=2)
    it = iter(done)
    for _ in range(len(done)):
        next(it)
    state = done.state_dict()  # every batch of epoch 0 consumed, the iterator not yet finished
    assert state["epoch"] == 0 and state["offset"] == done.num_rows
    loader = Loader(store, ["features/a/pooled"], 8)
    loader.load_state_dict(state)
    got = np.concatenate(rows_of(loader))
    np.testing.assert_array_equal(got, np.concatenate(rows_of(Loader(store, ["features/a/pooled"], 8, seed=2, epoch=1))))
    assert {k: loader.state_dict()[k] for k in ("seed", "epoch", "offset")} == {"seed": 2, "epoch": 2, "offset": 0}


def test_row_subset_and_ram_cache(store):
    uids = store.uids()
    train, val = split_by_uid(uids, 0.25)
    tr = np.concatenate(rows_of(Loader(store, ["features/a/pooled"], 16, rows=train, cache="ram", seed=1)))
    va = np.concatenate(rows_of(Loader(store, ["features/a/pooled"], 16, rows=np.flatnonzero(val), seed=1)))
    assert set(tr).isdisjoint(va)
    assert set(tr) | set(va) == set(np.flatnonzero(store.feature_set("a").usable_rows()))
    ram = {}
    for batch in Loader(store, {"x": "features/a/pooled"}, 16, seed=4, cache="ram"):  # a full permutation
        ram.update(zip(batch["row"].tolist(), batch["x"].numpy()))
    for batch in Loader(store, {"x": "features/a/pooled"}, 16, seed=4):
        for r, x in zip(batch["row"].tolist(), batch["x"].numpy()):
            np.testing.assert_array_equal(ram[r], x)
    assert Loader(store, ["features/a/pooled"], 16, cache="ram").mode == "full"


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


def test_unknown_columns_and_bad_options_are_clear(store):
    with pytest.raises(UnknownFeatureSet, match="no feature set 'nope'"):
        Loader(store, ["features/nope/pooled"], 4)
    with pytest.raises(UnknownArray, match="is not a column"):
        Loader(store, ["whatever"], 4)
    with pytest.raises(ConfigError, match="full permutation"):
        Loader(store, ["features/a/pooled"], 4, cache="ram", window=64)
    with pytest.raises(ConfigError, match="not both"):
        Loader(store, ["features/a/pooled"], 4, window=64, window_bytes=1 << 20)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs CUDA"):
            Loader(store, ["features/a/pooled"], 4, pin_memory=True)


def test_window_blocks_is_a_deprecated_window(store):
    with pytest.warns(DeprecationWarning, match="window_blocks"):
        old = Loader(store, ["features/a/pooled"], 8, seed=1, window_blocks=2)
    new = Loader(store, ["features/a/pooled"], 8, seed=1, window=2 * R)
    assert old.window == new.window == 32
    np.testing.assert_array_equal(np.concatenate(rows_of(old)), np.concatenate(rows_of(new)))


def test_window_in_bytes(store):
    row_bytes = 12 * 2 + 20 * 2
    loader = Loader(store, ["features/a/pooled", "features/b/pooled"], 4, window_bytes=40 * row_bytes)
    assert loader.window == 40 and loader.batches_per_window == 10 and loader.run_rows == 10
    assert Loader(store, ["features/a/pooled"], 4, window_bytes=1).window == 4  # at least one batch


def test_every_read_path_gives_zarrs_bytes(tmp_path):
    """Mapped shards, preadv'd shards, zarr and the RAM cache give the same bytes, for pooled fp16,
    int8 tokens + scales, uint8 pixels, bool and str columns and a partial last block."""
    s = make_store(tmp_path / "d.zarr", n=45, rows_per_shard=16, features={"t": 8}, tokens=(4, 8), token_dtype="int8",
                   invalid_every=5)
    s.create_feature_set("px", {"model": "pixels"}, 2, pixels="crops", pixels_shape=(3, 4, 4))
    s.create_feature_set("w", {"model": "wide"}, 128)  # 16 rows x 256 bytes: mapped
    for b in range(s.n_blocks):
        start, stop = s.block_range(b)
        rng = np.random.default_rng(b)
        write_block(s, "px", b, {"pooled": rng.standard_normal((stop - start, 2)),
                                 "pixels": rng.integers(0, 255, (stop - start, 3, 4, 4), dtype=np.uint8)},
                    np.ones(stop - start, bool))
        write_block(s, "w", b, {"pooled": rng.standard_normal((stop - start, 128))}, np.ones(stop - start, bool))
    cols = {"pooled": "features/t/pooled", "tok": "features/t/tokens", "px": "pixels/crops",
            "valid": "features/t/valid", "cap": "samples/caption", "wide": "features/w/pooled"}
    kinds = [c.source.kind for c in Loader(s, cols, 7).columns]
    assert "mapped" in kinds and "local" in kinds
    for dequantize in (True, False):
        for window, kw in ((None, {}), (7, {"read_threads": 1, "read_ahead": 0})):
            want = list(Loader(s, cols, 7, seed=3, dequantize=dequantize, window=window, direct=False))
            got = list(Loader(s, cols, 7, seed=3, dequantize=dequantize, window=window, **kw))
            assert len(got) == len(want) > 0
            for x, y in zip(got, want):
                for k in list(cols) + ["row"]:
                    np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]))


def test_kept_batches_are_never_overwritten(store):
    """A consumer that keeps batches (or views of them) sees them unchanged: no batch aliases a
    buffer the loader reuses, on the mapped and the buffered path."""
    cols = {"x": "features/a/pooled", "m": "features/m/pooled"}
    kept = [(b["row"], b["x"][:, :3], b["m"].numpy()) for b in Loader(store, cols, 8, seed=7, window=16)]
    dropping = Loader(store, cols, 8, seed=7, window=16)
    for (row, x, m), fresh in zip(kept, dropping):
        np.testing.assert_array_equal(row.numpy(), fresh["row"].numpy())
        np.testing.assert_array_equal(x.numpy(), fresh["x"][:, :3].numpy())
        np.testing.assert_array_equal(m, fresh["m"].numpy())
    assert dropping._memory.reused > 0  # batches nobody holds any more lend their memory to the next


# ---- guarded resume ------------------------------------------------------------------------------
def saved_state(s, cols, **kw):
    loader = Loader(s, cols, 8, seed=4, **kw)
    it = iter(loader)
    next(it)
    next(it)
    state = loader.state_dict()
    del it
    return state


def test_the_state_is_a_small_dict_of_what_it_replays_against(store):
    state = saved_state(store, ["features/a/pooled"], world_size=2, rank=1)
    assert set(state) == set(loader_state.KEYS) == {"seed", "epoch", "offset", "rows", "fingerprint", "usable",
                                                    "store_rows", "world_size", "batch_size", "window", "order",
                                                    "drop_last"}
    assert state["offset"] == 16 and state["world_size"] == 2
    assert all(isinstance(v, (int, str, bool)) for v in state.values())


def test_resume_after_the_store_grew_is_refused(tmp_path):
    s = make_store(tmp_path / "g.zarr", n=64, rows_per_shard=16, features={"a": 12})
    state = saved_state(s, ["features/a/pooled"])
    s.register([f"new-{i}" for i in range(20)])
    fill_feature_set(s, "a", 12)  # every block computed again (the grown one included)
    loader = Loader(s, ["features/a/pooled"], 8)
    with pytest.raises(CheckpointError, match=r"the store grew \(64 rows when saved, 84 now\)") as e:
        loader.load_state_dict(state)
    assert isinstance(e.value, FeatstoreError)
    loader.load_state_dict(state, strict=False)  # asked for: the next epoch, the state's seed
    assert {k: loader.state_dict()[k] for k in ("seed", "epoch", "offset")} == {"seed": 4, "epoch": 1, "offset": 0}


def test_resume_while_extraction_was_finishing_blocks_is_refused(tmp_path):
    s = make_store(tmp_path / "f.zarr", n=64, rows_per_shard=16)
    fill_feature_set(s, "a", 12, blocks=[0, 1])
    state = saved_state(s, ["features/a/pooled"])
    for b in (2, 3):  # extraction finished two more blocks since
        start, stop = s.block_range(b)
        write_block(s, "a", b, {"pooled": block_features("a", b, stop - start, 12)}, np.ones(stop - start, bool))
    with pytest.raises(CheckpointError, match="64 rows are finished and valid now, 32 when saved"):
        Loader(s, ["features/a/pooled"], 8).load_state_dict(state)


def test_resume_at_another_world_size_batch_size_or_split_is_refused(store):
    cols = ["features/a/pooled"]
    state = saved_state(store, cols, world_size=2)
    with pytest.raises(CheckpointError, match="world size 2 when saved, 4 now"):
        Loader(store, cols, 8, world_size=4).load_state_dict(state)
    with pytest.raises(CheckpointError, match="batch size 8 when saved, 16 now"):
        Loader(store, cols, 16, world_size=2).load_state_dict(state)
    with pytest.raises(CheckpointError, match="served rows differ"):
        Loader(store, cols, 8, world_size=2, rows=np.arange(100)).load_state_dict(state)
    with pytest.raises(CheckpointError, match="order 'window' when saved, 'full' now"):
        Loader(store, cols, 8, world_size=2, cache="ram").load_state_dict(state)
    with pytest.raises(CheckpointError, match=r"shuffle window \(rows\) 37 when saved, 64 now"):
        Loader(store, cols, 8, world_size=2, window=64).load_state_dict({**state, "window": 37})
    with pytest.raises(CheckpointError, match="older featstore"):
        Loader(store, cols, 8).load_state_dict({"seed": 0, "epoch": 0, "offset": 8})
    Loader(store, cols, 8, world_size=2, rank=1).load_state_dict(state)  # any rank resumes a rank's state


# ---- bounded memory ------------------------------------------------------------------------------
def test_a_clip_b16_token_store_trains_in_its_window_budget(tmp_path):
    """197 x 768 fp16 tokens per row (CLIP-B/16) at the default 4096 rows per shard: a block is
    1.2 GB, a window only `window_bytes`.  Buffers the loader allocates stay under its stated
    bound, far below one block, whether a column is read into buffers or mapped (no buffers)."""
    n, tokens = 96, (197, 768)
    s = make_store(tmp_path / "tok.zarr", n=n, rows_per_shard=4096)
    fill_feature_set(s, "clip", 768, tokens=tokens)
    block_bytes = 4096 * tokens[0] * tokens[1] * 2
    budget = 8 << 20  # 8 MiB windows: ~27 rows
    row_bytes = tokens[0] * tokens[1] * 2
    for direct in (False, True):
        loader = Loader(s, {"t": "features/clip/tokens"}, 4, window_bytes=budget, direct=direct, seed=0)
        assert loader.window == budget // row_bytes and loader.run_rows == loader.window // 4
        seen = 0
        for batch in loader:
            seen += len(batch["row"])
        assert seen == n
        assert loader.buffer_peak <= loader.buffer_bound <= 2 * (2 + loader.read_ahead) * budget < block_bytes / 20
        if direct:
            assert loader.columns[0].source.kind == "mapped" and loader.buffer_peak == 0
        else:
            assert loader.buffer_peak > 0


def test_a_damaged_shard_is_an_error_never_wrong_bytes(tmp_path):
    """A shard whose index fails its checksum is neither mapped nor read directly; zarr's own
    check then fails and the loader says which rows, in one line."""
    s = make_store(tmp_path / "c.zarr", n=48, rows_per_shard=16, features={"m": 128})
    shard = tmp_path / "c.zarr" / "features" / "m" / "pooled" / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # the index checksum
    shard.write_bytes(bytes(data))
    loader = Loader(s, ["features/m/pooled"], 8, seed=0)
    assert loader.columns[0].source.kind == "local"  # not mapped: the index did not check out
    with pytest.raises(FeatstoreError, match="cannot read rows 16-32 of features/m/pooled"):
        list(loader)
