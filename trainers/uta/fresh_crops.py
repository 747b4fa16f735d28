"""Fresh crops every step, as EVA-02 trains: a random-resized crop and a flip per image per step,
cut on the training device from the stored uint8 pixels (no image is decoded), with the teacher's
targets for that crop (`fresh_crops` in the config):

* ``teacher`` (exact): the frozen teacher, re-loaded from the identity its feature set recorded
  (`backbone_link.backbone_for`), runs on each step's crops inside the step, as EVA-02's
  pre-training runs its CLIP teacher: the targets are the teacher's own tokens and pooled
  embedding of exactly the crop the student sees;
* ``resample`` (approximate, no teacher forward): the stored token grid of the whole stored crop
  is resampled (bilinear) at the crop's cell centres and mirrored with it; the pooled target stays
  the stored embedding of the uncropped image.  A token covers a wider context than its cell and a
  crop changes what the teacher attends to, so these targets only approximate the teacher's.
* ``none``: the stored crop (or stored views, `extract --views K`) as it is.

The crop (torchvision's RandomResizedCrop rule, EVA-02's parameters): area fraction uniform in
[`crop_scale_min`, 1], log aspect ratio uniform in [log 3/4, log 4/3], ten tries, else the whole
image; resized back to the stored size bicubic (EVA-02's `train_interpolation`); mirrored with
probability 0.5.  The crops are drawn for the whole global batch from (seed, step) alone, so a
resumed run and N ranks cut what one uninterrupted process cuts.  What differs from EVA-02: the
crop is cut from the stored crop (the teacher's resize + centre crop of the image), not from the
original image; boxes are fractional, not whole pixels; and one batched bicubic resampling
(grid_sample) reads the real pixels next to a box where crop-then-resize repeats the box's edge.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from featstore.errors import ConfigError
from featstore.trainers.uta.masks import step_generator

CROP_STREAM = 2  # step_generator's stream for crops (0: masks and flips, 1: validation)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
TRIES = 10


def draw_crops(n: int, g: torch.Generator, scale_min: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """(boxes (n, 4): x0, y0, w, h as fractions of a square image, flips (n,) bool)."""
    area = torch.empty(n, TRIES).uniform_(scale_min, 1.0, generator=g)
    log_r = torch.empty(n, TRIES).uniform_(math.log(RATIO[0]), math.log(RATIO[1]), generator=g)
    w = torch.sqrt(area * torch.exp(log_r))
    h = torch.sqrt(area / torch.exp(log_r))
    ok = (w <= 1.0) & (h <= 1.0)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1))
    pick = first.clamp(min=0)
    w = torch.where(first >= 0, w[torch.arange(n), pick], torch.ones(n))  # no try fits: the whole image
    h = torch.where(first >= 0, h[torch.arange(n), pick], torch.ones(n))
    x0 = torch.rand(n, generator=g) * (1.0 - w)
    y0 = torch.rand(n, generator=g) * (1.0 - h)
    flips = torch.rand(n, generator=g) < 0.5
    return torch.stack([x0, y0, w, h], dim=1), flips


def step_crops(cfg, step: int, n: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the step's crops for a global batch of n * world_size images."""
    boxes, flips = draw_crops(n * world_size, step_generator(cfg.seed, step, CROP_STREAM), cfg.crop_scale_min)
    mine = slice(rank * n, (rank + 1) * n)
    return boxes[mine], flips[mine]


def _grid(boxes: torch.Tensor, flips: torch.Tensor, size: int, device) -> torch.Tensor:
    """grid_sample's sampling grid (B, size, size, 2) for each box's `size` x `size` cell centres."""
    centres = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size  # in [0, 1] of the box
    boxes = boxes.to(device)
    xs = boxes[:, :1] + centres[None] * boxes[:, 2:3]  # (B, size) fractions of the image
    ys = boxes[:, 1:2] + centres[None] * boxes[:, 3:4]
    xs = torch.where(flips.to(device)[:, None], xs.flip(1), xs)
    xs, ys = xs * 2 - 1, ys * 2 - 1  # align_corners=False: -1 and 1 are the image's outer edges
    return torch.stack([xs[:, None, :].expand(-1, size, -1), ys[:, :, None].expand(-1, -1, size)], dim=-1)


def cut(pixels: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (B, 3, S, S) -> uint8 crops (B, 3, S, S): each box resized to S bicubic, mirrored
    where `flips`."""
    size = pixels.shape[-1]
    grid = _grid(boxes, flips, size, pixels.device)
    out = F.grid_sample(pixels.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def resample_tokens(tokens: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """A stored square token grid (B, g*g, D) sampled at each crop's g x g cell centres (bilinear)."""
    b, n, d = tokens.shape
    g = math.isqrt(n)
    grid_map = tokens.float().transpose(1, 2).reshape(b, d, g, g)
    out = F.grid_sample(grid_map, _grid(boxes, flips, g, tokens.device), mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.flatten(2).transpose(1, 2)


def check_fresh_crops(cfg, *, teacher_views: int, light_mode: bool) -> None:
    """Refuse what fresh crops cannot do, each with one line."""
    if cfg.fresh_crops == "none":
        return
    if light_mode:
        raise ConfigError("fresh_crops needs pixels (the student's input is cut per step); light mode reads stored "
                          "tokens: set fresh_crops=none")
    if teacher_views > 1:
        raise ConfigError("fresh_crops cuts a new crop every step; the teacher has stored views (extract --views K): "
                          "use one or the other (fresh_crops=none, or a teacher extracted without --views)")
    if cfg.hflip > 0:
        raise ConfigError("fresh_crops already mirrors half the crops: set hflip=0")


def load_teacher(tdesc: dict, dev):
    """The frozen teacher of a feature set record, with tokens, on the training device."""
    from featstore.trainers.backbone_link import backbone_for

    return backbone_for(tdesc, device=str(dev), tokens=True)


def crop_batch(mode: str, teacher, x: torch.Tensor, stored_tokens: torch.Tensor, stored_pooled: torch.Tensor | None,
               boxes: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(crops, teacher tokens on the teacher's grid, pooled target) for this step's boxes."""
    crops = cut(x, boxes, flips)
    if mode == "teacher":
        out = teacher.encode_images(crops, keep_on_device=True)  # inference tensors: cloned to be loss targets
        pooled = out["pooled"].to(x.device).clone() if stored_pooled is not None else None
        return crops, out["tokens"].to(x.device).clone(), pooled
    return crops, resample_tokens(stored_tokens, boxes, flips), stored_pooled
