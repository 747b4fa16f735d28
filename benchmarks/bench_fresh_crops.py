"""The cost of UTA's fresh crops (trainers/uta/fresh_crops.py): train-uta's step with the stored
crop (fresh_crops none), a fresh crop with resampled stored targets (resample), and a fresh crop
with the EVA02-CLIP teacher run on it in the step (teacher, the exact one), on the same batches.

The teacher is featstore's EVA02-CLIP port (pipelines/backbones/eva_clip.py) with random weights in
EVA's checkpoint layout, loaded through `load_backbone` as a user's directory would be; the student
is train-uta's `student: base` (UTA-B/16's shape).  Figures: steps/s per mode; ratios: each mode's
steps/s over the stored crop's (same run, same device, rounds interleaved).

    .venv/bin/python benchmarks/bench_fresh_crops.py --device cuda      # benchmarks/gpu.sh runs this
    .venv/bin/python benchmarks/bench_fresh_crops.py --quick            # tiny shapes on CPU (the tests)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

from featstore.pipelines.backbones import load_backbone  # noqa: E402
from featstore.pipelines.backbones.eva_clip import EvaClipVision  # noqa: E402
from featstore.pipelines.backbones.eva_clip_weights import SPEC_FILE, read_spec  # noqa: E402
from featstore.trainers import loop  # noqa: E402
from featstore.trainers.config import load_config  # noqa: E402
from featstore.trainers.uta.arch import resolve_arch  # noqa: E402
from featstore.trainers.uta.config import UTAConfig  # noqa: E402
from featstore.trainers.uta.student import UTAStudent  # noqa: E402
from featstore.trainers.uta.train import param_groups, train_step  # noqa: E402

MODES = ("none", "resample", "teacher")
# EVA02-CLIP-B/16 (baaivision/EVA, EVA-CLIP/rei/eva_clip/model_configs/EVA02-CLIP-B-16.json), and a tiny one
B16 = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "head_width": 64, "patch_size": 16,
                                        "mlp_ratio": 2.6667, "eva_model_name": "eva-clip-b-16-X", "rope": True,
                                        "pt_hw_seq_len": 16, "intp_freq": True, "naiveswiglu": True, "subln": True},
       "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}
TINY = {"embed_dim": 16, "vision_cfg": {**B16["vision_cfg"], "image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                                        "patch_size": 8, "pt_hw_seq_len": 4},
        "text_cfg": {"context_length": 16, "vocab_size": 512, "width": 16, "heads": 2, "layers": 1}}


def save_teacher(d: Path, config: dict) -> Path:
    """A random EVA02-CLIP vision tower saved in EVA's layout (visual.* keys) with its config."""
    d.mkdir(parents=True, exist_ok=True)
    (d / SPEC_FILE).write_text(json.dumps(config))
    spec = read_spec(d)
    torch.manual_seed(0)
    model = EvaClipVision(spec.vision, spec.embed_dim)
    model.vit.init_weights()
    sd = {("visual." + k[len("vit."):] if k.startswith("vit.") else "visual." + k): v.contiguous()
          for k, v in model.state_dict().items()}
    torch.save(sd, d / "EVA02_CLIP_random.pt")
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode and round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    dev = torch.device(args.device)
    config = TINY if args.quick else B16
    batch = args.batch_size or (4 if args.quick else 128)
    steps = args.steps or (2 if args.quick else 10)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = load_backbone(str(save_teacher(Path(tmp) / "eva02-clip", config)), tokens=True, device=str(dev))
    size = teacher.preprocess.crop
    t_tokens = tuple(teacher.token_shape)
    over = ["cpu_threads=1"] + (["depth=2", "width=32", "heads=2"] if args.quick else ["student=base"])
    base = load_config(None, over + ["patch_size=" + str(config["vision_cfg"]["patch_size"])], base=UTAConfig())
    arch = resolve_arch(base, teacher_tokens=t_tokens, pixels_shape=(3, size, size), pixels_identity={},
                        teacher_pooled_dim=teacher.dim)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    data = {"input": pixels, "target": teacher.encode_images(pixels)["tokens"].half(),
            "pooled": teacher.encode_images(pixels)["pooled"].half()}
    autocast = loop.autocast(dev, "bf16" if dev.type == "cuda" else "fp32")
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:  # interleaved: each round measures every mode once
            cfg = UTAConfig(**{**base.to_dict(), "fresh_crops": mode})
            torch.manual_seed(0)
            model = UTAStudent(arch).to(dev)
            opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
            train_step(model, opt, data, 0, cfg, dev, autocast, teacher=teacher)  # warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for s in range(1, steps + 1):
                train_step(model, opt, data, s, cfg, dev, autocast, teacher=teacher)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            rates[mode].append(steps / (time.perf_counter() - t0))
    median = {m: sorted(v)[len(v) // 2] for m, v in rates.items()}
    figures = {f"{m}_steps_per_s": median[m] for m in MODES}
    ratios = {f"{m}_vs_stored_crop": median[m] / median["none"] for m in MODES if m != "none"}
    path = write_results("fresh_crops", {"batch_size": batch, "steps": steps, "rounds": args.rounds, "image_size": size,
                                         "teacher": "EVA02-CLIP (random weights) " + ("tiny" if args.quick else "B/16"),
                                         "student": arch["width"], "device": str(dev)},
                         figures, ratios, quick=args.quick, runs=rates)
    print(json.dumps({"figures": figures, "ratios": ratios, "results": str(path)}))


if __name__ == "__main__":
    main()
