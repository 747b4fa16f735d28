"""CLIP (Radford et al., 2021), either tower of a full CLIPModel checkpoint or a single tower.

* image (``clip-vision``): pooled = ``image_embeds`` (the joint space); tokens = the patch tokens
  through ``post_layernorm`` and ``visual_projection`` (the joint space too) unless
  ``token_projection=False`` or a ``layer`` is asked for (then raw hidden states).
* text (``clip-text``): pooled = ``text_embeds``.
"""

from __future__ import annotations

import torch

from featstore.pipelines.preprocess import CLIP_MEAN, CLIP_STD, Preprocess

from .base import Backbone, BackboneConfig, ImageBackbone, LoadOptions, Source
from .common import is_dual, load_model, make_identity, normalize_layer, pooling_choice, preprocess_for, run_image_model
from .text import build_text


def build_vision(src: Source, opt: LoadOptions, dev: torch.device) -> Backbone:
    from transformers import CLIPVisionModelWithProjection

    config = src.config
    tower = config
    if is_dual(config):
        tower = config.vision_config
        tower.projection_dim = config.projection_dim
    pre = preprocess_for(src, Preprocess(tower.image_size, tower.image_size, CLIP_MEAN, CLIP_STD, "bicubic"))
    model = load_model(CLIPVisionModelWithProjection, src, opt, dev, config=tower if tower is not config else None)
    layer = normalize_layer(opt.layer, tower, src)
    pooling = pooling_choice(opt, "pooler", ["pooler", "cls", "mean"], src)
    project_tokens = opt.token_projection and layer is None
    hidden_name = "last_hidden_state" if layer is None else f"hidden_states[{layer}]"

    def forward(model, x, want_tokens):
        out = run_image_model(model, x, layer)
        hidden = out.last_hidden_state if layer is None else out.hidden_states[layer]
        patches = hidden[:, 1:]
        if pooling == "pooler":
            pooled = out.image_embeds
        elif pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = patches.float().mean(1)
        tokens = None
        if want_tokens:
            tokens = patches
            if project_tokens:
                tokens = model.visual_projection(model.vision_model.post_layernorm(patches))
        return pooled, tokens

    if project_tokens:
        token_desc = "visual_projection(post_layernorm(last_hidden_state[:, 1:])) (joint space)"
    else:
        token_desc = f"{hidden_name}[:, 1:] raw"
    identity = make_identity(
        src, opt, recipe="clip-vision", architecture=type(model).__name__, modality="image", pooling=pooling,
        pooled={"pooler": "image_embeds", "cls": f"{hidden_name}[:, 0] raw",
                "mean": f"mean of {hidden_name}[:, 1:] raw"}[pooling],
        layer=layer, model=model, tokens=token_desc, preprocess=pre,
    )
    if not opt.token_projection:  # the trunk's own width (UTA-B's 1024-d ViT-L/14 targets); re-loads keep it
        identity["token_projection"] = False
    return ImageBackbone(name=src.name, identity=identity, model=model, forward=forward, preprocess=pre,
                         device=dev, precision=opt.precision, tokens=opt.tokens)


def build_text_tower(src: Source, opt: LoadOptions, dev: torch.device) -> Backbone:
    return build_text(src, opt, dev, recipe="clip-text")


RECIPES = {"clip-vision": build_vision, "clip-text": build_text_tower}
ALIASES = [
    BackboneConfig("clip-vit-b16", "openai/clip-vit-base-patch16", "clip-vision", "image", 512, "CLIP ViT-B/16 image_embeds"),
    BackboneConfig("clip-vit-l14", "openai/clip-vit-large-patch14", "clip-vision", "image", 768, "CLIP ViT-L/14 image_embeds"),
    BackboneConfig("clip-text-b16", "openai/clip-vit-base-patch16", "clip-text", "text", 512, "CLIP ViT-B/16 text_embeds"),
    BackboneConfig("clip-text-l14", "openai/clip-vit-large-patch14", "clip-text", "text", 768, "CLIP ViT-L/14 text_embeds"),
]
