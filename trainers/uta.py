"""UTA (Unmasked Token Alignment): a ViT student whose unmasked tokens match a frozen teacher's.

The teacher (a CLIP vision tower, say) ran once at extraction: `features/<teacher>/tokens` holds its
patch tokens (N, T, D), `features/<teacher>/pooled` its image embedding and `pixels/<name>` the
exact uint8 crop it saw.  Extracted with `--views K`, each image has K such crops (a view axis:
view 0 the centre crop, the others random-resized crops, some mirrored, each with the teacher's own
outputs); the training loader serves one view per image per epoch (`Loader(view="epoch")`, the
same view in pixels, tokens and pooled), validation view 0.  A training step:

1. draws masks per sample (`uta_masks.draw_masks`: uniform random or BEiT-style blocks, a pure
   function of (seed, step), so a resumed run draws the same masks); `mask_ratio` of the grid
   positions are dropped;
2. embeds the input once (patches of the pixels + position embeddings), GATHERS the kept positions
   and runs the encoder (`uta_student.UTAStudent`, EVA-02-like) on those only: no [MASK] tokens,
   so the student costs ~(1 - mask_ratio) of a full forward, and what it says at a kept position
   cannot depend on a dropped patch;
3. maps each output token through the head (student width -> teacher width) and scores
   1 - cosine against the teacher token at the same grid position, and the CLS through the same
   final norm and head against the teacher's pooled embedding, weighted by `cls_weight`
   (`alignment_losses`).  The CLS embedding is the student's image embedding (zero-shot reads it).

Reversed masking (the complement view): each image appears twice, once with its mask and once
with the complement, so every position is aligned every step.  With mask_ratio 0.5 the two halves
have the same length and run as one batch of 2B sequences of N/2 tokens, which costs the same as
one unmasked forward of B.

Grids: the student's grid is (stored crop size / student patch).  By default the student patch is
the teacher's (crop / teacher grid side), so grids match; when they differ (a /14 teacher at 224 is
16x16, a /16 student 14x14) the teacher grid is resized to the student's (`interpolate_grid`,
bilinear on the (D, h, w) map), recorded in the checkpoint.

Light mode (`student_input=<feature set>`): the student's input is another backbone's stored tokens
(e.g. DINOv2's) instead of pixels: a LayerNorm, a 1x1 "patch" projection of the token grid, then the
same (small) transformer.  Both feature sets must come from the same crop (`same_crop`).

No pretrained weights, no backbone, no image decoding.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from featstore.errors import CheckpointError, ConfigError, IdentityMismatch
from featstore.core.identity import identity_diff, lines
from featstore.tokens import dequantize_int8

from . import checkpoint
from .config import ConfigBase, need
from .loop import count_parameters  # noqa: F401  (re-exported)
from .uta_masks import MASKINGS, draw_masks, mask_groups, step_generator  # noqa: F401  (re-exported)
from .uta_student import UTAStudent, gather_tokens

# name -> (width, depth, heads): ViT-Ti/S/B (Touvron et al. 2021; Dosovitskiy et al. 2021)
STUDENTS = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
MLPS = {"swiglu": 8.0 / 3.0, "gelu": 4.0}  # name -> default mlp_ratio (EVA-02's 2.6667 for SwiGLU; ViT's 4)
CLS_HEADS = ("auto", "shared", "separate")
GRID_MODES = ("bilinear", "bicubic", "nearest")
FORMAT = "featstore-uta-checkpoint"
VERSION = 2  # 2: EVA-02-like student, CLS alignment (version 1's plain ViT students are not loaded)
# the keys of a preprocessing identity that decide which pixels a token covers (mean/std do not:
# they are applied to the crop afterwards, and differ between e.g. CLIP and DINOv2); "views" is the
# stored views' recipe (extract --views K: which crop each view is), absent without stored views
CROP_KEYS = ("name", "resize", "crop", "interpolation", "resize_mode", "views")


@dataclass
class UTAConfig(ConfigBase):
    """`featstore train-uta` settings (configs/uta.yaml explains each and the values chosen).
    Loaded like ShareLock's Config: `trainers.config.load_config(file, ["KEY=VALUE"], base=UTAConfig())`."""

    # ---- the student ----
    student: str = "tiny"  # tiny | small | base (ViT-Ti/S/B sizes)
    width: int | None = None  # override the preset's hidden width
    depth: int | None = None  # override the preset's number of layers
    heads: int | None = None  # None: the preset's, or width // 64 when width is overridden
    mlp: str = "swiglu"  # swiglu | gelu
    mlp_ratio: float | None = None  # None: 8/3 for swiglu (EVA-02), 4 for gelu
    sub_ln: bool = True  # EVA-02's LayerNorm before each attention / MLP output projection
    rope: bool = True  # 2D rotary position embeddings on the patch tokens (EVA-02's frequencies)
    abs_pos_embed: bool = True  # learned absolute position embeddings (EVA-02 keeps both)
    layer_scale: float | None = None  # None: no layer scale (EVA-02-B); a value: its init
    drop_path: float = 0.1  # stochastic depth at the last block (linear from 0)
    patch_size: int | None = None  # None: the teacher's patch (crop / teacher grid side): grids match
    student_input: str | None = None  # light mode: a feature set whose stored tokens replace the pixels
    # ---- the objective ----
    mask_ratio: float = 0.5  # fraction of grid positions dropped from the student's input
    masking: str = "random"  # random | block (BEiT's block-wise masking)
    mask_block_min: int = 16  # block masking: the smallest block, in patches
    mask_block_aspect: float = 0.3  # block masking: aspect ratios log-uniform in [this, 1 / this]
    reversed_masking: bool = True  # the complement view: each image twice, its mask and the complement
    cls_weight: float = 1.0  # weight of 1 - cos(student CLS embedding, teacher pooled); 0 = tokens only
    cls_head: str = "auto"  # auto | shared | separate: the head the CLS goes through (auto: shared if widths match)
    grid_interpolation: str = "bilinear"  # teacher grid -> student grid when they differ
    hflip: float = 0.0  # probability of flipping an image and its teacher grid together (refused on mirrored stored views)
    # ---- optimisation ----
    steps: int = 20000
    batch_size: int = 256  # images per step (2x sequences with reversed masking)
    lr: float = 5e-4
    weight_decay: float = 0.05
    adam_beta2: float = 0.98
    warmup_steps: int = 1000
    max_warmup_fraction: float = 0.1  # warm-up never longer than this fraction of `steps`
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    # ---- data ----
    seed: int = 0  # init, masks, flips, data order
    val_fraction: float = 0.1  # held out by uid hash (featstore.split), as train-head
    cache: str | None = None  # None streams from the store; "ram" reads the train columns once
    shuffle_window: int | None = None  # the loader's read window per rank, in rows; None = the loader's default (by bytes)
    cpu_threads: int | None = None  # torch threads on CPU; None = torch's default
    # ---- validation and checkpoints ----
    val_every: int | None = None  # None = steps // 10; never more than that
    val_max_rows: int = 2000  # validate on at most this many held-out rows
    save_every: int = 500
    log_every: int = 10
    # ---- zero-shot at the final validation ----
    zero_shot_text: str | None = None  # text feature set whose prompts/<name>/ cache holds class prompts
    zero_shot_templates: str = "openai"  # sharelock | openai | a file (as `featstore eval --templates`)

    def validate(self) -> "UTAConfig":
        need(self.student in STUDENTS, f"student must be one of {', '.join(STUDENTS)}, got {self.student!r}")
        for key in ("width", "depth", "heads", "patch_size"):
            value = getattr(self, key)
            need(value is None or value >= 1, f"{key} must be >= 1 or null, got {value}")
        need(self.mlp in MLPS, f"mlp must be one of {', '.join(MLPS)}, got {self.mlp!r}")
        need(self.mlp_ratio is None or self.mlp_ratio > 0, f"mlp_ratio must be > 0 or null, got {self.mlp_ratio}")
        need(self.layer_scale is None or self.layer_scale > 0, f"layer_scale must be > 0 or null, got {self.layer_scale}")
        need(0.0 <= self.drop_path < 1.0, f"drop_path must be in [0, 1), got {self.drop_path}")
        need(self.masking in MASKINGS, f"masking must be one of {', '.join(MASKINGS)}, got {self.masking!r}")
        need(self.mask_block_min >= 1, f"mask_block_min must be >= 1, got {self.mask_block_min}")
        need(0.0 < self.mask_block_aspect <= 1.0, f"mask_block_aspect must be in (0, 1], got {self.mask_block_aspect}")
        need(self.cls_weight >= 0, f"cls_weight must be >= 0, got {self.cls_weight}")
        need(self.cls_head in CLS_HEADS, f"cls_head must be one of {', '.join(CLS_HEADS)}, got {self.cls_head!r}")
        need(0.0 <= self.mask_ratio < 1.0, f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        need(self.grid_interpolation in GRID_MODES, f"grid_interpolation must be one of {', '.join(GRID_MODES)}")
        need(0.0 <= self.hflip <= 1.0, f"hflip must be in [0, 1], got {self.hflip}")
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(0.0 <= self.adam_beta2 < 1.0, f"adam_beta2 must be in [0, 1), got {self.adam_beta2}")
        need(self.val_max_rows >= 1, f"val_max_rows must be >= 1, got {self.val_max_rows}")
        self._check_common()
        return self


# ---- what the student is built from ---------------------------------------------------------
def grid_side(n_tokens: int, what: str) -> int:
    side = math.isqrt(int(n_tokens))
    if side * side != n_tokens:
        raise ConfigError(f"{what} has {n_tokens} tokens, not a square grid: UTA needs square token grids")
    return side


def same_crop(pre_a: dict | None, pre_b: dict | None, a_name: str, b_name: str) -> None:
    """Refuse two preprocessing identities (a feature set's identity["preprocess"], or a pixels
    array's identity) that differ in the crop geometry (resize, crop, interpolation, resize mode):
    their token grids would not cover the same pixels."""
    if not isinstance(pre_a, dict) or not isinstance(pre_b, dict):
        missing = a_name if not isinstance(pre_a, dict) else b_name
        raise IdentityMismatch(f"{missing} records no preprocessing identity: cannot check that {a_name} and "
                               f"{b_name} come from the same crop; extract both with featstore")
    diff = identity_diff(pre_a, pre_b, then=f"({a_name})", now=f"({b_name})", keys=CROP_KEYS)
    if diff:
        raise IdentityMismatch(f"{a_name} and {b_name} were not made from the same crop (extract both with the same "
                               f"resize/crop so their token grids line up):{lines(diff)}")


def resolve_arch(cfg: UTAConfig, *, teacher_tokens: tuple[int, int], pixels_shape=None, pixels_identity=None,
                 input_tokens: tuple[int, int] | None = None, teacher_pooled_dim: int | None = None) -> dict:
    """The student's full architecture (JSON-able; a checkpoint rebuilds the model from it) from
    the config and the shapes in the store: the teacher's tokens (T, D) and pooled width, and the
    pixels (3, H, W) or light-mode input tokens (T, D)."""
    width, depth, heads = STUDENTS[cfg.student]
    if cfg.width is not None:
        width, heads = cfg.width, max(1, cfg.width // 64)
    depth = cfg.depth or depth
    heads = cfg.heads or heads
    if width % heads:
        raise ConfigError(f"bad config: width {width} is not divisible by heads {heads}; set heads")
    if cfg.rope and (width // heads) % 4:
        raise ConfigError(f"bad config: 2D RoPE needs a head width divisible by 4 (width {width} / {heads} heads "
                          f"= {width // heads}); change width/heads or set rope=false")
    t_tokens, t_dim = (int(x) for x in teacher_tokens)
    t_side = grid_side(t_tokens, "the teacher's token grid")
    cls_dim = int(teacher_pooled_dim or t_dim)
    cls_head = cfg.cls_head if cfg.cls_head != "auto" else ("shared" if cls_dim == t_dim else "separate")
    if cls_head == "shared" and cls_dim != t_dim:
        raise ConfigError(f"bad config: cls_head shared needs the teacher's pooled width ({cls_dim}) to equal its token "
                          f"width ({t_dim}); set cls_head=separate (or auto)")
    ratio = cfg.mlp_ratio if cfg.mlp_ratio is not None else MLPS[cfg.mlp]
    arch = {"width": width, "depth": depth, "heads": heads, "mlp": cfg.mlp, "mlp_dim": int(round(width * ratio)),
            "sub_ln": cfg.sub_ln, "rope": cfg.rope, "abs_pos_embed": cfg.abs_pos_embed, "layer_scale": cfg.layer_scale,
            "drop_path": cfg.drop_path, "out_dim": t_dim, "cls_dim": cls_dim, "cls_head": cls_head,
            "teacher_grid": [t_side, t_side]}
    if input_tokens is None:
        c, h, w = (int(x) for x in pixels_shape)
        if c != 3 or h != w:
            raise ConfigError(f"UTA needs square RGB pixels, got shape {(c, h, w)}")
        patch = cfg.patch_size or h // t_side
        if patch < 1 or h % patch:
            raise ConfigError(f"bad config: patch_size {patch} does not divide the stored {h}x{h} crop")
        pre = (pixels_identity or {})
        arch.update(input="pixels", image_size=h, patch_size=patch, in_channels=3, grid=h // patch,
                    mean=list(pre.get("mean", (0.5, 0.5, 0.5))), std=list(pre.get("std", (0.5, 0.5, 0.5))))
    else:
        n, d = (int(x) for x in input_tokens)
        if cfg.patch_size not in (None, 1):
            raise ConfigError("bad config: patch_size applies to pixels; a light-mode student's grid is its input's")
        side = grid_side(n, "the student input's token grid")
        arch.update(input="tokens", image_size=side, patch_size=1, in_channels=d, grid=side)
    g = arch["grid"]
    arch["grid_interpolation"] = None if [g, g] == arch["teacher_grid"] else cfg.grid_interpolation
    return arch


# ---- grids, flips, the loss ------------------------------------------------------------------
def interpolate_grid(tokens: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Teacher tokens (B, h*w, D) on a square grid resized to size x size: (B, size*size, D), fp32.
    Resampled as a (D, h, w) map (align_corners=False); the same tensor when the grids match."""
    b, n, d = tokens.shape
    side = grid_side(n, "the teacher's token grid")
    if side == size:
        return tokens
    grid = tokens.float().transpose(1, 2).reshape(b, d, side, side)
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(grid, size=(size, size), mode=mode, **kwargs).flatten(2).transpose(1, 2)


def flip_tokens(tokens: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Mirror the square token grid (B, g*g, D) left-right where `which` (B,) is true (`hflip`
    only: stored views carry their own mirroring, with the teacher's own outputs on the mirror, and
    `train_uta.check_flips` refuses hflip on mirrored stored views)."""
    b, n, d = tokens.shape
    g = grid_side(n, "a token grid")
    flipped = tokens.view(b, g, g, d).flip(2).reshape(b, n, d)
    return torch.where(which.view(b, 1, 1).to(tokens.device), flipped, tokens)


def flip_input(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Mirror pixels (B, 3, H, W) or a light-mode token grid (B, T, D) where `which` is true."""
    if x.ndim == 4:
        return torch.where(which.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    return flip_tokens(x, which)


def mask_options(cfg: UTAConfig) -> dict:
    """The keyword arguments of `draw_masks` that the config sets besides ratio and complement."""
    return {"masking": cfg.masking, "block_min": cfg.mask_block_min, "block_aspect": cfg.mask_block_aspect}


def alignment_losses(model: UTAStudent, x: torch.Tensor, targets: torch.Tensor, masks: list[torch.Tensor],
                     pooled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{"token": mean over every (image, mask, kept position) of 1 - cos(student token, teacher
    token), and with `pooled` (B, D) "cls": mean over every (image, mask) of 1 - cos(student CLS
    embedding, teacher pooled embedding)}.

    `targets` (B, N, D) are on the student's grid.  The input is embedded once; each group of masks
    gathers its kept positions from it and runs the encoder on those alone."""
    e = model.embed(x)
    token_sum, token_n = e.new_zeros((), dtype=torch.float32), 0
    cls_sum, cls_n = e.new_zeros((), dtype=torch.float32), 0
    for keep in mask_groups(masks):
        reps = len(keep) // len(e)
        keep = keep.to(e.device)
        tokens, cls = model.encode(gather_tokens(e.repeat(reps, 1, 1), keep), keep)
        cos = F.cosine_similarity(tokens.float(), gather_tokens(targets.repeat(reps, 1, 1), keep).float(), dim=-1)
        token_sum, token_n = token_sum + (1.0 - cos).sum(), token_n + cos.numel()
        if pooled is not None:
            c = F.cosine_similarity(cls.float(), pooled.repeat(reps, 1).to(cls.device).float(), dim=-1)
            cls_sum, cls_n = cls_sum + (1.0 - c).sum(), cls_n + c.numel()
    out = {"token": token_sum / token_n}
    if pooled is not None:
        out["cls"] = cls_sum / cls_n
    return out


def alignment_loss(model: UTAStudent, x: torch.Tensor, targets: torch.Tensor, masks: list[torch.Tensor],
                   pooled: torch.Tensor | None = None, cls_weight: float = 0.0) -> torch.Tensor:
    """The training objective: token loss + cls_weight * CLS loss (`alignment_losses`)."""
    parts = alignment_losses(model, x, targets, masks, pooled if cls_weight > 0 else None)
    return parts["token"] + cls_weight * parts["cls"] if "cls" in parts else parts["token"]


def prepare_batch(batch: dict, arch: dict, flip: torch.Tensor | None, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch on the device: the input as stored (uint8 pixels / tokens), the teacher tokens
    as fp32 on the student's grid, both mirrored where `flip` is true.  int8 tokens served raw with
    their scales (columns "<key>_scale" and "<key>_channel_scale", see `loader_columns`) are
    dequantized here, on the device."""
    x = on_device(batch, "input", dev)
    t = on_device(batch, "target", dev)
    t = interpolate_grid(t, arch["grid"], arch["grid_interpolation"] or "bilinear").float()
    if flip is not None and bool(flip.any()):
        x, t = flip_input(x, flip), flip_tokens(t, flip)
    return x, t


def batch_pooled(batch: dict, dev) -> torch.Tensor | None:
    """The teacher's pooled embeddings of a batch (B, D) fp32 on the device, when served."""
    return batch["pooled"].to(dev, non_blocking=True).float() if "pooled" in batch else None


def on_device(batch: dict, key: str, dev) -> torch.Tensor:
    """batch[key] on `dev`; int8 tokens served raw with their scales are dequantized there."""
    x = batch[key].to(dev, non_blocking=True)
    scale, channel = batch.get(f"{key}_scale"), batch.get(f"{key}_channel_scale")
    if scale is None:
        return x
    channel = channel.to(dev, non_blocking=True) if channel is not None else None  # token x channel int8
    return dequantize_int8(x, scale.to(dev, non_blocking=True), channel_scale=channel)


def loader_columns(input_column: str, teacher: str, *, int8_on_device: bool, store, pooled: bool = False) -> tuple[dict, bool]:
    """The loader's columns {"input", "target"[, "pooled"][, "<key>_scale"[, "<key>_channel_scale"]]}
    and its `dequantize` flag.  With `int8_on_device` (a GPU), int8 token columns are served raw (half
    the bytes to copy) with their scales (both of them for token x channel int8: a
    `<tokens>_channel_scale` array beside the tokens) and dequantized by `prepare_batch` on the
    device; otherwise the loader dequantizes them to fp16 in its producer thread, overlapping the
    step (best on CPU), with whichever scales the feature set has."""
    columns = {"input": input_column, "target": f"features/{teacher}/tokens"}
    if pooled:
        columns["pooled"] = f"features/{teacher}/pooled"
    token_keys = [k for k, p in columns.items() if p.endswith("/tokens") and store.array(p).dtype == np.int8]
    raw = token_keys if int8_on_device else []
    for key in raw:
        columns[f"{key}_scale"] = columns[key] + "_scale"
        if _has_array(store, columns[key] + "_channel_scale"):
            columns[f"{key}_channel_scale"] = columns[key] + "_channel_scale"
    return columns, not raw


def _has_array(store, path: str) -> bool:
    from featstore.errors import NotInStore

    try:
        store.array(path)
        return True
    except NotInStore:
        return False


# ---- checkpoints (trainers/checkpoint.py's files, UTA's format) ----------------------------------
def _refuse_old(state: dict, ckpt_dir: str) -> None:
    version = int(state.get("version", 0))
    if version < VERSION:
        raise CheckpointError(f"{ckpt_dir} is a UTA checkpoint of version {version} (a plain ViT student whose CLS was "
                              "never aligned): retrain it with this featstore")


def is_uta_checkpoint(path, which: str = "best") -> bool:
    """Whether `path` (a run or checkpoint directory) holds a UTA checkpoint of any version."""
    return checkpoint.format_of(path, which) == FORMAT


def load_checkpoint(path, which: str = "best", optimizer: bool = False, verify: bool = True) -> checkpoint.Checkpoint:
    """A UTA checkpoint (`<run>/best` or `<run>/last`): state, config, student (eval mode, CPU) and,
    with `optimizer`, the optimizer/RNG tensors.  Files whose checksum differs are refused."""
    ckpt = checkpoint.read(path, which, format=FORMAT, version=VERSION, kind="UTA", optimizer=optimizer,
                           verify=verify, check=_refuse_old)
    ckpt.config = UTAConfig.from_dict(ckpt.state["config"], where=os.path.join(ckpt.path, checkpoint.STATE_FILE))
    ckpt.model = UTAStudent.from_state(ckpt.state, ckpt.weights).eval()
    return ckpt
