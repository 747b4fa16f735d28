import subprocess
import sys
import time

import numpy as np
import pytest

from featstore.core import format as fmt
from featstore.errors import FormatTooNew, IdentityMismatch, NotAStore, StoreNotFound, UnknownFeatureSet
from featstore.store import Store
from storeutil import make_store


def test_create_register_and_lookup(tmp_path):
    store = Store.create(tmp_path / "s.zarr", rows_per_shard=8)
    res = store.register(["a", "b", "c", "b"], captions=["A", "B", "C", "B2"], labels=[0, 1, 2, 1], source_refs=["x:0", "x:1", "x:2", "x:3"])
    assert res["registered"] == 3 and res["duplicates"] == [{"uid": "b", "source_ref": "x:3"}]
    assert store.n_rows == 3
    np.testing.assert_array_equal(store.rows_of(["c", "a", "zzz"]), [2, 0, -1])
    assert store.samples("caption").tolist() == ["A", "B", "C"]  # the first occurrence keeps the row
    # registering again is idempotent; new uids append after the existing rows
    res = store.register(["a", "d"], captions=["A", "D"], labels=[0, 3], source_refs=["y:0", "y:1"])
    assert {k: res[k] for k in ("registered", "already_present", "duplicates", "n_rows")} == \
        {"registered": 1, "already_present": 1, "duplicates": [], "n_rows": 4}
    reopened = Store.open(tmp_path / "s.zarr")
    assert reopened.uids().tolist() == ["a", "b", "c", "d"] and reopened.rows_per_shard == 8
    assert reopened.samples("label").tolist() == [0, 1, 2, 3]


def test_uid_lookup_is_vectorized_and_fast(tmp_path):
    store = Store.create(tmp_path / "s.zarr", rows_per_shard=4096)
    uids = np.array([f"https://example.com/{i:07d}.jpg" for i in range(1_000_000)])
    store.register(uids)
    query = uids[::-1][:200_000]
    store.rows_of(query[:1])  # builds the index once
    t = time.perf_counter()
    rows = store.rows_of(uids)
    elapsed = time.perf_counter() - t
    np.testing.assert_array_equal(rows, np.arange(1_000_000))
    print(f"1M uid lookups: {elapsed:.3f}s")  # reported, not asserted: machines are noisy


def test_create_keeps_an_existing_stores_grid(tmp_path):
    Store.create(tmp_path / "s.zarr", rows_per_shard=8)
    assert Store.create(tmp_path / "s.zarr", rows_per_shard=4096).rows_per_shard == 8


def test_chunks_divide_the_shard_and_stay_small():
    for width in (1, 2, 768 * 2, 4096 * 2, 196 * 512 * 2):
        for r in (16, 100, 4096):
            c = fmt.chunk_rows(width, r)
            assert r % c == 0
            assert c * width <= 2 * fmt.TARGET_CHUNK_BYTES or c == 1


def test_feature_set_arrays_follow_the_row_grid(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=40, rows_per_shard=16, features={"img": 32})
    fs = store.feature_set("img")
    pooled = fs.array("pooled")
    assert pooled.shape == (40, 32) and pooled.dtype == np.float16
    assert pooled.shards == (16, 32) and 16 % pooled.chunks[0] == 0
    assert pooled.compressors == ()  # floats uncompressed by default
    assert fs.missing_blocks() == [] and fs.done_blocks() == [0, 1, 2]


def test_identity_mismatch_is_refused_with_the_difference(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=10, features={"img": 8})
    with pytest.raises(IdentityMismatch) as e:
        store.create_feature_set("img", {"model": "other", "dim": 8}, 8)
    assert "model: 'synthetic-img' in the store vs 'other' now" in str(e.value)
    first, *details = str(e.value).splitlines()  # the refusal, then one indented line per differing key
    assert "different identity" in first and details == ["  model: 'synthetic-img' in the store vs 'other' now"]
    store.create_feature_set("img", {"model": "synthetic-img", "dim": 8}, 8)  # same identity: fine


def test_newer_format_and_non_stores_are_refused(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=4)
    meta = store.meta
    meta["format"] = fmt.FORMAT_VERSION + 1
    store.root.attrs["featstore"] = meta
    with pytest.raises(FormatTooNew, match="upgrade featstore"):
        Store.open(tmp_path / "s.zarr")
    with pytest.raises(StoreNotFound):
        Store.open(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("hi")
    with pytest.raises(NotAStore):
        Store.open(tmp_path / "plain")
    import zarr
    zarr.open_group(tmp_path / "z.zarr", mode="w")
    with pytest.raises(NotAStore, match="no attrs.featstore"):
        Store.open(tmp_path / "z.zarr")


def test_growing_the_store_keeps_every_computed_row(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=20, rows_per_shard=16, features={"img": 8})
    before = np.asarray(store.feature_set("img").array("pooled")[:20]).tobytes()
    assert store.feature_set("img").missing_blocks() == []
    store.register([f"new-{i}" for i in range(20)])
    fs = store.feature_set("img")
    assert fs.array("pooled").shape == (40, 8)
    assert fs.missing_blocks() == [1, 2]  # block 1 grew from 4 to 16 rows: 12 rows to do
    assert fs.usable_rows()[:20].all() and not fs.usable_rows()[20:].any()  # its 4 done rows still served
    assert np.asarray(fs.array("pooled")[:20]).tobytes() == before


def test_remove_feature_set(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=20, features={"a": 4, "b": 4})
    store.remove_feature_set("a")
    assert store.feature_set_names() == ["b"]
    assert not (tmp_path / "s.zarr" / "_progress" / "a").exists()
    with pytest.raises(UnknownFeatureSet, match="it has: b"):
        store.feature_set("a")


def test_plain_zarr_and_dask_read_the_store_without_featstore(tmp_path):
    make_store(tmp_path / "s.zarr", n=50, rows_per_shard=16, features={"img": 8})
    code = f"""
import sys, zarr, dask.array as da, numpy as np
g = zarr.open_group({str(tmp_path / 's.zarr')!r}, mode="r")
assert g.attrs["featstore"]["format"] == 3
uids = g["samples/uid"][:]
x = da.from_zarr(g["features/img/pooled"])
assert x.shape == (50, 8), x.shape
assert np.isfinite(x.astype("float32").sum().compute())
assert "featstore" not in sys.modules
print(len(uids), uids[0], x.chunks[0][0])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[:2] == ["50", "uid-000000"]
