"""The registry: alias -> `BackboneConfig`, recipe name -> factory, collected from the family
modules (each keeps its aliases and recipes beside its factory).  Adding a family is one module
with ``RECIPES`` and ``ALIASES`` and one line in `FAMILIES`."""

from __future__ import annotations

from typing import Callable

import torch

from . import clip, dinov2, efficientnet, eva_clip, siglip, text, vit
from .base import Backbone, BackboneConfig, LoadOptions, Source

Factory = Callable[[Source, LoadOptions, torch.device], Backbone]

FAMILIES = (dinov2, clip, siglip, efficientnet, text, vit, eva_clip)
RECIPES: dict[str, Factory] = {name: f for family in FAMILIES for name, f in family.RECIPES.items()}
REGISTRY: dict[str, BackboneConfig] = {c.alias: c for family in FAMILIES for c in family.ALIASES}


def list_backbones() -> list[str]:
    """The registry's aliases, sorted."""
    return sorted(REGISTRY)


def describe_registry() -> list[dict]:
    """One JSON-able row per alias: what `featstore backbones` lists."""
    rows = []
    for alias in list_backbones():
        c = REGISTRY[alias]
        if c.preprocess is not None:
            pre = c.preprocess.identity()
        elif c.modality == "image":
            pre = "the image processor saved with the weights (preprocessor_config.json)"
        else:
            pre = None
        rows.append({"alias": alias, "source": c.source, "modality": c.modality, "dim": c.dim, "recipe": c.recipe,
                     "preprocess": pre, "description": c.description})
    return rows


def format_registry(rows: list[dict]) -> str:
    """`describe_registry()` as the table `featstore backbones` prints."""
    head = ("alias", "modality", "dim", "source", "recipe / preprocessing")
    lines = []
    for r in rows:
        pre = r["preprocess"]
        if isinstance(pre, dict):
            how = "squash to" if pre["resize_mode"] == "squash" else "shorter side"
            pre = (f"{how} {pre['resize']} {pre['interpolation']}, center crop {pre['crop']}, "
                   f"mean {_short(pre['mean'])} std {_short(pre['std'])}")
        elif pre:
            pre = "preprocessor_config.json of the weights"
        recipe = f"{r['recipe']}: {pre or r['description']}"
        lines.append((r["alias"], r["modality"], str(r["dim"]), r["source"], recipe))
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join(fmt.format(*row) for row in [head, *lines])


def _short(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def _check() -> None:
    missing = sorted({c.recipe for c in REGISTRY.values()} - set(RECIPES))
    if missing:  # a programming error in a family module, caught at import
        raise RuntimeError(f"registry entries name unknown recipes: {missing}")


_check()
