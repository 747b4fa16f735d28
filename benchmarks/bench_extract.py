"""Extraction throughput, side by side in one run, rounds interleaved (A B C ... A B C ...), medians:

(a) Images: a DINOv2-small-sized ViT (hidden 384, 12 layers, patch 14, 224 px, random weights;
    --quick: hidden 96, 4 layers)
    over JPEGs of 320-640 px in one webdataset tar, the same batch, threads and precision (the
    faster of fp32 and bf16 here, probed first) for every contender:
      forward      the backbone's forward pass alone on pre-made uint8 tensors
      extract      featstore's block runner: tar → decode+preprocess → forward → store (block
                   writes on a writer thread behind the forward pass: pipelines/write_behind.py)
      extract_tokens       the same storing the patch tokens as int8 (token x channel, quantized
                           on the writer thread), and `_sync`: with the writes on the forward thread
      extract_e2e  the whole job as `featstore extract` runs it (prepare: manifest + model load, then run)
      hf_map       the peer a user would script: transformers AutoModel + AutoImageProcessor over
                   datasets.load_dataset("webdataset", data_files=tar) → .map(batched=True, batch_size)
                   into Arrow (a fresh cache per round), model loading included
    → `extract_vs_forward` (how much of the forward rate extraction keeps), `extract_vs_hf_map`
      (extract_e2e ÷ hf_map), `write_behind_vs_sync` (extract_tokens ÷ extract_tokens_sync: what
      the writer thread buys) and `extract_tokens_vs_forward`.
(b) Captions (MiniLM, the faster precision): featstore's length-sorted batches of 64 through the
    extract job (each padded to its own longest caption, the next one tokenized on a worker thread)
    vs one caption per forward pass (ShareLock's script) → `batched_vs_one_caption`; and the bound
    `matmul_bound`: captions/s if the encoder's linear layers ran at the rate this machine multiplies
    one batch's (tokens x hidden) by (hidden x intermediate) in the weights' dtype (attention left
    out) → `batched_vs_matmul_bound` (how close the batches come) and `matmul_bound_vs_one_caption`
    (the most any batching could gain over one caption per forward, as far as those layers go).
(c) Dask: images/s with 1 and 2 single-threaded worker processes (a pre-started LocalCluster; each
    worker loads the model once, included) → `dask_2_vs_1_workers`, `dask_scaling_efficiency`.

    python benchmarks/bench_extract.py [--quick [--dask]] [--rounds K]       (--quick skips (c))
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import bench_parser, data_dir, device_string, print_table, write_results  # noqa: E402

CAPTION_BATCH = 64


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


VIT = {"full": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
       "quick": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=2, intermediate_size=384)}


def dinov2_small_sized(path: str, shape: dict) -> str:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(patch_size=14, image_size=224, **shape)
    Dinov2Model(cfg).eval().save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      resample=3).save_pretrained(path)
    return path


def captions(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    words = ("a photo of the small red old large dog cat car street house tree river city market people "
             "walking under bright sky at night with two three children near beach mountain snow").split()
    return [" ".join(rng.choice(words, int(rng.integers(4, 40)))) for _ in range(n)]


def fastest_precision(probe) -> tuple[str, dict]:
    """probe(precision) -> items/s; bf16 autocast is ~2x faster than fp32 on CPUs with AVX-512
    BF16/AMX and several times slower on AVX2-only ones, so measure."""
    rates = {"fp32": 0.0, "bf16": 0.0}
    for _ in range(2):  # interleaved, best of two: one busy moment must not pick the slow one
        for p in rates:
            rates[p] = max(rates[p], probe(p))
    return max(rates, key=rates.get), rates


# ---- image contenders: each returns images/s of one run ------------------------------------------
class Images:
    def __init__(self, d: str, model: str, n: int, batch: int, precision: str):
        from featstore.pipelines.backbones import load_backbone

        self.d, self.model, self.n, self.batch, self.precision = d, model, n, batch, precision
        self.shards = make_images(n, os.path.join(d, "shards"))
        self.bb = load_backbone(model, precision=precision)
        self.x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
        self.bb.encode_images(self.x)  # warm-up
        self.k = 0

    def _store(self) -> str:
        self.k += 1
        path = os.path.join(self.d, f"img-{self.k}.zarr")
        shutil.rmtree(path, ignore_errors=True)
        return path

    def forward(self) -> float:
        t = time.perf_counter()
        for _ in range(self.n // self.batch):
            self.bb.encode_images(self.x)
        return (self.n // self.batch) * self.batch / (time.perf_counter() - t)

    def extract(self) -> float:
        """The block runner alone (what extract does after prepare), the loaded backbone reused."""
        from featstore.pipelines.extract import BlockRunner, prepare

        spec, store, _, _ = prepare(self._store(), self.shards, self.model, name="vit", rows_per_shard=self.batch * 2,
                                    batch_size=self.batch, precision=self.precision, writes_in_flight=1,
                                    log=lambda *_: None)
        runner = BlockRunner(spec, backbone=self.bb, store=store)
        t = time.perf_counter()
        runner.run(store.feature_set("vit").missing_blocks())
        rate = self.n / (time.perf_counter() - t)
        runner.close()
        assert store.feature_set("vit").usable_rows().sum() == self.n
        return rate

    def extract_tokens(self, in_flight: int = 1) -> float:
        """The block runner storing tokens as int8 (token x channel, quantized on the writer thread)
        beside the pooled features; `in_flight=0` writes on the forward thread instead."""
        from featstore.pipelines.extract import BlockRunner, prepare

        spec, store, bb, _ = prepare(self._store(), self.shards, self.model, name="vit", rows_per_shard=self.batch * 2,
                                     batch_size=self.batch, precision=self.precision, tokens=True, token_dtype="int8",
                                     writes_in_flight=in_flight, log=lambda *_: None)
        bb.encode_images(self.x[:2])  # warm-up of this freshly loaded backbone
        runner = BlockRunner(spec, backbone=bb, store=store)
        t = time.perf_counter()
        runner.run(store.feature_set("vit").missing_blocks())
        rate = self.n / (time.perf_counter() - t)
        runner.close()
        fs = store.feature_set("vit")
        assert fs.usable_rows().sum() == self.n and fs.token_scaling == "token_channel"
        return rate

    def extract_tokens_sync(self) -> float:
        return self.extract_tokens(in_flight=0)

    def extract_e2e(self) -> float:
        from featstore.pipelines.extract import extract

        t = time.perf_counter()
        s = extract(self._store(), self.shards, self.model, name="vit", rows_per_shard=self.batch * 2,
                    batch_size=self.batch, precision=self.precision, progress=False, log=lambda *_: None)
        rate = self.n / (time.perf_counter() - t)
        assert s["valid"] == self.n
        return rate

    def hf_map(self) -> float:
        """What a user scripts with transformers + datasets: a batched map into Arrow."""
        import datasets
        from transformers import AutoImageProcessor, AutoModel

        datasets.disable_progress_bars()
        cache = os.path.join(self.d, f"hf-cache-{self.k}")
        self.k += 1
        autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if self.precision == "bf16" else torch.autocast("cpu", enabled=False))
        t = time.perf_counter()
        processor = AutoImageProcessor.from_pretrained(self.model)
        model = AutoModel.from_pretrained(self.model).eval()
        ds = datasets.load_dataset("webdataset", data_files={"train": os.path.join(self.shards, "*.tar")}, split="train",
                                   cache_dir=cache)

        def embed(batch):
            inputs = processor(images=[im.convert("RGB") for im in batch["jpg"]], return_tensors="pt")
            with torch.inference_mode(), autocast:
                out = model(**inputs)
            return {"embedding": out.pooler_output.float().numpy()}

        out = ds.map(embed, batched=True, batch_size=self.batch, remove_columns=ds.column_names)
        rate = self.n / (time.perf_counter() - t)
        assert len(out) == self.n and np.asarray(out[0]["embedding"]).shape == (self.bb.dim,)
        shutil.rmtree(cache, ignore_errors=True)
        return rate


def interleave(contenders: dict, rounds: int) -> dict[str, list[float]]:
    out = {k: [] for k in contenders}
    for r in range(rounds):
        for name, fn in contenders.items():
            out[name].append(fn())
            print(f"  {name:<14} round {r}: {out[name][-1]:8.2f} /s", flush=True)
    return out


# ---- captions -----------------------------------------------------------------------------------
def caption_contenders(d: str, n: int, precision: str, one_n: int, bound_info: dict) -> dict:
    import datasets

    from featstore.pipelines.backbones import load_backbone
    from featstore.pipelines.extract import BlockRunner, prepare

    texts = captions(n)
    folder = os.path.join(d, "captions")
    datasets.Dataset.from_dict({"uid": [f"c{i:06d}" for i in range(n)], "caption": texts}).save_to_disk(folder)
    bb = load_backbone("minilm", precision=precision)
    bb.encode_texts(texts[:8])
    k = one_n
    state = {"round": 0}

    def one():
        t = time.perf_counter()
        for c in texts[:k]:
            bb.encode_texts([c])
        return k / (time.perf_counter() - t)

    # the bound: the encoder's linear layers (2 x (4h^2 + 2 h i) FLOPs a token a layer; attention
    # left out, so it is generous) for a batch's padded tokens, at the rate this machine multiplies a
    # (batch tokens x h) by (h x i) matrix in the weights' dtype, timed in the same round
    cfg = bb.model.config
    h, inter = cfg.hidden_size, cfg.intermediate_size
    per_token = 2 * cfg.num_hidden_layers * (4 * h * h + 2 * h * inter)
    lengths = sorted(bb.text_lengths(texts), reverse=True)
    padded = sum(max(lengths[a:a + CAPTION_BATCH]) * len(lengths[a:a + CAPTION_BATCH])
                 for a in range(0, n, CAPTION_BATCH)) / n  # tokens a caption, padded as featstore batches it
    wdtype = next(m.weight.dtype for m in bb.model.modules() if isinstance(m, torch.nn.Linear))
    xm = torch.randn(int(padded * CAPTION_BATCH), h).to(wdtype)
    wm = torch.randn(h, inter).to(wdtype)
    bound_info.update(flops_per_token=per_token, padded_tokens_per_caption=round(padded, 2), dtype=str(wdtype),
                      shape=[int(xm.shape[0]), h, inter])

    def matmul_bound():
        with torch.inference_mode():
            for _ in range(3):
                xm @ wm
            reps, t = 40, time.perf_counter()
            for _ in range(reps):
                xm @ wm
            flops_per_s = reps * 2 * xm.shape[0] * h * inter / (time.perf_counter() - t)
        return flops_per_s / (per_token * padded)  # captions/s if every linear FLOP ran at that rate

    def batched():
        state["round"] += 1
        path = os.path.join(d, f"cap-{state['round']}.zarr")
        spec, store, _, _ = prepare(path, folder, "minilm", field="caption", uid_field="uid", text_column="caption",
                                    rows_per_shard=n, batch_size=CAPTION_BATCH, precision=precision, log=lambda *_: None)
        runner = BlockRunner(spec, backbone=bb, store=store)
        t = time.perf_counter()
        runner.run(store.feature_set("minilm").missing_blocks())
        return n / (time.perf_counter() - t)

    return {"one_caption": one, "batched": batched, "matmul_bound": matmul_bound}


def bench_dask(d: str, shards: str, model: str, n: int, batch: int, precision: str) -> dict:
    from dask.distributed import LocalCluster

    from featstore.pipelines.extract import extract

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
    p = bench_parser(__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--dask", action="store_true", help="with --quick: run (c) too (starting Dask workers takes ~30 s)")
    args = p.parse_args()
    t0 = time.perf_counter()
    d = str(data_dir(args, "extract"))
    n_img, batch, n_cap = (16, 8, 128) if args.quick else (192, 32, 4096)
    rounds = args.rounds or (1 if args.quick else 3)
    vit = VIT["quick" if args.quick else "full"]
    model = dinov2_small_sized(os.path.join(d, "vit"), vit)

    from featstore.pipelines.backbones import load_backbone

    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)

    def probe_image(precision):
        bb = load_backbone(model, precision=precision)
        bb.encode_images(x[:2])
        t = time.perf_counter()
        bb.encode_images(x)
        return batch / (time.perf_counter() - t)

    def probe_text(precision):
        bb, texts = load_backbone("minilm", precision=precision), captions(64)
        bb.encode_texts(texts[:8])
        t = time.perf_counter()
        bb.encode_texts(texts)
        return 64 / (time.perf_counter() - t)

    precision, img_probe = fastest_precision(probe_image)
    text_precision, text_probe = fastest_precision(probe_text)
    images = Images(d, model, n_img, batch, precision)
    print(f"images: {n_img} JPEGs, batch {batch}, {precision}; {rounds} interleaved rounds", flush=True)
    img = interleave({"forward": images.forward, "extract": images.extract, "extract_tokens": images.extract_tokens,
                      "extract_tokens_sync": images.extract_tokens_sync, "extract_e2e": images.extract_e2e,
                      "hf_map": images.hf_map}, rounds)
    print(f"captions: {n_cap}, MiniLM, {text_precision}", flush=True)
    bound: dict = {}
    cap = interleave(caption_contenders(d, n_cap, text_precision, 16 if args.quick else 256, bound), rounds)
    dask = {} if args.quick and not args.dask else bench_dask(d, images.shards, model, n_img, batch, precision)

    med = {k: statistics.median(v) for k, v in {**img, **cap}.items()}
    fig = {f"{k}_images_per_s": v for k, v in med.items() if k in img}
    fig.update({"one_caption_per_s": med["one_caption"], "batched_captions_per_s": med["batched"],
                "matmul_bound_captions_per_s": med["matmul_bound"], **dask})
    fig.update({f"probe_forward_{k}_images_per_s": v for k, v in img_probe.items()})
    fig.update({f"probe_minilm_{k}_captions_per_s": v for k, v in text_probe.items()})
    spread = {k: {"min": round(min(v), 2), "max": round(max(v), 2), "rounds": len(v)} for k, v in {**img, **cap}.items()}

    def paired(a, b, runs):
        return statistics.median(x / y for x, y in zip(runs[a], runs[b]))

    ratios = {
        "extract_vs_forward": paired("extract", "forward", img),
        "extract_vs_hf_map": paired("extract_e2e", "hf_map", img),
        "extract_tokens_vs_forward": paired("extract_tokens", "forward", img),
        "write_behind_vs_sync": paired("extract_tokens", "extract_tokens_sync", img),
        "batched_vs_one_caption": paired("batched", "one_caption", cap),
        "batched_vs_matmul_bound": paired("batched", "matmul_bound", cap),
        "matmul_bound_vs_one_caption": paired("matmul_bound", "one_caption", cap),
    }
    if dask:
        ratios["dask_2_vs_1_workers"] = dask["dask_2_workers_images_per_s"] / dask["dask_1_workers_images_per_s"]
        ratios["dask_scaling_efficiency"] = ratios["dask_2_vs_1_workers"] / 2
    fig = {k: round(v, 2) for k, v in fig.items()}
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    print_table([{"figure": k, "value": v} for k, v in fig.items()], "extraction throughput")
    print_table([{"ratio": k, "value": v} for k, v in ratios.items()], "ratios (ours / theirs)")
    params = {"images": n_img, "batch": batch, "precision": precision, "rounds": rounds, "captions": n_cap,
              "caption_batch": CAPTION_BATCH, "caption_precision": text_precision, "caption_bound": bound,
              "caption_tokenize": "a block's captions sorted by token length (longest first), batches of "
                                  f"{CAPTION_BATCH} padded to their own longest caption, the next batch tokenized "
                                  "on a worker thread during the forward pass; bf16: linear weights cast once "
                                  "at load (the same bits autocast computes)",
              "model": f"DINOv2-style ViT ({vit['hidden_size']}/{vit['num_hidden_layers']}/14/224), random weights",
              "text_model": "minilm",
              "torch_threads": torch.get_num_threads(), "decode": "1 background thread (--num-workers 0)",
              "statistic": "figures: median over interleaved rounds (spread: min/max); ratios: median over rounds of "
                           "the pair measured in the same round",
              "contenders": {
                  "forward": "bb.encode_images on pre-made uint8 batches",
                  "extract": "BlockRunner.run over the tar (decode thread, forward, block writes on the writer "
                             "thread behind the forward pass), backbone loaded",
                  "extract_tokens": "the same with --tokens --token-dtype int8: token x channel quantization and the "
                                    "block writes on the writer thread (pipelines/write_behind.py, one block in flight)",
                  "extract_tokens_sync": "the same with writes_in_flight=0: quantization and writes on the forward thread",
                  "extract_e2e": "featstore.pipelines.extract.extract(): manifest, model load, run",
                  "hf_map": "AutoModel + AutoImageProcessor; load_dataset('webdataset') → map(batched=True, "
                            "batch_size) into Arrow (fresh cache); model load included",
              },
              "dask": "LocalCluster, 1 thread per worker; includes each worker loading the model",
              "wall_seconds": round(time.perf_counter() - t0, 1)}
    print(f"wrote {write_results('extract', params, fig, ratios, quick=args.quick, device=device_string(), spread=spread)}")
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
