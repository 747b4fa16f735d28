import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

from featstore.store import Store
from featstore.verify import verify
from featstore.writer import write_block
from storeutil import block_features, make_store

WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from featstore.store import Store
    from featstore.writer import write_block
    from storeutil import block_features
    import numpy as np
    store = Store.open({path!r}, mode="r+")
    store.create_feature_set("img", {{"model": "synthetic-img"}}, 256)
    for b in store.feature_set("img").missing_blocks():
        start, stop = store.block_range(b)
        write_block(store, "img", b, {{"pooled": block_features("img", b, stop - start, 256)}}, np.ones(stop - start, bool))
""")


def _arrays_bytes(path):
    g = zarr.open_group(path, mode="r")
    return {k: np.asarray(g[f"features/img/{k}"][:]).tobytes() for k in ("pooled", "valid")}


def test_round_trip_and_marker(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=40, rows_per_shard=16, features={"img": 8}, invalid_every=7)
    fs = store.feature_set("img")
    x = np.asarray(fs.array("pooled")[:])
    expected = np.concatenate([block_features("img", b, n, 8) for b, n in enumerate([16, 16, 8])]).astype(np.float16)
    valid = np.arange(40) % 7 != 0
    np.testing.assert_array_equal(x[valid], expected[valid])
    assert (x[~valid] == 0).all()  # invalid rows are zeroed: deterministic bytes
    m = fs.marker(2)
    assert m["rows"] == [32, 40] and m["n_invalid"] == 1 and m["failures"][0]["uid"] == "uid-000035"
    assert set(m["checksums"]) == {"features/img/pooled", "features/img/valid"}
    assert verify(store)["ok"]


def test_same_block_twice_gives_identical_bytes(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=32, rows_per_shard=16, features={"img": 8})
    before = _arrays_bytes(tmp_path / "s.zarr")
    m1 = store.feature_set("img").marker(1)
    write_block(store, "img", 1, {"pooled": block_features("img", 1, 16, 8)}, np.ones(16, bool))
    assert _arrays_bytes(tmp_path / "s.zarr") == before
    assert store.feature_set("img").marker(1)["checksums"] == m1["checksums"]


def test_verify_catches_tampering(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=32, rows_per_shard=16, features={"img": 8})
    store.feature_set("img").array("pooled")[3] = np.full(8, np.nan, np.float16)
    result = verify(store)
    assert not result["ok"]
    assert any("block 0" in p and "checksum" in p for p in result["problems"])
    assert any("NaN" in p for p in result["problems"])


def test_bad_columns_are_refused(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=16, rows_per_shard=16, features={"img": 8})
    with pytest.raises(ValueError, match="expected shape"):
        write_block(store, "img", 0, {"pooled": np.zeros((15, 8))}, np.ones(16, bool))
    with pytest.raises(ValueError, match="missing arrays"):
        write_block(store, "img", 0, {}, np.ones(16, bool))


def test_sigkill_mid_write_then_rerun_completes_identically(tmp_path):
    tests_dir = os.path.dirname(__file__)
    n, r = 4000, 100
    for name in ("killed", "clean"):
        s = Store.create(tmp_path / f"{name}.zarr", rows_per_shard=r)
        s.register([f"u{i}" for i in range(n)])
    script = lambda name: WRITER.format(tests=tests_dir, path=str(tmp_path / f"{name}.zarr"))  # noqa: E731
    subprocess.run([sys.executable, "-c", script("clean")], check=True)

    proc = subprocess.Popen([sys.executable, "-c", script("killed")])
    progress = tmp_path / "killed.zarr" / "_progress" / "img"
    deadline = time.time() + 60
    while time.time() < deadline and not (progress.exists() and len(os.listdir(progress)) >= 3):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = Store.open(tmp_path / "killed.zarr")
    missing = killed.feature_set("img").missing_blocks()
    assert 0 < len(missing) < 40, "the writer should have been killed part-way"
    assert verify(killed)["ok"], verify(killed)["problems"]  # unmarked blocks are just missing

    subprocess.run([sys.executable, "-c", script("killed")], check=True)
    done = Store.open(tmp_path / "killed.zarr")
    assert done.feature_set("img").missing_blocks() == []
    assert verify(done)["ok"]
    assert _arrays_bytes(tmp_path / "killed.zarr") == _arrays_bytes(tmp_path / "clean.zarr")
