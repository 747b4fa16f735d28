"""Benchmark: training a ShareLock head from the store, and featstore's data path vs ShareLock's.

Two questions, each answered side by side in one process (contenders alternate over rounds; the
median round counts, ratios are medians over rounds of the pair measured in the same round):

1. Does streaming from the store slow training down?  train-head's step (the ShareLock head,
   symmetric InfoNCE, Adam with the config's weight decay, grad clip; one micro-batch per step)
   fed by train-head's own training loader (`featstore.trainers.loading.train_loader`: the
   Loader with the config's batch, seed, drop_last, shuffle window) streaming from a zarr store,
   vs fed from the same features preloaded as in-RAM tensors  →  `store_vs_preloaded` (goal ≥ 0.9).
2. How fast is the data path itself?  samples/s of that loader vs ShareLock's real training data
   path (benchmarks/contenders/sharelock_staged.py: features staged to local disk as one fp32
   `.pt` file per sample and feature, `torch.load`-ed per sample through a DataLoader with
   workers and prefetch_factor=12)  →  `featstore_vs_sharelock_staged`.

    python benchmarks/bench_train.py --quick        # < 1 min on 2 CPU cores
    python benchmarks/bench_train.py --device cuda  # ShareLock's real head (4096 hidden, batch 1024)

Writes benchmarks/results/train[.<tag>][.quick].json ({"bench", "device", "params", "figures", "ratios"}).
"""

from __future__ import annotations

import io
import math
import os
import shutil
import statistics
import time

import numpy as np
import torch
from common import bench_parser, data_dir, device_string, print_table, write_results
from contenders.sharelock_staged import StagedFeatures

from featstore.store import Store
from featstore.trainers.sharelock.config import Config
from featstore.trainers.contrastive import info_nce
from featstore.trainers.ddp import Dist
from featstore.trainers.train_loader import train_loader
from featstore.trainers.sharelock.model import ShareLockModel, count_parameters
from featstore.trainers.sharelock.text_sets import train_text
from featstore.core.writes import write_block

PRESETS = {
    # rows, image dim, text dim, head width, batch, timed steps per round, ShareLock data-path batches per
    # round (featstore's data path is timed over two whole epochs per round, so read-ahead cannot flatter it)
    "quick": dict(rows=8192, image_dim=384, text_dim=1024, hidden_dim=256, batch_size=256, steps=30, data_batches=12,
                  sharelock_rows=4096),
    "cpu": dict(rows=32768, image_dim=768, text_dim=4096, hidden_dim=1024, batch_size=512, steps=20, data_batches=24,
                sharelock_rows=16384),
    "cuda": dict(rows=65536, image_dim=768, text_dim=4096, hidden_dim=4096, batch_size=1024, steps=100, data_batches=60,
                 sharelock_rows=16384),
}
COLUMNS = {"image": "features/img/pooled", "text": "features/txt/pooled"}
SHARD_KEYS = 10_000  # FeatureUtils' shard size (a staging directory per shard)


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


def stage_sharelock(staging: str, image: np.ndarray, text: np.ndarray) -> StagedFeatures:
    """ShareLock's staged layout (what its dataset reads once the zips are extracted): per sample
    `<staging>/<shard>/<key>_vision_features.pt` and `..._language_features.pt`, fp32."""
    key2shard = {}
    for i in range(len(image)):
        shard = f"shard_{i // SHARD_KEYS}"
        os.makedirs(os.path.join(staging, shard), exist_ok=True)
        for feature, arr in (("vision_features", image), ("language_features", text)):
            buf = io.BytesIO()
            torch.save(torch.from_numpy(arr[i].astype(np.float32)), buf)
            with open(os.path.join(staging, shard, f"{i}_{feature}.pt"), "wb") as f:
                f.write(buf.getvalue())
        key2shard[str(i)] = shard
    return StagedFeatures(staging, list(key2shard), key2shard, seed=0)


# ---- contenders ----------------------------------------------------------------------------------
def store_batches(loader):
    while True:
        yield from loader


def preloaded_batches(image: torch.Tensor, text: torch.Tensor, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(image), generator=g)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            yield {"image": image[idx], "text": text[idx], "row": idx}


def sharelock_batches(dataset, batch: int, workers: int, seed: int):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                         prefetch_factor=12 if workers else None, persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(seed))
    while True:
        for b in loader:
            yield {"image": b["vision_features"], "text": b["language_features"]}


def train_steps(model, optimizer, batches, steps: int, cfg: Config, dev: torch.device, first_step: int) -> float:
    """train-head's step (trainers/sharelock/train.py, one micro-batch, one process); returns steps/s."""
    run = Dist()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for step in range(first_step, first_step + steps):
        model.train()
        run.seed_step(cfg.seed, step)
        optimizer.zero_grad(set_to_none=True)
        batch = next(batches)
        x_image = batch["image"].to(dev, non_blocking=True).float()
        x_text = train_text(batch, ["text"], cfg.seed, step).to(dev, non_blocking=True).float()
        z_image, z_text = model(x_image, x_text)
        loss = info_nce(z_image, z_text, model.logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        optimizer.step()
    sync()
    return steps / (time.perf_counter() - t0)


def samples_per_s(batches, n_batches: int) -> float:
    next(batches)  # start-up (threads, worker processes) is not counted
    t0, n = time.perf_counter(), 0
    for _ in range(n_batches):
        n += len(next(batches)["image"])
    return n / (time.perf_counter() - t0)


# ---- main ------------------------------------------------------------------------------------------
def main() -> int:
    ap = bench_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds per contender (median counts; "
                    "default 3, --quick 2)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader workers for ShareLock's path")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for both contenders (default on CPU: 1, as configs/demo.yaml: a small head "
                         "trains fastest on one thread, and 2 contend with the readers on a 2-core box)")
    ap.add_argument("--rows-per-shard", type=int, default=4096)
    ap.add_argument("--tag", default=None, help="results file tag: results/train.<tag>.json (gpu.sh: gpu)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device here")
    threads = args.threads or (1 if dev.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    p = dict(PRESETS["quick" if args.quick else dev.type])
    rounds = args.rounds or (2 if args.quick else 3)
    tmp = str(data_dir(args, "train"))

    t = time.perf_counter()
    store = build_store(os.path.join(tmp, "s.zarr"), p, args.rows_per_shard)
    image = torch.from_numpy(np.asarray(store.array(COLUMNS["image"])[:]))
    text = torch.from_numpy(np.asarray(store.array(COLUMNS["text"])[:]))
    staged = stage_sharelock(os.path.join(tmp, "sharelock"), image.numpy()[: p["sharelock_rows"]],
                             text.numpy()[: p["sharelock_rows"]])
    setup_s = time.perf_counter() - t

    cfg = Config(hidden_dim=p["hidden_dim"], batch_size=p["batch_size"], accumulation_steps=1)
    torch.manual_seed(0)
    model = ShareLockModel(p["image_dim"], p["text_dim"], cfg).to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loader = train_loader(store, COLUMNS, cfg, Dist(), rows=np.arange(store.n_rows), pin_memory=dev.type == "cuda")
    streams = {"store": store_batches(loader), "preloaded": preloaded_batches(image, text, p["batch_size"], 0)}
    step = 0
    for batches in streams.values():  # warm-up: allocator, kernels, first reads
        train_steps(model, optimizer, batches, 3, cfg, dev, step)
        step += 3
    steps_per_s = {k: [] for k in streams}
    for _ in range(rounds):
        for name, batches in streams.items():
            steps_per_s[name].append(train_steps(model, optimizer, batches, p["steps"], cfg, dev, step))
            step += p["steps"]

    data_loader = train_loader(store, COLUMNS, cfg, Dist(), rows=np.arange(store.n_rows), pin_memory=dev.type == "cuda")
    data = {"featstore": store_batches(data_loader),
            "sharelock_staged": sharelock_batches(staged, p["batch_size"], args.workers, 1)}
    n_batches = {"featstore": 2 * len(data_loader), "sharelock_staged": p["data_batches"]}
    data_rate = {k: [] for k in data}
    for _ in range(rounds):
        for name, batches in data.items():
            data_rate[name].append(samples_per_s(batches, n_batches[name]))
    for gen in (*streams.values(), *data.values()):
        gen.close()

    def paired(a: dict, x: str, y: str) -> float:
        return round(statistics.median(u / v for u, v in zip(a[x], a[y])), 3)

    med = {k: statistics.median(v) for k, v in {**steps_per_s, **data_rate}.items()}
    figures = {"store_steps_per_s": round(med["store"], 3), "preloaded_steps_per_s": round(med["preloaded"], 3),
               "featstore_samples_per_s": round(med["featstore"], 1),
               "sharelock_staged_samples_per_s": round(med["sharelock_staged"], 1)}
    ratios = {"store_vs_preloaded": paired(steps_per_s, "store", "preloaded"),
              "featstore_vs_sharelock_staged": paired(data_rate, "featstore", "sharelock_staged")}
    spread = {k: {"min": round(min(v), 3), "max": round(max(v), 3), "rounds": len(v)}
              for k, v in {**steps_per_s, **data_rate}.items()}
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    params = {**p, "rounds": rounds, "rows_per_shard": args.rows_per_shard, "sharelock_workers": args.workers,
              "head_params": count_parameters(model), "torch_threads": torch.get_num_threads(),
              "store_dtype": "float16", "sharelock_dtype": "float32", "setup_s": round(setup_s, 1),
              "contenders": {
                  "store": "train-head's step fed by trainers.loading.train_loader (Loader: config batch, seed, "
                           f"drop_last, default window = {loader.window:,} rows)",
                  "preloaded": "the same step fed from in-RAM tensors (a random permutation, gathered per batch)",
                  "featstore": "the same training loader alone, two whole epochs per round",
                  "sharelock_staged": f"ShareLock's staged .pt files per sample and feature (fp32), DataLoader(batch, "
                                      f"shuffle, num_workers={args.workers}, prefetch_factor=12), first "
                                      f"{p['sharelock_rows']:,} rows"},
              "statistic": "figures: median over rounds; ratios: median over rounds of the pair measured in the same round",
              "wall_seconds": round(time.perf_counter() - t_start, 1)}
    path = write_results("train", params, figures, ratios, quick=args.quick, device=device_string(gpu), tag=args.tag,
                         spread=spread)
    print_table([{"figure": k, "value": f"{v:,.3f}"} for k, v in figures.items()],
                f"bench_train ({p['rows']:,} rows, image {p['image_dim']}-d, text {p['text_dim']}-d, head "
                f"{params['head_params'] / 1e6:.1f}M params, batch {p['batch_size']}, median of {rounds} rounds) — "
                f"{device_string(gpu)}")
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], "ratios (ours / theirs)")
    print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
