"""UTA (Unmasked Token Alignment): a ViT student whose unmasked tokens match a frozen teacher's.

The teacher (a CLIP vision tower, say) ran once at extraction: `features/<teacher>/tokens` holds its
patch tokens (N, T, D) and `pixels/<name>` the exact uint8 crop it saw.  A training step:

1. draws a random mask per sample (`draw_masks`: a pure function of (seed, step), so a resumed run
   draws the same masks); `mask_ratio` of the grid positions are dropped;
2. embeds the input once (patches of the pixels + position embeddings), GATHERS the kept positions
   and runs the encoder on those only: no [MASK] tokens, so the student costs ~(1 - mask_ratio) of a
   full forward, and what it says at a kept position cannot depend on a dropped patch;
3. maps each output token through a linear head (student width -> teacher width) and scores
   1 - cosine against the teacher token at the same grid position (`alignment_loss`).

Reversed masking: each image appears twice, once with its mask and once with the complement, so
every position is aligned every step.  With mask_ratio 0.5 the two halves have the same length and
run as one batch of 2B sequences of N/2 tokens, which costs the same as one unmasked forward of B.

Grids: the student's grid is (stored crop size / student patch).  By default the student patch is
the teacher's (crop / teacher grid side), so grids match; when they differ (a /14 teacher at 224 is
16x16, a /16 student 14x14) the teacher grid is resized to the student's (`interpolate_grid`,
bilinear on the (D, h, w) map), recorded in the checkpoint.

Light mode (`student_input=<feature set>`): the student's input is another backbone's stored tokens
(e.g. DINOv2's) instead of pixels: a LayerNorm, a 1x1 "patch" projection of the token grid, then the
same (small) transformer.  Both feature sets must come from the same crop (`same_crop`).

Only torch and transformers' ViT building blocks (randomly initialised from a ViTConfig) are used;
no pretrained weights, no backbone, no image decoding.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from featstore.errors import CheckpointError, ConfigError, IdentityMismatch

from .config import ConfigBase, need

# name -> (width, depth, heads): ViT-Ti/S/B (Touvron et al. 2021; Dosovitskiy et al. 2021)
STUDENTS = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
GRID_MODES = ("bilinear", "bicubic", "nearest")
FORMAT = "featstore-uta-checkpoint"
VERSION = 1
# the keys of a preprocessing identity that decide which pixels a token covers (mean/std do not:
# they are applied to the crop afterwards, and differ between e.g. CLIP and DINOv2)
CROP_KEYS = ("name", "resize", "crop", "interpolation", "resize_mode")


@dataclass
class UTAConfig(ConfigBase):
    """`featstore train-uta` settings (configs/uta.yaml explains each).  Loaded like ShareLock's
    Config: `trainers.config.load_config(file, ["KEY=VALUE"], base=UTAConfig())`."""

    # ---- the student ----
    student: str = "tiny"  # tiny | small | base (ViT-Ti/S/B sizes)
    width: int | None = None  # override the preset's hidden width
    depth: int | None = None  # override the preset's number of layers
    heads: int | None = None  # None: the preset's, or width // 64 when width is overridden
    mlp_ratio: float = 4.0
    patch_size: int | None = None  # None: the teacher's patch (crop / teacher grid side): grids match
    student_input: str | None = None  # light mode: a feature set whose stored tokens replace the pixels
    # ---- the objective ----
    mask_ratio: float = 0.5  # fraction of grid positions dropped from the student's input
    reversed_masking: bool = True  # each image twice: its mask and the complement
    grid_interpolation: str = "bilinear"  # teacher grid -> student grid when they differ
    hflip: float = 0.0  # probability of flipping an image and its teacher grid together
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
        need(self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}")
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
    diff = [f"{k} {pre_a.get(k)!r} vs {pre_b.get(k)!r}" for k in CROP_KEYS if pre_a.get(k) != pre_b.get(k)]
    if diff:
        raise IdentityMismatch(f"{a_name} and {b_name} were not made from the same crop ({'; '.join(diff)}): "
                               "extract both with the same resize/crop so their token grids line up")


def resolve_arch(cfg: UTAConfig, *, teacher_tokens: tuple[int, int], pixels_shape=None, pixels_identity=None,
                 input_tokens: tuple[int, int] | None = None) -> dict:
    """The student's full architecture (JSON-able; a checkpoint rebuilds the model from it) from
    the config and the shapes in the store: pixels (3, H, W) or light-mode input tokens (T, D)."""
    width, depth, heads = STUDENTS[cfg.student]
    if cfg.width is not None:
        width, heads = cfg.width, max(1, cfg.width // 64)
    depth = cfg.depth or depth
    heads = cfg.heads or heads
    if width % heads:
        raise ConfigError(f"bad config: width {width} is not divisible by heads {heads}; set heads")
    t_tokens, t_dim = (int(x) for x in teacher_tokens)
    t_side = grid_side(t_tokens, "the teacher's token grid")
    arch = {"width": width, "depth": depth, "heads": heads, "mlp_dim": int(round(width * cfg.mlp_ratio)),
            "out_dim": t_dim, "teacher_grid": [t_side, t_side]}
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


# ---- the student ------------------------------------------------------------------------------
class UTAStudent(torch.nn.Module):
    """A transformers ViT (random init) + a linear head to the teacher's width.

    Pixel input: uint8 (B, 3, H, W), normalized with the crop's own mean/std (buffers, saved with
    the weights).  Light mode: tokens (B, T, D_in) -> LayerNorm -> the ViT's patch projection over the
    (D_in, g, g) grid with 1x1 patches (a per-token linear map) -> the same encoder.
    """

    def __init__(self, arch: dict):
        super().__init__()
        from transformers import ViTConfig, ViTModel

        self.arch = dict(arch)
        config = ViTConfig(
            hidden_size=arch["width"], num_hidden_layers=arch["depth"], num_attention_heads=arch["heads"],
            intermediate_size=arch["mlp_dim"], image_size=arch["image_size"], patch_size=arch["patch_size"],
            num_channels=arch["in_channels"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.head = torch.nn.Linear(arch["width"], arch["out_dim"])
        self.tokens_in = arch["input"] == "tokens"
        if self.tokens_in:
            self.input_norm = torch.nn.LayerNorm(arch["in_channels"])
        else:
            self.register_buffer("pixel_mean", torch.tensor(arch["mean"], dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("pixel_std", torch.tensor(arch["std"], dtype=torch.float32).view(1, 3, 1, 1))
        self.grid = int(arch["grid"])

    @property
    def n_tokens(self) -> int:
        return self.grid * self.grid

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Every grid position's input embedding (B, N, W): patch projection + position embedding."""
        if self.tokens_in:
            x = self.input_norm(x.float())
            b, n, d = x.shape
            x = x.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        else:
            x = (x.float() / 255.0 - self.pixel_mean) / self.pixel_std
        emb = self.vit.embeddings
        return emb.patch_embeddings(x) + emb.position_embeddings[:, 1:]

    def encode(self, e: torch.Tensor) -> torch.Tensor:
        """Run the encoder on the given position embeddings (B, K, W) only (plus the CLS token) and
        map every output token through the head: (B, K, teacher width)."""
        emb = self.vit.embeddings
        cls = (emb.cls_token + emb.position_embeddings[:, :1]).expand(len(e), -1, -1)
        h = torch.cat([cls, e], dim=1)
        for layer in self.vit.layers:
            h = layer(h, None)
        return self.head(self.vit.layernorm(h[:, 1:]))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Head outputs at the kept positions `keep` (m*B, K) (rows i, i+B, ... are image i under
        m masks), or at every position when `keep` is None."""
        e = self.embed(x)
        if keep is not None:
            e = gather_tokens(e.repeat(len(keep) // len(e), 1, 1), keep)
        return self.encode(e)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """The image embedding: the mean over all positions of the head's tokens (the teacher's space)."""
        return self.forward(x).mean(dim=1)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- masks, grids, loss ---------------------------------------------------------------------------
def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The random stream of one training step (masks and flips): a pure function of (seed, step),
    so a resumed run draws exactly what an uninterrupted one did.  `stream` 1 is validation."""
    state = np.random.SeedSequence([int(seed), int(stream), int(step)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_masks(n_samples: int, n_tokens: int, mask_ratio: float, generator: torch.Generator,
               reversed_masking: bool = True) -> list[torch.Tensor]:
    """Kept positions per sample, sorted: [(B, K)] or, with reversed masking, [(B, K), (B, N-K)]
    (the complement of each sample's mask); K = round(N * (1 - mask_ratio)), at least 1."""
    keep_n = min(n_tokens, max(1, int(round(n_tokens * (1.0 - mask_ratio)))))
    order = torch.rand(n_samples, n_tokens, generator=generator).argsort(dim=1)
    masks = [order[:, :keep_n].sort(dim=1).values]
    if reversed_masking and keep_n < n_tokens:
        masks.append(order[:, keep_n:].sort(dim=1).values)
    return masks


def mask_groups(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Masks of the same length stacked into one forward pass (reversed masking at ratio 0.5 →
    one batch of 2B sequences); masks of different lengths stay separate passes."""
    groups: dict[int, list[torch.Tensor]] = {}
    for m in masks:
        groups.setdefault(m.shape[1], []).append(m)
    return [torch.cat(ms) for ms in groups.values()]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), index (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, index.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[-1]))


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
    """Mirror the square token grid (B, g*g, D) left-right where `which` (B,) is true."""
    b, n, d = tokens.shape
    g = grid_side(n, "a token grid")
    flipped = tokens.view(b, g, g, d).flip(2).reshape(b, n, d)
    return torch.where(which.view(b, 1, 1).to(tokens.device), flipped, tokens)


def flip_input(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Mirror pixels (B, 3, H, W) or a light-mode token grid (B, T, D) where `which` is true."""
    if x.ndim == 4:
        return torch.where(which.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    return flip_tokens(x, which)


def alignment_loss(model: UTAStudent, x: torch.Tensor, targets: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """Mean over every (image, mask, kept position) of 1 - cos(student token, teacher token).

    `targets` (B, N, D) are on the student's grid.  The input is embedded once; each group of masks
    gathers its kept positions from it and runs the encoder on those alone."""
    e = model.embed(x)
    total, count = e.new_zeros((), dtype=torch.float32), 0
    for keep in mask_groups(masks):
        reps = len(keep) // len(e)
        keep = keep.to(e.device)
        pred = model.encode(gather_tokens(e.repeat(reps, 1, 1), keep))
        target = gather_tokens(targets.repeat(reps, 1, 1), keep)
        cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
        total = total + (1.0 - cos).sum()
        count += cos.numel()
    return total / count


def prepare_batch(batch: dict, arch: dict, flip: torch.Tensor | None, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch on the device: the input as stored (uint8 pixels / tokens), the teacher tokens
    as fp32 on the student's grid, both mirrored where `flip` is true.  int8 tokens served raw with
    their scale (columns "<key>_scale", see `loader_columns`) are dequantized here, on the device."""
    x = _on_device(batch, "input", dev)
    t = _on_device(batch, "target", dev)
    t = interpolate_grid(t, arch["grid"], arch["grid_interpolation"] or "bilinear").float()
    if flip is not None and bool(flip.any()):
        x, t = flip_input(x, flip), flip_tokens(t, flip)
    return x, t


def _on_device(batch: dict, key: str, dev) -> torch.Tensor:
    x = batch[key].to(dev, non_blocking=True)
    scale = batch.get(f"{key}_scale")
    if scale is not None:
        x = x.float() * scale.to(dev, non_blocking=True).float().unsqueeze(-1)
    return x


def loader_columns(input_column: str, teacher: str, *, int8_on_device: bool, store) -> tuple[dict, bool]:
    """The loader's columns {"input", "target"[, "input_scale", "target_scale"]} and its `dequantize`
    flag.  With `int8_on_device` (a GPU), int8 token columns are served raw (half the bytes to copy)
    with their per-token scales and dequantized by `prepare_batch` on the device; otherwise the loader
    dequantizes them to fp16 in its producer thread, overlapping the step (best on CPU)."""
    columns = {"input": input_column, "target": f"features/{teacher}/tokens"}
    if not int8_on_device:
        return columns, True
    for key, path in list(columns.items()):
        if path.endswith("/tokens") and store.array(path).dtype == np.int8:
            columns[f"{key}_scale"] = path + "_scale"
    return columns, False


# ---- checkpoints (trainers/checkpoint.py's files, UTA's format) ----------------------------------
@dataclass
class UTACheckpoint:
    path: str
    state: dict
    config: UTAConfig
    model: UTAStudent
    tensors: dict | None

    @property
    def step(self) -> int:
        return int(self.state["step"])


def load_checkpoint(path, which: str = "best", optimizer: bool = False, verify: bool = True) -> UTACheckpoint:
    """A UTA checkpoint (`<run>/best` or `<run>/last`): config, student (eval mode, CPU) and, with
    `optimizer`, the optimizer/RNG tensors.  Files whose checksum differs are refused."""
    from . import checkpoint

    ckpt_dir = checkpoint.resolve(path, which)
    state = checkpoint.read_state(ckpt_dir, expect=FORMAT)
    if int(state.get("version", 0)) > VERSION:
        raise CheckpointError(f"{ckpt_dir} was written by a newer featstore (UTA checkpoint version {state['version']})")
    config = UTAConfig.from_dict(state["config"], where=os.path.join(ckpt_dir, checkpoint.STATE_FILE))
    model = UTAStudent(state["arch"])
    model.load_state_dict(checkpoint._read(ckpt_dir, checkpoint.MODEL_FILE, state, verify))
    tensors = None
    if optimizer and checkpoint.OPTIMIZER_FILE in state["files"]:
        tensors = checkpoint._read(ckpt_dir, checkpoint.OPTIMIZER_FILE, state, verify)
    return UTACheckpoint(ckpt_dir, state, config, model.eval(), tensors)
