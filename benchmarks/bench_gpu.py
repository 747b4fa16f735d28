"""Extraction at GPU scale, and the projected time to precompute CC3M from the measured rates.

Images: a DINOv2-B-sized ViT (hidden 768, 12 layers, 12 heads, patch 14, 518 px position grid
interpolated to 224, as the released checkpoint; random weights saved locally), bf16 autocast,
batch 256, SDPA attention:
  forward      `encode_images` on pre-made uint8 batches (host → GPU copy and result back included)
  extract      featstore's block runner over webdataset tars of synthetic JPEGs (256 px on the
               short side, what `featstore download` stores), decode in `--num-workers` processes;
               timed after the first of 4 row blocks (the decode processes' start-up is left out:
               over CC3M it is amortized)
Captions: a Llama-3-8B-shaped decoder (4096 hidden, 32 layers, 32 heads / 8 KV heads, MLP 14336,
vocab 128,256; random bf16 weights made on the GPU, never downloaded), SDPA attention, through
featstore's TextBackbone (last real token, left padding) with a word-level tokenizer; captions of
~16 tokens:
  batched      featstore's caption batches (length-sorted, longest first, as the extract job
               forms them), batch 512
  one          one caption per forward pass (ShareLock's precompute script)
Projection: CC3M = 3.3M images + 3.3M captions: hours = 3.3M / extract rate + 3.3M / batched rate
(target <= 1.5 GPU-hours; ShareLock reports ~9).  FLOP bound: FLOPs per image / caption from the
models' shapes (2 x matmul params x tokens + attention) at the device's dense bf16 peak (spec
sheet where known) and at the bf16 GEMM rate measured here.

    python benchmarks/bench_gpu.py --device cuda        # writes results/gpu.json
    python benchmarks/bench_gpu.py --quick              # tiny shapes on CPU (the test)
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
from common import bench_parser, data_dir, device_string, print_table, write_results  # noqa: E402

CC3M = 3_300_000
SHARELOCK_GPU_HOURS = 9.0
TARGET_GPU_HOURS = 1.5
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, SXM
SHAPES = {
    "full": dict(vit=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                          image_size=518), img_batch=256, images=16_384,
                 llm=dict(vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                          rope_theta=500_000.0, rms_norm_eps=1e-5),
                 cap_batch=512, captions=16_384, one=256),
    "quick": dict(vit=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=224), img_batch=8, images=32,
                  llm=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
                  cap_batch=32, captions=128, one=16),
}
WORDS = ("a photo of the small red old large dog cat car street house tree river city market people walking "
         "under bright sky at night with two three children near beach mountain snow man woman playing field "
         "view from top water boat road sign table food plate white black blue green").split()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ---- images --------------------------------------------------------------------------------------
def _jpeg(i: int) -> bytes:
    from imagedata import encode
    from PIL import Image

    rng = np.random.default_rng(i)
    w = int(rng.integers(256, 384))
    low = rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((w, 256), Image.BICUBIC), dtype=np.float32)
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)  # photo-like detail
    return encode(Image.fromarray(img), quality=90)


def make_shards(out: str, n: int, per_tar: int = 4096) -> str:
    from concurrent.futures import ProcessPoolExecutor

    from imagedata import write_shard

    os.makedirs(out, exist_ok=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        jpegs = list(pool.map(_jpeg, range(n), chunksize=64))
    for s, start in enumerate(range(0, n, per_tar)):
        write_shard(os.path.join(out, f"{s:05d}.tar"), [
            {"key": f"{i:09d}", "image": jpegs[i], "caption": f"photo {i}", "json": {"uid": f"img-{i:07d}"}}
            for i in range(start, min(start + per_tar, n))])
    return out


def vit_model(path: str, shape: dict) -> tuple[str, int]:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(patch_size=14, attn_implementation="sdpa", **shape)
    model = Dinov2Model(cfg)
    model.save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      resample=3).save_pretrained(path)
    return path, sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embeddings" not in n)


def bench_images(d: str, s: dict, dev, precision: str, workers: int) -> dict:
    from featstore.pipelines.backbones import load_backbone
    from featstore.pipelines.extract import BlockRunner, prepare

    model, matmul_params = vit_model(os.path.join(d, "vit"), s["vit"])
    shards = make_shards(os.path.join(d, "shards"), s["images"])
    bb = load_backbone(model, device=str(dev), precision=precision)
    b = s["img_batch"]
    x = torch.randint(0, 256, (b, 3, 224, 224), dtype=torch.uint8)
    if dev.type == "cuda":
        x = x.pin_memory()
    for _ in range(3):  # warm-up: kernels, allocator
        bb.encode_images(x)
    sync(dev)
    steps = max(4, s["images"] // b // 2)
    t = time.perf_counter()
    for _ in range(steps):
        bb.encode_images(x)  # returns CPU tensors: synchronizes
    sync(dev)
    forward = steps * b / (time.perf_counter() - t)
    rows_per_shard = s["images"] // 4
    spec, store, _, _ = prepare(os.path.join(d, "img.zarr"), shards, model, name="vit", rows_per_shard=rows_per_shard,
                                batch_size=b, device=str(dev), precision=precision, num_workers=workers,
                                log=lambda *_: None)
    runner = BlockRunner(spec, backbone=bb, store=store)
    blocks = store.feature_set("vit").missing_blocks()
    runner.run(blocks[:1])  # untimed: starts the decode processes (amortized over a real dataset)
    t = time.perf_counter()
    runner.run(blocks[1:])
    sync(dev)
    extract = (s["images"] - rows_per_shard) / (time.perf_counter() - t)
    runner.close()
    valid = int(store.feature_set("vit").usable_rows().sum())
    if valid != s["images"]:
        raise RuntimeError(f"extract wrote {valid} valid rows of {s['images']}")
    tokens = (224 // 14) ** 2 + 1
    h, layers = s["vit"]["hidden_size"], s["vit"]["num_hidden_layers"]
    flops = 2 * matmul_params * tokens + layers * 4 * tokens * tokens * h
    return {"forward_images_per_s": forward, "extract_images_per_s": extract, "image_flops": flops,
            "vit_matmul_params": matmul_params}


# ---- captions ------------------------------------------------------------------------------------
def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<pad>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def llm_backbone(shape: dict, dev):
    """A Llama-3-8B-shaped LlamaModel with random weights, made directly on the device in bf16."""
    from transformers import LlamaConfig, LlamaModel

    from featstore.pipelines.backbones import TextBackbone

    cfg = LlamaConfig(attn_implementation="sdpa", **shape)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(dev):
            model = LlamaModel(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.eval().requires_grad_(False)

    def last_token(out, hidden, mask):  # featstore's "last" pooling: the last real token
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.long() * positions).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n)
    identity = {"model": "llama3-8b-shaped-random", "architecture": "LlamaModel", "pooling": "last"}
    bb = TextBackbone(name="llama3-8b-shaped", identity=identity, model=model, tokenizer=word_tokenizer(shape["vocab_size"]),
                      pool=last_token, layer=None, max_length=64, prefix="", device=dev, precision="bf16",
                      dim=shape["hidden_size"], position_ids_from_mask=True)
    return bb, matmul_params


def bench_captions(s: dict, dev) -> dict:
    bb, matmul_params = llm_backbone(s["llm"], dev)
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(11, 20)))) for _ in range(s["captions"])]
    lengths = bb.text_lengths(texts)
    order = sorted(range(len(texts)), key=lambda j: (-lengths[j], j))  # as the extract job sorts a block
    b = s["cap_batch"]
    batches = [[texts[j] for j in order[k : k + b]] for k in range(0, len(order), b)]
    for batch in batches[:2]:  # warm-up
        bb.encode_texts(batch)
    for c in texts[:4]:
        bb.encode_texts([c])
    sync(dev)
    t = time.perf_counter()
    for batch in batches:
        out = bb.encode_texts(batch)
    sync(dev)
    batched = len(texts) / (time.perf_counter() - t)
    if not torch.isfinite(out["pooled"]).all():
        raise RuntimeError("the decoder produced non-finite features")
    t = time.perf_counter()
    for c in texts[: s["one"]]:
        bb.encode_texts([c])
    sync(dev)
    one = s["one"] / (time.perf_counter() - t)
    mean_tokens = float(np.mean(lengths))
    cfg = s["llm"]
    flops = 2 * matmul_params * mean_tokens + cfg["num_hidden_layers"] * 4 * mean_tokens**2 * cfg["hidden_size"]
    return {"batched_captions_per_s": batched, "one_caption_per_s": one, "caption_flops": flops,
            "caption_mean_tokens": mean_tokens, "llm_matmul_params": matmul_params}


def gemm_rate(dev, n: int) -> float:
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    bm = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ bm
    sync(dev)
    reps = 20 if dev.type == "cuda" else 3
    t = time.perf_counter()
    for _ in range(reps):
        a @ bm
    sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def main() -> None:
    p = bench_parser(__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-workers", type=int, default=None, help="decode processes for extract (default: cores)")
    p.add_argument("--tag", default=None, help="results file tag")
    args = p.parse_args()
    t0 = time.perf_counter()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device here")
    s = SHAPES["quick" if args.quick else "full"]
    precision = "bf16" if dev.type == "cuda" else "fp32"  # bf16 autocast is slow on AVX2-only CPUs
    default_workers = 0 if args.quick else (os.cpu_count() or 1)  # --quick: one decode thread, no process start-up
    workers = args.num_workers if args.num_workers is not None else default_workers
    d = str(data_dir(args, "gpu"))
    fig = bench_images(d, s, dev, precision, workers)  # first: its JPEGs are made by forked processes before CUDA starts
    print(f"images: forward {fig['forward_images_per_s']:,.0f}/s, extract {fig['extract_images_per_s']:,.0f}/s", flush=True)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    fig["gemm_flops_per_s"] = gemm_rate(dev, 8192 if dev.type == "cuda" else 512)
    print(f"GEMM: {fig['gemm_flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    fig.update(bench_captions(s, dev))
    print(f"captions: batched {fig['batched_captions_per_s']:,.0f}/s, one {fig['one_caption_per_s']:,.1f}/s", flush=True)

    peak = next((v for k, v in PEAK_BF16.items() if gpu and k in gpu), None)
    img_h = CC3M / fig["extract_images_per_s"] / 3600
    cap_h = CC3M / fig["batched_captions_per_s"] / 3600
    total_flops = CC3M * (fig["image_flops"] + fig["caption_flops"])
    proj = {
        "cc3m_images_hours": img_h, "cc3m_images_forward_only_hours": CC3M / fig["forward_images_per_s"] / 3600,
        "cc3m_captions_hours": cap_h, "cc3m_captions_one_per_forward_hours": CC3M / fig["one_caption_per_s"] / 3600,
        "cc3m_total_gpu_hours": img_h + cap_h, "cc3m_total_flops": total_flops,
        "flop_bound_hours_at_measured_gemm": total_flops / fig["gemm_flops_per_s"] / 3600,
        "flop_bound_hours_at_spec_peak": total_flops / peak / 3600 if peak else None,
        "target_gpu_hours": TARGET_GPU_HOURS, "sharelock_reported_gpu_hours": SHARELOCK_GPU_HOURS,
    }
    ratios = {
        "extract_vs_forward": fig["extract_images_per_s"] / fig["forward_images_per_s"],
        "batched_vs_one_caption": fig["batched_captions_per_s"] / fig["one_caption_per_s"],
        "cc3m_sharelock_reported_vs_ours": SHARELOCK_GPU_HOURS / proj["cc3m_total_gpu_hours"],
        "cc3m_flop_bound_vs_ours": proj["flop_bound_hours_at_measured_gemm"] / proj["cc3m_total_gpu_hours"],
    }
    rows = [{"figure": k, "value": f"{v:,.4g}"} for k, v in {**fig, **proj}.items() if v is not None]
    print_table(rows, f"GPU extraction and CC3M projection — {device_string(gpu)}")
    print(f"\nCC3M precompute projected: {proj['cc3m_total_gpu_hours']:.2f} GPU-hours "
          f"(images {img_h:.2f} h + captions {cap_h:.2f} h; target <= {TARGET_GPU_HOURS}; ShareLock reports ~{SHARELOCK_GPU_HOURS:g})")
    print(f"FLOP bound: {proj['flop_bound_hours_at_measured_gemm'] * 60:.1f} min at the measured GEMM rate"
          + (f", {proj['flop_bound_hours_at_spec_peak'] * 60:.1f} min at the {peak / 1e12:.0f} TFLOP/s spec peak" if peak else ""))
    params = {"device_type": dev.type, "precision": precision, "decode_workers": workers, "shapes": s,
              "images": "synthetic JPEGs, 256 px short side, quality 90, webdataset tars of 4096",
              "rows_per_shard": s["images"] // 4, "cc3m_items": CC3M, "peak_bf16_flops": peak,
              "flops_model": "2 x matmul params x tokens + layers x 4 x tokens^2 x hidden (per image / caption)",
              "wall_seconds": round(time.perf_counter() - t0, 1)}
    out = write_results("gpu", params, {k: round(v, 4) for k, v in fig.items()}, {k: round(v, 4) for k, v in ratios.items()},
                        quick=args.quick, device=device_string(gpu), tag=args.tag, projection=proj)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
