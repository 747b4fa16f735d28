"""bench_uta's parts 2 and 3 (see its docstring): a UTA student's steps/s fed by the store vs from
RAM, and int8 token fidelity on real images; plus the synthetic teacher tokens both parts use."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time

import numpy as np
import torch

from featstore.loader import Loader
from featstore.store import Store
from featstore.tokens import dequantize_int8, encode_tokens, int8_fidelity
from featstore.trainers.config import load_config
from featstore.trainers.ddp import Dist
from featstore.trainers.train_loader import train_loader
from featstore.trainers.uta.train import param_groups, train_step
from featstore.trainers.loop import count_parameters
from featstore.trainers.uta.arch import resolve_arch
from featstore.trainers.uta.batch import loader_columns
from featstore.trainers.uta.config import UTAConfig
from featstore.trainers.uta.student import UTAStudent
from featstore.core.writes import write_block

SEED = 0
T, D = 196, 512  # CLIP ViT-B/16 at 224: 14x14 patch tokens in the 512-d joint space
# label: (config overrides, teacher feature set): float16 teacher tokens, or int8 token x channel
STUDENTS = {"vit-ti": (["student=tiny"], "teacher"), "small": (["depth=2", "width=64"], "teacher"),
            "small_int8": (["depth=2", "width=64"], "teacher8")}
PREPROCESS = {"name": "featstore-pil-v1", "resize": 224, "crop": 224, "mean": [0.48145466, 0.4578275, 0.40821073],
              "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest"}




def block_tokens(block: int, n: int, t: int = T, d: int = D) -> np.ndarray:
    """Token-like rows: a shared direction per position plus per-image variation, float32."""
    rng = np.random.default_rng([SEED, block])
    base = np.random.default_rng([SEED, 10**6]).standard_normal((t, d)).astype(np.float32)
    return (base + rng.standard_normal((n, t, d), dtype=np.float32)) * 0.5


# ---- 2. student steps/s --------------------------------------------------------------------------
def student_store(root, p: dict):
    """pixels (N, 3, S, S) uint8 + teacher tokens (N, g*g, 512) and pooled (N, 512) in one store:
    feature set "teacher" (float16 tokens, owning the pixels) and "teacher8" (the same tokens as
    int8 token x channel, as extraction writes them)."""
    s, g = p["image"], p["image"] // p["patch"]
    store = Store.create(root / "student.zarr", rows_per_shard=p["rows_per_shard"])
    n = p["student_rows"]
    store.register([f"s{i:08d}" for i in range(n)])
    pre = dict(PREPROCESS, resize=s, crop=s)
    store.create_feature_set("teacher", {"model": "synthetic-teacher", "preprocess": pre}, D, tokens=(g * g, D),
                             pixels="px", pixels_shape=(3, s, s), pixels_identity=pre)
    store.create_feature_set("teacher8", {"model": "synthetic-teacher", "preprocess": pre}, D, tokens=(g * g, D),
                             token_dtype="int8", token_scaling="token_channel")
    for b in range(store.n_blocks):
        start, stop = store.block_range(b)
        rng = np.random.default_rng([SEED, 7, b])
        px = rng.integers(0, 256, (stop - start, 3, s, s), dtype=np.uint8)
        tok = block_tokens(b, stop - start, g * g)
        ok = np.ones(stop - start, bool)
        write_block(store, "teacher", b, {"pooled": tok.mean(1), "tokens": tok, "pixels": px}, ok)
        cols8, fidelity = encode_tokens(tok, "token_channel")
        write_block(store, "teacher8", b, {"pooled": tok.mean(1), **cols8}, ok, int8_fidelity=fidelity)
    return store, pre


def preloaded_batches(ram: dict, batch: int):
    """Batches of the same columns from in-RAM tensors: a random permutation, gathered per batch."""
    g = torch.Generator().manual_seed(SEED)
    n = len(ram["input"])
    while True:
        order = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            idx = order[i : i + batch]
            yield {**{k: t[idx] for k, t in ram.items()}, "row": idx}


def forever(loader):
    while True:
        yield from loader


def student_steps(store, pre, p: dict, rounds: int) -> dict:
    """Each student: steps/s of train_step fed by the trainer's loader vs by preloaded tensors."""
    dev = torch.device("cpu")
    out = {}
    for label, (overrides, teacher) in STUDENTS.items():
        cfg = load_config(None, overrides + [f"batch_size={p['student_batch']}"], base=UTAConfig())
        g = p["image"] // p["patch"]
        arch = resolve_arch(cfg, teacher_tokens=(g * g, D), pixels_shape=(3, p["image"], p["image"]), pixels_identity=pre,
                            teacher_pooled_dim=D)
        # the columns and loader train-uta makes on a CPU (int8 token x channel: raw + both scales)
        columns, dequantize = loader_columns("pixels/px", teacher, int8_on_device=False, store=store,
                                             pooled=cfg.cls_weight > 0)
        loader = train_loader(store, columns, cfg, Dist(), rows=None, dequantize=dequantize)
        ram = {k: torch.from_numpy(np.asarray(store.array(path)[:])) for k, path in columns.items()}
        torch.manual_seed(0)
        model = UTAStudent(arch)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=1e-4)
        streams = {"store": forever(loader), "preloaded": preloaded_batches(ram, cfg.batch_size)}
        step = 0

        def run(batches, n):
            nonlocal step
            t0 = time.perf_counter()
            for _ in range(n):
                train_step(model, optimizer, next(batches), step, cfg, dev, contextlib.nullcontext())
                step += 1
            return n / (time.perf_counter() - t0)

        for batches in streams.values():
            run(batches, 2)  # warm-up: allocator, first reads
        rates = {k: [] for k in streams}
        steps = p["steps"] * (4 if label.startswith("small") else 1)
        for _ in range(rounds):
            for name, batches in streams.items():
                rates[name].append(run(batches, steps))
        for gen in streams.values():
            gen.close()
        out[label] = {"rates": rates, "params": count_parameters(model), "arch": arch, "batch": cfg.batch_size,
                      "steps_per_round": steps, "columns": columns, "teacher_tokens": str(store.array(columns["target"]).dtype),
                      "cls_weight": cfg.cls_weight, "loader_window_rows": loader.window}
        print(f"  student {label:<10} store {statistics.median(rates['store']):.2f} steps/s, "
              f"preloaded {statistics.median(rates['preloaded']):.2f} steps/s", flush=True)
    return out


# ---- 3. int8 fidelity on real tokens --------------------------------------------------------------
def real_token_fidelity(root, n_images: int) -> dict:
    """EfficientNet-Lite0 tokens of real images stored as float16 and as int8; cosines per token."""
    sys.path.insert(0, str(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")))
    from imagedata import SKIMAGE_NAMES, encode, real_images, write_shard
    from PIL import Image
    from sklearn.datasets import load_digits

    from featstore.pipelines.extract import extract

    photos = real_images(len(SKIMAGE_NAMES))
    digits = load_digits()
    ink = [255 - (x / 16 * 255).astype(np.uint8) for x in digits.images[: max(0, n_images - len(photos))]]
    scans = [(f"digit-{i}", Image.fromarray(x).resize((64, 64), Image.BICUBIC).convert("RGB")) for i, x in enumerate(ink)]
    shard_dir = root / "real"
    shard_dir.mkdir()
    write_shard(shard_dir / "00000.tar", [{"key": f"{i:09d}", "image": encode(img), "json": {"uid": name}}
                                          for i, (name, img) in enumerate(photos + scans)])
    path = str(root / "real.zarr")
    for dt in ("float16", "int8"):
        extract(path, shard_dir, "efficientnet-lite0", name=dt, tokens=True, token_dtype=dt, rows_per_shard=64,
                batch_size=32, progress=False, log=lambda *_: None)
    store = Store.open(path)
    scaling = store.feature_set("int8").attrs.get("token_scaling")
    columns = {"a": "features/float16/tokens", "q": "features/int8/tokens", "s": "features/int8/tokens_scale"}
    if scaling == "token_channel":
        columns["c"] = "features/int8/tokens_channel_scale"
    batch = next(iter(Loader(store, columns, 10_000, shuffle=False, dequantize=False)))
    a = batch["a"].float()
    q = torch.from_numpy(dequantize_int8(batch["q"].numpy(), batch["s"].numpy(), np.float32,
                                         channel_scale=batch["c"].numpy() if "c" in batch else None))
    per_token = int8_fidelity(a.numpy(), "token")  # the older layout, on the same tokens
    cos = torch.nn.functional.cosine_similarity(a, q, dim=-1).flatten().double()
    rel = ((a - q).norm(dim=-1) / a.norm(dim=-1)).flatten().double()
    return {"images": int(len(a)), "photos": len(photos), "digit_scans": len(scans), "tokens": int(cos.numel()),
            "token_shape": list(a.shape[1:]), "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "cos_p001": float(torch.quantile(cos, 0.001)), "rel_l2_mean": float(rel.mean()),
            "bytes_per_token_fp16": int(a.shape[2] * 2), "bytes_per_token_int8": round((a.shape[1] * a.shape[2] + 2 * a.shape[1]
                                                                      + (2 * a.shape[2] if "c" in batch else 0)) / a.shape[1], 1),
            "scaling": scaling, "per_token_cos_mean": per_token["mean_cos"], "per_token_cos_min": per_token["worst_cos"]}
