"""A store on object storage: a real S3 server on 127.0.0.1 (moto's, which speaks the S3 protocol),
written by the `featstore` command; writers are serialized by a lease object made with a
conditional create (If-None-Match)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from imagedata import encode, real_images, write_shard

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on a free loopback port, and the environment a process needs to reach it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("featstore-test")
    try:
        yield {**os.environ, **env}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


def cli(env, *args):
    return subprocess.run([FEATSTORE, *map(str, args)], capture_output=True, text=True, env=env)


def test_extract_grow_and_verify_a_store_on_s3(s3_env, shards, tiny_llama_path):
    a, b = shards
    url = "s3://featstore-test/s.zarr"
    r = cli(s3_env, "extract", "--store", url, "--source", a, "--backbone", tiny_llama_path, "--name", "txt",
            "--field", "caption", "--rows-per-shard", "4", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = cli(s3_env, "extract", "--store", url, "--source", b, "--backbone", tiny_llama_path, "--name", "txt",
            "--field", "caption", "--no-progress")
    assert r.returncode == 0 and "coverage: 10 of 10 rows done (10 usable)" in r.stdout, r.stdout + r.stderr
    r = cli(s3_env, "verify", "--store", url)
    assert r.returncode == 0 and r.stdout.strip().startswith("ok"), r.stdout
    s = json.loads(cli(s3_env, "inspect", "--store", url, "--json").stdout)
    assert s["rows"] == 10 and len(s["sources"]) == 2 and s["feature_sets"]["txt"]["valid_rows"] == 10
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert not fs.exists("featstore-test/s.zarr/_progress/_locks/store.lock")  # every lease was released


def test_a_held_lease_makes_a_writer_wait_then_refuse_naming_its_holder(s3_env, shards, tiny_llama_path):
    import fsspec

    a, _ = shards
    url = "s3://featstore-test/busy.zarr"
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.pipe_file("featstore-test/busy.zarr/_progress/_locks/store.lock",
                 json.dumps({"owner": "other-host:4242", "since": "2026-01-01T00:00:00+00:00"}).encode())
    r = cli({**s3_env, "FEATSTORE_LOCK_TIMEOUT": "2"}, "extract", "--store", url, "--source", a, "--backbone",
            tiny_llama_path, "--field", "caption", "--no-progress")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "held by other-host:4242" in r.stderr and "delete s3://featstore-test/busy.zarr/_progress/_locks/store.lock" in r.stderr
    assert not fs.exists("featstore-test/busy.zarr/zarr.json")  # nothing was created
