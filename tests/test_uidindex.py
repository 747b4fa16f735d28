"""The on-disk uid index (featstore.core.uidindex, featstore.core.uidhash): it agrees with a dict, through
collisions, growth and compaction, concurrent writers and a kill -9 mid-registration."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from featstore.core import uidhash

from featstore.core import uidindex
from featstore.store import Store
from featstore.tools.verify import verify


def random_uids(rng, n, prefix=""):
    """Random ASCII and non-ASCII uids of varied length (repeats possible within a call)."""
    alphabet = np.array(list("abcdef0123456789-_/") + ["é", "ß", "猫"])
    lengths = rng.integers(1, 24, n)
    return np.array([prefix + "".join(rng.choice(alphabet, k)) for k in lengths], dtype=np.dtypes.StringDType())


def test_the_vectorized_hash_is_its_reference_definition():
    rng = np.random.default_rng(0)
    uids = np.concatenate([random_uids(rng, 500), np.char.mod("%032x", rng.integers(0, 2**62, 500)).astype("T")])
    want = np.array([uidhash.uid_hash_reference(str(u)) for u in uids.tolist()], np.uint64)
    np.testing.assert_array_equal(uidhash.uid_hash(uids), want)
    assert len(np.unique(want)) == len(set(uids.tolist()))  # 64 bits: no collision among a thousand


@pytest.fixture
def small_levels(monkeypatch):
    """Levels a few hundred entries wide, so a test's thousands of rows go through every kind of
    compaction step (level 0 into 1, a file of level i into i + 1, a full merge)."""
    monkeypatch.setattr(uidindex, "FILE_ROWS", 64)
    monkeypatch.setattr(uidindex, "L1_ROWS", 256)
    monkeypatch.setattr(uidindex, "L0_FILES", 2)
    monkeypatch.setattr(uidindex, "COMPACT_FACTOR", 4)


@pytest.mark.parametrize("bits", [64, 4])  # 4 bits: every lookup meets collisions, resolved by the uid strings
def test_the_index_agrees_with_a_dict_as_the_store_grows(tmp_path, small_levels, bits):
    rng = np.random.default_rng(bits)
    store = Store.create(tmp_path / "s.zarr", rows_per_shard=32, uid_hash_bits=bits)
    truth: dict[str, int] = {}
    levels_seen = set()
    for step in range(12):
        k = int(rng.integers(1, 700))
        fresh = random_uids(rng, k, prefix=f"s{step}-")
        again = np.array(list(truth)[:: max(1, len(truth) // 50)], dtype="T") if truth else np.zeros(0, "T")
        batch = np.concatenate([fresh, again, fresh[:5]])  # repeats within the call and from earlier ones
        res = store.register(batch, batch_rows=97)  # several batches per call
        for u in batch.tolist():
            truth.setdefault(u, len(truth))
        assert res["n_rows"] == len(truth) == store.n_rows
        levels_seen |= set(store.uid_index().levels())
        probe = np.concatenate([np.array(list(truth), dtype="T"), random_uids(rng, 300, prefix="absent-")])
        want = np.array([truth.get(u, -1) for u in probe.tolist()])
        np.testing.assert_array_equal(Store.open(store.path).rows_of(probe), want)
    assert {0, 1, 2} <= levels_seen  # runs waited in level 0 and were merged down through two levels
    assert verify(Store.open(store.path))["ok"]


WRITER = r"""
import sys
import numpy as np
from featstore.store import Store
path, i = sys.argv[1], int(sys.argv[2])
own = np.char.mod(f"w{i}-%06d", np.arange(3000)).astype("T")
shared = np.char.mod("shared-%06d", np.arange(500)).astype("T")
for part in np.array_split(np.concatenate([shared, own]), 6):  # six registrations each, interleaved
    Store.open(path, mode="r+").register(part)
"""


def test_concurrent_writers_lose_nothing_and_register_nothing_twice(tmp_path):
    path = tmp_path / "s.zarr"
    Store.create(path, rows_per_shard=256)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(i)]) for i in range(4)]
    assert [p.wait() for p in procs] == [0] * 4
    st = Store.open(path)
    want = np.concatenate([np.char.mod("shared-%06d", np.arange(500))]
                          + [np.char.mod(f"w{i}-%06d", np.arange(3000)) for i in range(4)]).astype("T")
    assert st.n_rows == len(want)
    rows = st.rows_of(want)
    assert (rows >= 0).all() and len(np.unique(rows)) == len(want)
    assert verify(st)["ok"]


KILLED = r"""
import sys
import numpy as np
from featstore.store import Store
path = sys.argv[1]
uids = np.char.mod("k-%09d", np.arange(600_000)).astype("T")
Store.open(path, mode="r+").register(uids, batch_rows=20_000)
"""


def test_kill_9_mid_registration_then_a_rerun_completes_it(tmp_path):
    """A registration killed while it writes index runs (of an uncommitted batch) leaves a store
    verify passes and that holds only what was committed; the re-run registers every uid once."""
    path = tmp_path / "s.zarr"
    st = Store.create(path, rows_per_shard=1024)
    st.register(np.char.mod("before-%05d", np.arange(1000)).astype("T"))
    runs = path / "_index" / "uid" / "runs"
    before = set(os.listdir(runs))
    p = subprocess.Popen([sys.executable, "-c", KILLED, str(path)])
    while p.poll() is None and len(set(os.listdir(runs)) - before) < 3:  # it is mid-way: runs written
        os.sched_yield()
    p.send_signal(signal.SIGKILL)
    p.wait()
    st = Store.open(path)
    assert st.n_rows == 1000 and verify(st)["ok"]  # nothing half-registered is visible
    again = np.char.mod("k-%09d", np.arange(600_000)).astype("T")
    res = Store.open(path, mode="r+").register(again, batch_rows=200_000)
    assert res["registered"] == 600_000
    st = Store.open(path)
    assert st.n_rows == 601_000
    probe = again[::997]
    np.testing.assert_array_equal(st.rows_of(probe), 1000 + np.arange(0, 600_000, 997))
    assert verify(st)["ok"]


def test_stored_uids_read_straight_from_shards_are_zarrs(tmp_path):
    """featstore.core.strings reads candidates' uids from the shard files: the same strings as zarr,
    unicode, empty chunks and a shard not written included; a damaged shard index is refused."""
    import zarr

    from featstore.errors import FeatstoreError
    from featstore.core.strings import strings_at

    arr = zarr.create_array(tmp_path / "a.zarr", shape=(5000,), shards=(2048,), chunks=(256,), dtype=str,
                            fill_value="")
    values = random_uids(np.random.default_rng(3), 3000)
    arr[:3000] = values  # the third shard never written, chunks 3000.. of the second empty
    rows = np.random.default_rng(4).integers(0, 5000, 700)
    got = strings_at(arr, rows)
    assert got.dtype == np.dtypes.StringDType()
    np.testing.assert_array_equal(got, np.asarray(arr.get_coordinate_selection(rows)))
    shard = tmp_path / "a.zarr" / "c" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(FeatstoreError, match="shard index is damaged"):
        strings_at(arr, [1])
