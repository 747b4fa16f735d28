"""`featstore train-uta`'s settings: `UTAConfig` (configs/uta.yaml explains each key)."""

from __future__ import annotations

from dataclasses import dataclass

from featstore.trainers.config import ConfigBase, need
from featstore.trainers.uta.masks import MASKINGS


# name -> (width, depth, heads): ViT-Ti/S/B (Touvron et al. 2021; Dosovitskiy et al. 2021)
STUDENTS = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
MLPS = {"swiglu": 8.0 / 3.0, "gelu": 4.0}  # name -> default mlp_ratio (EVA-02's 2.6667 for SwiGLU; ViT's 4)
FRESH_CROPS = ("none", "teacher", "resample")  # trainers/uta/fresh_crops.py
CLS_HEADS = ("auto", "shared", "separate")
GRID_MODES = ("bilinear", "bicubic", "nearest")
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
    sub_ln: bool = True  # EVA-02's LayerNorm before the MLP's output projection (ffn_ln)
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
    fresh_crops: str = "none"  # none | teacher (exact: the teacher runs on each step's crops) | resample (stored grid resampled)
    crop_scale_min: float = 0.2  # fresh crops: the smallest area fraction (EVA-02's random-resized crop: 0.2)
    hflip: float = 0.0  # probability of flipping an image and its teacher grid together (refused on mirrored stored views)
    # ---- optimisation ----
    steps: int = 20000
    batch_size: int = 256  # images per step (2x sequences with reversed masking)
    lr: float = 5e-4
    weight_decay: float = 0.05
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8  # torch's default; EVA-02 uses 1e-6 (configs/uta-b16.yaml)
    warmup_steps: int = 1000
    max_warmup_fraction: float = 0.1  # warm-up never longer than this fraction of `steps`
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    # ---- data ----
    seed: int = 0  # init, masks, flips, data order
    val_fraction: float = 0.1  # held out by uid hash (featstore.split), as train-head
    skip_duplicates: str | None = None  # a `featstore dedup` record ("exact" or a feature set): its duplicates are left out of training
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
        need(self.fresh_crops in FRESH_CROPS, f"fresh_crops must be one of {', '.join(FRESH_CROPS)}, got {self.fresh_crops!r}")
        need(0.0 < self.crop_scale_min <= 1.0, f"crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        need(0.0 <= self.hflip <= 1.0, f"hflip must be in [0, 1], got {self.hflip}")
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(0.0 <= self.adam_beta2 < 1.0, f"adam_beta2 must be in [0, 1), got {self.adam_beta2}")
        need(self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps}")
        need(self.val_max_rows >= 1, f"val_max_rows must be >= 1, got {self.val_max_rows}")
        self._check_common()
        return self


def mask_options(cfg: UTAConfig) -> dict:
    """The keyword arguments of `draw_masks` that the config sets besides ratio and complement."""
    return {"masking": cfg.masking, "block_min": cfg.mask_block_min, "block_aspect": cfg.mask_block_aspect}
