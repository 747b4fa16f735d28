"""DINOv2 (Oquab et al., 2023): CLS token after the final norm; tokens = patch tokens.

Two image recipes:

* ``dinov2`` (ShareLock's backbone, ViT-B/14): the preprocessing of ShareLock's official feature
  extraction, torchvision's ``Resize(256)`` (its default *bilinear* interpolation, antialiased)
  -> ``CenterCrop(224)`` -> ImageNet mean/std, fixed for the alias whatever processor config the
  weights ship with;
* ``dinov2-small/base/large/giant``: the image processor saved with the weights (the hub repos'
  BitImageProcessor: shortest edge 256 *bicubic*, crop 224), else the same numbers bicubic.
"""

from __future__ import annotations

import torch

from featstore.pipelines.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

from .base import Backbone, BackboneConfig, LoadOptions, Source
from .vit import build_vit_like

SHARELOCK_PREPROCESS = Preprocess(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")
DEFAULT_PREPROCESS = Preprocess(resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bicubic")


def build(src: Source, opt: LoadOptions, dev: torch.device) -> Backbone:
    return build_vit_like(src, opt, dev, recipe="dinov2", default_preprocess=DEFAULT_PREPROCESS, default_pooling="cls")


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
