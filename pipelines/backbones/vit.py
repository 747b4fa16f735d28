"""Transformer vision models from transformers (ViT-like: a sequence of prefix + patch tokens).

The shared factory behind DINOv2, SigLIP's vision tower and any transformers vision model given
by path (recipe ``image``): tokens are the patch tokens (CLS and register tokens dropped); the
pooled output is the CLS token, the mean of the patch tokens, or the model's own pooler.
"""

from __future__ import annotations

import torch

from .base import Backbone, ImageBackbone, LoadOptions, Source
from .common import (as_tokens, load_model, make_identity, model_class, normalize_layer, pooling_choice,
                     preprocess_for, run_image_model)


def build_vit_like(src: Source, opt: LoadOptions, dev: torch.device, *, recipe: str, tower=None, model_cls=None,
                   default_preprocess=None, default_pooling: str | None = None) -> Backbone:
    tower = tower if tower is not None else src.config
    model_cls = model_cls or model_class(tower)
    pre = preprocess_for(src, default_preprocess)
    model = load_model(model_cls, src, opt, dev, config=tower if tower is not src.config else None)
    layer = normalize_layer(opt.layer, tower, src)
    patch = getattr(tower, "patch_size", None)
    n_patches = (pre.crop // patch) ** 2 if isinstance(patch, int) and patch > 0 else None

    # one raw forward to learn the token layout (prefix tokens: CLS + registers)
    with torch.inference_mode():
        out = run_image_model(model, torch.zeros(1, 3, pre.crop, pre.crop, device=dev), layer)
    seq = as_tokens(out.last_hidden_state).shape[1]
    n_prefix = seq - n_patches if n_patches is not None and seq >= n_patches else 0
    has_pooler = getattr(out, "pooler_output", None) is not None

    default = default_pooling or ("cls" if n_prefix >= 1 else "pooler" if has_pooler else "mean")
    allowed = ["cls", "mean"] + (["pooler"] if has_pooler else [])
    if n_prefix < 1:
        allowed.remove("cls")
    pooling = pooling_choice(opt, default, allowed, src)

    hidden_name = "last_hidden_state" if layer is None else f"hidden_states[{layer}]"
    pooled_desc = {
        "cls": f"{hidden_name}[:, 0]",
        "mean": f"mean of {hidden_name} patch tokens",
        "pooler": "pooler_output",
    }[pooling]

    def forward(model, x, want_tokens):
        out = run_image_model(model, x, layer)
        hidden = as_tokens(out.last_hidden_state if layer is None else out.hidden_states[layer])
        patches = hidden[:, n_prefix:]
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "mean":
            pooled = patches.float().mean(1)
        else:
            pooled = out.pooler_output.flatten(1)
        return pooled, (patches if want_tokens else None)

    identity = make_identity(
        src, opt, recipe=recipe, architecture=type(model).__name__, modality="image", pooling=pooling,
        pooled=pooled_desc, layer=layer, model=model,
        tokens=f"{hidden_name}[:, {n_prefix}:] (patch tokens; {n_prefix} prefix tokens dropped)",
        preprocess=pre,
    )
    return ImageBackbone(name=src.name, identity=identity, model=model, forward=forward, preprocess=pre,
                         device=dev, precision=opt.precision, tokens=opt.tokens)


def build_image(src: Source, opt: LoadOptions, dev: torch.device) -> Backbone:
    """Any transformers vision model by path: its own processor config, CLS when it has one."""
    return build_vit_like(src, opt, dev, recipe="image")


RECIPES = {"image": build_image}
ALIASES: list = []  # paths only: the recipe is picked from the model's config
