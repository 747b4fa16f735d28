"""Run extraction blocks on a Dask cluster: one task per row block.

The coordinator has already registered every row and created every array (`extract.prepare`);
a task only computes its block and writes that block's shards and marker, so tasks never
touch the same shard.  Dask may run a task twice (a worker presumed dead comes back, or a
worker dies and the task is retried elsewhere): the block is written again with identical
bytes, which the marker's checksums prove.

`--workers N` starts a local cluster: on CPU N single-threaded worker processes; on CUDA one
worker per GPU, each pinned to its device through CUDA_VISIBLE_DEVICES.  `--scheduler ADDR`
uses a cluster that already runs (`dask scheduler` + `dask worker`, or dask-jobqueue).
"""

from __future__ import annotations

import collections
import os
import time

from featstore.store import Store

from .extract import BlockRunner, ExtractSpec, _progress

_RUNNERS: dict[str, BlockRunner] = {}  # per worker process: one opened runner per extraction


def _tune_zarr_for_workers() -> None:
    """Each worker runs one task at a time; keep zarr's own concurrency and thread pool small
    (zarr's docs advise this under Dask)."""
    import zarr

    zarr.config.set({"async.concurrency": 8, "threading.max_workers": 2})


def extract_block_task(spec: ExtractSpec, block: int) -> dict:
    """The Dask task: compute and write one block; returns its marker and who computed it."""
    key = repr(spec)
    runner = _RUNNERS.get(key)
    if runner is None:
        _tune_zarr_for_workers()
        if spec.device.startswith("cuda"):
            import torch

            torch.cuda.set_device(0)  # the worker sees only its own GPU
        runner = _RUNNERS[key] = BlockRunner(spec)
    t0 = time.perf_counter()
    marker = runner.run([block])[0]
    try:
        from dask.distributed import get_worker

        worker = get_worker().address
    except Exception:  # not inside a Dask worker (e.g. called directly)
        worker = f"pid-{os.getpid()}"
    return {"marker": marker, "worker": worker, "seconds": time.perf_counter() - t0}


def start_local_cluster(workers: int, device: str):
    from dask.distributed import LocalCluster

    if not device.startswith("cuda"):
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    from dask.distributed import Nanny, Scheduler, SpecCluster

    specs = {
        i: {"cls": Nanny, "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(i)}}}
        for i in range(workers)
    }
    return SpecCluster(workers=specs, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}})


def run_blocks(spec: ExtractSpec, blocks: list[int], *, workers: int | None = None, scheduler: str | None = None,
               progress: bool = True, log=print, retries: int = 3) -> tuple[list[dict], dict]:
    """Compute `blocks` on a cluster; returns (markers, per-worker stats)."""
    from dask.distributed import Client, as_completed

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = start_local_cluster(int(workers), spec.device)
        client = Client(cluster)
    log(f"dask: {len(client.scheduler_info()['workers'])} workers ({'scheduler ' + scheduler if scheduler else 'local cluster'})")
    markers = []
    per_worker: dict[str, dict] = collections.defaultdict(lambda: {"blocks": 0, "rows": 0, "seconds": 0.0})
    try:
        futures = [
            client.submit(extract_block_task, spec, b, key=f"extract-{spec.name}-block-{b}-{time.time_ns()}",
                          pure=False, retries=retries)
            for b in blocks
        ]
        store = Store.open(spec.store_path)
        total_rows = sum(stop - start for start, stop in map(store.block_range, blocks))
        with _progress(total_rows, f"extract {spec.name} (dask)", progress) as bar:
            for fut in as_completed(futures):
                res = fut.result()
                m = res["marker"]
                markers.append(m)
                w = per_worker[res["worker"]]
                w["blocks"] += 1
                w["rows"] += m["rows"][1] - m["rows"][0]
                w["seconds"] += res["seconds"]
                bar.update(m["rows"][1] - m["rows"][0])
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    for w in per_worker.values():
        w["seconds"] = round(w["seconds"], 2)
        w["rows_per_s"] = round(w["rows"] / w["seconds"], 2) if w["seconds"] else 0.0
    return sorted(markers, key=lambda m: m["block"]), dict(per_worker)
