"""A loader batch on the device, as the UTA step wants it: the input, the teacher tokens on the
student's grid (resized, mirrored), int8 tokens dequantized; and which columns the loader serves."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from featstore.tokens import dequantize_int8
from featstore.trainers.uta.arch import grid_side


def interpolate_grid(tokens: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Teacher tokens (B, h*w, D) on a square grid resized to size x size: (B, size*size, D), fp32.
    Resampled as a (D, h, w) map (align_corners=False); the same tensor when the grids match."""
    b, n, d = tokens.shape
    side = grid_side(n, "the teacher's token grid")
    if side == size:
        return tokens
    grid = tokens.float().transpose(1, 2).reshape(b, d, side, side)
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(grid, size=(size, size), mode=mode, **kwargs).flatten(2).transpose(1, 2)


def flip_tokens(tokens: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Mirror the square token grid (B, g*g, D) left-right where `which` (B,) is true (`hflip`
    only: stored views carry their own mirroring, with the teacher's own outputs on the mirror, and
    `train_uta.check_flips` refuses hflip on mirrored stored views)."""
    b, n, d = tokens.shape
    g = grid_side(n, "a token grid")
    flipped = tokens.view(b, g, g, d).flip(2).reshape(b, n, d)
    return torch.where(which.view(b, 1, 1).to(tokens.device), flipped, tokens)


def flip_input(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Mirror pixels (B, 3, H, W) or a light-mode token grid (B, T, D) where `which` is true."""
    if x.ndim == 4:
        return torch.where(which.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)
    return flip_tokens(x, which)


def prepare_batch(batch: dict, arch: dict, flip: torch.Tensor | None, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch on the device: the input as stored (uint8 pixels / tokens), the teacher tokens
    as fp32 on the student's grid, both mirrored where `flip` is true.  int8 tokens served raw with
    their scales (columns "<key>_scale" and "<key>_channel_scale", see `loader_columns`) are
    dequantized here, on the device."""
    x = on_device(batch, "input", dev)
    t = on_device(batch, "target", dev)
    t = interpolate_grid(t, arch["grid"], arch["grid_interpolation"] or "bilinear").float()
    if flip is not None and bool(flip.any()):
        x, t = flip_input(x, flip), flip_tokens(t, flip)
    return x, t


def batch_pooled(batch: dict, dev) -> torch.Tensor | None:
    """The teacher's pooled embeddings of a batch (B, D) fp32 on the device, when served."""
    return batch["pooled"].to(dev, non_blocking=True).float() if "pooled" in batch else None


def on_device(batch: dict, key: str, dev) -> torch.Tensor:
    """batch[key] on `dev`; int8 tokens served raw with their scales are dequantized there."""
    x = batch[key].to(dev, non_blocking=True)
    scale, channel = batch.get(f"{key}_scale"), batch.get(f"{key}_channel_scale")
    if scale is None:
        return x
    channel = channel.to(dev, non_blocking=True) if channel is not None else None  # token x channel int8
    return dequantize_int8(x, scale.to(dev, non_blocking=True), channel_scale=channel)


def loader_columns(input_column: str, teacher: str, *, int8_on_device: bool, store, pooled: bool = False) -> tuple[dict, bool]:
    """The loader's columns {"input", "target"[, "pooled"][, "<key>_scale"[, "<key>_channel_scale"]]}
    and its `dequantize` flag.  With `int8_on_device` (a GPU), int8 token columns are served raw (half
    the bytes to copy) with their scales (both of them for token x channel int8: a
    `<tokens>_channel_scale` array beside the tokens) and dequantized by `prepare_batch` on the
    device; otherwise the loader dequantizes them to fp16 in its producer thread, overlapping the
    step (best on CPU), with whichever scales the feature set has."""
    columns = {"input": input_column, "target": f"features/{teacher}/tokens"}
    if pooled:
        columns["pooled"] = f"features/{teacher}/pooled"
    token_keys = [k for k, p in columns.items() if p.endswith("/tokens") and store.array(p).dtype == np.int8]
    raw = token_keys if int8_on_device else []
    for key in raw:
        columns[f"{key}_scale"] = columns[key] + "_scale"
        if _has_array(store, columns[key] + "_channel_scale"):
            columns[f"{key}_channel_scale"] = columns[key] + "_channel_scale"
    return columns, not raw


def _has_array(store, path: str) -> bool:
    from featstore.errors import NotInStore

    try:
        store.array(path)
        return True
    except NotInStore:
        return False
