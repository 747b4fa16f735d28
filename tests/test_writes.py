"""Block writes on a writer thread behind the forward pass (pipelines/write_behind.py), through `extract`
on real images with the tiny saved DINOv2: the bytes of the synchronous path, a failed write stops
the job in one line and a re-run completes, Ctrl-C keeps every block handed over."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from featstore.pipelines.extract import extract
from featstore.store import Store
from featstore.tools.verify import verify
from imagedata import encode, real_images, write_shard
from signals import default_sigint

FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")
QUIET = dict(progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 real images in two shards (13 + 11), uid in each json."""
    d = tmp_path_factory.mktemp("wds")
    samples = [{"key": f"{i:09d}", "image": encode(img), "caption": f"a photo of {name}", "json": {"uid": f"img-{name}"}}
               for i, (name, img) in enumerate(real_images(24))]
    write_shard(d / "00000.tar", samples[:13])
    write_shard(d / "00001.tar", samples[13:])
    return d


@pytest.fixture(scope="module")
def clean(tmp_path_factory, shards, tiny_dinov2_path):
    """The store an uninterrupted run writes (2 rows per block)."""
    path = tmp_path_factory.mktemp("clean") / "clean.zarr"
    extract(path, shards, tiny_dinov2_path, name="dino", rows_per_shard=2, batch_size=2, **QUIET)
    return path


def stored_bytes(path) -> dict[str, bytes]:
    g = zarr.open_group(str(path), mode="r")
    out = {f"features/dino/{k}": np.asarray(a[:]).tobytes() for k, a in g["features/dino"].arrays()}
    if "pixels" in g:
        out.update({f"pixels/{k}": np.asarray(a[:]).tobytes() for k, a in g["pixels"].arrays()})
    return out


def test_writes_behind_the_forward_pass_give_the_bytes_of_the_synchronous_path(tmp_path, shards, tiny_dinov2_path):
    """0: written on the forward thread; 1, 2 and 4 blocks in flight, each on a writer thread of its
    own (4: what a store on object storage gets, blocks written concurrently)."""
    stores = {}
    for depth in (0, 1, 2, 4):
        path = stores[depth] = tmp_path / f"w{depth}.zarr"
        s = extract(path, shards, tiny_dinov2_path, name="dino", tokens=True, token_dtype="int8", pixels="crops",
                    rows_per_shard=4, batch_size=3, writes_in_flight=depth, **QUIET)
        assert s["blocks_written"] == 6 and s["valid"] == 24
        assert verify(Store.open(path))["ok"]
    ref = stored_bytes(stores[0])
    assert {"features/dino/tokens_channel_scale", "pixels/crops"} <= set(ref)
    for depth in (1, 2, 4):
        assert stored_bytes(stores[depth]) == ref, depth
        markers = Store.open(stores[depth]).feature_set("dino").markers()
        assert {b: m["checksums"] for b, m in markers.items()} == \
               {b: m["checksums"] for b, m in Store.open(stores[0]).feature_set("dino").markers().items()}


def test_a_failed_write_stops_the_job_in_one_line_and_a_rerun_completes(tmp_path, shards, tiny_dinov2_path, clean):
    store = tmp_path / "s.zarr"
    extract(store, shards / "00000.tar", tiny_dinov2_path, name="dino", rows_per_shard=2, batch_size=2, **QUIET)
    # a file where block 8's shard directory must go: the filesystem refuses that write (a real OSError)
    blocker = store / "features" / "dino" / "pooled" / "c" / "8"
    blocker.write_bytes(b"in the way")
    r = subprocess.run([FEATSTORE, "extract", "--store", str(store), "--source", str(shards), "--backbone",
                        tiny_dinov2_path, "--name", "dino", "--batch-size", "2", "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: writing block 8 of features/dino failed (") and "run the same command again" in r.stderr
    st = Store.open(store)
    fs = st.feature_set("dino")
    assert st.n_rows == 24 and fs.missing_blocks() == list(range(8, 12))  # 6 and 7 written, nothing after 8
    assert verify(st)["ok"], verify(st)["problems"]
    blocker.unlink()
    s = extract(store, shards, tiny_dinov2_path, name="dino", batch_size=2, **QUIET)
    assert s["blocks_missing"] == 0 and verify(Store.open(store))["ok"]
    assert stored_bytes(store) == stored_bytes(clean)


def test_ctrl_c_keeps_the_blocks_handed_over_then_a_rerun_completes(tmp_path, shards, tiny_dinov2_path, clean):
    args = ["--source", str(shards), "--backbone", tiny_dinov2_path, "--name", "dino", "--rows-per-shard", "2",
            "--batch-size", "2"]
    store = tmp_path / "s.zarr"
    proc = subprocess.Popen([FEATSTORE, "extract", "--store", str(store), *args, "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    progress = store / "_progress" / "dino"
    deadline = time.time() + 120
    while not (progress.exists() and any(n.endswith("-1.json") for n in os.listdir(progress))) \
            and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    st = Store.open(store)
    missing = st.feature_set("dino").missing_blocks()
    assert proc.returncode == 130 and "interrupted: finished blocks are kept" in err, err
    assert 0 < len(missing) < st.n_blocks
    assert verify(st)["ok"], verify(st)["problems"]
    s = extract(store, shards, tiny_dinov2_path, name="dino", batch_size=2, **QUIET)
    assert s["blocks_missing"] == 0 and s["blocks_written"] == len(missing)
    assert stored_bytes(store) == stored_bytes(clean)
