"""Run extraction work items on a Dask cluster: one task per work item (rows of one row block).

The coordinator has already registered every row and created every array (`extract.prepare`);
a task computes its rows and writes them under its block's lock (`featstore.core.writes`), so two
tasks of one block, or a task Dask runs twice (a worker presumed dead comes back, or a worker
dies and the task is retried elsewhere), lose nothing and never write a row twice.

`--workers N` starts a local cluster: on CPU N single-threaded worker processes; on CUDA one
worker per GPU, each pinned to its device through CUDA_VISIBLE_DEVICES.  `--scheduler ADDR`
uses a cluster that already runs (`dask scheduler` + `dask worker`, or dask-jobqueue).
Each worker keeps one opened runner per (extraction, store identity): a store re-created,
grown or re-registered since gets a fresh one.  Decode processes (`--num-workers`) become
threads inside a worker (its process is daemonic and may not start children).
"""

from __future__ import annotations

import collections
import os
import time

from featstore.errors import FeatstoreError, WorkerError, WriteFailed, one_line
from featstore.store import Store

from .blocks import BlockRunner, ExtractSpec
from .summary import progress_bar

_RUNNERS: dict[str, BlockRunner] = {}  # per worker process: one opened runner per extraction


def _tune_zarr_for_workers() -> None:
    """Each worker runs one task at a time; keep zarr's own concurrency and thread pool small
    (zarr's docs advise this under Dask)."""
    import zarr

    zarr.config.set({"async.concurrency": 8, "threading.max_workers": 2})


def _worker_name() -> str:
    try:
        from dask.distributed import get_worker

        return get_worker().address
    except Exception:  # not inside a Dask worker (e.g. called directly)
        return f"pid-{os.getpid()}"


def _runner(spec: ExtractSpec) -> BlockRunner:
    key = repr(spec)  # includes store_identity: path, store id, registration generation, n_rows
    runner = _RUNNERS.get(key)
    if runner is None:
        for old in _RUNNERS.values():
            old.close()
        _RUNNERS.clear()
        _tune_zarr_for_workers()
        if spec.device.startswith("cuda"):
            import torch

            torch.cuda.set_device(0)  # the worker sees only its own GPU
        store = Store.open(spec.store_path, mode="r+")
        if spec.store_identity and store.identity[1] != spec.store_identity[1]:
            raise WorkerError(f"{spec.store_path} on worker {_worker_name()} is not the store this job planned "
                              "(it was re-created): run the extract again")
        runner = _RUNNERS[key] = BlockRunner(spec, store=store)
    return runner


def extract_item_task(spec: ExtractSpec, item: dict) -> dict:
    """The Dask task: compute and write one work item; returns its marker and who computed it.
    An error that is not a FeatstoreError (or a failed write) comes back as one line naming the
    worker and block."""
    t0 = time.perf_counter()
    try:
        marker = _runner(spec).run([item])[0]
    except WriteFailed as err:  # a storage error on one worker: say which
        raise WorkerError(f"worker {_worker_name()}: {err}") from None
    except FeatstoreError:
        raise
    except Exception as err:  # noqa: BLE001 - every failure reaches the user as one line
        raise WorkerError(f"worker {_worker_name()} failed on block {item['block']} of features/{spec.name}: "
                          f"{one_line(err)}") from None
    return {"marker": marker, "worker": _worker_name(), "seconds": time.perf_counter() - t0}


# A local cluster lives on loopback: the only reason a connection is slow there is a loaded
# machine (workers importing torch on busy cores), which is not a reason to fail the job
LOCAL_TIMEOUTS = {"distributed.comm.timeouts.connect": "300s", "distributed.comm.timeouts.tcp": "300s"}


def start_local_cluster(workers: int, device: str):
    import dask
    from dask.distributed import LocalCluster, Nanny, Scheduler, SpecCluster

    with dask.config.set(LOCAL_TIMEOUTS):  # the nannies hand this config to their workers
        if not device.startswith("cuda"):
            return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
        specs = {
            i: {"cls": Nanny, "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(i)}}}
            for i in range(workers)
        }
        return SpecCluster(workers=specs, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}})


def run_items(spec: ExtractSpec, items: list, *, workers: int | None = None, scheduler: str | None = None,
              progress: bool = True, log=print, retries: int = 3) -> tuple[list[dict], dict]:
    """Compute work items on a cluster; returns (markers, per-worker stats)."""
    from dask.distributed import Client, as_completed

    import dask

    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = start_local_cluster(int(workers), spec.device)
        with dask.config.set(LOCAL_TIMEOUTS):
            client = Client(cluster)
    log(f"dask: {len(client.scheduler_info()['workers'])} workers ({'scheduler ' + scheduler if scheduler else 'local cluster'})")
    markers = []
    per_worker: dict[str, dict] = collections.defaultdict(lambda: {"items": 0, "rows": 0, "seconds": 0.0})
    try:
        futures = [
            client.submit(extract_item_task, spec, it.to_dict(), key=f"extract-{spec.name}-block-{it.block}-{time.time_ns()}",
                          pure=False, retries=retries)
            for it in items
        ]
        with progress_bar(sum(len(it.rows) for it in items), f"extract {spec.name} (dask)", progress) as bar:
            for fut in as_completed(futures):
                res = fut.result()
                m = res["marker"]
                markers.append(m)
                rows = m.get("last_write", {}).get("rows", 0)
                w = per_worker[res["worker"]]
                w["items"] += 1
                w["rows"] += rows
                w["seconds"] += res["seconds"]
                bar.update(rows)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    for w in per_worker.values():
        w["seconds"] = round(w["seconds"], 2)
        w["rows_per_s"] = round(w["rows"] / w["seconds"], 2) if w["seconds"] else 0.0
    return sorted(markers, key=lambda m: m["block"]), dict(per_worker)
