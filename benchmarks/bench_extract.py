"""Extraction throughput, side by side in one run:

(a) `extract` end to end (tar → decode+preprocess → forward → store) vs the same backbone's
    forward pass alone on pre-made uint8 tensors: same model (a DINOv2-small-sized ViT: hidden
    384, 12 layers, patch 14, 224 px, random weights), batch, threads and precision (the faster
    of fp32 and bf16 on this machine, probed first)
    → `extract_vs_forward` (target ≥ 0.85: decode and writes hide behind the forward pass).
(b) MiniLM caption encoding: featstore's length-sorted batches (through the extract job) vs one
    caption per forward pass (what ShareLock's script does), each at its fastest precision
    → `batched_vs_one_caption` (target ≥ 5 on this CPU).
(c) Scaling on Dask: images/s with 1 and 2 single-threaded worker processes (a pre-started
    LocalCluster; the figure includes each worker loading the model once)
    → `dask_2_vs_1_workers` and `dask_scaling_efficiency` (= speed-up / 2).  On a 2-core
    machine the ideal is bounded by the cores: 2 workers can at best double 1 worker.

    python benchmarks/bench_extract.py [--quick]
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import bench_parser, data_dir, print_table, write_results  # noqa: E402


def make_images(n: int, out: str) -> str:
    """n real-ish JPEGs (skimage photos resized to 320-640 px, and generated ones) in one shard."""
    from imagedata import encode, real_images, write_shard

    base = real_images(16)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        name, img = base[i % len(base)]
        side = int(rng.integers(320, 640))
        img = img.resize((side, int(side * img.height / img.width)))
        samples.append({"key": f"{i:09d}", "image": encode(img, quality=90), "caption": f"photo {i} of {name}",
                        "json": {"uid": f"img-{i:06d}"}})
    os.makedirs(out, exist_ok=True)
    write_shard(os.path.join(out, "00000.tar"), samples)
    return out


def dinov2_small_sized(path: str) -> str:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                       patch_size=14, image_size=224)
    Dinov2Model(cfg).eval().save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      resample=3).save_pretrained(path)
    return path


def captions(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    words = ("a photo of the small red old large dog cat car street house tree river city market people "
             "walking under bright sky at night with two three children near beach mountain snow").split()
    return [" ".join(rng.choice(words, int(rng.integers(4, 40)))) for _ in range(n)]


def fastest_precision(model: str, batch: int) -> tuple[str, dict]:
    """Probe fp32 and bf16 forward speed: bf16 autocast is ~2x faster than fp32 on CPUs with
    AVX-512 BF16/AMX and several times slower on AVX2-only ones."""
    from featstore.pipelines.backbones import load_backbone

    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    rates = {}
    for precision in ("fp32", "bf16"):
        bb = load_backbone(model, precision=precision)
        bb.encode_images(x[:2])
        t = time.perf_counter()
        bb.encode_images(x)
        rates[f"probe_forward_{precision}_images_per_s"] = batch / (time.perf_counter() - t)
    best = max(("fp32", "bf16"), key=lambda p: rates[f"probe_forward_{p}_images_per_s"])
    return best, rates


def bench_images(d: str, model: str, n: int, batch: int, precision: str) -> dict:
    from featstore.pipelines.extract import BlockRunner, prepare

    shards = make_images(n, os.path.join(d, "shards"))
    spec, store, bb, _ = prepare(os.path.join(d, "img.zarr"), shards, model, name="vit", rows_per_shard=batch * 2,
                                 batch_size=batch, precision=precision, log=lambda *_: None)
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
    bb.encode_images(x)  # warm-up
    t = time.perf_counter()
    for _ in range(n // batch):
        bb.encode_images(x)
    forward = (n // batch) * batch / (time.perf_counter() - t)
    runner = BlockRunner(spec, backbone=bb, store=store)
    t = time.perf_counter()
    runner.run(store.feature_set("vit").missing_blocks())
    end_to_end = n / (time.perf_counter() - t)
    runner.close()
    return {"forward_images_per_s": forward, "extract_images_per_s": end_to_end}


def bench_captions(d: str, n: int) -> dict:
    from featstore.pipelines.backbones import load_backbone
    from featstore.pipelines.extract import BlockRunner, prepare
    from featstore.store import Store

    texts = captions(n)
    folder = os.path.join(d, "captions")
    os.makedirs(folder, exist_ok=True)
    # an HF dataset of captions only: the text path never touches images
    import datasets

    datasets.Dataset.from_dict({"uid": [f"c{i:06d}" for i in range(n)], "caption": texts}).save_to_disk(folder)
    out = {}
    for precision in ("fp32", "bf16"):
        bb = load_backbone("minilm", precision=precision)
        bb.encode_texts(texts[:8])
        k = max(64, n // 8)
        t = time.perf_counter()
        for c in texts[:k]:
            bb.encode_texts([c])
        out[f"one_caption_{precision}_per_s"] = k / (time.perf_counter() - t)
        path = os.path.join(d, f"cap-{precision}.zarr")
        spec, store, bb, _ = prepare(path, folder, "minilm", field="caption", uid_field="uid", text_column="caption",
                                     rows_per_shard=n, batch_size=64, precision=precision, log=lambda *_: None)
        runner = BlockRunner(spec, backbone=bb, store=store)
        t = time.perf_counter()
        runner.run(Store.open(path).feature_set("minilm").missing_blocks())
        out[f"batched_{precision}_per_s"] = n / (time.perf_counter() - t)
    return out


def bench_dask(d: str, model: str, n: int, batch: int, precision: str) -> dict:
    from dask.distributed import LocalCluster

    from featstore.pipelines.extract import extract

    shards = os.path.join(d, "shards")
    out = {}
    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            t = time.perf_counter()
            s = extract(os.path.join(d, f"dask{workers}.zarr"), shards, model, name="vit", rows_per_shard=batch,
                        batch_size=batch, precision=precision, scheduler=cluster.scheduler_address,
                        progress=False, log=lambda *_: None)
            out[f"dask_{workers}_workers_images_per_s"] = n / (time.perf_counter() - t)
            assert s["valid"] == n
    return out


def main() -> None:
    args = bench_parser(__doc__).parse_args()
    d = str(data_dir(args, "extract"))
    n_img, batch, n_cap = (32, 16, 512) if args.quick else (192, 32, 4096)
    model = dinov2_small_sized(os.path.join(d, "dinov2-small-sized"))
    precision, fig = fastest_precision(model, batch)
    fig.update(bench_images(d, model, n_img, batch, precision))
    fig.update(bench_captions(d, n_cap))
    fig.update(bench_dask(d, model, n_img, batch, precision))
    best_one = max(fig["one_caption_fp32_per_s"], fig["one_caption_bf16_per_s"])
    best_batched = max(fig["batched_fp32_per_s"], fig["batched_bf16_per_s"])
    ratios = {
        "extract_vs_forward": fig["extract_images_per_s"] / fig["forward_images_per_s"],
        "batched_vs_one_caption": best_batched / best_one,
        "dask_2_vs_1_workers": fig["dask_2_workers_images_per_s"] / fig["dask_1_workers_images_per_s"],
    }
    ratios["dask_scaling_efficiency"] = ratios["dask_2_vs_1_workers"] / 2
    fig = {k: round(v, 2) for k, v in fig.items()}
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    print_table([{"figure": k, "value": v} for k, v in fig.items()], "extraction throughput")
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], "ratios (ours / theirs)")
    params = {"images": n_img, "batch": batch, "precision": precision, "captions": n_cap, "caption_batch": 64,
              "model": "DINOv2-small-sized ViT (384/12/14/224), random weights", "text_model": "minilm",
              "torch_threads": torch.get_num_threads(), "decode": "1 background thread (--num-workers 0)",
              "dask": "LocalCluster, 1 thread per worker; includes each worker loading the model"}
    print(f"wrote {write_results('extract', params, fig, ratios, quick=args.quick)}")


if __name__ == "__main__":
    main()
