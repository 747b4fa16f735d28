"""Side-by-side checks of the Loader's read path (ratios only, rounds interleaved).

    .venv/bin/python examples/loader_ratios.py [--rows 81920] [--remote-rows 16384] [--rounds 5] [--out FILE]

Two fp16 columns (768-d "img", 4096-d "txt"), batch 1024, default rows_per_shard (4096), rows
sorted by class (1000 classes), the Loader's defaults.  Measured here, in one process:

- warm one-copy: the Loader (shards mapped, one np.take into each batch tensor) vs a numpy
  memmap of the same data as .npy files gathered in the same order by the same np.take into a
  fresh tensor; both with a consumer that drops each batch and one that keeps every batch's
  `row` tensor (as evaluation does).  Files read just before each timed epoch.  Cold: the
  files evicted from the page cache (posix_fadvise DONTNEED) just before, a fresh epoch order.
- prefetch: the Loader warm with 1, 2 and 4 batches prefetched (the default is 1).
- shuffle quality: per-batch label entropy of the Loader's epoch over a full permutation's.
- remote vs local: the same store uploaded to moto's S3 server on 127.0.0.1 (a child process),
  read by the Loader's remote shard reader, vs the local store; default window and a 16x one;
  and the server's own limit: fetching every shard object whole, concurrently (s3fs `cat`).

Writes a JSON of figures and ratios (ratios: median over rounds of ours / theirs in that round; warm
rounds run A B B A).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from featstore.loader import Loader  # noqa: E402
from featstore.store import Store  # noqa: E402
from featstore.core.writes import write_block  # noqa: E402

DIMS = {"img": 768, "txt": 4096}
COLUMNS = {k: f"features/{k}/pooled" for k in DIMS}
BATCH, CLASSES = 1024, 1000


def build(root: Path, n: int) -> Path:
    path = root / "store.zarr"
    store = Store.create(path)
    store.register([f"u{i:08d}" for i in range(n)], labels=np.arange(n) * CLASSES // n)
    for k, d in DIMS.items():
        store.create_feature_set(k, {"model": k}, d)
        mm = np.lib.format.open_memmap(root / f"{k}.npy", mode="w+", dtype=np.float16, shape=(n, d))
        for b in range(store.n_blocks):
            a, z = store.block_range(b)
            x = np.random.default_rng([b, d]).standard_normal((z - a, d), dtype=np.float32).astype(np.float16)
            write_block(store, k, b, {"pooled": x}, np.ones(z - a, bool))
            mm[a:z] = x
        mm.flush()
        del mm
    return path


def warm(paths) -> None:
    for p in paths:
        for f in ([p] if p.is_file() else sorted(p.rglob("*"))):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(16 << 20):
                        pass


def drop(paths) -> None:
    """Evict these files from the page cache (posix_fadvise DONTNEED): the next read is cold."""
    for p in paths:
        for f in ([p] if p.is_file() else sorted(p.rglob("*"))):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)


def featstore_epoch(loader, keep: bool) -> int:
    kept, n = [], 0
    for batch in loader:
        n += len(batch["row"])
        if keep:
            kept.append(batch["row"])
    return n


def memmap_epoch(mms, batches, keep: bool) -> int:
    kept, n = [], 0
    for rows in batches:
        batch = {}
        for k, m in mms.items():
            out = torch.empty((len(rows), m.shape[1]), dtype=torch.float16)
            np.take(m, rows, axis=0, out=out.numpy(), mode="clip")
            batch[k] = out
        batch["row"] = torch.from_numpy(rows.copy())
        n += len(rows)
        if keep:
            kept.append(batch["row"])
    return n


def rate(fn) -> float:
    t = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=81920)
    ap.add_argument("--remote-rows", type=int, default=16384)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--data-dir", default="bench_data/loader_ratios")
    ap.add_argument("--out", default=str(HERE / "results" / "loader_ratios.json"))
    ap.add_argument("--skip-remote", action="store_true")
    args = ap.parse_args()
    root = Path(args.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    local_path = root / "store.zarr"
    if not (local_path / "zarr.json").exists() or Store.open(local_path).n_rows != args.rows:
        import shutil

        shutil.rmtree(root)
        root.mkdir(parents=True)
        build(root, args.rows)
    store = Store.open(local_path)
    loader = Loader(store, COLUMNS, BATCH, seed=0)
    assert all(c.source.kind == "mapped" for c in loader.columns)
    mms = {k: np.load(root / f"{k}.npy", mmap_mode="r") for k in DIMS}
    figures: dict = {"shuffle_quality": loader.shuffle_quality()}
    ratios: dict = {}
    samples = {"drop": [], "keep": []}
    for r in range(args.rounds):
        loader.set_epoch(r)
        batches = loader.batch_rows()  # the same order the Loader serves this epoch
        for keep in (False, True):
            got = {"ours": [], "mem": []}
            for who in ("mem", "ours", "ours", "mem"):  # A B B A: a drifting machine cancels out
                warm([local_path, root / "img.npy", root / "txt.npy"])
                if who == "mem":
                    got[who].append(rate(lambda: memmap_epoch(mms, batches, keep)))
                else:
                    got[who].append(rate(lambda: featstore_epoch(loader, keep)))
                    loader.set_epoch(r)  # the same order as the memmap's
            ours, mem = statistics.mean(got["ours"]), statistics.mean(got["mem"])
            samples["keep" if keep else "drop"].append((ours, mem))
            print(f"round {r} keep_rows={keep}: featstore {ours:,.0f}/s  memmap one-copy {mem:,.0f}/s  "
                  f"ratio {ours / mem:.3f}", flush=True)
    sweep = {p: [] for p in (1, 2, 4)}  # batches prefetched: how deep is worth it
    for r in range(args.rounds):
        for p, got in sweep.items():
            warm([local_path])
            got.append(rate(lambda: featstore_epoch(Loader(store, COLUMNS, BATCH, seed=0, prefetch=p), False)))
        print("prefetch sweep round", r, {p: f"{v[-1]:,.0f}/s" for p, v in sweep.items()}, flush=True)
    for p, got in sweep.items():
        figures[f"featstore_warm_prefetch_{p}_samples_per_s"] = statistics.median(got)
    cold = []
    for r in range(max(1, args.rounds // 2)):
        fresh = Loader(store, COLUMNS, BATCH, seed=100 + r)
        batches = fresh.batch_rows()
        drop([root / "img.npy", root / "txt.npy"])
        mem = rate(lambda: memmap_epoch({k: np.load(root / f"{k}.npy", mmap_mode="r") for k in DIMS}, batches, False))
        drop([local_path])
        ours = rate(lambda: featstore_epoch(fresh, False))
        cold.append((ours, mem))
        print(f"cold round {r}: featstore {ours:,.0f}/s  memmap one-copy {mem:,.0f}/s  ratio {ours / mem:.3f}", flush=True)
    samples["cold"] = cold
    for mode, pairs in samples.items():
        name = "cold" if mode == "cold" else f"warm_{mode}"
        figures[f"featstore_{name}_samples_per_s"] = statistics.median(p[0] for p in pairs)
        figures[f"memmap_one_copy_{name}_samples_per_s"] = statistics.median(p[1] for p in pairs)
        ratios[f"featstore_vs_memmap_one_copy_{name}"] = statistics.median(p[0] / p[1] for p in pairs)
    if not args.skip_remote:
        figures.update(remote(root, args.remote_rows, args.rounds, ratios))
    result = {"bench": "loader_ratios", "device": f"cpu: {os.cpu_count()} cores",
              "params": {"rows": args.rows, "remote_rows": args.remote_rows, "dims": DIMS, "batch": BATCH,
                         "classes": CLASSES, "rows_per_shard": store.rows_per_shard, "window_rows": loader.window,
                         "run_rows": loader.run_rows, "rounds": args.rounds},
              "figures": figures, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


def ensure_store(root: Path, n: int) -> None:
    """root/store.zarr with n rows: kept when it is there already, else built afresh."""
    if not (root / "store.zarr" / "zarr.json").exists() or Store.open(root / "store.zarr").n_rows != n:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        build(root, n)


def upload_store(root: Path):
    """Inside `servers.s3_server()`: root/store.zarr uploaded to s3://bench/store.zarr; returns
    (the S3 filesystem, the local store, the remote store, the remote feature shard objects)."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    fs.put(str(root / "store.zarr"), "bench/store.zarr", recursive=True)
    local, far = Store.open(root / "store.zarr"), Store.open("s3://bench/store.zarr")
    return fs, local, far, [p for p in fs.find("bench/store.zarr/features") if "/c/" in p]


def remote(root: Path, n: int, rounds: int, ratios: dict) -> dict:
    from servers import s3_server

    sub = root / "remote"
    ensure_store(sub, n)
    figures = {}
    with s3_server():
        fs, local, far, shards = upload_store(sub)
        pairs = []
        for r in range(rounds):  # the server's own limit: every shard object, whole, concurrently
            theirs = rate(lambda: featstore_epoch(Loader(local, COLUMNS, BATCH, seed=r), False))
            t = time.perf_counter()
            fs.cat(shards)
            pairs.append((n / (time.perf_counter() - t), theirs))
        figures["s3_whole_objects_samples_per_s"] = statistics.median(p[0] for p in pairs)
        ratios["s3_whole_objects_vs_local"] = statistics.median(p[0] / p[1] for p in pairs)
        print(f"s3 transport (whole shard objects, concurrent): {figures['s3_whole_objects_samples_per_s']:,.0f} rows/s,"
              f" {ratios['s3_whole_objects_vs_local']:.3f}x local", flush=True)
        for name, kw in (("default_window", {}), ("window_x16", {"window_bytes": 16 * (256 << 20)})):
            pairs = []
            for r in range(rounds):
                a = Loader(far, COLUMNS, BATCH, seed=r, read_ahead=2, **kw)
                b = Loader(local, COLUMNS, BATCH, seed=r, **kw)
                theirs = rate(lambda: featstore_epoch(b, False))
                ours = rate(lambda: featstore_epoch(a, False))
                reqs = a.columns[1].source.remote.requests
                pairs.append((ours, theirs))
                print(f"remote {name} round {r}: s3 {ours:,.0f}/s  local {theirs:,.0f}/s  ratio {ours / theirs:.3f}  "
                      f"(run {a.run_rows} rows, txt requests {reqs})", flush=True)
            figures[f"remote_{name}_samples_per_s"] = statistics.median(p[0] for p in pairs)
            figures[f"local_{name}_samples_per_s"] = statistics.median(p[1] for p in pairs)
            ratios[f"remote_vs_local_{name}"] = statistics.median(p[0] / p[1] for p in pairs)
    return figures


if __name__ == "__main__":
    main()
