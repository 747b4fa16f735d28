"""`load_backbone`: a registry alias, a hub id or a local directory -> a ready `Backbone`."""

from __future__ import annotations

import os
from pathlib import Path

from featstore.device import resolve_device
from featstore.errors import BackboneError, ConfigError

from .base import PRECISIONS, Backbone, LoadOptions
from .registry import RECIPES, REGISTRY, list_backbones
from .resolve import clean_name, download, looks_like_hub_id, recipe_for, resolve_alias, resolve_path


def load_backbone(
    name_or_path: str,
    *,
    pooling: str | None = None,
    layer: int | None = None,
    tokens: bool = False,
    token_projection: bool = True,
    device: str = "cpu",
    precision: str = "fp32",
    trust_remote_code: bool = False,
    max_length: int | None = None,
    modality: str | None = None,
    prefix: str = "",
) -> Backbone:
    """Build a frozen backbone from a registry alias, a hub id or a local directory.

    ``modality`` picks the tower of a two-tower checkpoint (a full CLIP: "image" or "text");
    ``prefix`` is prepended to every text. Raises `BackboneError` / `ConfigError` with one line.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if modality not in (None, "image", "text"):
        raise ConfigError(f"unknown modality {modality!r}; use image or text")
    if layer is not None and not isinstance(layer, int):
        raise ConfigError(f"layer must be an integer, got {layer!r}")
    if max_length is not None and int(max_length) < 1:
        raise ConfigError(f"max_length must be >= 1, got {max_length}")
    opt = LoadOptions(pooling, layer, bool(tokens), bool(token_projection), device, precision,
                      bool(trust_remote_code), max_length, modality, prefix or "")
    dev = resolve_device(device)

    name = str(name_or_path)
    entry = REGISTRY.get(name)
    if entry is not None:
        if modality and modality != entry.modality:
            raise ConfigError(f"backbone {name} is {'an' if entry.modality == 'image' else 'a'} {entry.modality} "
                              f"backbone, not {'an' if modality == 'image' else 'a'} {modality} backbone")
        src = resolve_alias(entry, opt)
        recipe = entry.recipe
    elif os.path.exists(os.path.expanduser(name)):
        src = resolve_path(Path(os.path.expanduser(name)), opt)
        recipe = recipe_for(src, opt)
    elif looks_like_hub_id(name):
        local = download(name, label=name)
        src = resolve_path(local, opt, model=name, name=clean_name(name.split("/")[-1]))
        recipe = recipe_for(src, opt)
    else:
        raise BackboneError(
            f"unknown backbone {name!r}: not a registered alias ({', '.join(list_backbones())}), "
            "a local directory, or a hub id (org/name)"
        )
    bb = RECIPES[recipe](src, opt, dev)
    if not opt.token_projection and bb.identity.get("token_projection") is not False:
        raise ConfigError(f"backbone {name}: token_projection=False (--no-token-projection) applies only to CLIP and "
                          "EVA-CLIP image towers, whose tokens are otherwise projected into the joint space")
    return bb


