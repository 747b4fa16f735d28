import json
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
from featstore.tools.verify import verify
from featstore.core.writes import write_block, write_rows
from storeutil import block_features, make_store

WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from featstore.store import Store
    from featstore.core.writes import write_block
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


def test_rows_of_a_block_from_two_writers_are_merged_byte_for_byte(tmp_path):
    store = Store.create(tmp_path / "s.zarr", rows_per_shard=8)
    for k in range(2):
        store.register([f"u{i}" for i in range(4 * k, 4 * k + 4)],
                       source={"type": "folder", "location": f"/data/{k}", "options": {}, "fingerprint": "f"})
    store.create_feature_set("img", {"model": "synthetic-img"}, 4)
    x = block_features("img", 0, 8, 4)
    m = write_rows(store, "img", 0, [0, 2, 4], {"pooled": x[[0, 2, 4]]}, np.ones(3, bool), source=0)
    assert m["done"] == [[0, 1], [2, 3], [4, 5]] and m["version"] == 1
    first = np.asarray(store.feature_set("img").array("pooled")[:]).tobytes()
    # a second writer brings rows 1-5: rows 2 and 4 are already done and stay as they are
    m = write_rows(store, "img", 0, [1, 2, 3, 4, 5], {"pooled": -x[1:6]}, np.array([1, 1, 1, 1, 0], bool),
                   [{"row": 5, "reason": "corrupt-image"}], source=1)
    assert m["done"] == [[0, 6]] and m["version"] == 2 and m["n_valid"] == 5 and m["n_invalid"] == 1
    assert m["sources"] == {"0": [[0, 1], [2, 3], [4, 5]], "1": [[1, 2], [3, 4], [5, 6]]}
    assert m["last_write"]["rows"] == 3 and m["failures"] == [{"row": 5, "reason": "corrupt-image", "uid": "u5"}]
    pooled = np.asarray(store.feature_set("img").array("pooled")[:])
    assert pooled[[0, 2, 4]].tobytes() == np.frombuffer(first, np.float16).reshape(8, 4)[[0, 2, 4]].tobytes()
    np.testing.assert_array_equal(pooled[[1, 3]], (-x[[1, 3]]).astype(np.float16))
    assert (pooled[5:] == 0).all()
    assert store.feature_set("img").usable_rows().tolist() == [True] * 5 + [False] * 3
    folder = tmp_path / "s.zarr" / "_progress" / "img"
    assert sorted(n for n in os.listdir(folder) if n.endswith(".json")) == ["0-2.json"]  # the old version is gone
    assert json.loads((folder / "latest" / "0.json").read_text()) == {"version": 2}  # the block's pointer
    assert verify(store)["ok"], verify(store)["problems"]


def test_progress_reads_cost_a_listing_and_the_index(tmp_path):
    from featstore.core.progress import Progress

    store = make_store(tmp_path / "s.zarr", n=64, rows_per_shard=8, features={"img": 4})
    reads = []
    real = store.files.read_json
    store.files.read_json = lambda key: (reads.append(key), real(key))[1]  # count what is read
    with store.lock():
        Progress(store.files, "img").compact()
    reads.clear()
    assert len(store.feature_set("img").markers()) == 8
    assert reads == ["_progress/img/index.json"]
    # a block rewritten after the compaction: only its new marker is read besides the index
    store.register(["late"])
    write_block(store, "img", 8, {"pooled": block_features("img", 8, 1, 4)}, np.ones(1, bool))
    reads.clear()
    markers = store.feature_set("img").markers()
    assert len(markers) == 9 and reads == ["_progress/img/index.json", "_progress/img/8-1.json"]


def test_verify_catches_what_would_mislabel_or_lose_rows(tmp_path):
    store = make_store(tmp_path / "s.zarr", n=32, rows_per_shard=16, features={"img": 8}, invalid_every=5)
    assert verify(store)["ok"]
    fs = store.feature_set("img")
    m = fs.marker(1)
    fs.progress.write(1, {**m, "failures": [{**m["failures"][0], "uid": "someone-else"}]}, m)
    assert any("names uid 'someone-else'" in p for p in verify(store)["problems"])
    m = fs.marker(1)
    fs.progress.write(1, {**m, "done": [[16, 40]]}, m)
    assert any("outside its extent" in p for p in verify(store)["problems"])
    store.root["samples/uid"][3] = "uid-000004"  # a duplicate uid
    assert any("more than once" in p for p in verify(store)["problems"])
    meta = store.meta
    meta["n_rows"] = 40
    store.root.attrs["featstore"] = meta
    problems = verify(Store.open(tmp_path / "s.zarr"))["problems"]
    assert any("samples/uid has 32 rows but the store has 40" in p for p in problems)
    assert any("features/img/pooled has 32 rows" in p for p in problems)
