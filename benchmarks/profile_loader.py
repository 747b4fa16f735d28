"""Where an epoch of the featstore Loader spends its time: every thread profiled (cProfile).

Runs the same Loader as bench_store's featstore contender (contenders/featstore_loader.py) over
a store of two float16 columns, warm (its files read just before), and prints the epoch rate,
the time to the first batch, the steady rate after it, and the functions with the most own time
summed over the consuming, producer and reader threads.  Profiling slows Python-level code, so
read the split, not the rate.

    python benchmarks/profile_loader.py [--rows 200000] [--epochs 2] [--store bench_data/store/featstore/store.zarr]
    python benchmarks/profile_loader.py --compare [--rounds 5]     no profiler: where the time goes

`--compare` times, in interleaved rounds and without a profiler, a fresh Loader's epoch (the
featstore contender), a later epoch of one Loader (featstore_reused) and the one-copy memmap in
the same order (bench_store's limit), each warm, with the time to the first batch, the steady
rate after it, the minor page faults the epoch took (getrusage: a page of the page cache mapped
into the process for the first time costs one) and the CPU seconds it used.
"""

from __future__ import annotations

import argparse
import cProfile
import resource
import statistics
import io
import pstats
import sys
import threading
import time
from pathlib import Path

import numpy as np

from common import data_dir, warm_cache
from contenders import Data, write_npy
from contenders.featstore_loader import build_store, open_loader


def profiled_epoch(loader) -> tuple[dict, pstats.Stats]:
    profiles: list[cProfile.Profile] = []

    def start(frame, event, arg):  # the first event of each new thread: profile that thread
        sys.setprofile(None)
        p = cProfile.Profile()
        profiles.append(p)
        p.enable()

    main = cProfile.Profile()
    threading.setprofile(start)
    main.enable()
    t0 = time.perf_counter()
    first, n = None, 0
    for batch in loader:
        n += len(batch["img"])
        if first is None:
            first, first_n = time.perf_counter() - t0, n
    secs = time.perf_counter() - t0
    main.disable()
    threading.setprofile(None)
    stats = pstats.Stats(main)
    for p in profiles:
        try:
            stats.add(p)
        except TypeError:  # a thread still running: no stats yet
            pass
    return {"samples": n, "seconds": secs, "samples_per_s": n / secs, "first_batch_s": first,
            "steady_samples_per_s": (n - first_n) / (secs - first) if secs > first else None}, stats


def timed_epoch(batches) -> dict:
    """One epoch of `batches`, timed: rate, first batch, steady rate, minor faults, CPU seconds."""
    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    t0 = time.perf_counter()
    first, n, first_n = None, 0, 0
    for batch in batches:
        n += len(batch["img"])
        if first is None:
            first, first_n = time.perf_counter() - t0, n
    secs = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"samples_per_s": n / secs, "first_batch_s": first, "steady_samples_per_s": (n - first_n) / (secs - first),
            "minor_faults": r1.ru_minflt - r0.ru_minflt, "cpu_s": time.process_time() - c0, "wall_s": secs}


def compare(path, data, rounds: int) -> None:
    """fresh Loader / reused Loader / one-copy memmap, warm, interleaved (see the module doc)."""
    from contenders.memmap_ram import MemmapOneCopy

    reused = open_loader(path, data)
    for _ in reused:  # its first epoch, untimed
        pass
    data.order = open_loader(path, data).batch_rows()
    memmap = MemmapOneCopy(data)
    runs: dict[str, list[dict]] = {}
    for r in range(rounds):
        for name in ("featstore", "featstore_reused", "memmap"):
            warm_cache(*([data.npy] if name == "memmap" else [path / "features"]))
            if name == "featstore":
                batches = open_loader(path, data)
            elif name == "featstore_reused":
                reused.set_epoch(reused.epoch)
                batches = reused
            else:
                batches = memmap.open()
            runs.setdefault(name, []).append(timed_epoch(batches))
            x = runs[name][-1]
            print(f"  round {r} {name:<17} {x['samples_per_s']:>10,.0f}/s  first {x['first_batch_s'] * 1e3:6.1f} ms  "
                  f"steady {x['steady_samples_per_s']:>10,.0f}/s  faults {x['minor_faults']:>8,}  cpu {x['cpu_s']:.2f}s "
                  f"/ wall {x['wall_s']:.2f}s", flush=True)
    print("\nmedians:")
    for name, xs in runs.items():
        med = {k: statistics.median(x[k] for x in xs) for k in xs[0]}
        print(f"  {name:<17} " + ", ".join(f"{k} {v:,.3f}" for k, v in med.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--store", default=None, help="an existing bench_store store (bench_store.py --keep)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the same Loader, each profiled")
    ap.add_argument("--compare", action="store_true", help="time fresh / reused Loader and memmap, no profiler")
    ap.add_argument("--rounds", type=int, default=5, help="--compare: interleaved rounds")
    args = ap.parse_args()
    if args.store:
        path = Path(args.store)
        data = Data(root=path.parent.parent, n=0, rows_per_shard=4096, batch_size=1024, seed=0, labels=np.zeros(0))
    else:
        args.data_dir, args.keep = None, False
        root = data_dir(args, "profile")
        data = Data(root=root, n=args.rows, rows_per_shard=4096, batch_size=1024, seed=0,
                    labels=np.zeros(args.rows, dtype=np.int64))
        write_npy(root, args.rows, 4096, 0)
        path = root / "store.zarr"
        build_store(path, data)
    if args.compare:
        compare(path, data, args.rounds)
        return
    loader = open_loader(path, data)
    for epoch in range(args.epochs):  # later epochs of the same Loader reuse its window buffers
        warm_cache(path / "features")
        result, stats = profiled_epoch(loader)
        print(f"epoch {epoch} of one Loader: "
              + ", ".join(f"{k} {v:,.3f}" if isinstance(v, float) else f"{k} {v:,}" for k, v in result.items()))
        out = io.StringIO()
        stats.stream = out
        stats.sort_stats("tottime").print_stats(args.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
