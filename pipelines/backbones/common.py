"""What the factories share: loading transformers weights and tokenizers quietly and strictly,
the option checks (pooling, layer), and the identity record.

* weights are loaded in float32 and run under autocast at ``precision``; decoder LLMs are the
  exception (their factory asks for bf16/fp16 weights: an 8B model in fp32 is 32 GB).
  ``identity["dtype"]`` records the weights' dtype.
* ``weights_hash``: sha256 over each weight file's (name, size, first MiB, last MiB): fast on
  multi-GB checkpoints, and it changes with any re-trained or re-saved weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from featstore.errors import BackboneError, ConfigError, one_line
from featstore.pipelines.preprocess import Preprocess

from .base import LoadOptions, Source

IDENTITY_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json",
)
MAX_TEXT_LENGTH = 512  # default cap on max_length when the tokenizer/config allow more
_MIB = 1 << 20


# ---- option checks --------------------------------------------------------------------------
def pooling_choice(opt: LoadOptions, default: str, allowed: list[str], src: Source) -> str:
    pooling = opt.pooling or default
    if pooling not in allowed:
        raise ConfigError(f"backbone {src.name}: pooling {pooling!r} is not available; use one of {', '.join(allowed)}")
    return pooling


def normalize_layer(layer: int | None, config, src: Source) -> int | None:
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


# ---- transformers configs, weights, tokenizers -----------------------------------------------
def is_dual(config) -> bool:
    return getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None


def architecture(config) -> str | None:
    archs = getattr(config, "architectures", None) or []
    return archs[0] if archs else None


def model_class(config):
    """The architecture the config names when it is a base model class (no task head), else AutoModel."""
    import transformers

    arch = architecture(config)
    if arch and "For" not in arch and "LMHead" not in arch and hasattr(transformers, arch):
        return getattr(transformers, arch)
    return transformers.AutoModel


@contextlib.contextmanager
def quiet_transformers():
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


def load_model(model_cls, src: Source, opt: LoadOptions, dev: torch.device, *, config=None, dtype=torch.float32):
    """`model_cls.from_pretrained(src.local_dir)`, offline, refusing any missing or mismatched weight."""
    kwargs = dict(local_files_only=True, dtype=dtype, output_loading_info=True)
    if config is not None:
        kwargs["config"] = config
    if opt.trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        with quiet_transformers():
            model, info = model_cls.from_pretrained(src.local_dir, **kwargs)
    except Exception as e:
        text = one_line(e)
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


def load_tokenizer(src: Source, opt: LoadOptions):
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(src.local_dir, local_files_only=True,
                                                 trust_remote_code=opt.trust_remote_code)
    except Exception as e:
        raise BackboneError(f"backbone {src.name}: cannot load a tokenizer from {src.local_dir} ({one_line(e)}); "
                            "save the tokenizer beside the model (tokenizer.save_pretrained)") from None


def default_max_length(src: Source, tokenizer, config) -> int:
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


# ---- images --------------------------------------------------------------------------------
def preprocess_for(src: Source, default: Preprocess | None) -> Preprocess:
    """The image recipe: a registry entry's fixed one, else the image processor config saved with
    the model, else the family's published `default`."""
    if src.preprocess is not None:
        return src.preprocess
    path = src.local_dir / "preprocessor_config.json"
    if path.is_file():
        try:
            return Preprocess.from_hf(path)
        except ConfigError as e:
            raise BackboneError(f"backbone {src.name}: {e}") from None
    if default is not None:
        return default
    raise BackboneError(f"backbone {src.name}: {src.local_dir} has no preprocessor_config.json; save the model's "
                        "image processor beside it (processor.save_pretrained)")


def run_image_model(model, x, layer):
    if layer is None:
        return model(pixel_values=x)
    return model(pixel_values=x, output_hidden_states=True)


def as_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, D) as is; a CNN's (B, C, H, W) map as (B, H*W, C)."""
    if hidden.ndim == 4:
        return hidden.flatten(2).transpose(1, 2)
    return hidden


# ---- identity --------------------------------------------------------------------------------
def weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def fingerprint(files: list[Path]) -> str | None:
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


def make_identity(src: Source, opt: LoadOptions, *, recipe, architecture, modality, pooling, pooled, layer, model,
                  tokens, preprocess: Preprocess | None = None, weight_files_=None) -> dict:
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    ident = {
        "backbone_identity": IDENTITY_VERSION,
        "recipe": recipe,
        "alias": src.alias,
        "model": src.model,
        "revision": src.revision,
        "weights_hash": fingerprint(weight_files_ or weight_files(src.local_dir)),
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


def package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = package.replace("_", "-")
    try:
        return f"{dist}=={version(dist)}"
    except PackageNotFoundError:
        return dist
