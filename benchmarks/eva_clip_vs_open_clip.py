"""featstore's EVA-CLIP port (pipelines/backbones/eva_clip.py) against open_clip itself, on a machine
where open_clip and timm import (they cannot beside this repository's CPU torch).

Builds open_clip's EVA02-B-16 (or --model), with random weights (every parameter perturbed, so no
zero bias hides a mapping error) or --pretrained <open_clip checkpoint file>, saves it in open_clip's
hub layout (open_clip_config.json, open_clip_model.safetensors with its own ``visual.trunk.*`` /
``text.*`` keys, and open_clip's BPE written as CLIPTokenizer files), loads that directory through
`load_backbone`, and compares on the same normalised pixels and prompts:

* pooled: ``model.encode_image(x)`` vs our ``pooled``;
* tokens: ``trunk.head(trunk.forward_features(x)[:, 1:])`` vs our ``tokens``;
* text: ``model.encode_text(open_clip tokenizer(prompts))`` vs our text tower's ``pooled``.

Prints max abs diff and min cosine of each, writes --out (default
benchmarks/results/eva_clip_parity.json), exits 1 when a cosine is below 0.9999.

    python benchmarks/eva_clip_vs_open_clip.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = ["a photo of a cat", "a photo of a dog", "an origami crane on a wooden table",
           "a blurry photo of the number seven", ""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="EVA02-B-16", help="open_clip model name (EVA02-B-16, EVA02-L-14, EVA02-L-14-336)")
    ap.add_argument("--pretrained", default=None, help="an open_clip checkpoint file (default: random weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/eva_clip_parity.json")
    args = ap.parse_args()
    try:
        import open_clip
        import timm
    except Exception as e:  # the one line this script prints where it cannot run
        print(f"eva_clip_vs_open_clip: open_clip and timm are not importable here ({type(e).__name__}: {e}); "
              "run it where they are (pip install open_clip_torch timm)", file=sys.stderr)
        return 2
    import torch

    from featstore.pipelines.backbones import load_backbone

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(args.seed)
    model = open_clip.create_model(args.model, pretrained=args.pretrained).eval()
    if args.pretrained is None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    tok = open_clip.get_tokenizer(args.model)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        save_open_clip_dir(model, args.model, tok, d)
        image = load_backbone(str(d), tokens=True, device=args.device)
        text = load_backbone(str(d), modality="text", device=args.device)
    model = model.to(args.device)
    g = torch.Generator().manual_seed(args.seed)
    s = image.preprocess.crop
    pixels = torch.randint(0, 256, (args.batch, 3, s, s), dtype=torch.uint8, generator=g)
    ours = image.encode_images(pixels)
    with torch.no_grad():
        x = image.preprocess.normalize(pixels.to(args.device))
        ref_pooled = model.encode_image(x).float().cpu()
        trunk = model.visual.trunk
        ref_tokens = trunk.head(trunk.forward_features(x)[:, 1:]).float().cpu()
        ref_text = model.encode_text(tok(PROMPTS).to(args.device)).float().cpu()
    ours_text = text.encode_texts(PROMPTS)["pooled"]
    rows = {"pooled": compare(ours["pooled"], ref_pooled), "tokens": compare(ours["tokens"], ref_tokens),
            "text": compare(ours_text, ref_text)}
    ok = all(r["min_cosine"] >= 0.9999 for r in rows.values())
    for name, r in rows.items():
        print(f"{name:7s} max abs diff {r['max_abs_diff']:.3g}  min cosine {r['min_cosine']:.7f}  shape {r['shape']}")
    result = {
        "what": "featstore EVA-CLIP (load_backbone of an open_clip-format directory) vs open_clip, same inputs, fp32",
        "model": args.model, "pretrained": args.pretrained or f"random (seed {args.seed}, every parameter perturbed)",
        "device": device_name(torch, args.device), "torch": torch.__version__, "open_clip": open_clip.__version__,
        "timm": timm.__version__, "python": platform.python_version(), "batch": args.batch, "prompts": PROMPTS,
        "results": rows, "ok": ok, "seconds": round(time.perf_counter() - t0, 1),
        "identity_image": {k: image.identity[k] for k in ("recipe", "pooled", "tokens", "eva_clip")},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'ok' if ok else 'MISMATCH'}: wrote {out}")
    return 0 if ok else 1


def save_open_clip_dir(model, name: str, tokenizer, d: Path) -> None:
    """open_clip's hub layout: config, safetensors weights, and its BPE as CLIPTokenizer files."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = open_clip.get_model_config(name)
    pp = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
          "interpolation": "bicubic", "resize_mode": "shortest"}
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pp}))
    sd = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    save_file(sd, str(d / "open_clip_model.safetensors"))
    enc = getattr(tokenizer, "encoder", None)
    ranks = getattr(tokenizer, "bpe_ranks", None)
    if enc is None or ranks is None:
        raise SystemExit(f"eva_clip_vs_open_clip: {name}'s tokenizer is not open_clip's SimpleTokenizer")
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip's -> CLIP's names
    (d / "vocab.json").write_text(json.dumps({names.get(t, t): i for t, i in enc.items()}))
    merges = sorted(ranks, key=ranks.get)
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    from transformers import CLIPTokenizer

    hf = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    if (hf.bos_token_id, hf.eos_token_id, len(hf)) != (tokenizer.sot_token_id, tokenizer.eot_token_id, len(enc)):
        raise SystemExit("eva_clip_vs_open_clip: the CLIPTokenizer written from open_clip's BPE has other special ids")
    hf.save_pretrained(str(d))


def compare(a, b) -> dict:
    import torch

    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {"max_abs_diff": float((a - b).abs().max()), "min_cosine": float(cos.min()),
            "ref_abs_max": float(b.abs().max()), "shape": list(a.shape)}


def device_name(torch, device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()})"


if __name__ == "__main__":
    sys.exit(main())
