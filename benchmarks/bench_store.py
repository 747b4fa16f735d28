"""Shuffled batches of two aligned fp16 feature columns: featstore against what a user would pick.

Two columns, "img" (768-d) and "txt" (4096-d), float16, N rows (200k; --quick 40960), batch
1024, shuffled.  Each contender serves whole epochs, measured warm (its files read just before:
these VMs evict page cache nobody touched for about a minute) and cold (its files dropped with
posix_fadvise(DONTNEED); the residency left is recorded), interleaved over a few rounds in one
process; figures are medians in samples/s, timing the iteration only (objects opened untimed);
ratios are medians of featstore / other measured back to back in the same round (the machine
drifts; pairs hold).  The slow ones (ShareLock's layout, hf_torch, featstore_via_zarr) run in
round 0 only.

  featstore  featstore.Loader(store, {"img": "features/img/pooled", "txt": "features/txt/pooled"},
             1024, shuffle=True, seed=0) with its defaults: blocks (4096 rows) in a seeded random
             order, rows shuffled inside windows of 4 blocks, batches gathered from the window
             buffers.  Threads: 1 producer (gathers) + 4 readers (preadv) + the consuming thread.
  memmap     the limit: the same data as .npy files through np.memmap, the same windows (the
             Loader's own order), each window copied into a buffer by 1 read-ahead thread, each
             batch gathered into a torch tensor (np.take, as featstore) by the consuming thread.
  sharelock  ShareLock's layout (its FeatureUtils ZIP backend): one torch.save .pt per sample and
             feature (fp32; the vision one (768,), the language one (1, 4096)), in uncompressed zip
             shards of 10k keys, a directory per backbone; read per sample by a Dataset through a
             torch DataLoader (batch 1024, shuffle, 2 worker processes).  `sharelock` opens each
             zip once per worker; `sharelock_as_shipped` reopens it for every sample, as
             FeatureUtils.load_feature does (measured on a few hundred samples, batch 32).
             Its store holds the first SL_N rows only (20k; --quick 4k).
  hf         a Hugging Face `datasets` Arrow table (fixed-size lists of float16) from
             load_from_disk, ds.shuffle(seed) (a full random permutation), read with
             .iter(batch_size=1024).  `hf` is its fastest path: the arrow format turned into
             torch tensors by hand (zero-copy from the gathered Arrow buffers); `hf_torch` is
             with_format("torch", dtype=torch.float16) (without the dtype it silently upcasts
             fp16 to fp32).  One thread.
  zarr       the featstore's own arrays opened with plain zarr and read naively: arr[a:b] per
             block in the same windows, np.concatenate, buf[idx] per batch, one thread (plus
             zarr's I/O event-loop thread).

Ratios are featstore's samples/s over the other's (DESIGN.md, "Benchmarks"), warm unless named
_cold.  Writes benchmarks/results/store.json (--quick: store.quick.json) and prints the table.

    .venv/bin/python benchmarks/bench_store.py [--quick] [--rounds K] [--zarrs] [--keep] [--data-dir D]
"""

from __future__ import annotations

import gc
import io
import os
import shutil
import statistics
import sys
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from common import (bench_parser, data_dir, device_string, drop_cache, print_table, resident_fraction,
                    timed, warm_cache, write_results)

from featstore.loader import Loader, _aligned_empty
from featstore.store import Store
from featstore.writer import write_block

DIMS = {"img": 768, "txt": 4096}
COLUMNS = {"img": "features/img/pooled", "txt": "features/txt/pooled"}
SL_FEATURE = {"img": "vision_features", "txt": "language_features"}
SL_SHARD = 10_000  # FeatureUtils' default shard_size
R = 4096
BATCH = 1024
SEED = 0


# ---- data --------------------------------------------------------------------------------------
def block_data(block: int, n: int) -> dict[str, np.ndarray]:
    """Deterministic random fp16 rows, all finite (|x| < 2: the exponent's top bit cleared)."""
    rng = np.random.default_rng([SEED, block])
    return {k: (rng.integers(0, 1 << 16, (n, d), dtype=np.uint16) & 0xBFFF).view(np.float16) for k, d in DIMS.items()}


def generate(root, n: int, sl_n: int) -> dict:
    """The same N x (768 + 4096) fp16 rows as a featstore store, .npy files, an HF Arrow dataset,
    and (first sl_n rows) ShareLock's zip layout."""
    import datasets
    import pyarrow as pa

    datasets.disable_progress_bars()
    paths = {"featstore": root / "store.zarr", "memmap": root / "npy", "hf": root / "hf", "sharelock": root / "sharelock"}
    store = Store.create(paths["featstore"], rows_per_shard=R)
    store.register([f"s{i:08d}" for i in range(n)])
    for name, dim in DIMS.items():
        store.create_feature_set(name, {"model": f"synthetic-{name}", "dim": dim}, dim)
    paths["memmap"].mkdir()
    mm = {k: np.lib.format.open_memmap(paths["memmap"] / f"{k}.npy", "w+", np.float16, (n, d)) for k, d in DIMS.items()}
    tables = []
    sl = _ShareLockWriter(paths["sharelock"])
    for b in range(store.n_blocks):
        start, stop = store.block_range(b)
        cols = block_data(b, stop - start)
        for k, x in cols.items():
            write_block(store, k, b, {"pooled": x}, np.ones(len(x), dtype=bool))
            mm[k][start:stop] = x
        tables.append(pa.table({k: pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
                                for k, x in cols.items()}))
        for i in range(start, min(stop, sl_n)):
            sl.add(str(i), {k: x[i - start] for k, x in cols.items()})
    sl.close()
    for m in mm.values():
        m.flush()
    del mm
    datasets.Dataset(pa.concat_tables(tables)).save_to_disk(str(paths["hf"]))
    return paths


class _ShareLockWriter:
    """Writes FeatureUtils' ZIP layout: <dir>/<backbone>/shard_<k>.zip holding '<key>_<feature>.pt'."""

    def __init__(self, root):
        self.root, self.count, self.zips = root, 0, {}
        self.key2shard: dict[str, str] = {}
        for k in DIMS:
            (root / k).mkdir(parents=True)

    def add(self, key: str, rows: dict[str, np.ndarray]) -> None:
        shard = f"shard_{self.count // SL_SHARD}"
        if self.count % SL_SHARD == 0:
            self._close_zips()
            self.zips = {k: zipfile.ZipFile(self.root / k / f"{shard}.zip", "w") for k in DIMS}  # ZIP_STORED
        for k, x in rows.items():
            t = torch.from_numpy(x.astype(np.float32))
            t = t.reshape(1, -1) if k == "txt" else t  # ShareLock's language features are (1, D)
            buf = io.BytesIO()
            torch.save(t.clone(), buf)
            self.zips[k].writestr(f"{key}_{SL_FEATURE[k]}.pt", buf.getvalue())
        self.key2shard[key] = shard
        self.count += 1

    def _close_zips(self):
        for z in self.zips.values():
            z.close()

    def close(self):
        self._close_zips()
        import json

        (self.root / "key2shard.json").write_text(json.dumps(self.key2shard))


# ---- contenders: each open_* is untimed and returns epoch() -> samples served -------------------
def _windows(paths) -> list[np.ndarray]:
    """The featstore Loader's epoch order (block order + windows), shared by memmap and zarr."""
    return Loader(Store.open(paths["featstore"]), COLUMNS, BATCH, shuffle=True, seed=SEED)._windows()


def open_featstore(paths, **kw):
    loader = Loader(Store.open(paths["featstore"]), COLUMNS, BATCH, shuffle=True, seed=SEED, **kw)

    def epoch():
        n = 0
        for batch in loader:
            n += len(batch["row"])
        return n

    return epoch


def _window_index(rows: np.ndarray, n_rows: int):
    blocks = np.unique(rows // R)
    ranges = [(int(b) * R, min((int(b) + 1) * R, n_rows)) for b in blocks]
    lengths = np.array([b - a for a, b in ranges])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.searchsorted(blocks * R, rows, side="right") - 1
    return ranges, offsets, offsets[pos] + rows - blocks[pos] * R


def open_memmap(paths):
    windows = _windows(paths)
    mms = {k: np.load(paths["memmap"] / f"{k}.npy", mmap_mode="r") for k in DIMS}
    n_rows = len(mms["img"])
    free: dict[str, list] = {k: [] for k in DIMS}

    def read(rows):
        ranges, offsets, local = _window_index(rows, n_rows)
        data = {}
        for k, m in mms.items():
            buf = free[k].pop() if free[k] else _aligned_empty((4 * R, DIMS[k]), np.float16)
            for (a, b), o in zip(ranges, offsets):
                np.copyto(buf[o : o + b - a], m[a:b])
            data[k] = buf
        return data, local

    def gather(parts, k):
        n = sum(b - a for _, _, a, b in parts)
        out = torch.empty((n, DIMS[k]), dtype=torch.float16)
        dst, pos = out.numpy(), 0
        for data, local, a, b in parts:
            np.take(data[k], local[a:b], axis=0, out=dst[pos : pos + b - a], mode="clip")
            pos += b - a
        return out

    def epoch():
        served, parts, have = 0, [], 0
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(read, windows[0])
            for i in range(len(windows)):
                data, local = pending.result()
                if i + 1 < len(windows):
                    pending = pool.submit(read, windows[i + 1])  # read ahead while gathering this one
                a, last = 0, i == len(windows) - 1
                while a < len(local):
                    k = min(BATCH - have, len(local) - a)
                    parts.append((data, local, a, a + k))
                    have, a = have + k, a + k
                    if have == BATCH or (last and a == len(local)):
                        batch = {key: gather(parts, key) for key in DIMS}
                        served += len(batch["img"])
                        for d, *_ in parts if a == len(local) else parts[:-1]:  # windows used up
                            for key in DIMS:
                                free[key].append(d[key])
                        parts, have = [], 0
        return served

    return epoch


def open_zarr(paths):
    import zarr

    windows = _windows(paths)
    arrs = {k: zarr.open_array(str(paths["featstore"] / v), mode="r") for k, v in COLUMNS.items()}
    n_rows = Store.open(paths["featstore"]).n_rows

    def epoch():
        served = 0
        for rows in windows:
            ranges, _, local = _window_index(rows, n_rows)
            bufs = {k: np.concatenate([a[s:e] for s, e in ranges]) for k, a in arrs.items()}
            for i in range(0, len(rows), BATCH):
                batch = {k: torch.from_numpy(buf[local[i : i + BATCH]]) for k, buf in bufs.items()}
                served += len(batch["img"])
        return served

    return epoch


def open_hf(paths, torch_format: bool):
    import datasets

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # zero-copy from Arrow

    datasets.disable_progress_bars()
    ds = datasets.load_from_disk(str(paths["hf"])).shuffle(seed=SEED, keep_in_memory=True)

    if torch_format:
        def epoch():
            served = 0
            for b in ds.with_format("torch", dtype=torch.float16).iter(batch_size=BATCH):
                assert b["txt"].dtype == torch.float16
                served += len(b["img"])
            return served
    else:
        def epoch():
            served = 0
            for t in ds.with_format("arrow").iter(batch_size=BATCH):
                batch = {k: torch.from_numpy(t.column(k).combine_chunks().flatten().to_numpy(zero_copy_only=False)
                                             .reshape(len(t), DIMS[k])) for k in DIMS}
                served += len(batch["img"])
            return served
    return epoch


class ShareLockFeatures(torch.utils.data.Dataset):
    """ShareLock's VisionLanguageFeatureDataset over FeatureUtils' ZIP backend (not staged):
    per sample, the vision feature and the language feature, each torch.load-ed from its zip."""

    def __init__(self, root, reopen: bool):
        import json

        self.root, self.reopen = root, reopen
        key2shard = json.loads((root / "key2shard.json").read_text())
        self.keys = list(key2shard)
        self.key2shard = key2shard
        self._zips: dict = {}  # (pid, backbone, shard) -> ZipFile, opened in the worker

    def __len__(self):
        return len(self.keys)

    def _load(self, zf, key, k):
        with zf.open(f"{key}_{SL_FEATURE[k]}.pt") as f:
            return torch.load(io.BytesIO(f.read()), weights_only=True)

    def __getitem__(self, idx):
        key = self.keys[idx]
        shard = self.key2shard[key]
        out = {}
        for k in DIMS:
            path = self.root / k / f"{shard}.zip"
            if self.reopen:  # FeatureUtils.load_feature: a ZipFile per call
                with zipfile.ZipFile(path, "r") as zf:
                    out[SL_FEATURE[k]] = self._load(zf, key, k)
            else:
                zkey = (os.getpid(), k, shard)
                if zkey not in self._zips:
                    self._zips[zkey] = zipfile.ZipFile(path, "r")
                out[SL_FEATURE[k]] = self._load(self._zips[zkey], key, k)
        out["language_features"] = out["language_features"].squeeze()
        return out


def open_sharelock(paths, reopen: bool, limit: int | None = None, batch: int = BATCH, workers: int = 2):
    ds = ShareLockFeatures(paths["sharelock"], reopen)
    if limit is not None:
        ds = torch.utils.data.Subset(ds, np.random.default_rng(SEED).permutation(len(ds))[:limit].tolist())
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(SEED))

    def epoch():
        served = 0
        for b in loader:
            served += len(b["vision_features"])
        return served

    return epoch


def check(paths) -> None:
    """Untimed sanity check: featstore's batches hold the rows' bytes, in the memmap's order."""
    loader = Loader(Store.open(paths["featstore"]), COLUMNS, BATCH, shuffle=True, seed=SEED)
    first = next(iter(loader))
    rows = np.concatenate(_windows(paths))[:BATCH]
    assert np.array_equal(first["row"].numpy(), rows), "featstore and memmap orders differ"
    for k in DIMS:
        want = np.load(paths["memmap"] / f"{k}.npy", mmap_mode="r")[rows]
        assert first[k].dtype == torch.float16 and np.array_equal(first[k].numpy(), want), f"{k}: wrong bytes"


# ---- the run -----------------------------------------------------------------------------------
def measure(open_fn, files, cold: bool) -> dict:
    gc.collect()  # no stale mmap may pin pages of these files
    if cold:
        drop_cache(*files)
        left = resident_fraction(*files)
    else:
        warm_cache(*files)
        left = None
    epoch = open_fn()
    secs, n = timed(epoch)
    del epoch
    gc.collect()
    out = {"samples_per_s": n / secs, "samples": n, "seconds": round(secs, 4)}
    if left is not None:
        out["resident_after_drop"] = round(left, 4)
    return out


def main():
    p = bench_parser(__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="warm rounds (default 5; --quick 1); cold rounds: 3 (1)")
    p.add_argument("--zarrs", action="store_true", help="use the zarrs codec pipeline for the zarr reads "
                   "(the `zarr` contender and featstore's zarr fallback); featstore's direct shard reads don't use zarr")
    args = p.parse_args()
    if args.zarrs:
        import zarr
        import zarrs  # noqa: F401  (optional: pip install zarrs)

        zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    quick = args.quick
    n = 32_768 if quick else 200_000
    sl_n = 1_000 if quick else 20_000
    shipped_n = 32 if quick else 256
    warm_rounds = args.rounds or (1 if quick else 5)
    cold_rounds = 1 if quick else 3
    root = data_dir(args, "store")
    t0 = time.perf_counter()
    print(f"generating {n} rows (+ ShareLock layout for {sl_n}) under {root} ...", flush=True)
    gen_s, paths = timed(generate, root, n, sl_n)
    print(f"  done in {gen_s:.0f}s", flush=True)
    check(paths)
    load_start = os.getloadavg()

    fs_files = [paths["featstore"] / "features"]
    contenders = {  # name -> (open, files read, what)
        "featstore": (lambda: open_featstore(paths), fs_files),
        "memmap": (lambda: open_memmap(paths), [paths["memmap"]]),
        "sharelock": (lambda: open_sharelock(paths, reopen=False), [paths["sharelock"]]),
        "hf": (lambda: open_hf(paths, torch_format=False), [paths["hf"]]),
        "hf_torch": (lambda: open_hf(paths, torch_format=True), [paths["hf"]]),
        "zarr": (lambda: open_zarr(paths), fs_files),
        "featstore_via_zarr": (lambda: open_featstore(paths, direct=False), fs_files),
    }
    shipped = (lambda: open_sharelock(paths, reopen=True, limit=shipped_n, batch=shipped_n // 8), [paths["sharelock"]])

    once = {"sharelock", "sharelock_as_shipped", "hf_torch", "featstore_via_zarr"}  # slow: round 0 only
    contenders["sharelock_as_shipped"] = shipped
    runs: dict[str, list[dict]] = {}
    for cold, rounds in ((False, warm_rounds), (True, cold_rounds)):
        for r in range(rounds):
            for name, (fn, fl) in contenders.items():
                if (name in once and r > 0) or (name in ("hf_torch", "featstore_via_zarr") and (cold or quick)):
                    continue
                key = name + ("_cold" if cold else "")
                res = {"round": r, **measure(fn, fl, cold)}
                runs.setdefault(key, []).append(res)
                print(f"  {key:<28} round {r}: {res['samples_per_s']:>12,.1f} samples/s", flush=True)

    load_end = os.getloadavg()
    fig = {k: statistics.median(x["samples_per_s"] for x in v) for k, v in runs.items()}
    figures = {f"{k}_samples_per_s": round(v, 1) for k, v in fig.items()}

    def ratio(other: str, cold: bool = False) -> float:
        """featstore / other, paired by round (measured back to back), median over rounds."""
        sfx = "_cold" if cold else ""
        ours = {x["round"]: x["samples_per_s"] for x in runs["featstore" + sfx]}
        return statistics.median(ours[x["round"]] / x["samples_per_s"] for x in runs[other + sfx])

    ratios = {
        "featstore_vs_memmap": ratio("memmap"),
        "featstore_vs_memmap_cold": ratio("memmap", cold=True),
        "featstore_vs_sharelock": ratio("sharelock"),
        "featstore_vs_sharelock_as_shipped": ratio("sharelock_as_shipped"),
        "featstore_vs_hf": ratio("hf"),
        "featstore_vs_zarr": ratio("zarr"),
    }
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    device = device_string()
    params = {
        "rows": n, "dims": DIMS, "dtype": "float16", "batch_size": BATCH, "rows_per_shard": R,
        "window_blocks": 4, "seed": SEED, "warm_rounds": warm_rounds, "cold_rounds": cold_rounds,
        "statistic": "figures: median over rounds; ratios: median over rounds of featstore / other measured in "
                     "the same round; sharelock*, hf_torch, featstore_via_zarr: round 0 only; iteration timed, opening untimed",
        "warm": "files read just before the timed epoch", "cold": "files dropped with posix_fadvise(DONTNEED) just before",
        "sharelock_rows": sl_n, "sharelock_zip_keys": SL_SHARD, "sharelock_dtype": "float32",
        "sharelock_as_shipped_samples": shipped_n, "sharelock_as_shipped_batch": shipped_n // 8,
        "zarrs_codec_pipeline": bool(args.zarrs), "featstore_read_path": "direct shard preadv (featstore.loader)",
        "threads": {
            "featstore": "1 producer (gather) + 4 readers + consumer",
            "memmap": "1 read-ahead + consumer (gather)",
            "sharelock": "2 DataLoader worker processes + consumer",
            "hf": "1", "hf_torch": "1", "zarr": "1 (+ zarr's event-loop thread)",
            "torch_intra_op": torch.get_num_threads(),
        },
        "versions": _versions(),
        "loadavg_1_5_15_at_start": [round(x, 2) for x in load_start],
        "loadavg_1_5_15_at_end": [round(x, 2) for x in load_end],
    }
    path = write_results("store", params, figures, ratios, quick=quick, device=device, runs=runs)

    what = {
        "featstore": "featstore Loader (block shuffle, 4-block window)",
        "memmap": "np.memmap, same order and buffer (the limit)",
        "sharelock": "ShareLock zip layout, zip opened once per worker",
        "sharelock_as_shipped": "ShareLock zip layout, zip reopened per sample (as shipped)",
        "hf": "HF datasets Arrow, shuffled, arrow→torch by hand (fastest HF path)",
        "hf_torch": "HF datasets Arrow, shuffled, with_format('torch', dtype=float16)",
        "zarr": "plain zarr, same arrays and order, read naively",
        "featstore_via_zarr": "featstore Loader(direct=False): zarr's read path",
    }
    rows = []
    for k, label in what.items():
        warm, cold = fig.get(k), fig.get(k + "_cold")
        if warm is None and cold is None:
            continue
        rows.append({
            "contender": k, "what": label,
            "warm samples/s": f"{warm:,.0f}" if warm else "–",
            "cold samples/s": f"{cold:,.0f}" if cold else "–",
            "featstore ÷ it (warm)": f"{ratio(k):,.2f}" if warm else "–",
            "featstore ÷ it (cold)": f"{ratio(k, cold=True):,.2f}" if cold else "–",
        })
    print_table(rows, title=f"bench_store ({'quick, ' if quick else ''}{n} rows, batch {BATCH}) — {device}")
    print()
    for k, v in ratios.items():
        print(f"  {k:<36} {v:,.3f}")
    print(f"\nwrote {path}  ({time.perf_counter() - t0:.0f}s)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def _versions() -> dict:
    import datasets
    import pyarrow
    import zarr

    out = {"python": sys.version.split()[0], "numpy": np.__version__, "torch": torch.__version__, "zarr": zarr.__version__,
           "datasets": datasets.__version__, "pyarrow": pyarrow.__version__}
    try:
        import zarrs

        out["zarrs"] = getattr(zarrs, "__version__", "installed")
    except ImportError:
        pass
    return out


if __name__ == "__main__":
    main()
