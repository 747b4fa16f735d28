"""SigLIP's vision tower (Zhai et al., 2023): the attention-pool head's output; every token is a
patch (no CLS).  Its processor squashes the image to a square (no crop)."""

from __future__ import annotations

import torch

from featstore.pipelines.preprocess import Preprocess

from .base import Backbone, BackboneConfig, LoadOptions, Source
from .common import is_dual
from .vit import build_vit_like


def build(src: Source, opt: LoadOptions, dev: torch.device) -> Backbone:
    from transformers import SiglipVisionModel

    tower = src.config.vision_config if is_dual(src.config) else src.config
    size = int(tower.image_size)
    default = Preprocess(size, size, (0.5,) * 3, (0.5,) * 3, "bicubic", resize_mode="squash")
    return build_vit_like(src, opt, dev, recipe="siglip-vision", tower=tower, model_cls=SiglipVisionModel,
                          default_preprocess=default, default_pooling="pooler")


RECIPES = {"siglip-vision": build}
ALIASES = [
    BackboneConfig("siglip", "google/siglip-base-patch16-224", "siglip-vision", "image", 768, "SigLIP B/16 pooler_output"),
]
