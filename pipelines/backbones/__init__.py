"""Frozen backbones behind one small interface, and the registry that names them.

``load_backbone(name_or_path)`` accepts a registry alias (``dinov2``, ``dinov2-small``,
``clip-vit-b16``, ``minilm``, ``llama3-8b``, ...), a Hugging Face hub id, or a local directory
saved with ``save_pretrained``; every result is a `Backbone` (`base.py`) whose ``identity`` is a
JSON-able dict saying exactly what produced its features (it becomes the feature set's attrs).

Layout (timm style): each family module (`dinov2`, `clip`, `siglip`, `efficientnet`, `text`,
`vit`) holds its factories (``RECIPES``: recipe name -> factory) and its aliases (``ALIASES``:
`BackboneConfig` entries with the recipe, weights source, width and any fixed preprocessing)
side by side; `registry.py` collects them.  Local paths and hub ids pick their recipe from their
config (`resolve.py`).

* ``pooling``: ``cls`` / ``mean`` / ``last`` are computed from the selected hidden state (the final
  output, or ``hidden_states[layer]`` when ``layer`` is given, which is raw: before any final
  norm); ``pooler`` is the model's own pooled output (CLIP's projected embeds, SigLIP's
  attention-pool head, BERT-style ``pooler_output``), always from the final layer.
"""

from .base import PRECISIONS, Backbone, BackboneConfig, ImageBackbone, LoadOptions, TextBackbone
from .common import IDENTITY_VERSION
from .load import load_backbone
from .registry import RECIPES, REGISTRY, describe_registry, format_registry, list_backbones

__all__ = [
    "Backbone", "BackboneConfig", "IDENTITY_VERSION", "ImageBackbone", "LoadOptions", "PRECISIONS", "RECIPES",
    "REGISTRY", "TextBackbone", "describe_registry", "format_registry", "list_backbones", "load_backbone",
]
