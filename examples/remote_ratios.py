"""A store on S3 vs the same store on local disk, read by the Loader (ratios only, rounds interleaved).

    .venv/bin/python examples/remote_ratios.py [--rows 32768] [--rounds 3] [--out FILE]

The store of examples/loader_ratios.py (two fp16 columns, 768-d "img" and 4096-d "txt", batch 1024,
default rows_per_shard 4096, the Loader's defaults) uploaded to moto's S3 server on 127.0.0.1 (a
child process: the real S3 protocol, objects in memory).  Each round, back to back:

- local: the local store, warm (files read just before), one epoch;
- remote, cache="disk": a fresh cache directory, the first epoch (every shard object fetched
  whole, in read order, while the epoch reads) and the next two epochs (read from the cache);
  then the first epoch of a second Loader on the same cache (another run: nothing fetched);
- remote, cache=None: ranged reads of each window's runs (index fetched once per shard);
- the server's own limit: every shard object fetched whole, concurrently (s3fs `cat`);
- local again (A B ... A: a drifting machine cancels out).

Epochs are timed alone; making each Loader (opening the store's metadata, listing, mapping) is
timed apart (`loader_setup_*_s`).  Then the first cache epoch again with 2, 4, 8 and 16 download threads (a fresh cache each).
Writes a JSON of figures and ratios (ratios: median over rounds of remote / local in that round).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from loader_ratios import BATCH, COLUMNS, DIMS, build, featstore_epoch, warm  # noqa: E402

from featstore.loader import Loader  # noqa: E402
from featstore.store import Store  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data-dir", default="bench_data/remote_ratios")
    ap.add_argument("--out", default=str(HERE / "results" / "remote_ratios.json"))
    args = ap.parse_args()
    import s3fs

    from servers import s3_server

    root = Path(args.data_dir)
    if not (root / "store.zarr" / "zarr.json").exists() or Store.open(root / "store.zarr").n_rows != args.rows:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        build(root, args.rows)
    n = args.rows
    samples: dict[str, list] = {k: [] for k in ("local", "cache_first", "cache_later", "cache_next_loader",
                                                "direct", "whole_objects")}
    with s3_server():
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        fs.put(str(root / "store.zarr"), "bench/store.zarr", recursive=True)
        local, far = Store.open(root / "store.zarr"), Store.open("s3://bench/store.zarr")
        shards = [p for p in fs.find("bench/store.zarr/features") if "/c/" in p]
        setup: dict[str, list] = {"local": [], "cache_cold": [], "cache_warm": [], "direct": []}
        for r in range(args.rounds):
            got = {}
            made = time.perf_counter()
            mine = Loader(local, COLUMNS, BATCH, seed=r)
            setup["local"].append(time.perf_counter() - made)
            warm([root / "store.zarr"])
            a = timed(lambda: featstore_epoch(mine, False))
            cache_dir = tempfile.mkdtemp(prefix="featstore-cache-", dir=root)
            made = time.perf_counter()
            loader = Loader(far, COLUMNS, BATCH, seed=r, cache="disk", cache_dir=cache_dir)
            setup["cache_cold"].append(time.perf_counter() - made)
            got["cache_first"] = timed(lambda: featstore_epoch(loader, False))
            got["cache_later"] = statistics.median(timed(lambda: featstore_epoch(loader, False)) for _ in range(2))
            made = time.perf_counter()
            loader = Loader(far, COLUMNS, BATCH, seed=r + 1, cache="disk", cache_dir=cache_dir)
            setup["cache_warm"].append(time.perf_counter() - made)
            got["cache_next_loader"] = timed(lambda: featstore_epoch(loader, False))
            shutil.rmtree(cache_dir)
            made = time.perf_counter()
            loader = Loader(far, COLUMNS, BATCH, seed=r, read_ahead=2)
            setup["direct"].append(time.perf_counter() - made)
            got["direct"] = timed(lambda: featstore_epoch(loader, False))
            got["whole_objects"] = timed(lambda: fs.cat(shards))
            warm([root / "store.zarr"])
            mine.set_epoch(r)
            b = timed(lambda: featstore_epoch(mine, False))
            got["local"] = (a + b) / 2
            for k, v in got.items():
                samples[k].append(n / v)
            print(f"round {r}: " + "  ".join(f"{k} {n / v:,.0f}/s" for k, v in got.items()), flush=True)
        sweep = {t: [] for t in (2, 4, 8, 16)}
        for r in range(args.rounds):
            for t in sweep:
                cache_dir = tempfile.mkdtemp(prefix="featstore-cache-", dir=root)
                loader = Loader(far, COLUMNS, BATCH, seed=r, cache="disk", cache_dir=cache_dir, download_threads=t)
                sweep[t].append(n / timed(lambda: featstore_epoch(loader, False)))
                shutil.rmtree(cache_dir)
            print(f"download threads, round {r}: " + "  ".join(f"{t}: {v[-1]:,.0f}/s" for t, v in sweep.items()),
                  flush=True)
    figures = {f"{k}_samples_per_s": statistics.median(v) for k, v in samples.items()}
    figures.update({f"loader_setup_{k}_s": statistics.median(v) for k, v in setup.items()})
    figures.update({f"cache_first_{t}_threads_samples_per_s": statistics.median(v) for t, v in sweep.items()})
    ratios = {f"remote_{k}_vs_local": statistics.median(x / y for x, y in zip(v, samples["local"]))
              for k, v in samples.items() if k != "local"}
    ratios["remote_cache_first_vs_whole_objects"] = statistics.median(
        x / y for x, y in zip(samples["cache_first"], samples["whole_objects"]))
    result = {"bench": "remote_ratios", "device": f"cpu: {os.cpu_count()} cores",
              "params": {"rows": n, "dims": DIMS, "batch": BATCH, "rows_per_shard": local.rows_per_shard,
                         "rounds": args.rounds, "server": "moto (child process) on 127.0.0.1"},
              "figures": figures, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
