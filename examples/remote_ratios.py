"""A store on S3 vs the same store on local disk, read by the Loader (ratios only, rounds interleaved).

    .venv/bin/python examples/remote_ratios.py [--rows 65536] [--rounds 3] [--out FILE]

The store of examples/loader_ratios.py (two fp16 columns, 768-d "img" and 4096-d "txt", batch 1024,
default rows_per_shard 4096, the Loader's defaults) uploaded to moto's S3 server on 127.0.0.1 (a
child process: the real S3 protocol, objects in memory).  Each round, back to back:

- remote, cache="disk": a fresh cache directory, the first epoch (every shard object fetched
  whole, in read order, while the epoch reads); then two later epochs (read from the cache);
  then the first epoch of a second Loader on the same cache (another run: nothing fetched);
- remote, cache=None: ranged reads of each window's runs (index fetched once per shard);
- the server's own limit: every shard object fetched whole, concurrently (s3fs `cat`);

each next to the local store (warm: files read just before) in the same order, measured just
before and after it (later epochs: remote, local, remote, local; a second Loader's first epoch:
against a new local Loader's first epoch, both mapping their pages in); ratios are remote / local
of each pair.

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

from loader_ratios import BATCH, COLUMNS, DIMS, ensure_store, featstore_epoch, upload_store, warm  # noqa: E402

from featstore.loader import Loader  # noqa: E402


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data-dir", default="bench_data/remote_ratios")
    ap.add_argument("--out", default=str(HERE / "results" / "remote_ratios.json"))
    args = ap.parse_args()
    from servers import s3_server

    root = Path(args.data_dir)
    ensure_store(root, args.rows)
    n = args.rows
    pairs: dict[str, list] = {k: [] for k in ("cache_first", "cache_later", "cache_next_loader", "direct",
                                              "whole_objects")}  # (remote, local) rates of one round
    setup: dict[str, list] = {"local": [], "cache_cold": [], "cache_warm": [], "direct": []}
    with s3_server():
        fs, local, far, shards = upload_store(root)
        for r in range(args.rounds):
            made = time.perf_counter()
            mine = Loader(local, COLUMNS, BATCH, seed=r)
            setup["local"].append(time.perf_counter() - made)

            def local_rate(epoch: int) -> float:
                warm([root / "store.zarr"])
                mine.set_epoch(epoch)
                return n / timed(lambda: featstore_epoch(mine, False))

            def fresh_local_rate(epoch: int) -> float:  # a new Loader's first epoch (its pages not mapped in yet)
                warm([root / "store.zarr"])
                fresh = Loader(local, COLUMNS, BATCH, seed=r, epoch=epoch)
                return n / timed(lambda: featstore_epoch(fresh, False))

            def around(name: str, remote_rate, baseline=local_rate) -> None:  # local, remote, local
                a = baseline(r)
                ours = remote_rate()
                pairs[name].append((ours, (a + baseline(r)) / 2))

            cache_dir = tempfile.mkdtemp(prefix="featstore-cache-", dir=root)
            made = time.perf_counter()
            cached = Loader(far, COLUMNS, BATCH, seed=r, cache="disk", cache_dir=cache_dir)
            setup["cache_cold"].append(time.perf_counter() - made)
            around("cache_first", lambda: n / timed(lambda: featstore_epoch(cached, False)))
            for _ in range(2):  # later epochs, A B B A against the local store in the same order
                cached.set_epoch(r)
                b = n / timed(lambda: featstore_epoch(cached, False))
                pairs["cache_later"].append((b, local_rate(r)))
            made = time.perf_counter()
            again = Loader(far, COLUMNS, BATCH, seed=r, cache="disk", cache_dir=cache_dir)
            setup["cache_warm"].append(time.perf_counter() - made)
            around("cache_next_loader", lambda: n / timed(lambda: featstore_epoch(again, False)), fresh_local_rate)
            del cached, again
            shutil.rmtree(cache_dir)
            made = time.perf_counter()
            direct = Loader(far, COLUMNS, BATCH, seed=r, read_ahead=2)
            setup["direct"].append(time.perf_counter() - made)
            around("direct", lambda: n / timed(lambda: featstore_epoch(direct, False)))
            around("whole_objects", lambda: n / timed(lambda: fs.cat(shards)))
            print(f"round {r}: " + "  ".join(f"{k} {v[-1][0]:,.0f}/s (local {v[-1][1]:,.0f}/s)"
                                             for k, v in pairs.items()), flush=True)
        sweep = {t: [] for t in (2, 4, 8, 16)}
        for r in range(args.rounds):
            for t in sweep:
                cache_dir = tempfile.mkdtemp(prefix="featstore-cache-", dir=root)
                loader = Loader(far, COLUMNS, BATCH, seed=r, cache="disk", cache_dir=cache_dir, download_threads=t)
                sweep[t].append(n / timed(lambda: featstore_epoch(loader, False)))
                del loader
                shutil.rmtree(cache_dir)
            print(f"download threads, round {r}: " + "  ".join(f"{t}: {v[-1]:,.0f}/s" for t, v in sweep.items()),
                  flush=True)
    figures = {f"{k}_samples_per_s": statistics.median(p[0] for p in v) for k, v in pairs.items()}
    figures["local_samples_per_s"] = statistics.median(p[1] for v in pairs.values() for p in v)
    figures.update({f"loader_setup_{k}_s": statistics.median(v) for k, v in setup.items()})
    figures.update({f"cache_first_{t}_threads_samples_per_s": statistics.median(v) for t, v in sweep.items()})
    ratios = {f"remote_{k}_vs_local": statistics.median(a / b for a, b in v) for k, v in pairs.items()}
    ratios["remote_cache_first_vs_whole_objects"] = statistics.median(
        a[0] / b[0] for a, b in zip(pairs["cache_first"], pairs["whole_objects"]))
    result = {"bench": "remote_ratios", "device": f"cpu: {os.cpu_count()} cores",
              "params": {"rows": n, "dims": DIMS, "batch": BATCH, "rows_per_shard": local.rows_per_shard,
                         "rounds": args.rounds, "server": "moto (child process) on 127.0.0.1"},
              "figures": figures, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
