"""DINOv2 (Oquab et al., 2023): CLS token after the final norm; tokens = patch tokens.

Two image recipes:

* ``dinov2`` (ShareLock's backbone, ViT-B/14): the preprocessing of ShareLock's official feature
  extraction, torchvision's ``Resize(256)`` (its default *bilinear* interpolation, antialiased)
  -> ``CenterCrop(224)`` -> ImageNet mean/std, fixed for the alias whatever processor config the
  weights ship with;
* ``dinov2-small/base/large/giant``: the image processor saved with the weights (the hub repos'
  BitImageProcessor: shortest edge 256 *bicubic*, crop 224), else the same numbers bicubic.

Position embeddings.  The weights were trained at 518 px (a 37x37 patch grid); at 224 px (16x16)
the position embeddings are resized, and transformers' port and the reference code resize them
differently.  transformers' ``Dinov2Embeddings.interpolate_pos_encoding`` asks for the output
*size* (16, 16); ``torch.hub``'s ``dinov2_vit{s,b,l,g}14`` (facebookresearch/dinov2,
``DinoVisionTransformer.interpolate_pos_encoding`` with the released ``interpolate_offset=0.1``,
``interpolate_antialias=False``) asks for the *scale factor* (16 + 0.1) / 37 per axis, bicubic,
in float32: the output is still floor(37 * 16.1 / 37) = 16 wide, but bicubic samples at the
positions that scale gives, not at 37/16 steps.  ShareLock extracted its features with the hub
model, so every registry alias here (the HF ports of exactly those four hub models) runs the hub
rule (`HubPositionEmbeddings`), recorded as ``identity["position_embeddings"]`` so that features
made before (transformers' rule, no such key) are refused beside new ones rather than mixed.  A
DINOv2 given by path keeps transformers' own rule and its identity is unchanged: it is whatever
model transformers loads (with registers the hub's rule is another one: offset 0, antialiased).
``tests/test_dinov2_hub.py`` checks the alias against a transcription of the hub forward.
"""

from __future__ import annotations

import math

import torch

from featstore.errors import BackboneError
from featstore.pipelines.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

from .base import Backbone, BackboneConfig, LoadOptions, Source
from .vit import build_vit_like

SHARELOCK_PREPROCESS = Preprocess(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")
DEFAULT_PREPROCESS = Preprocess(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic")

HUB_INTERPOLATE_OFFSET = 0.1  # dinov2/hub/backbones.py, the released models without registers
HUB_POSITION_EMBEDDINGS = ("torch.hub dinov2 rule: bicubic by scale_factor (grid + 0.1) / trained grid, "
                           "no antialias, in float32")


class HubPositionEmbeddings:
    """Stands in for ``Dinov2Embeddings.interpolate_pos_encoding`` on one loaded model: the same
    call (tokens with CLS first, pixel height, width) -> position embeddings, by the hub's rule.
    A plain object holding its module (not a bound method), so copies and pickles keep it."""

    def __init__(self, embeddings: torch.nn.Module, offset: float = HUB_INTERPOLATE_OFFSET):
        self.embeddings = embeddings
        self.offset = float(offset)

    def __call__(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        pos = self.embeddings.position_embeddings  # (1, 1 + M*M, D): CLS, then the trained grid
        n_pos = pos.shape[1] - 1
        if tokens.shape[1] - 1 == n_pos and height == width:
            return pos  # the trained grid itself: no resampling, as the hub code
        side = math.isqrt(n_pos)
        if side * side != n_pos:
            raise BackboneError(f"DINOv2 position embeddings: {n_pos} positions are not a square grid")
        patch = self.embeddings.patch_embeddings.patch_size
        ph, pw = (patch, patch) if isinstance(patch, int) else patch
        rows, cols = height // ph, width // pw
        pos = pos.float()
        dim = pos.shape[-1]
        grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(
            grid, scale_factor=((rows + self.offset) / side, (cols + self.offset) / side),
            mode="bicubic", antialias=False)
        if tuple(grid.shape[-2:]) != (rows, cols):
            raise BackboneError(f"DINOv2 position embeddings: resampled to {tuple(grid.shape[-2:])}, "
                                f"not the {rows}x{cols} patch grid")
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
        return torch.cat([pos[:, :1], grid], dim=1).to(tokens.dtype)


def use_hub_position_embeddings(model: torch.nn.Module) -> None:
    """Make a loaded transformers DINOv2 resize its position embeddings as torch.hub's does."""
    emb = getattr(model, "embeddings", None)
    if getattr(emb, "position_embeddings", None) is None or not hasattr(emb, "interpolate_pos_encoding"):
        raise BackboneError(f"{type(model).__name__} has no DINOv2 position embeddings to resize the hub's way")
    emb.interpolate_pos_encoding = HubPositionEmbeddings(emb)


def build(src: Source, opt: LoadOptions, dev: torch.device) -> Backbone:
    backbone = build_vit_like(src, opt, dev, recipe="dinov2", default_preprocess=DEFAULT_PREPROCESS,
                              default_pooling="cls")
    if src.alias in HUB_ALIASES:
        # after the build's probe forwards, which only read shapes (both rules give the same grid)
        use_hub_position_embeddings(backbone.model)
        backbone.identity = {**backbone.identity, "position_embeddings": HUB_POSITION_EMBEDDINGS}
    return backbone


RECIPES = {"dinov2": build}
ALIASES = [
    BackboneConfig("dinov2", "facebook/dinov2-base", "dinov2", "image", 768,
                   "DINOv2 ViT-B/14 as ShareLock extracts it: CLS after final norm, bilinear 256 -> 224",
                   preprocess=SHARELOCK_PREPROCESS),
    BackboneConfig("dinov2-small", "facebook/dinov2-small", "dinov2", "image", 384, "DINOv2 ViT-S/14, CLS after final norm"),
    BackboneConfig("dinov2-base", "facebook/dinov2-base", "dinov2", "image", 768, "DINOv2 ViT-B/14"),
    BackboneConfig("dinov2-large", "facebook/dinov2-large", "dinov2", "image", 1024, "DINOv2 ViT-L/14"),
    BackboneConfig("dinov2-giant", "facebook/dinov2-giant", "dinov2", "image", 1536, "DINOv2 ViT-g/14"),
]
HUB_ALIASES = frozenset(c.alias for c in ALIASES)  # the HF ports of torch.hub's dinov2_vit{s,b,l,g}14
