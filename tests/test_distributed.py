"""Distributed extraction on a real Dask LocalCluster of worker processes."""

import os
import signal
import threading
import time

import numpy as np
import pytest
import zarr

from featstore.pipelines.extract import extract
from featstore.store import Store
from featstore.tools.verify import verify
from imagedata import encode, real_images, write_shard

QUIET = dict(progress=False, log=lambda *_: None)


def feature_bytes(path, name):
    g = zarr.open_group(str(path), mode="r")
    return {k: np.asarray(a[:]).tobytes() for k, a in g[f"features/{name}"].arrays()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("wds")
    imgs = real_images(24)
    write_shard(d / "00000.tar", [{"key": f"{i:09d}", "image": encode(img), "caption": f"a photo of {name}",
                                   "json": {"uid": f"img-{i:03d}"}} for i, (name, img) in enumerate(imgs)])
    return d


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, shards, tiny_dinov2_path):
    path = tmp_path_factory.mktemp("single") / "s.zarr"
    extract(path, shards, tiny_dinov2_path, name="dino", rows_per_shard=2, batch_size=2, **QUIET)
    return path


@pytest.fixture(scope="module")
def cluster():
    from dask.distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        yield c


def test_two_workers_give_the_same_bytes_as_one_process(tmp_path, shards, tiny_dinov2_path, single_process, cluster):
    path = tmp_path / "dask.zarr"
    s = extract(path, shards, tiny_dinov2_path, name="dino", rows_per_shard=2, batch_size=2,
                scheduler=cluster.scheduler_address, **QUIET)
    assert s["blocks_written"] == 12 and s["valid"] == 24
    assert len(s["per_worker"]) == 2 and sum(w["rows"] for w in s["per_worker"].values()) == 24
    assert feature_bytes(path, "dino") == feature_bytes(single_process, "dino")
    assert verify(Store.open(path))["ok"]


def test_a_worker_killed_mid_run_is_retried_elsewhere(tmp_path, shards, tiny_dinov2_path, single_process, cluster):
    from dask.distributed import Client

    path = tmp_path / "dask.zarr"
    with Client(cluster) as client:
        pids = client.run(os.getpid)
    victim = sorted(pids.values())[0]
    killed = []

    def kill_after_first_marker():
        marker_dir = path / "_progress" / "dino"
        deadline = time.time() + 120
        while time.time() < deadline:
            if marker_dir.exists() and any(n.endswith(".json") for n in os.listdir(marker_dir)):
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
                return
            time.sleep(0.005)

    t = threading.Thread(target=kill_after_first_marker)
    t.start()
    s = extract(path, shards, tiny_dinov2_path, name="dino", rows_per_shard=2, batch_size=2,
                scheduler=cluster.scheduler_address, **QUIET)
    t.join()
    assert killed, "the worker was never killed"
    assert s["blocks_missing"] == 0
    assert verify(Store.open(path))["ok"]
    assert feature_bytes(path, "dino") == feature_bytes(single_process, "dino")


def test_workers_flag_starts_a_local_cluster(tmp_path, shards, single_process):
    # minilm over captions with --workers 2: the CLI path that builds its own LocalCluster
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    extract(a, shards, "minilm", field="caption", rows_per_shard=6, **QUIET)
    s = extract(b, shards, "minilm", field="caption", rows_per_shard=6, workers=2, **QUIET)
    assert s["blocks_written"] == 4
    assert feature_bytes(a, "minilm") == feature_bytes(b, "minilm")


def test_decode_processes_inside_dask_workers(tmp_path, shards, tiny_dinov2_path, single_process, cluster):
    # Dask worker processes are daemonic and may not start children: --num-workers decodes in threads there
    path = tmp_path / "dask.zarr"
    s = extract(path, shards, tiny_dinov2_path, name="dino", rows_per_shard=2, batch_size=2, num_workers=2,
                scheduler=cluster.scheduler_address, **QUIET)
    assert s["valid"] == 24
    assert feature_bytes(path, "dino") == feature_bytes(single_process, "dino")


def test_a_recreated_store_is_never_served_from_a_workers_cache(tmp_path, shards, tiny_dinov2_path, cluster):
    import shutil

    path = tmp_path / "dask.zarr"
    extract(path, shards, tiny_dinov2_path, name="dino", rows_per_shard=2, batch_size=2,
            scheduler=cluster.scheduler_address, **QUIET)
    shutil.rmtree(path)  # the same path, another layout: the workers' cached runners must not be reused
    s = extract(path, shards, tiny_dinov2_path, name="dino", rows_per_shard=5, batch_size=2,
                scheduler=cluster.scheduler_address, **QUIET)
    assert s["rows_written"] == 24 and s["rows_usable"] == 24
    clean = tmp_path / "clean.zarr"
    extract(clean, shards, tiny_dinov2_path, name="dino", rows_per_shard=5, batch_size=2, **QUIET)
    assert feature_bytes(path, "dino") == feature_bytes(clean, "dino")
    assert verify(Store.open(path))["ok"]


def test_a_workers_error_reaches_the_user_as_one_line(tmp_path, shards, tiny_dinov2_path, cluster):
    from dask.distributed import Client

    from featstore.errors import WorkerError
    from featstore.pipelines.dask_cluster import extract_item_task
    from featstore.pipelines.extract import prepare

    spec, _, _, _ = prepare(tmp_path / "s.zarr", shards, tiny_dinov2_path, name="dino", rows_per_shard=4,
                            log=lambda *_: None)
    bad = {"block": 1, "rows": [0, 1], "refs": ["00000.tar:000000000", "00000.tar:000000001"],
           "source": spec.source, "source_id": 0}  # rows of block 0 sent as block 1
    with Client(cluster) as client:
        with pytest.raises(WorkerError) as err:
            client.submit(extract_item_task, spec, bad, pure=False).result()
    message = str(err.value)
    assert "\n" not in message and "block 1 of features/dino" in message and "ValueError" in message
