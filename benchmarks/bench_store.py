"""Shuffled batches of two aligned float16 feature columns: featstore against what a user would pick.

The data: N rows (200k; --quick 4k) of a 768-d "img" and a 4096-d "txt" float16 column (a ViT-B
image feature and a Llama-3-8B caption feature), rows sorted by class (1,000 classes, as an image
folder gives them), batch 1024.  Each contender (benchmarks/contenders/, one module per peer,
each used the way its documentation recommends) writes the same rows in its own format, passes
an untimed correctness check, then serves whole epochs:

  featstore          featstore.Loader with its defaults (contenders/featstore_loader.py; the
                     results record the defaults from its signature and what they came to:
                     window in rows, runs, read path), a fresh Loader per epoch (a job's first)
  featstore_reused   one Loader iterated epoch after epoch (a trainer's later epochs)
  zarr               the same Loader reading through zarr (direct=False)
  memmap             the limit: .npy memmaps, the Loader's order (`Loader.batch_rows()`, checked
                     against a whole served epoch), each batch gathered with one copy
  ram                the same order over in-RAM torch tensors (warm only)
  memmap_threads     the fair limit: memmap gathered by featstore's read_threads, a batch ahead
  memcpy             the same bytes copied in order in RAM (warm only): copy bandwidth
  disk_seq           the .npy files read front to back: sequential page-cache / disk rate
                     (these three in contenders/limits.py)
  sharelock_staged   ShareLock's real path: staged .pt files per feature, DataLoader workers
  hf_iterable        HF datasets to_iterable_dataset(num_shards).shuffle(buffer), arrow→torch
  hf_iterable_torch  the same with_format("torch") in a DataLoader (round 0, warm only)
  litdata            optimize + StreamingDataset + StreamingDataLoader
  mosaic             MDSWriter + StreamingDataset + StreamingDataLoader
  lance              pylance, full permutation by ds.take per batch
  remote: featstore_local / featstore_remote / litdata_remote / mosaic_remote over one local S3
          server (moto, 127.0.0.1) on a subset of whole row blocks, each timed on its first
          epoch (caches emptied) and a later one (`*_later`) (contenders/remote.py)

Rounds are interleaved (A B C ... A B C ...): warm rounds (each contender's files read just before
its epoch: these VMs evict page cache nobody touched for about a minute), then cold rounds (its
files dropped with posix_fadvise(DONTNEED) first, the residency left checked with mincore), then
the remote rounds.  Only iteration is timed (opening is not; DataLoader worker start-up is part of
an epoch, as it is for a trainer); `steady` figures leave out the first batch.  Figures are
medians over rounds with their min/max in `spread`; ratios are medians over rounds of featstore ÷
the other measured in the same round.  `shuffle_quality` is `Loader.shuffle_quality()` of the
featstore contender's Loader (per-batch label entropy over a full permutation's, on this
class-sorted data) at the same default window whose rate is the featstore row.

    .venv/bin/python benchmarks/bench_store.py [--quick] [--rounds K] [--only a,b] [--device cuda]
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
import statistics
import sys
import time

import numpy as np
import torch

from common import (bench_parser, data_dir, device_string, drop_cache, print_table, resident_fraction,
                    warm_cache, write_results)
from contenders import DIMS, Data, Unavailable, write_npy
from contenders.featstore_loader import Featstore, FeatstoreReused, ZarrLoader
from contenders.hf_iterable import HFIterable, HFIterableTorch
from contenders.lance_take import Lance
from contenders.limits import DiskSequential, Memcpy, MemmapThreads
from contenders.litdata_stream import Litdata
from contenders.memmap_ram import InRam, MemmapOneCopy
from contenders.mosaic_mds import Mosaic
from contenders.remote import FeatstoreLocal, FeatstoreRemote, LitdataRemote, MosaicRemote, S3WholeObjects, s3_server
from contenders.sharelock_staged import ShareLockStaged

R, BATCH, SEED, CLASSES = 4096, 1024, 0, 1000
SIZES = {  # rows, ShareLock's rows, remote rows, warm rounds, cold rounds, remote rounds
    "full": dict(n=200_000, sharelock=20_000, remote=12 * R, warm=5, cold=3, remote_rounds=3),
    "quick": dict(n=R, sharelock=1_000, remote=R, warm=1, cold=1, remote_rounds=1),
}
ONCE = {"hf_iterable_torch"}  # slow: round 0, warm only
COLD_RESIDENT_MAX = 0.05  # a cold round starts with at most this fraction of its files in the page cache


# ---- one measurement ---------------------------------------------------------------------------
def run_epoch(batches, device) -> dict:
    """Iterate one epoch; with a GPU, every batch goes to it (non_blocking) as a trainer's would."""
    t0 = time.perf_counter()
    n = first_n = 0
    first = None
    for batch in batches:
        if device is not None:
            for k in DIMS:
                batch[k].to(device, non_blocking=True)
        n += len(batch["img"])
        if first is None:
            first, first_n = time.perf_counter() - t0, n
    if device is not None:
        torch.cuda.synchronize(device)
    secs = time.perf_counter() - t0
    steady = (n - first_n) / (secs - first) if n > first_n else None  # None: a single batch
    return {"samples": n, "seconds": round(secs, 4), "samples_per_s": n / secs, "steady_samples_per_s": steady,
            "first_batch_s": round(first or 0.0, 4)}


def measure(c, cold: bool, device, later: bool = False) -> dict:
    """One timed epoch of `c`: opened fresh, or with `later` the next epoch of what the last open
    made.  Contenders with a later epoch (`again`) are closed by the caller after it."""
    gc.collect()  # no stale map may pin pages of these files
    files = c.files()
    extra = {}
    if cold:
        drop_cache(*files)
        extra["resident_after_drop"] = round(resident_fraction(*files), 4)
        if extra["resident_after_drop"] > COLD_RESIDENT_MAX:  # a cold figure that was warm would be false
            raise RuntimeError(f"{c.name}: {100 * extra['resident_after_drop']:.1f}% of its files still in the page "
                               "cache after the drop (something maps them): no cold figure")
    elif files:
        warm_cache(*files)
    try:
        out = run_epoch(c.again() if later else c.open(), device)
    finally:
        if not hasattr(c, "again"):
            c.close()
            gc.collect()
    if hasattr(c, "cache_bytes"):
        extra["cache_bytes_after"] = c.cache_bytes()
    if out["samples"] != c.rows:
        raise RuntimeError(f"{c.name} served {out['samples']} rows of {c.rows}")
    return {**out, **extra}


# ---- shuffle quality ---------------------------------------------------------------------------
def classes_per_batch(labels: np.ndarray, batches: list[np.ndarray], batch_size: int) -> float:
    """Mean number of distinct classes in the full batches."""
    return statistics.fmean(len(np.unique(labels[b])) for b in batches if len(b) == batch_size)


def shuffle_quality(featstore, data: Data) -> dict:
    """`Loader.shuffle_quality()` of the featstore contender's Loader (its defaults: the window the
    results record), and classes per batch against a full permutation's, on the class-sorted rows."""
    full = np.random.default_rng(SEED).permutation(data.n)
    full_batches = [full[i : i + data.batch_size] for i in range(0, data.n, data.batch_size)]
    return {"ratio": featstore.shuffle_quality(),
            "loader_classes_per_batch": classes_per_batch(data.labels, data.order, data.batch_size),
            "full_permutation_classes_per_batch": classes_per_batch(data.labels, full_batches, data.batch_size)}


# ---- the run -----------------------------------------------------------------------------------
def build_all(contenders, data, built: dict, unavailable: dict) -> list:
    ok = []
    start_method = multiprocessing.get_start_method()
    for c in contenders:
        t = time.perf_counter()
        try:
            c.build()
            # litdata's optimize sets the process-wide start method to spawn (force=True); put back
            # the platform's, so every DataLoader reads the way it would in its own program
            multiprocessing.set_start_method(start_method, force=True)
            c.rows = c.check()
        except Unavailable as e:
            unavailable[c.name] = str(e)
            print(f"  {c.name:<20} unavailable: {e}", flush=True)
            continue
        except Exception as e:  # a peer that breaks here is reported, and the others still run
            unavailable[c.name] = f"failed while building or checking: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            print(f"  {c.name:<20} {unavailable[c.name]}", flush=True)
            continue
        built[c.name] = round(time.perf_counter() - t, 1)
        print(f"  {c.name:<20} built and checked in {built[c.name]:.1f}s", flush=True)
        ok.append(c)
    return ok


def rounds(contenders, phases, runs: dict, device, unavailable: dict, later: bool = False, deadline=None,
           skipped: list | None = None) -> None:
    """Interleaved rounds: A B C ... A B C ...; with `later`, each contender's first epoch and
    then its later one (`again()`), keys `<name>` and `<name>_later`.  Past `deadline`
    (perf_counter seconds) no new round starts; the rounds left out go into `skipped`."""
    broken = set()
    for cold, k in phases:
        if cold:  # a live mapping pins its pages in the page cache: nothing may hold one across a drop
            for c in contenders:
                if hasattr(c, "release"):
                    c.release()
            gc.collect()
        for r in range(k):
            if deadline is not None and time.perf_counter() > deadline:
                print(f"  --budget spent: {'cold' if cold else 'warm'} round {r} and later ones not run", flush=True)
                if skipped is not None:
                    skipped.append(f"{'cold' if cold else 'warm'}{'/later' if later else ''} rounds {r}..{k - 1}")
                break
            for c in contenders:
                if (cold and not c.cold) or (c.name in ONCE and (cold or r > 0)) or c.name in broken:
                    continue
                keys = [(c.name + ("_cold" if cold else ""), False)] + ([(c.name + "_later", True)] if later else [])
                try:
                    for key, again in keys:
                        res = {"round": r, **measure(c, cold, device, later=again)}
                        runs.setdefault(key, []).append(res)
                        steady = res["steady_samples_per_s"]
                        print(f"  {key:<24} round {r}: {res['samples_per_s']:>12,.0f} samples/s"
                              + (f" (steady {steady:>12,.0f})" if steady else ""), flush=True)
                except Exception as e:  # reported, never a figure; featstore itself failing ends the run
                    if c.name == "featstore":
                        raise
                    broken.add(c.name)
                    unavailable[c.name] = f"failed in {key} round {r}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    print(f"  {c.name:<20} {unavailable[c.name]}", flush=True)
                    for sfx in ("", "_cold", "_later"):
                        runs.pop(c.name + sfx, None)
                finally:
                    if hasattr(c, "again"):
                        c.close()
                        gc.collect()


def paired(runs: dict, ours: str, other: str, field: str = "samples_per_s") -> float | None:
    """ours / other, paired by round (measured in the same round), median over rounds."""
    if ours not in runs or other not in runs:
        return None
    mine = {x["round"]: x[field] for x in runs[ours] if x[field]}
    pairs = [mine[x["round"]] / x[field] for x in runs[other] if x["round"] in mine and x[field]]
    return round(statistics.median(pairs), 3) if pairs else None


def summarize(runs: dict, shuffle: dict) -> tuple[dict, dict, dict]:
    figures, spread = {}, {}
    for key, xs in runs.items():
        for field in ("samples_per_s", "steady_samples_per_s"):
            v = [x[field] for x in xs if x[field] is not None]
            if v:
                figures[f"{key}_{field}"] = round(statistics.median(v), 1)
        v = [x["samples_per_s"] for x in xs]
        spread[key] = {"min": round(min(v), 1), "max": round(max(v), 1), "rounds": len(v)}
    figures.update({f"shuffle_{k}": round(v, 4) for k, v in shuffle.items() if k != "ratio"})
    figures["shuffle_rate_samples_per_s"] = figures.get("featstore_samples_per_s")  # the default's rate
    ratios = {}
    for key in runs:
        base = key.removesuffix("_cold")
        if base.startswith(("featstore", "s3_")) or base.endswith(("_remote", "_remote_later")):
            continue
        sfx = "_cold" if key.endswith("_cold") else ""
        ratios[f"featstore_vs_{key}"] = paired(runs, "featstore" + sfx, key)
    ratios["featstore_vs_memmap_steady"] = paired(runs, "featstore", "memmap", "steady_samples_per_s")
    for sfx in ("", "_cold"):
        ratios[f"featstore_reused_vs_memmap{sfx}"] = paired(runs, "featstore_reused" + sfx, "memmap" + sfx)
    ratios["shuffle_quality"] = round(shuffle["ratio"], 4)
    for sfx in ("", "_later"):  # first epochs against first epochs, later against later
        ratios[f"remote_vs_local{sfx}"] = paired(runs, "featstore_remote" + sfx, "featstore_local" + sfx)
        for peer in ("litdata_remote", "mosaic_remote"):
            ratios[f"featstore_remote_vs_{peer}{sfx}"] = paired(runs, "featstore_remote" + sfx, peer + sfx)
    # the server's ceiling: whole shard objects fetched as fast as s3fs can, against the local Loader
    ratios["s3_whole_objects_vs_local"] = paired(runs, "s3_whole_objects", "featstore_local")
    ratios["featstore_remote_vs_s3_whole_objects"] = paired(runs, "featstore_remote", "s3_whole_objects")
    return figures, {k: v for k, v in ratios.items() if v is not None}, spread


def main():
    p = bench_parser(__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=None, help="rows (default 200,000; --quick 4,096)")
    p.add_argument("--rounds", type=int, default=None, help="warm rounds (default 5; --quick 1)")
    p.add_argument("--cold-rounds", type=int, default=None, help="cold rounds (default 3; --quick 1)")
    p.add_argument("--only", default=None, help="comma-separated contenders (featstore always runs)")
    p.add_argument("--no-remote", action="store_true", help="skip the S3 contenders")
    p.add_argument("--sharelock-rows", type=int, default=None, help="rows ShareLock's layout holds (default 20,000)")
    p.add_argument("--device", default="cpu", help="cuda: every batch is copied to the GPU (pinned where the contender can)")
    p.add_argument("--tag", default=None, help="results file tag: results/store.<tag>.json (gpu.sh: gpu)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: start no round after this (the results say which were left out); gpu.sh's one try")
    args = p.parse_args()
    size = dict(SIZES["quick" if args.quick else "full"])
    n = args.rows or size["n"]
    warm = args.rounds or size["warm"]
    cold = args.cold_rounds if args.cold_rounds is not None else size["cold"]
    device = torch.device(args.device) if args.device != "cpu" else None
    gpu = torch.cuda.get_device_name(device) if device is not None else None
    t0 = time.perf_counter()
    root = data_dir(args, "store")
    labels = (np.arange(n) * CLASSES // n).astype(np.int64)  # class-sorted rows
    data = Data(root=root, n=n, rows_per_shard=R, batch_size=BATCH, seed=SEED, labels=labels, pin_memory=device is not None)
    print(f"writing {n:,} rows under {root} ...", flush=True)
    write_npy(root, n, R, SEED)

    only = set(args.only.split(",")) | {"featstore"} if args.only else None
    featstore = Featstore(data)
    local = [FeatstoreReused(data), ZarrLoader(data), MemmapOneCopy(data), MemmapThreads(data), Memcpy(data), DiskSequential(data), InRam(data), ShareLockStaged(data, args.sharelock_rows or size["sharelock"]),
             HFIterable(data), HFIterableTorch(data), Litdata(data), Mosaic(data), Lance(data)]
    local = [c for c in local if only is None or c.name in only]
    built, unavailable, runs = {}, {}, {}
    if not build_all([featstore], data, built, unavailable):
        raise SystemExit(f"featstore itself cannot run: {unavailable['featstore']}")
    data.order = featstore.epoch_order()  # the Loader's batch_rows(): memmap and ram replay it
    assert np.array_equal(np.sort(np.concatenate(data.order)), np.arange(n)), "featstore's epoch is not a permutation"
    local = [featstore] + build_all(local, data, built, unavailable)
    shuffle = shuffle_quality(featstore, data)
    print(f"  shuffle quality (Loader.shuffle_quality at its default window): {shuffle['ratio']:.3f}; "
          f"{shuffle['loader_classes_per_batch']:.0f} classes per batch vs "
          f"{shuffle['full_permutation_classes_per_batch']:.0f} for a full permutation", flush=True)
    load_start = os.getloadavg()
    deadline = t0 + args.budget if args.budget else None
    skipped: list[str] = []
    rounds(local, [(False, warm), (True, cold)], runs, device, unavailable, deadline=deadline, skipped=skipped)

    remote_rows = min(size["remote"], n)
    if not args.no_remote and (only is None or only & {"featstore_remote", "featstore_local", "litdata_remote", "mosaic_remote", "s3_whole_objects"}):
        try:
            with s3_server() as url:
                whole = {c.name: c for c in local}
                fl = FeatstoreLocal(data, remote_rows, featstore.path)
                remote = [fl, FeatstoreRemote(data, remote_rows, fl), S3WholeObjects(data, remote_rows, fl),
                          LitdataRemote(data, remote_rows, whole["litdata"].dir if "litdata" in whole else None),
                          MosaicRemote(data, remote_rows, whole["mosaic"].dir if "mosaic" in whole else None)]
                remote = build_all(remote, data, built, unavailable)
                print(f"  S3 server {url}: uploaded", flush=True)
                rounds(remote, [(False, size["remote_rounds"])], runs, device, unavailable, later=True, deadline=deadline,
                       skipped=skipped)
        except Exception as e:  # no S3 server here: said so in the results
            unavailable["remote"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    load_end = os.getloadavg()

    figures, ratios, spread = summarize(runs, shuffle)
    dev = device_string(gpu)
    params = {
        "rows": n, "dims": DIMS, "dtype": "float16", "batch_size": BATCH, "rows_per_shard": R, "seed": SEED,
        "classes": CLASSES, "labels": "row * classes // rows (class-sorted)", "warm_rounds": warm,
        "cold_rounds": cold, "remote_rounds": size["remote_rounds"], "remote_rows": remote_rows,
        "device_copy": args.device, "statistic": "figures: median over rounds (spread: min/max); ratios: median over "
        "rounds of featstore / other in the same round; iteration timed, opening untimed; steady = after the first batch",
        "warm": "files read just before the timed epoch", "cold": "files dropped with posix_fadvise(DONTNEED) just before",
        "contenders": {c.name: c.describe() for c in local}, "build_seconds": built, "unavailable": unavailable,
        "torch_threads": torch.get_num_threads(), "versions": _versions(),
        "loadavg_1_5_15_at_start": [round(x, 2) for x in load_start], "loadavg_1_5_15_at_end": [round(x, 2) for x in load_end],
        "wall_seconds": round(time.perf_counter() - t0, 1), "budget_seconds": args.budget, "rounds_skipped": skipped,
    }
    if "remote" in locals():
        params["contenders"].update({c.name: c.describe() for c in remote})
    path = write_results("store", params, figures, ratios, quick=args.quick, device=dev, tag=args.tag, spread=spread, runs=runs)
    _print(figures, ratios, spread, dev, n, args.quick)
    print(f"\nwrote {path}  ({time.perf_counter() - t0:.0f}s)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def _print(figures, ratios, spread, dev, n, quick) -> None:
    rows = []
    for key in spread:
        if key.endswith("_cold"):
            continue
        cold = key + "_cold"
        rows.append({"contender": key, "warm samples/s": f"{figures[key + '_samples_per_s']:,.0f}",
                     "warm min–max": f"{spread[key]['min']:,.0f}–{spread[key]['max']:,.0f}",
                     "cold samples/s": f"{figures[cold + '_samples_per_s']:,.0f}" if cold in spread else "–",
                     "featstore ÷ it": ratios.get(f"featstore_vs_{key}", "–"),
                     "featstore ÷ it (cold)": ratios.get(f"featstore_vs_{cold}", "–")})
    print_table(rows, title=f"bench_store ({'quick, ' if quick else ''}{n:,} rows, batch {BATCH}) — {dev}")
    print()
    for k, v in ratios.items():
        print(f"  {k:<40} {v}")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("numpy", "torch", "zarr", "datasets", "pyarrow", "litdata", "mosaicml-streaming", "pylance", "moto", "s3fs"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


if __name__ == "__main__":
    main()
