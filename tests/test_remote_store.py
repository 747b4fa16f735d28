"""Stores and sources on object storage: a real S3 server on 127.0.0.1 (moto's, which speaks the S3
protocol; `s3util`), written by the `featstore` command.  Writers are serialized by a lease object
made with a conditional create (If-None-Match); webdataset tars on S3 stream as a source; and the
requests a job makes are counted on the server."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr

from imagedata import encode, real_images, write_shard

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")
BUCKET = "featstore-test"
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def s3():
    from s3util import s3_server

    with s3_server() as server:
        server.fs.mkdir(BUCKET)
        yield server


@pytest.fixture(scope="module")
def s3_env(s3):
    return s3.env


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("wds")
    images = real_images(10)
    write_shard(d / "00000.tar", [{"key": f"{i:09d}", "image": encode(img), "caption": f"a photo of {name}",
                                   "json": {"uid": f"u-{name}"}} for i, (name, img) in enumerate(images[:6])])
    more = d / "more"
    more.mkdir()
    write_shard(more / "00000.tar", [{"key": f"{i:09d}", "image": encode(img), "caption": f"a photo of {name}",
                                      "json": {"uid": f"v-{name}"}} for i, (name, img) in enumerate(images[6:])])
    return d, more


@pytest.fixture(scope="module")
def remote_shards(s3, shards):
    """The same samples as webdataset tars on S3: s3://featstore-test/wds/{00000,00001}.tar."""
    a, more = shards
    s3.fs.put(str(a / "00000.tar"), f"{BUCKET}/wds/00000.tar")
    s3.fs.put(str(more / "00000.tar"), f"{BUCKET}/wds/00001.tar")
    local = a.parent / "both"
    local.mkdir(exist_ok=True)
    for src, name in ((a / "00000.tar", "00000.tar"), (more / "00000.tar", "00001.tar")):
        (local / name).write_bytes(src.read_bytes())
    return f"s3://{BUCKET}/wds", local


def cli(env, *args):
    return subprocess.run([FEATSTORE, *map(str, args)], capture_output=True, text=True, env=env)


def test_extract_grow_and_verify_a_store_on_s3(s3_env, shards, tiny_llama_path):
    a, b = shards
    url = f"s3://{BUCKET}/s.zarr"
    r = cli(s3_env, "extract", "--store", url, "--source", a, "--backbone", tiny_llama_path, "--name", "txt",
            "--field", "caption", "--rows-per-shard", "4", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = cli(s3_env, "extract", "--store", url, "--source", b, "--backbone", tiny_llama_path, "--name", "txt",
            "--field", "caption", "--no-progress")
    assert r.returncode == 0 and "coverage: 10 of 10 rows done (10 usable)" in r.stdout, r.stdout + r.stderr
    from featstore.tools.inspect import summarize
    from featstore.store import Store
    from featstore.tools.verify import verify

    st = Store.open(url)  # what `featstore verify` / `inspect` run, in this process
    assert verify(st)["ok"], verify(st)["problems"]
    s = summarize(st)
    assert s["rows"] == 10 and len(s["sources"]) == 2 and s["feature_sets"]["txt"]["valid_rows"] == 10
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert not fs.exists(f"{BUCKET}/s.zarr/_progress/_locks/store.lock")  # every lease was released


def test_a_held_lease_makes_a_writer_wait_then_refuse_naming_its_holder(s3_env, shards, tiny_llama_path):
    import fsspec

    a, _ = shards
    url = f"s3://{BUCKET}/busy.zarr"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.pipe_file(f"{BUCKET}/busy.zarr/_progress/_locks/store.lock",
                 json.dumps({"owner": "other-host:4242", "since": "2026-01-01T00:00:00+00:00"}).encode())
    r = cli({**s3_env, "FEATSTORE_LOCK_TIMEOUT": "2"}, "extract", "--store", url, "--source", a, "--backbone",
            tiny_llama_path, "--field", "caption", "--no-progress")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "held by other-host:4242" in r.stderr and f"delete s3://{BUCKET}/busy.zarr/_progress/_locks/store.lock" in r.stderr
    assert not fs.exists(f"{BUCKET}/busy.zarr/zarr.json")  # nothing was created


# ---- webdataset tars on S3 as a source ---------------------------------------------------------------
def tar_gets(requests):
    return [r for r in requests if r.method == "GET" and r.key.startswith("wds/") and r.key.endswith(".tar")]


def test_tars_on_s3_stream_once_for_the_manifest_and_images_come_by_ranged_reads(s3, remote_shards):
    from featstore.pipelines.sources import open_source

    url, local = remote_shards
    s3.requests.clear()
    src = open_source(url)
    records = list(src.records())
    loc = open_source(local)
    want = list(loc.records())
    assert [(r.uid, r.caption, r.source_ref, r.span) for r in records] == [(r.uid, r.caption, r.source_ref, r.span) for r in want]
    assert src.provenance()["location"] == url and src.provenance()["type"] == "webdataset"
    gets = tar_gets(s3.requests)
    assert sorted(r.key for r in gets) == ["wds/00000.tar", "wds/00001.tar"]  # each tar streamed once, in one GET
    s3.requests.clear()
    got = list(src.read_images([r.source_ref for r in records], [r.span for r in records]))
    assert got == list(loc.read_images([r.source_ref for r in want]))
    gets = tar_gets(s3.requests)
    assert len(gets) == 2 and all(r.range and not r.range.startswith("bytes=0-") for r in gets)  # one merged range per tar
    # a ref the manifest does not hold is a bad sample, not an error
    assert [type(x).__name__ for x in src.read_images(["00000.tar:nope", "zzz.tar:1"])] == ["BadSample"] * 2


def test_extract_from_tars_on_s3_gives_the_bytes_of_the_local_tars(s3, remote_shards, tmp_path, tiny_dinov2_path):
    from featstore.pipelines.extract import extract
    from featstore.store import Store

    url, local = remote_shards
    extract(tmp_path / "local.zarr", local, tiny_dinov2_path, name="dino", rows_per_shard=4, batch_size=4, **QUIET)
    s3.requests.clear()
    r = cli(s3.env, "extract", "--store", tmp_path / "remote.zarr", "--source", url, "--backbone", tiny_dinov2_path,
            "--name", "dino", "--rows-per-shard", "4", "--batch-size", "4", "--no-progress")
    assert r.returncode == 0 and "coverage: 10 of 10 rows done (10 usable)" in r.stdout, r.stdout + r.stderr
    streams = [g for g in tar_gets(s3.requests) if g.range is None or g.range.startswith("bytes=0-")]
    assert sorted(g.key for g in streams) == ["wds/00000.tar", "wds/00001.tar"]  # the manifest, once; images by range
    a, b = (zarr.open_group(str(tmp_path / f"{k}.zarr"), mode="r") for k in ("local", "remote"))
    for key in ("pooled", "valid"):
        assert np.array_equal(np.asarray(a[f"features/dino/{key}"][:]), np.asarray(b[f"features/dino/{key}"][:]))
    assert Store.open(tmp_path / "remote.zarr").sources[0]["location"] == url
    # a folder with no tars is refused, naming it
    from featstore.errors import SourceError
    from featstore.pipelines.sources import open_source

    with pytest.raises(SourceError, match=f"s3://{BUCKET}/nothing-here"):
        open_source(f"s3://{BUCKET}/nothing-here")


def test_progress_reads_cost_the_same_few_requests_whatever_the_number_of_blocks(s3, shards, tiny_llama_path):
    """A job's progress reads (which rows are done: planning, the summary, the index) cost a listing
    and the index, never one request per block: a no-op re-run of a 6-block store costs what a
    2-block one does."""
    from featstore.pipelines.extract import extract

    a, _ = shards
    cost = {}
    for rows_per_shard in (1, 3):
        url = f"s3://{BUCKET}/blocks{rows_per_shard}.zarr"
        extract(url, a, tiny_llama_path, name="txt", field="caption", rows_per_shard=rows_per_shard, **QUIET)
        s3.requests.clear()
        s = extract(url, a, tiny_llama_path, name="txt", field="caption", **QUIET)
        assert s["rows_written"] == 0 and s["blocks_total"] == 6 // rows_per_shard
        prefix = f"blocks{rows_per_shard}.zarr/_progress/txt/"
        cost[rows_per_shard] = sorted((r.method, r.key.removeprefix(prefix), r.is_listing)
                                      for r in s3.requests if r.touches(prefix))
    assert cost[1] == cost[3], cost
    assert len(cost[1]) <= 8, cost[1]  # a listing and blocks.npy or the index: plan, summary, compaction


def test_a_block_write_costs_its_own_requests_and_a_kept_view_follows_growth_and_removal(s3):
    """On object storage a block write re-reads only the root zarr.json under its lock (not
    every group's and array's metadata): each block costs the same few requests whatever the
    store holds.  A writer's kept view re-opens when the store grew (it writes the new block)
    and when its feature set was removed (refused, not written into a deleted folder)."""
    from featstore.errors import UnknownFeatureSet
    from featstore.store import Store
    from featstore.core.writes import write_block, write_rows

    url = f"s3://{BUCKET}/writes.zarr"
    writer = Store.create(url, rows_per_shard=8)
    writer.register(np.array([f"u{i}" for i in range(32)]))
    writer = Store.open(url, mode="r+")
    for k in range(4):
        writer.create_feature_set(f"f{k}", {"backbone": f"x{k}"}, 16)
    rows = lambda n: {"pooled": np.full((n, 16), 0.5, np.float16)}  # noqa: E731
    write_block(writer, "f0", 0, rows(8), np.ones(8, bool))  # the view is opened once here
    cost = []
    for block in (1, 2, 3):
        s3.requests.clear()
        write_block(writer, "f0", block, rows(8), np.ones(8, bool))
        cost.append(list(s3.requests))
    # lock, zarr.json, pointer (absent: a new block), two shards, marker, pointer, unlock: 8
    assert [len(c) for c in cost] == [8, 8, 8], [[(r.method, r.key) for r in c] for c in cost]
    meta = [r.key for c in cost for r in c if r.key.endswith("zarr.json") and r.key != "writes.zarr/zarr.json"]
    assert meta == [], meta
    probes = [(r.method, r.key) for c in cost for r in c if r.method == "HEAD" or r.is_listing]
    assert probes == [], probes  # no size probe before a GET, no read-back of a shard replaced whole
    shards = [(r.method, r.key) for c in cost for r in c if "/c/" in r.key]
    assert {m for m, _ in shards} == {"PUT"} and len(shards) == 6, shards

    other = Store.open(url, mode="r+")
    other.register(np.array([f"u{i}" for i in range(32, 40)]))
    m = write_rows(writer, "f0", 4, np.arange(32, 40), rows(8), np.ones(8, bool))  # the writer's own view: 32 rows
    assert m["n_done"] == 8 and m["rows"] == [32, 40]
    fresh = Store.open(url).feature_set("f0")
    assert fresh.rows_done() == 40
    assert np.all(np.asarray(fresh.array("pooled")[32:40]) == np.float16(0.5))

    other.remove_feature_set("f0")
    with pytest.raises(UnknownFeatureSet):
        write_block(writer, "f0", 0, rows(8), np.ones(8, bool))
    assert not s3.fs.exists(f"{BUCKET}/writes.zarr/_progress/f0")
