"""EVA-CLIP (Sun et al., 2023): EVA-02's ViT as CLIP's image tower, with open_clip's text tower.

UTA's teachers.  Both towers of one checkpoint, each a recipe:

* ``eva-clip-vision``: pooled = the projected image embedding, ``head(norm(x)[:, 0])`` (open_clip's
  / EVA's ``encode_image``, the joint space); tokens = the same final norm and ``head`` applied to
  each patch token, ``head(norm(x)[:, 1:])`` (joint space too), unless ``token_projection=False``
  (``norm(x)[:, 1:]``) or a ``layer`` is asked for (then raw hidden states, 0 = the embeddings).
  Pooling ``cls`` / ``mean``: the final-normed (or raw, with ``layer``) CLS / mean of patches.
  The ViT is `eva02.EVA02ViT` (sub-LN attention and SwiGLU, 2D RoPE interpolated from a 16x16
  pre-training grid) plus ``head``, ``Linear(width, embed_dim)``.
* ``eva-clip-text``: pooled = ``encode_text``: open_clip's causal text transformer (GELU, not
  QuickGELU, for every EVA02-CLIP config), final LayerNorm at the EOT token, ``@ text_projection``;
  run as transformers' ``CLIPTextModelWithProjection`` (the same maths; tests/test_eva_clip.py
  checks it against a transcription of open_clip's), tokenised by CLIP's BPE (``CLIPTokenizer``).

A local EVA-CLIP directory is open_clip's hub layout (what ``open_clip.push_to_hf_hub`` writes, and
what the ``timm/eva02_*_clip_*`` hub repos hold)::

    open_clip_config.json   {"model_cfg": <model config>, "preprocess_cfg": {"mean", "std", ...}}
                            (or the bare model config); the model config is open_clip's
                            (model_configs/EVA02-B-16.json: vision_cfg.timm_model_name) or
                            EVA-CLIP's own (EVA02-CLIP-B-16.json: vision_cfg.eva_model_name + sizes)
    open_clip_model.safetensors | open_clip_pytorch_model.bin | one other *.safetensors/.pt/.bin
                            open_clip's (``visual.trunk.*``) or EVA's (``visual.blocks.*``) keys
    tokenizer.json / vocab.json + merges.txt + tokenizer_config.json   CLIP's tokenizer (text only)

``load_backbone(dir)`` reads it (``modality="text"`` for the text tower); the aliases fetch the
hub repos through the project's hub handling (offline: one line saying to pass a local path).
Key-mapping rules and the strict checks: `eva_clip_weights.py`.  Preprocessing: resize the
shorter side to the input size (bicubic), center crop, OpenAI CLIP mean/std (``preprocess_cfg``
may override mean/std/interpolation).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from featstore.errors import BackboneError, ConfigError
from featstore.pipelines.preprocess import CLIP_MEAN, CLIP_STD, Preprocess

from .base import Backbone, BackboneConfig, ImageBackbone, LoadOptions, Source, TextBackbone
from .common import (TOKENIZER_FILES, fingerprint, load_tokenizer, make_identity, normalize_layer, pooling_choice,
                     preprocess_for, quiet_transformers)
from featstore.models.eva02 import EVA02ViT
from .eva_clip_weights import (SPEC_FILE, EvaClipSpec, TextSpec, VisionSpec, layout, load_strict, map_text, map_vision,
                               read_checkpoint, weights_file)


class EvaClipVision(nn.Module):
    """EVA-CLIP's image tower: ``vit`` (EVA02ViT, final norm included) and ``head`` (to the joint space)."""

    def __init__(self, spec: VisionSpec, embed_dim: int):
        super().__init__()
        self.vit = EVA02ViT(image_size=spec.image_size, patch_size=spec.patch_size, width=spec.width, depth=spec.layers,
                            heads=spec.heads, mlp_dim=spec.mlp_dim, mlp=spec.mlp, mlp_sub_ln=spec.sub_ln,
                            attn_sub_ln=spec.sub_ln, qv_bias=spec.qv_bias, rope=spec.rope, pt_grid=spec.pt_grid,
                            layer_scale=spec.layer_scale)
        self.head = nn.Linear(spec.width, embed_dim)

    def run(self, x: torch.Tensor, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(final-normed hidden states (B, 1 + N, W), raw hidden_states[layer] or None), one pass."""
        vit = self.vit
        if layer is None:
            return vit(x), None
        e = vit.embed(x)
        cls = vit.cls_token.expand(len(e), -1, -1)
        if vit.pos_embed is not None:
            cls = cls + vit.pos_embed[:, :1]
        h = torch.cat([cls, e], dim=1)
        kept = h if layer == 0 else None
        for i, block in enumerate(vit.blocks, start=1):
            h = block(h, vit.rope)
            if i == layer:
                kept = h
        return vit.norm(h), kept

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """open_clip's encode_image: head(norm(x)[:, 0])."""
        return self.head(self.vit(x)[:, 0])


def text_config(spec: EvaClipSpec, tokenizer):
    from transformers import CLIPTextConfig

    t: TextSpec = spec.text
    return CLIPTextConfig(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                          num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                          hidden_act=t.act, layer_norm_eps=t.ln_eps, projection_dim=spec.embed_dim,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def _checkpoint(src: Source) -> tuple[EvaClipSpec, object, dict, str]:
    spec = src.config
    if not isinstance(spec, EvaClipSpec):
        raise BackboneError(f"backbone {src.name}: {src.local_dir} has no {SPEC_FILE}; it is not an EVA-CLIP directory")
    file = weights_file(src.local_dir, src.name)
    sd = read_checkpoint(file, src.name)
    kind = layout(sd)
    if kind == "none":
        raise BackboneError(f"backbone {src.name}: {file.name} has no visual.* keys; it is not an open_clip or "
                            "EVA-CLIP checkpoint")
    return spec, file, sd, kind


def _check_rope(rope: dict, model: EvaClipVision, spec: VisionSpec, src: Source, file) -> None:
    """EVA saves its rotary tables: they must be the ones the config's grid and pt_hw_seq_len give."""
    for key, saved in rope.items():
        table = None if model.vit.rope is None else (model.vit.rope.cos if key.endswith("cos") else model.vit.rope.sin)
        if table is None or saved.shape != table.shape or not torch.allclose(saved.float(), table, atol=2e-3):
            raise BackboneError(f"backbone {src.name}: the rotary table {key} in {file.name} is not the one of a "
                                f"{spec.grid}x{spec.grid} grid interpolated from pt_hw_seq_len {spec.pt_grid}: "
                                f"{SPEC_FILE} does not describe this checkpoint")


def _identity_extra(spec: EvaClipSpec, file, sd: dict, kind: str) -> dict:
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in sd.values()})
    return {"eva_clip": {"config": spec.name, "embed_dim": spec.embed_dim, "checkpoint": file.name,
                         "checkpoint_layout": kind, "checkpoint_dtype": ",".join(dtypes)}}


def build_vision(src: Source, opt: LoadOptions, dev: torch.device) -> Backbone:
    spec, file, sd, kind = _checkpoint(src)
    model = EvaClipVision(spec.vision, spec.embed_dim).eval()
    mapped, origin, rope = map_vision(sd, spec.vision)
    text, text_origin = map_text(sd)
    stray = {k: v for k, v in text.items() if k.startswith("?")}  # keys no rule of either tower claims
    load_strict(model, {**mapped, **stray}, {**origin, **text_origin}, label=src.name, file=file, tower="vision")
    _check_rope(rope, model, spec.vision, src, file)
    model = model.requires_grad_(False).to(dev)
    pre = preprocess_for(src, spec.preprocess)
    if pre.crop != spec.vision.image_size:
        raise ConfigError(f"backbone {src.name}: its input is {spec.vision.image_size} px; a {pre.crop} px crop does not fit")
    layer = normalize_layer(opt.layer, SimpleNamespace(num_hidden_layers=spec.vision.layers), src)
    pooling = pooling_choice(opt, "pooler", ["pooler", "cls", "mean"], src)
    project_tokens = opt.token_projection and layer is None

    def forward(model, x, want_tokens):
        normed, raw = model.run(x, layer)
        hidden = normed if raw is None else raw
        if pooling == "pooler":
            pooled = model.head(normed[:, 0])
        elif pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = hidden[:, 1:].float().mean(1)
        tokens = None
        if want_tokens:
            tokens = model.head(normed[:, 1:]) if project_tokens else hidden[:, 1:]
        return pooled, tokens

    hidden_name = "norm(x)" if layer is None else f"hidden_states[{layer}] raw"
    token_desc = ("head(norm(x)[:, 1:]) (joint space)" if project_tokens else f"{hidden_name}[:, 1:]")
    identity = make_identity(
        src, opt, recipe="eva-clip-vision", architecture="EvaClipVision", modality="image", pooling=pooling,
        pooled={"pooler": "head(norm(x)[:, 0]) (open_clip encode_image, joint space)", "cls": f"{hidden_name}[:, 0]",
                "mean": f"mean of {hidden_name}[:, 1:]"}[pooling],
        layer=layer, model=model, tokens=token_desc, preprocess=pre,
    )
    if not opt.token_projection:  # the trunk's own width (UTA-B's 1024-d ViT-L/14 targets); re-loads keep it
        identity["token_projection"] = False
    identity.update(_identity_extra(spec, file, sd, kind))
    return ImageBackbone(name=src.name, identity=identity, model=model, forward=forward, preprocess=pre,
                         device=dev, precision=opt.precision, tokens=opt.tokens)


def build_text(src: Source, opt: LoadOptions, dev: torch.device) -> Backbone:
    from transformers import CLIPTextModelWithProjection

    if opt.tokens:
        raise ConfigError(f"backbone {src.name}: token outputs are for image backbones; drop --tokens")
    if opt.layer is not None:
        raise ConfigError(f"backbone {src.name}: --layer is not available for the EVA-CLIP text tower")
    pooling = pooling_choice(opt, "pooler", ["pooler"], src)
    spec, file, sd, kind = _checkpoint(src)
    if not any((src.local_dir / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise BackboneError(f"backbone {src.name}: {src.local_dir} has no CLIP tokenizer (tokenizer.json, or vocab.json "
                            "+ merges.txt); save one beside the weights (CLIPTokenizer.save_pretrained)")
    tokenizer = load_tokenizer(src, opt)
    if tokenizer.eos_token_id is None or len(tokenizer) > spec.text.vocab_size:
        raise BackboneError(f"backbone {src.name}: its tokenizer ({len(tokenizer)} tokens, eos {tokenizer.eos_token}) "
                            f"does not fit the text tower (vocab_size {spec.text.vocab_size}, EOT pooling)")
    with quiet_transformers():
        model = CLIPTextModelWithProjection(text_config(spec, tokenizer)).eval()
    mapped, origin = map_text(sd)
    with torch.device("meta"):  # the vision tower's names only: a key neither tower takes is refused
        vision_names = set(EvaClipVision(spec.vision, spec.embed_dim).state_dict())
    vmapped, vorigin, _ = map_vision(sd, spec.vision)
    stray = {k: v for k, v in vmapped.items() if k not in vision_names}
    load_strict(model, {**mapped, **stray}, {**origin, **vorigin}, label=src.name, file=file, tower="text")
    model = model.requires_grad_(False).to(dev)
    max_length = min(int(opt.max_length or spec.text.context_length), spec.text.context_length)

    def pool(out, hidden, mask):
        return out.text_embeds

    identity = make_identity(src, opt, recipe="eva-clip-text", architecture=type(model).__name__, modality="text",
                             pooling=pooling, pooled="text_embeds (open_clip encode_text: ln_final at EOT @ "
                             "text_projection)", layer=None, model=model, tokens=None)
    identity.update(
        tokenizer=type(tokenizer).__name__,
        tokenizer_hash=fingerprint([src.local_dir / f for f in TOKENIZER_FILES if (src.local_dir / f).is_file()]),
        vocab_size=len(tokenizer), max_length=max_length, padding_side=tokenizer.padding_side,
        pad_token=tokenizer.pad_token, prefix=opt.prefix, normalized=False, hidden_act=spec.text.act,
    )
    identity.update(_identity_extra(spec, file, sd, kind))
    return TextBackbone(name=src.name, identity=identity, model=model, tokenizer=tokenizer, pool=pool, layer=None,
                        max_length=max_length, prefix=opt.prefix, device=dev, precision=opt.precision,
                        dim=spec.embed_dim)


_224 = Preprocess(224, 224, CLIP_MEAN, CLIP_STD, "bicubic")
_336 = Preprocess(336, 336, CLIP_MEAN, CLIP_STD, "bicubic")
_HUB = {"b16": "timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k",  # open_clip EVA02-B-16 merged2b_s8b_b131k
        "l14": "timm/eva02_large_patch14_clip_224.merged2b_s4b_b131k",  # EVA02-L-14 merged2b_s4b_b131k
        "l14-336": "timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k"}  # EVA02-L-14-336 merged2b_s6b_b61k
RECIPES = {"eva-clip-vision": build_vision, "eva-clip-text": build_text}
ALIASES = [
    BackboneConfig("eva02-clip-b16", _HUB["b16"], "eva-clip-vision", "image", 512,
                   "EVA02-CLIP-B/16 image embedding head(norm(x)[:, 0])", preprocess=_224),
    BackboneConfig("eva02-clip-l14", _HUB["l14"], "eva-clip-vision", "image", 768,
                   "EVA02-CLIP-L/14 image embedding head(norm(x)[:, 0])", preprocess=_224),
    BackboneConfig("eva02-clip-l14-336", _HUB["l14-336"], "eva-clip-vision", "image", 768,
                   "EVA02-CLIP-L/14 at 336 px, image embedding head(norm(x)[:, 0])", preprocess=_336),
    BackboneConfig("eva02-clip-text-b16", _HUB["b16"], "eva-clip-text", "text", 512, "EVA02-CLIP-B/16 text embedding"),
    BackboneConfig("eva02-clip-text-l14", _HUB["l14"], "eva-clip-text", "text", 768, "EVA02-CLIP-L/14 text embedding"),
]
