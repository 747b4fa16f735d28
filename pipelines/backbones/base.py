"""The `Backbone` interface every factory returns, and the small records factories are given.

* image: ``encode_images(uint8 (B, 3, S, S)) -> {"pooled": (B, dim)[, "tokens": (B, T, D)]}``
* text: ``encode_texts(list[str]) -> {"pooled": (B, dim)}`` and ``text_lengths(list[str])``

Outputs are float32 on the CPU; ``identity`` says exactly what produced them.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from featstore.errors import BackboneError, ConfigError, one_line
from featstore.pipelines.preprocess import Preprocess

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BackboneConfig:
    """One registry entry: an alias, where its weights come from, and the recipe that builds it.

    ``preprocess`` fixes the image recipe for this alias (else the model's own processor config,
    else its family's default); ``dim`` is the pooled width of the real weights (for listings).
    Weights shipped in a pip package (``source="package:<module>"``) are found by ``locate(module)``
    and named ``model`` in the identity."""

    alias: str
    source: str  # hub id, or "package:<python module>" for weights shipped in a pip package
    recipe: str
    modality: str
    dim: int
    description: str = ""
    preprocess: Preprocess | None = None
    model: str | None = None  # identity["model"] when it is not `source`
    locate: Callable[[Any], str] | None = None  # package sources: module -> path of the weights
    pooled_dtype: str | None = None  # the recipe's storage dtype of the pooled features (None: float16)


@dataclass(frozen=True)
class LoadOptions:
    """What the caller of `load_backbone` asked for (every factory gets the same record)."""

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
class Source:
    """A resolved backbone: where its files are and what they are."""

    name: str  # default feature-set name
    model: str  # hub id, absolute path or package id (identity["model"])
    local_dir: Path
    alias: str | None = None
    revision: str | None = None
    package: str | None = None
    config: Any = None  # transformers config, when the source has one
    preprocess: Preprocess | None = None  # a registry entry's fixed image recipe (else the model's own)


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
                                f"input failed ({one_line(e)})") from None
        self.tokens = tokens
        self.dim = int(probe["pooled"].shape[1])
        recipe_shape = tuple(int(s) for s in probe["tokens"].shape[1:])
        self.token_shape = recipe_shape if tokens else None
        # the identity describes the recipe for both outputs, whether or not tokens are stored
        self.identity = {**identity, "dim": self.dim, "token_shape": list(recipe_shape)}

    def encode_images(self, pixels, keep_on_device: bool = False) -> dict[str, torch.Tensor]:
        """uint8 (B, 3, S, S) -> {"pooled": float32 (B, dim)[, "tokens": float32 (B, T, D)]} on CPU (on the
        backbone's device with `keep_on_device`: a trainer running the teacher in its step)."""
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
            home = (lambda t: t.float().contiguous()) if keep_on_device else (lambda t: t.float().cpu().contiguous())
            out = {"pooled": home(pooled)}
            if self.tokens:
                out["tokens"] = home(tokens)
        return out


# model types whose linears are only ever called as nn.Linear under autocast (checked in transformers'
# modeling code): their weights can be cast once.  Others keep autocast's per-call casts.
CAST_ONCE_MODEL_TYPES = frozenset({"bert", "mpnet", "roberta", "xlm-roberta", "distilbert", "clip", "clip_text_model",
                                   "siglip", "siglip_text_model"})


def cast_linear_weights(model: torch.nn.Module, dtype, device) -> int:
    """Store the float32 weights and biases of `model`'s nn.Linear layers in `dtype` (bf16/fp16),
    on CPU only: CPU autocast casts every linear's weight on every call (the weights do not require
    grad, so autocast's cache never keeps them): with small batches (captions) those casts were
    ~40% of a forward pass.  Autocast would run these linears in `dtype` from the same
    round-to-nearest cast anyway, so the outputs are bit-identical; everything autocast keeps in
    float32 (layer norms, embeddings, softmax) is left as it is.  Returns the layers cast."""
    if dtype is None or torch.device(device).type != "cpu":
        return 0
    if getattr(getattr(model, "config", None), "model_type", None) not in CAST_ONCE_MODEL_TYPES:
        return 0  # models that read a linear's weight dtype themselves (T5 casts activations to it) keep fp32
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.float32:
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
            n += 1
    return n


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
        self._accepts = set(inspect.signature(model.forward).parameters)
        self.identity = {**identity, "dim": dim, "token_shape": None}
        cast_linear_weights(model, PRECISIONS[precision], device)

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
        return self.encode_tokenized(self.tokenize(texts))

    def tokenize(self, texts: list[str]):
        """The tokenizer's batch for `texts`, padded to its longest text (never to max_length):
        what `encode_tokenized` runs.  Extraction calls it on a worker thread, a batch ahead."""
        return self.tokenizer(
            self._texts(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    def encode_tokenized(self, enc) -> dict[str, torch.Tensor]:
        """A `tokenize` batch -> {"pooled": float32 (B, dim)} on CPU (the forward pass)."""
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
