"""cache="disk": a store on S3 (moto's server on 127.0.0.1, every request recorded: `s3util`) read
from its whole shard objects fetched into a local cache directory."""

import os

import numpy as np
import pytest
import torch
import zarr

from featstore.errors import CacheFull, FetchFailed
from featstore.errors import ConfigError
from featstore.loader import Loader
from featstore.store import Store
from loaderutil import assert_same, batches, mixed_store

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

BUCKET = "featstore-cache"
COLUMNS = {"pooled": "features/t/pooled", "tok": "features/t/tokens", "wide": "features/w/pooled",
           "valid": "features/t/valid", "label": "samples/label", "cap": "samples/caption"}
CACHED = ("features/t/pooled/", "features/t/tokens/", "features/t/tokens_scale/", "features/w/pooled/",
          "features/t/valid/")
POOLED = ("features/t/pooled/", "features/w/pooled/")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(server, local store path): 45 rows in blocks of 16 (a partial last block), invalid rows,
    int8 tokens with scales, a 128-d column (its shards are mapped; the narrow ones are read with
    pread), uploaded to s3://featstore-cache/s.zarr."""
    from s3util import s3_server

    path = tmp_path_factory.mktemp("cache-src") / "s.zarr"
    mixed_store(path)
    with s3_server() as server:
        server.fs.mkdir(BUCKET)
        server.fs.put(str(path), f"{BUCKET}/s.zarr", recursive=True)
        yield server, path


def upload(s3, name: str) -> Store:
    server, path = s3
    server.fs.put(str(path), f"{BUCKET}/{name}", recursive=True)
    return Store.open(f"s3://{BUCKET}/{name}")


def shard_gets(server, store_key: str = "s.zarr", arrays=CACHED) -> list[str]:
    """Object keys of the GETs of these arrays' shards since the last clear (one per request)."""
    out = []
    for r in server.requests:
        if r.method == "GET" and r.key.startswith(store_key + "/"):
            inner = r.key[len(store_key) + 1 :]
            if inner.startswith(arrays) and "/c/" in inner:
                assert r.range is None, f"a ranged GET of {r.key}: the cache fetches whole objects"
                out.append(r.key)
    return out


def cached_objects(server, store_key: str = "s.zarr") -> dict[str, int]:
    return {k: v["size"] for k, v in server.fs.find(f"{BUCKET}/{store_key}", detail=True).items()
            if k.split(store_key + "/")[1].startswith(CACHED) and "/c/" in k}


def test_cached_batches_are_the_local_bytes_and_each_object_is_fetched_once(s3, tmp_path):
    server, path = s3
    local, remote = Store.open(path), Store.open(f"s3://{BUCKET}/s.zarr")
    server.requests.clear()
    loader = Loader(remote, COLUMNS, 7, seed=3, cache="disk", cache_dir=tmp_path)
    assert len([r for r in server.requests if r.is_listing]) <= 2 * len(CACHED)  # a listing per array, not per block
    loader.served.rows()  # partial blocks' served masks, read through zarr (not the cache) and kept
    server.requests.clear()
    kinds = {c.alias: c.source.kind for c in loader.columns}
    assert kinds == {"pooled": "cached", "tok": "cached", "wide": "cached", "valid": "cached", "label": "zarr",
                     "cap": "zarr"}
    assert loader.columns[2].source.by_row is not None  # the 128-d column: its shards mapped, one np.take
    assert loader.columns[0].source.by_row is None  # 8-d: a 256-byte block cannot be mapped: pread
    mine = Loader(local, COLUMNS, 7, seed=3)
    cached = [s.cached for c in loader.columns for s in c.sources() if s.cached is not None]
    for _ in range(2):  # two epochs (different orders), each the local store's bytes
        assert_same(batches(loader), batches(mine))
        assert all(c.fetched_all() for c in cached)  # so the second epoch schedules nothing
    objects = cached_objects(server)
    gets = shard_gets(server)
    assert sorted(gets) == sorted(k.split("/", 1)[1] for k in objects)  # each object once, whole
    fetched = sum(s.cached.fetched for c in loader.columns for s in c.sources() if s.cached is not None)
    assert fetched == len(objects)

    # a later loader (another run) reads the cache: no shard object fetched again
    again = Loader(remote, COLUMNS, 7, seed=5, rank=1, world_size=2, dequantize=False, cache="disk",
                   cache_dir=tmp_path)
    again.served.rows()
    server.requests.clear()
    assert_same(batches(again), batches(Loader(local, COLUMNS, 7, seed=5, rank=1, world_size=2, dequantize=False)))
    assert shard_gets(server) == []


def test_an_entry_that_does_not_match_its_object_is_fetched_again(s3, tmp_path):
    server, path = s3
    remote = upload(s3, "changed.zarr")
    cols = {"wide": "features/w/pooled", "pooled": "features/t/pooled"}
    first = batches(Loader(remote, cols, 8, shuffle=False, cache="disk", cache_dir=tmp_path))
    # block 1 of w rewritten on the server (here: block 0's shard; same size, other bytes and ETag)
    key = f"{BUCKET}/changed.zarr/features/w/pooled/c/"
    server.fs.pipe_file(key + "1/0", server.fs.cat_file(key + "0/0"))
    # and an entry of t truncated in the cache (a disk that filled, a hand that slipped)
    entries = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if "@" in f and "lock" not in f]
    (short,) = [e for e in entries if "/t/pooled/c/2/" in e]
    with open(short, "r+b") as f:
        f.truncate(100)
    server.requests.clear()
    got = batches(Loader(remote, cols, 8, shuffle=False, cache="disk", cache_dir=tmp_path))
    assert sorted(shard_gets(server, "changed.zarr", POOLED)) == ["changed.zarr/features/t/pooled/c/2/0",
                                                                  "changed.zarr/features/w/pooled/c/1/0"]
    assert len([p for p in _entries(tmp_path) if "/w/pooled/c/1/" in p]) == 1  # the old version's entry is gone
    want = np.asarray(zarr.open_array(store=f"s3://{BUCKET}/changed.zarr/features/w/pooled", mode="r")[:45])
    rows = np.concatenate([b["row"] for b in got])  # (t's invalid rows are not served)
    np.testing.assert_array_equal(np.concatenate([b["wide"] for b in got]), want[rows])
    np.testing.assert_array_equal(want[16:32], want[0:16])  # the new bytes, not the cached old ones
    assert not np.array_equal(np.concatenate([b["wide"] for b in first]), want[rows])
    np.testing.assert_array_equal(np.concatenate([b["pooled"] for b in got]),
                                  np.concatenate([b["pooled"] for b in first]))


def test_a_full_cache_evicts_the_least_recently_used_or_refuses(s3, tmp_path):
    server, _ = s3
    remote = Store.open(f"s3://{BUCKET}/s.zarr")
    sizes = cached_objects(server)
    need = {k: sum(v for o, v in sizes.items() if f"/features/{k}/pooled/" in o) for k in ("w", "t")}
    with pytest.raises(CacheFull, match="cache_limit") as e:
        Loader(remote, {"w": "features/w/pooled"}, 8, cache="disk", cache_dir=tmp_path, cache_limit=need["w"] - 1)
    assert "\n" not in str(e.value)
    limit = need["w"] + need["t"] - 1  # room for either set, not both
    batches(Loader(remote, {"w": "features/w/pooled"}, 8, cache="disk", cache_dir=tmp_path, cache_limit=limit))
    os.utime(next(p for p in _entries(tmp_path) if "/w/pooled/c/0/" in p), (1, 1))  # the least recently used
    server.requests.clear()
    batches(Loader(remote, {"t": "features/t/pooled"}, 8, cache="disk", cache_dir=tmp_path, cache_limit=limit))
    left = _entries(tmp_path)
    assert sum(os.path.getsize(p) for p in left) <= limit
    assert not any("/w/pooled/c/0/" in p for p in left) and len([p for p in left if "/w/pooled/" in p]) == 2
    server.requests.clear()  # w again: only the evicted object is fetched
    batches(Loader(remote, {"w": "features/w/pooled"}, 8, cache="disk", cache_dir=tmp_path, cache_limit=limit))
    assert shard_gets(server, arrays=POOLED) == ["s.zarr/features/w/pooled/c/0/0"]


def _entries(root) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if "@" in f and not f.endswith(".lock")]


def test_dataloader_workers_share_one_fetch_per_object(s3, tmp_path):
    server, path = s3
    remote = upload(s3, "workers.zarr")
    cols = {"pooled": "features/t/pooled", "wide": "features/w/pooled"}
    server.requests.clear()
    dl = torch.utils.data.DataLoader(Loader(remote, cols, 5, seed=2, cache="disk", cache_dir=tmp_path),
                                     batch_size=None, num_workers=2)
    assert_same(batches(dl), batches(Loader(Store.open(path), cols, 5, seed=2)))
    gets = shard_gets(server, "workers.zarr", POOLED)
    assert len(gets) == len(set(gets)) == 6  # 2 arrays x 3 blocks, each fetched by one worker only


def test_a_loader_waits_for_the_fetch_another_process_makes(s3, tmp_path):
    """Another process (its lock taken here) is fetching block 1: the loader waits for that entry
    and reads it, instead of fetching the object a second time."""
    import threading

    import filelock

    server, path = s3
    remote = upload(s3, "waits.zarr")
    loader = Loader(remote, {"wide": "features/w/pooled"}, 8, shuffle=False, cache="disk", cache_dir=tmp_path)
    entry = loader.columns[0].source.cached.entries[1]
    server.requests.clear()
    with filelock.FileLock(entry.path + ".lock"):
        out = []
        reading = threading.Thread(target=lambda: out.append(batches(loader)))
        reading.start()
        reading.join(timeout=1)
        assert reading.is_alive() and not out  # block 1 is not there yet: the loader waits
        tmp = entry.path + ".tmp-other"
        with open(tmp, "wb") as f:  # what the other process fetched
            f.write(open(path / "features/w/pooled/c/1/0", "rb").read())
        os.replace(tmp, entry.path)
    reading.join(timeout=60)
    assert sorted(shard_gets(server, "waits.zarr", POOLED)) == ["waits.zarr/features/w/pooled/c/0/0",
                                                        "waits.zarr/features/w/pooled/c/2/0"]
    assert_same(out[0], batches(Loader(Store.open(path), {"wide": "features/w/pooled"}, 8, shuffle=False)))


@pytest.mark.parametrize("change", ["removed", "rewritten"])
def test_an_object_that_changes_after_its_listing_is_refused_in_one_line(s3, tmp_path, change):
    """The object a loader listed is gone or has other bytes (of the same size) by the time it is
    fetched: nothing is cached and the epoch stops with one line naming the object."""
    server, _ = s3
    remote = upload(s3, f"{change}.zarr")
    loader = Loader(remote, {"wide": "features/w/pooled"}, 8, cache="disk", cache_dir=tmp_path)  # listed now
    key = f"{BUCKET}/{change}.zarr/features/w/pooled/c/"
    if change == "removed":
        server.fs.rm(key + "1/0")
    else:
        server.fs.pipe_file(key + "1/0", server.fs.cat_file(key + "0/0"))
    with pytest.raises(FetchFailed, match=f"{change}.zarr/features/w/pooled/c/1/0") as e:
        batches(loader)
    assert "\n" not in str(e.value) and (change == "removed" or "changed" in str(e.value))
    assert not any("/c/1/" in p for p in _entries(tmp_path)) and not any(".tmp-" in p for p in os.listdir(tmp_path))


def test_disk_cache_refusals_and_default_location(s3, tmp_path, monkeypatch):
    _, path = s3
    remote = Store.open(f"s3://{BUCKET}/s.zarr")
    with pytest.raises(ConfigError, match="local already"):
        Loader(Store.open(path), COLUMNS, 8, cache="disk", cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="for cache='disk'"):
        Loader(remote, COLUMNS, 8, cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="direct=False"):
        Loader(remote, COLUMNS, 8, cache="disk", direct=False)
    with pytest.raises(ConfigError, match="none of these columns"):
        Loader(remote, {"cap": "samples/caption"}, 8, cache="disk", cache_dir=tmp_path)
    monkeypatch.delenv("FEATSTORE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    Loader(remote, {"wide": "features/w/pooled"}, 8, cache="disk").columns[0].source.cached.wait([0])
    assert any("/w/pooled/c/0/" in p for p in _entries(tmp_path / "xdg" / "featstore"))
