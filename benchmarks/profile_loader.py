"""Where an epoch of the featstore Loader spends its time: every thread profiled (cProfile).

Runs the same Loader as bench_store's featstore contender (contenders/featstore_loader.py) over
a store of two float16 columns, warm (its files read just before), and prints the epoch rate,
the time to the first batch, the steady rate after it, and the functions with the most own time
summed over the consuming, producer and reader threads.  Profiling slows Python-level code, so
read the split, not the rate.

    python benchmarks/profile_loader.py [--rows 200000] [--epochs 2] [--store bench_data/store/featstore/store.zarr]
"""

from __future__ import annotations

import argparse
import cProfile
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--store", default=None, help="an existing bench_store store (bench_store.py --keep)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--epochs", type=int, default=2, help="epochs of the same Loader, each profiled")
    args = ap.parse_args()
    if args.store:
        path = Path(args.store)
        data = Data(root=path.parent, n=0, rows_per_shard=4096, batch_size=1024, seed=0, labels=np.zeros(0))
    else:
        args.data_dir, args.keep = None, False
        root = data_dir(args, "profile")
        data = Data(root=root, n=args.rows, rows_per_shard=4096, batch_size=1024, seed=0,
                    labels=np.zeros(args.rows, dtype=np.int64))
        write_npy(root, args.rows, 4096, 0)
        path = root / "store.zarr"
        build_store(path, data)
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
