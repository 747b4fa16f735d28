"""Benchmark: training a ShareLock head from the store, and featstore's data path vs ShareLock's.

Two questions, each answered side by side in one process (contenders alternate over rounds; the
median round counts):

1. Does streaming from the store slow training down?  The identical training step (the head,
   symmetric InfoNCE, Adam, grad clip) fed by the featstore `Loader` streaming from a zarr store,
   vs fed from the same features preloaded as in-RAM tensors  →  `store_vs_preloaded` (goal ≥ 0.9).
2. How fast is the data path itself?  samples/s of the `Loader` vs ShareLock's own data path: one
   `torch.save` .pt file per sample per feature (fp32) inside uncompressed zip shards of 10k keys,
   read per sample through a torch `DataLoader`  →  `featstore_vs_sharelock`.

    python benchmarks/bench_train.py --quick        # < 1 min on 2 CPU cores
    python benchmarks/bench_train.py --device cuda  # ShareLock's real head (4096 hidden, batch 1024)

Writes benchmarks/results/train.json ({"bench", "device", "params", "figures", "ratios"}).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import tempfile
import time
import zipfile

import numpy as np
import torch

from featstore.loader import Loader
from featstore.store import Store
from featstore.trainers.config import Config
from featstore.trainers.contrastive import info_nce
from featstore.trainers.sharelock import ShareLockModel, count_parameters
from featstore.writer import write_block

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = {
    # rows, image dim, text dim, head width, batch, timed steps per round, ShareLock data-path batches per
    # round (featstore's data path is timed over two whole epochs per round, so read-ahead cannot flatter it)
    "quick": dict(rows=8192, image_dim=384, text_dim=1024, hidden_dim=256, batch_size=256, steps=30, data_batches=12),
    "cpu": dict(rows=32768, image_dim=768, text_dim=4096, hidden_dim=1024, batch_size=512, steps=20, data_batches=24),
    "cuda": dict(rows=65536, image_dim=768, text_dim=4096, hidden_dim=4096, batch_size=1024, steps=100, data_batches=60),
}


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"cpu: {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores {model}".strip()


# ---- the data ----------------------------------------------------------------------------------
def features(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32).astype(np.float16)


def build_store(path: str, p: dict, rows_per_shard: int) -> Store:
    store = Store.create(path, rows_per_shard=rows_per_shard)
    store.register([f"u{i:08d}" for i in range(p["rows"])])
    for name, dim, seed in (("img", p["image_dim"], 1), ("txt", p["text_dim"], 2)):
        store.create_feature_set(name, {"model": f"bench-{name}", "dim": dim}, dim)
        for b in range(store.n_blocks):
            start, stop = store.block_range(b)
            write_block(store, name, b, {"pooled": features(stop - start, dim, seed * 100_000 + b)}, np.ones(stop - start, bool))
    return store


def write_sharelock_shards(out_dir: str, image: np.ndarray, text: np.ndarray, shard_size: int = 10_000) -> list[str]:
    """ShareLock's layout: per sample and feature one torch.save'd fp32 tensor, in uncompressed zips."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for s, start in enumerate(range(0, len(image), shard_size)):
        path = os.path.join(out_dir, f"{s:05d}.zip")
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            for i in range(start, min(start + shard_size, len(image))):
                for key, arr in (("image", image), ("text", text)):
                    buf = io.BytesIO()
                    torch.save(torch.from_numpy(arr[i].astype(np.float32)), buf)
                    zf.writestr(f"u{i:08d}.{key}.pt", buf.getvalue())
        paths.append(path)
    return paths


class ShareLockZipDataset(torch.utils.data.Dataset):
    """One sample = two small members of a zip shard, each torch.load'ed (ShareLock's data path)."""

    def __init__(self, shards: list[str], n: int, shard_size: int = 10_000):
        self.shards, self.n, self.shard_size, self._open = shards, n, shard_size, {}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        s = i // self.shard_size
        if s not in self._open:  # one handle per shard per worker process
            self._open[s] = zipfile.ZipFile(self.shards[s])
        zf = self._open[s]
        return tuple(torch.load(io.BytesIO(zf.read(f"u{i:08d}.{k}.pt")), weights_only=True) for k in ("image", "text"))


# ---- contenders ----------------------------------------------------------------------------------
def store_batches(store: Store, rows, batch: int, seed: int):
    loader = Loader(store, {"image": "features/img/pooled", "text": "features/txt/pooled"}, batch, shuffle=True,
                    seed=seed, rows=rows, drop_last=True)
    while True:
        for b in loader:
            yield b["image"], b["text"]


def preloaded_batches(image: torch.Tensor, text: torch.Tensor, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(image), generator=g)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            yield image[idx], text[idx]


def train_steps(model, optimizer, batches, steps: int, dev: torch.device) -> float:
    """The training step of train_head (one micro-batch per step); returns steps/s."""
    model.train()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        x_image, x_text = next(batches)
        x_image = x_image.to(dev, non_blocking=True).float()
        x_text = x_text.to(dev, non_blocking=True).float()
        z_image, z_text = model(x_image, x_text)
        loss = info_nce(z_image, z_text, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    sync()
    return steps / (time.perf_counter() - t0)


def samples_per_s(batches, n_batches: int) -> float:
    next(batches)  # start-up (threads, worker processes) is not counted
    t0, n = time.perf_counter(), 0
    for _ in range(n_batches):
        n += len(next(batches)[0])
    return n / (time.perf_counter() - t0)


def sharelock_batches(dataset, batch: int, workers: int, seed: int):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed))
    while True:
        yield from loader


# ---- main ------------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small dims and few steps: under a minute on 2 cores")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds per contender (median counts; "
                    "default 3, --quick 2)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers for ShareLock's path")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for both contenders (default on CPU: 1, as configs/demo.yaml: a small head "
                         "trains fastest on one thread, and 2 contend with the readers on a 2-core box)")
    ap.add_argument("--rows-per-shard", type=int, default=4096)
    ap.add_argument("--dir", default=None, help="where to build the store and zip shards (default: a temp dir)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("FEATSTORE_BENCH_RESULTS") or os.path.join(HERE, "results"),
                                                  "train.json"))
    args = ap.parse_args()
    dev = torch.device(args.device)
    threads = args.threads or (1 if dev.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    p = dict(PRESETS["quick" if args.quick else dev.type])
    rounds = args.rounds or (2 if args.quick else 3)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-train-") as tmp:
        t = time.perf_counter()
        store = build_store(os.path.join(tmp, "s.zarr"), p, args.rows_per_shard)
        rows = np.arange(store.n_rows)
        image = torch.from_numpy(np.asarray(store.array("features/img/pooled")[:]))
        text = torch.from_numpy(np.asarray(store.array("features/txt/pooled")[:]))
        shards = write_sharelock_shards(os.path.join(tmp, "sharelock"), image.numpy(), text.numpy())
        setup_s = time.perf_counter() - t

        cfg = Config(hidden_dim=p["hidden_dim"], batch_size=p["batch_size"])
        torch.manual_seed(0)
        model = ShareLockModel(p["image_dim"], p["text_dim"], cfg).to(dev)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)
        streams = {"store": store_batches(store, rows, p["batch_size"], 0),
                   "preloaded": preloaded_batches(image, text, p["batch_size"], 0)}
        for batches in streams.values():  # warm-up: allocator, kernels, first reads
            train_steps(model, optimizer, batches, 3, dev)
        steps_per_s = {k: [] for k in streams}
        for _ in range(rounds):
            for name, batches in streams.items():
                steps_per_s[name].append(train_steps(model, optimizer, batches, p["steps"], dev))

        data = {"featstore": store_batches(store, rows, p["batch_size"], 1),
                "sharelock": sharelock_batches(ShareLockZipDataset(shards, store.n_rows), p["batch_size"], args.workers, 1)}
        n_batches = {"featstore": 2 * (store.n_rows // p["batch_size"]), "sharelock": p["data_batches"]}
        data_rate = {k: [] for k in data}
        for _ in range(rounds):
            for name, batches in data.items():
                data_rate[name].append(samples_per_s(batches, n_batches[name]))
        for gen in (*streams.values(), *data.values()):
            gen.close()

    med = {k: statistics.median(v) for k, v in {**steps_per_s, **data_rate}.items()}
    result = {
        "bench": "train",
        "device": device_name(dev),
        "params": {**p, "rounds": rounds, "rows_per_shard": args.rows_per_shard, "sharelock_workers": args.workers,
                   "head_params": count_parameters(model), "torch_threads": torch.get_num_threads(),
                   "store_dtype": "float16", "sharelock_dtype": "float32", "setup_s": round(setup_s, 1)},
        "figures": {
            "store_steps_per_s": med["store"],
            "preloaded_steps_per_s": med["preloaded"],
            "featstore_samples_per_s": med["featstore"],
            "sharelock_samples_per_s": med["sharelock"],
        },
        "ratios": {
            "store_vs_preloaded": med["store"] / med["preloaded"],
            "featstore_vs_sharelock": med["featstore"] / med["sharelock"],
        },
    }
    print(f"\ntrain benchmark on {result['device']}  ({p['rows']:,} rows, image {p['image_dim']}-d, text {p['text_dim']}-d, "
          f"head {result['params']['head_params'] / 1e6:.1f}M params, batch {p['batch_size']}, median of {rounds} rounds)")
    print(f"{'':38}{'ours':>14}{'theirs':>14}{'ratio':>9}")
    print(f"{'training steps/s: store vs preloaded':38}{med['store']:>14,.2f}{med['preloaded']:>14,.2f}"
          f"{result['ratios']['store_vs_preloaded']:>9.2f}")
    print(f"{'data path samples/s: featstore vs .pt zips':38}{med['featstore']:>14,.0f}{med['sharelock']:>14,.0f}"
          f"{result['ratios']['featstore_vs_sharelock']:>9.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
