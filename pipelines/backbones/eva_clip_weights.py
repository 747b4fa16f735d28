"""EVA-CLIP's directory format, its config, and its checkpoints mapped onto featstore's modules.

The format (`eva_clip.py` documents it for users): ``open_clip_config.json`` (open_clip's hub
file, ``{"model_cfg": ..., "preprocess_cfg": ...}``, or a bare model config) + one weights file
+ CLIP tokenizer files.  ``model_cfg`` is either open_clip's (``vision_cfg.timm_model_name``:
``eva02_base_patch16_clip_224`` ...) or EVA-CLIP's own (``vision_cfg.eva_model_name`` with the
sizes spelled out); `read_spec` turns both into one `EvaClipSpec`.

Checkpoint layouts (found from the keys, whatever the config's flavour):

* ``eva`` (baaivision/EVA, ``EVA02_CLIP_B_psz16_s8B.pt``): ``visual.<EVAVisionTransformer names>``;
  the names are the ones `eva02.EVA02ViT` uses, so ``visual.X -> vit.X`` and ``visual.head.* ->
  head.*``; the rotary tables EVA saves as buffers (``visual.rope.freqs_cos|sin`` and
  ``visual.blocks.{i}.attn.rope.freqs_cos|sin``) are checked against ours and dropped; a fused
  ``attn.qkv.weight`` is split into q, k, v.
* ``open_clip`` (timm trunk, ``open_clip_model.safetensors``): ``visual.trunk.<timm Eva names>``,
  renamed back to EVA's (the inverse of timm's ``checkpoint_filter_fn``): ``attn.q_proj.bias ->
  attn.q_bias``, ``attn.v_proj.bias -> attn.v_bias``, ``attn.norm -> attn.inner_attn_ln``,
  ``mlp.fc1_g -> mlp.w1``, ``mlp.fc1_x -> mlp.w2``, ``mlp.norm -> mlp.ffn_ln``, ``mlp.fc2 -> mlp.w3``
  (SwiGLU; a GELU MLP keeps ``fc1``/``fc2``); ``visual.trunk.head.* -> head.*``; timm's ``rope.*``
  buffers are dropped (timm's filter does the same).
* text, both layouts: open_clip's ``TextTransformer`` names, with or without a ``text.`` prefix
  (open_clip's CustomTextCLIP and EVA's CustomCLIP have it, open_clip's CLIP not), mapped onto
  transformers' ``CLIPTextModelWithProjection``: ``token_embedding -> embeddings.token_embedding``,
  ``positional_embedding -> embeddings.position_embedding.weight``, ``transformer.resblocks.{i}.``
  ``ln_1/ln_2 -> encoder.layers.{i}.layer_norm1/2``, ``attn.in_proj_weight|bias`` split in thirds
  into ``self_attn.q_proj/k_proj/v_proj``, ``attn.out_proj -> self_attn.out_proj``, ``mlp.c_fc/c_proj
  -> mlp.fc1/fc2``, ``ln_final -> final_layer_norm``, ``text_projection`` (W, E) transposed into
  ``text_projection.weight``; ``logit_scale`` (either place) is read and not used by a tower.

Any key no rule claims, a missing weight, or a shape that does not fit is refused with one line.
Weights are read safely only: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from featstore.errors import BackboneError, one_line
from featstore.pipelines.preprocess import CLIP_MEAN, CLIP_STD, Preprocess

SPEC_FILE = "open_clip_config.json"
CANONICAL_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# timm's EVA-CLIP trunks (timm/models/eva.py eva02_*_clip_*): qkv_fused=False, swiglu_mlp,
# scale_mlp, scale_attn_inner, use_rot_pos_emb, ref_feat_shape=(16, 16), mlp_ratio 4 * 2 / 3
TIMM_TRUNKS = {
    "eva02_base_patch16_clip_224": dict(image_size=224, patch_size=16, width=768, layers=12, heads=12),
    "eva02_large_patch14_clip_224": dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16),
    "eva02_large_patch14_clip_336": dict(image_size=336, patch_size=14, width=1024, layers=24, heads=16),
}


@dataclass(frozen=True)
class VisionSpec:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_dim: int
    mlp: str  # "swiglu" | "gelu"
    sub_ln: bool  # EVA's subln: inner_attn_ln and ffn_ln
    qv_bias: bool
    rope: bool
    pt_grid: int | None  # the grid the rotary positions are interpolated from (pt_hw_seq_len)
    layer_scale: float | None

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextSpec:
    context_length: int
    vocab_size: int
    width: int
    heads: int
    layers: int
    mlp_dim: int
    act: str  # transformers' hidden_act: "gelu" (EVA-CLIP) or "quick_gelu"
    ln_eps: float


@dataclass(frozen=True)
class EvaClipSpec:
    """One EVA-CLIP model: both towers' sizes, the joint width, and its image recipe."""

    name: str  # the vision config's timm_model_name / eva_model_name
    embed_dim: int
    vision: VisionSpec
    text: TextSpec
    preprocess: Preprocess
    recipe_family: str = "eva-clip"  # how resolve.py tells this from a transformers config

    def recipe(self, modality: str | None) -> str:
        return "eva-clip-text" if modality == "text" else "eva-clip-vision"


# ---- the config ------------------------------------------------------------------------------
def is_eva_clip_dir(path: Path) -> bool:
    return (Path(path) / SPEC_FILE).is_file()


def read_spec(path: Path) -> EvaClipSpec:
    """`EvaClipSpec` from ``<path>/open_clip_config.json``; one-line BackboneError if it is not EVA-CLIP."""
    file = Path(path) / SPEC_FILE
    try:
        raw = json.loads(file.read_text())
        cfg = raw.get("model_cfg", raw)
        vision, name = _vision_spec(dict(cfg["vision_cfg"]))
        text = _text_spec(dict(cfg["text_cfg"]), quick_gelu=bool(cfg.get("quick_gelu", False)))
        embed_dim = int(cfg["embed_dim"])
        pp = raw.get("preprocess_cfg") or {}
        mode = pp.get("resize_mode", "shortest")
        if mode not in ("shortest", "squash"):
            raise ValueError(f"preprocess_cfg resize_mode {mode!r} is not supported (shortest or squash)")
        pre = Preprocess(vision.image_size, vision.image_size, tuple(pp.get("mean", CLIP_MEAN)),
                         tuple(pp.get("std", CLIP_STD)), pp.get("interpolation", "bicubic"), resize_mode=mode)
    except BackboneError:
        raise
    except KeyError as e:
        raise BackboneError(f"backbone {path}: {file} names no {e.args[0]!r}; it is not an EVA-CLIP model config") from None
    except Exception as e:
        raise BackboneError(f"backbone {path}: cannot read {file} as an EVA-CLIP config ({one_line(e)})") from None
    return EvaClipSpec(name=name, embed_dim=embed_dim, vision=vision, text=text, preprocess=pre)


def _require(cfg: dict, key: str, allowed, what: str) -> None:
    if cfg.get(key, allowed[0]) not in allowed:
        raise ValueError(f"{what} {key}={cfg[key]!r} is not supported (only {allowed[0]!r})")


def _vision_spec(v: dict) -> tuple[VisionSpec, str]:
    if v.get("timm_model_name"):
        name = v["timm_model_name"]
        if name not in TIMM_TRUNKS:
            raise ValueError(f"timm_model_name {name!r} is not an EVA-CLIP trunk featstore knows ({', '.join(TIMM_TRUNKS)})")
        _require(v, "timm_pool", ["token"], "vision_cfg")
        if v.get("timm_proj") not in (None, ""):
            raise ValueError(f"vision_cfg timm_proj={v['timm_proj']!r} is not supported (only null: timm's head projects)")
        t = TIMM_TRUNKS[name]
        if int(v.get("image_size", t["image_size"])) != t["image_size"]:
            raise ValueError(f"vision_cfg image_size {v['image_size']} differs from {name}'s {t['image_size']}")
        spec = VisionSpec(t["image_size"], t["patch_size"], t["width"], t["layers"], t["heads"],
                          int(t["width"] * 4 * 2 / 3), "swiglu", True, True, True, 16, None)
        return spec, name
    if not v.get("eva_model_name"):
        raise ValueError("vision_cfg has neither timm_model_name nor eva_model_name: not an EVA-CLIP vision tower")
    for key, ok in (("global_average_pool", [False]), ("postnorm", [False])):
        _require(v, key, ok, "vision_cfg")
    width, image, patch = int(v.get("width", 768)), int(v.get("image_size", 224)), int(v.get("patch_size", 16))
    grid = image // patch
    rope = bool(v.get("rope", False))
    pt = int(v.get("pt_hw_seq_len", 16))
    if rope and not v.get("intp_freq", False) and pt != grid:
        raise ValueError(f"rope without intp_freq needs pt_hw_seq_len == the {grid}x{grid} grid, got {pt}")
    spec = VisionSpec(image, patch, width, int(v.get("layers", 12)), width // int(v.get("head_width", 64)),
                      int(width * float(v.get("mlp_ratio", 4.0))), "swiglu" if v.get("naiveswiglu") else "gelu",
                      bool(v.get("subln", False)), bool(v.get("qkv_bias", True)), rope,
                      (pt if v.get("intp_freq") else grid) if rope else None, v.get("ls_init_value"))
    return spec, v["eva_model_name"]


def _text_spec(t: dict, *, quick_gelu: bool) -> TextSpec:
    if t.get("hf_model_name"):
        raise ValueError(f"text_cfg hf_model_name={t['hf_model_name']!r}: a transformers text tower, not EVA-CLIP's")
    for key, ok in (("ls_init_value", [None]), ("embed_cls", [False]), ("pool_type", ["argmax"]),
                    ("proj_bias", [False]), ("proj_type", ["linear"]), ("no_causal_mask", [False]),
                    ("final_ln_after_pool", [False]), ("attn_mask", [True]), ("act_kwargs", [None])):
        _require(t, key, ok, "text_cfg")
    width = int(t.get("width", 512))
    eps = float((t.get("norm_kwargs") or {}).get("eps", 1e-5))
    return TextSpec(int(t.get("context_length", 77)), int(t.get("vocab_size", 49408)), width, int(t.get("heads", 8)),
                    int(t.get("layers", 12)), int(width * float(t.get("mlp_ratio", 4.0))),
                    "quick_gelu" if quick_gelu else "gelu", eps)


# ---- the weights file ------------------------------------------------------------------------
def weights_file(path: Path, label: str) -> Path:
    """open_clip's weights file, else the directory's one weights file."""
    path = Path(path)
    for name in CANONICAL_WEIGHTS:
        if (path / name).is_file():
            return path / name
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if len(files) != 1:
        what = "no weights file" if not files else f"{len(files)} weights files ({', '.join(p.name for p in files)})"
        raise BackboneError(f"backbone {label}: {path} has {what}; put one checkpoint beside {SPEC_FILE} "
                            f"({' or '.join(CANONICAL_WEIGHTS)})")
    return files[0]


def read_checkpoint(file: Path, label: str) -> dict[str, torch.Tensor]:
    """The state dict in `file` (safetensors, or a torch pickle of tensors only), unwrapped from
    ``state_dict`` / ``model`` / ``module`` and a ``module.`` prefix (as EVA's loader does)."""
    try:
        if file.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(str(file))
        else:
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneError(f"backbone {label}: cannot read {file} as a safetensors file or a tensors-only torch "
                            f"checkpoint (weights_only=True) ({one_line(e)})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"backbone {label}: {file} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# ---- key mapping -----------------------------------------------------------------------------
_TIMM_BLOCK = [  # timm Eva name (inside blocks.{i}.) -> EVA's, the inverse of timm's checkpoint_filter_fn
    ("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"), ("attn.norm.", "attn.inner_attn_ln."),
    ("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."), ("mlp.norm.", "mlp.ffn_ln."), ("mlp.fc2.", "mlp.w3."),
]
_TIMM_BLOCK_GELU = [("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"),
                    ("attn.norm.", "attn.inner_attn_ln."), ("mlp.norm.", "mlp.ffn_ln.")]
_TEXT_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
               "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_ROPE_EVA = re.compile(r"^(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)$")
IGNORED = ("logit_scale", "text.logit_scale")


def layout(sd: dict) -> str:
    if any(k.startswith("visual.trunk.") for k in sd):
        return "open_clip"
    if any(k.startswith("visual.") for k in sd):
        return "eva"
    return "none"


def map_vision(sd: dict, spec: VisionSpec) -> tuple[dict, dict, dict]:
    """(our name -> tensor for `EvaClipVision`, our name -> checkpoint name, dropped rope tables)."""
    kind = layout(sd)
    out, origin, rope = {}, {}, {}
    prefix = "visual.trunk." if kind == "open_clip" else "visual."
    renames = _TIMM_BLOCK if spec.mlp == "swiglu" else _TIMM_BLOCK_GELU
    for key, v in sd.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        if kind == "eva" and _ROPE_EVA.match(k):
            rope[key] = v
            continue
        if kind == "open_clip" and k.startswith("rope."):
            continue  # timm's non-persistent rotary tables: recomputed (timm's filter skips them too)
        m = re.match(r"^blocks\.(\d+)\.(.*)$", k)
        if m and kind == "open_clip":
            rest = m.group(2)
            for old, new in renames:
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            k = f"blocks.{m.group(1)}.{rest}"
        if m and k.endswith(".attn.qkv.weight"):  # a fused projection (EVA without subln, timm qkv_fused)
            base = k[: -len("qkv.weight")]
            for part, t in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[f"vit.{base}{part}.weight"], origin[f"vit.{base}{part}.weight"] = t, key
            continue
        ours = k if k.startswith("head.") else "vit." + k
        out[ours], origin[ours] = v, key
    return out, origin, rope


def map_text(sd: dict) -> tuple[dict, dict]:
    """(transformers CLIPTextModelWithProjection name -> tensor, its checkpoint name)."""
    out, origin = {}, {}

    def put(name, v, key):
        out[name], origin[name] = v, key

    for key, v in sd.items():
        if key.startswith("visual.") or key in IGNORED:
            continue
        k = key[len("text."):] if key.startswith("text.") else key
        m = re.match(r"^transformer\.resblocks\.(\d+)\.(.*)$", k)
        if k == "token_embedding.weight":
            put("text_model.embeddings.token_embedding.weight", v, key)
        elif k == "positional_embedding":
            put("text_model.embeddings.position_embedding.weight", v, key)
        elif k in ("ln_final.weight", "ln_final.bias"):
            put("text_model.final_layer_norm." + k.split(".")[-1], v, key)
        elif k == "text_projection":
            put("text_projection.weight", v.t(), key)
        elif m and m.group(2) in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if m.group(2).endswith("weight") else "bias"
            for part, t in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                put(f"text_model.encoder.layers.{m.group(1)}.self_attn.{part}.{kind}", t, key)
        elif m and m.group(2).rsplit(".", 1)[0] in _TEXT_BLOCK:
            module, param = m.group(2).rsplit(".", 1)
            put(f"text_model.encoder.layers.{m.group(1)}.{_TEXT_BLOCK[module]}.{param}", v, key)
        else:
            put("?" + key, v, key)  # claimed by no rule: reported as unexpected
    return out, origin


def load_strict(model: torch.nn.Module, mapped: dict, origin: dict, *, label: str, file: Path, tower: str) -> None:
    """Copy `mapped` into `model`, refusing (one line) a missing weight, an unexpected one or a wrong shape."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in mapped)
    unexpected = sorted(origin[k] for k in mapped if k not in own)
    wrong = sorted(f"{origin[k]} {tuple(mapped[k].shape)} (wants {tuple(own[k].shape)})"
                   for k in mapped if k in own and tuple(mapped[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of the wrong shape (e.g. {wrong[0]})")
        raise BackboneError(f"backbone {label}: {file.name} does not fit the EVA-CLIP {tower} tower its config "
                            f"describes: {'; '.join(parts)}")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(mapped[k].to(t.dtype))
