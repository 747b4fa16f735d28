"""What a UTA student is built from: its architecture, from the config and the shapes in the store."""

from __future__ import annotations

import math

from featstore.core.identity import identity_diff, lines
from featstore.errors import ConfigError, IdentityMismatch
from featstore.trainers.uta.config import CROP_KEYS, MLPS, STUDENTS, UTAConfig


def grid_side(n_tokens: int, what: str) -> int:
    side = math.isqrt(int(n_tokens))
    if side * side != n_tokens:
        raise ConfigError(f"{what} has {n_tokens} tokens, not a square grid: UTA needs square token grids")
    return side


def same_crop(pre_a: dict | None, pre_b: dict | None, a_name: str, b_name: str) -> None:
    """Refuse two preprocessing identities (a feature set's identity["preprocess"], or a pixels
    array's identity) that differ in the crop geometry (resize, crop, interpolation, resize mode):
    their token grids would not cover the same pixels."""
    if not isinstance(pre_a, dict) or not isinstance(pre_b, dict):
        missing = a_name if not isinstance(pre_a, dict) else b_name
        raise IdentityMismatch(f"{missing} records no preprocessing identity: cannot check that {a_name} and "
                               f"{b_name} come from the same crop; extract both with featstore")
    diff = identity_diff(pre_a, pre_b, then=f"({a_name})", now=f"({b_name})", keys=CROP_KEYS)
    if diff:
        raise IdentityMismatch(f"{a_name} and {b_name} were not made from the same crop (extract both with the same "
                               f"resize/crop so their token grids line up):{lines(diff)}")


def resolve_arch(cfg: UTAConfig, *, teacher_tokens: tuple[int, int], pixels_shape=None, pixels_identity=None,
                 input_tokens: tuple[int, int] | None = None, teacher_pooled_dim: int | None = None) -> dict:
    """The student's full architecture (JSON-able; a checkpoint rebuilds the model from it) from
    the config and the shapes in the store: the teacher's tokens (T, D) and pooled width, and the
    pixels (3, H, W) or light-mode input tokens (T, D)."""
    width, depth, heads = STUDENTS[cfg.student]
    if cfg.width is not None:
        width, heads = cfg.width, max(1, cfg.width // 64)
    depth = cfg.depth or depth
    heads = cfg.heads or heads
    if width % heads:
        raise ConfigError(f"bad config: width {width} is not divisible by heads {heads}; set heads")
    if cfg.rope and (width // heads) % 4:
        raise ConfigError(f"bad config: 2D RoPE needs a head width divisible by 4 (width {width} / {heads} heads "
                          f"= {width // heads}); change width/heads or set rope=false")
    t_tokens, t_dim = (int(x) for x in teacher_tokens)
    t_side = grid_side(t_tokens, "the teacher's token grid")
    cls_dim = int(teacher_pooled_dim or t_dim)
    cls_head = cfg.cls_head if cfg.cls_head != "auto" else ("shared" if cls_dim == t_dim else "separate")
    if cls_head == "shared" and cls_dim != t_dim:
        raise ConfigError(f"bad config: cls_head shared needs the teacher's pooled width ({cls_dim}) to equal its token "
                          f"width ({t_dim}); set cls_head=separate (or auto)")
    ratio = cfg.mlp_ratio if cfg.mlp_ratio is not None else MLPS[cfg.mlp]
    arch = {"width": width, "depth": depth, "heads": heads, "mlp": cfg.mlp, "mlp_dim": int(round(width * ratio)),
            "sub_ln": cfg.sub_ln, "rope": cfg.rope, "abs_pos_embed": cfg.abs_pos_embed, "layer_scale": cfg.layer_scale,
            "drop_path": cfg.drop_path, "out_dim": t_dim, "cls_dim": cls_dim, "cls_head": cls_head,
            "teacher_grid": [t_side, t_side]}
    if input_tokens is None:
        c, h, w = (int(x) for x in pixels_shape)
        if c != 3 or h != w:
            raise ConfigError(f"UTA needs square RGB pixels, got shape {(c, h, w)}")
        patch = cfg.patch_size or h // t_side
        if patch < 1 or h % patch:
            raise ConfigError(f"bad config: patch_size {patch} does not divide the stored {h}x{h} crop")
        pre = (pixels_identity or {})
        arch.update(input="pixels", image_size=h, patch_size=patch, in_channels=3, grid=h // patch,
                    mean=list(pre.get("mean", (0.5, 0.5, 0.5))), std=list(pre.get("std", (0.5, 0.5, 0.5))))
    else:
        n, d = (int(x) for x in input_tokens)
        if cfg.patch_size not in (None, 1):
            raise ConfigError("bad config: patch_size applies to pixels; a light-mode student's grid is its input's")
        side = grid_side(n, "the student input's token grid")
        arch.update(input="tokens", image_size=side, patch_size=1, in_channels=d, grid=side)
    g = arch["grid"]
    arch["grid_interpolation"] = None if [g, g] == arch["teacher_grid"] else cfg.grid_interpolation
    return arch
