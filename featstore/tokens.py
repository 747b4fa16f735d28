"""int8 token storage: two symmetric schemes, and a check of what either one keeps.

Per token (the original layout; `quantize_int8` / `dequantize_int8`): a token row x (D values) is
stored as q = round(x / s) in int8 with s = max|x| / 127 kept as float16, and reads back as q * s.
Safe where every channel of a token has a similar range: projected tokens (CLIP's joint space),
CNN feature maps.  It is NOT safe on raw transformer residual streams (`--layer K`): a few outlier
channels there are 10-60x larger than the rest, set every token's scale, and leave the other
channels a handful of int8 levels.  On MiniLM's residual stream (tests/test_tokens.py) the
non-outlier channels then keep a mean cosine of only ~0.976, and some tokens lose them entirely.

Token x channel (`quantize_int8_token_channel`, `dequantize_int8(..., channel_scale=c)`): each
row's channels are first divided by their maximum over the row's tokens, c (D,) per row, which
takes the outlier channels out of the per-token scale; then each token of the normalized row gets
its own scale s = max|x / c| / 127 as above (c is stored divided by 127 too, so that channels
up to ~8e6 fit float16).  x ~= q * s[:, None] * c[None, :].  The extra array
is D float16 values per row (1% of a 196 x 768 row).  Per-channel scaling alone (c without s) does
as well on outlier channels but loses tokens whose norm is far below the row's largest
(high-norm tokens, ViT "registers"); the product keeps both.  Measured figures: the UTA section
of README.md, from tests/test_tokens.py.

`int8_fidelity(x)` quantizes and dequantizes `x` under a scheme and returns the mean and worst
cosine per token (optionally over a subset of channels) - the check an extraction can run on its
first block before it commits to int8.
"""

from __future__ import annotations

import numpy as np

from featstore.errors import ConfigError

SCHEMES = ("token", "token_channel")


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token scaling: (..., D) float -> (int8 (..., D), float16 scale (...,))."""
    x = np.asarray(x, dtype=np.float32)
    scale = _fp16_scale(np.abs(x).max(axis=-1) / 127.0)
    q = np.clip(np.rint(x / scale.astype(np.float32)[..., None]), -127, 127).astype(np.int8)
    return q, scale


def quantize_int8_token_channel(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token x channel scaling of rows of tokens: (..., T, D) float -> (int8 (..., T, D),
    float16 token scale (..., T), float16 channel scale (..., D)); each row (the last two axes)
    is quantized on its own."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim < 2:
        raise ConfigError(f"token x channel scaling needs rows of tokens (..., T, D), got shape {x.shape}")
    channel = _fp16_scale(np.abs(x).max(axis=-2) / 127.0, check=True)  # /127 keeps channels up to ~8e6 in float16
    q, token = quantize_int8(x / channel.astype(np.float32)[..., None, :])
    return q, token, channel


def dequantize_int8(q: np.ndarray, scale: np.ndarray, dtype=np.float16, channel_scale: np.ndarray | None = None) -> np.ndarray:
    """q * scale[..., None] (per token), times channel_scale[..., None, :] when given (token x channel)."""
    x = q.astype(np.float32) * scale.astype(np.float32)[..., None]
    if channel_scale is not None:
        x *= channel_scale.astype(np.float32)[..., None, :]
    return x.astype(dtype)


def round_trip(x: np.ndarray, scheme: str = "token_channel") -> np.ndarray:
    """`x` quantized under `scheme` and read back, float32."""
    if scheme == "token":
        return dequantize_int8(*quantize_int8(x), dtype=np.float32)
    if scheme == "token_channel":
        q, token, channel = quantize_int8_token_channel(x)
        return dequantize_int8(q, token, np.float32, channel_scale=channel)
    raise ConfigError(f"unknown int8 scheme {scheme!r}; use one of {', '.join(SCHEMES)}")


def int8_fidelity(x, scheme: str = "token_channel", channels=None) -> dict:
    """Quantize rows of tokens under `scheme`, read them back, and return {"scheme", "tokens",
    "mean_cos", "worst_cos"}: the cosine of each token to its original, over all channels or only
    those `channels` selects (a (D,) bool mask or index array).  `x`: an array (..., T, D), or a
    list of (T_i, D) rows of different lengths (each row is quantized on its own).  A token that is
    zero (in the selected channels) on both sides counts as cosine 1."""
    rows = list(x) if isinstance(x, (list, tuple)) else [x]
    pairs = [(np.asarray(r, dtype=np.float32), round_trip(r, scheme)) for r in rows]
    a = np.concatenate([r.reshape(-1, r.shape[-1]) for r, _ in pairs])
    b = np.concatenate([q.reshape(-1, q.shape[-1]) for _, q in pairs])
    if channels is not None:
        a, b = a[:, channels], b[:, channels]
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, (a * b).sum(-1) / np.maximum(na * nb, np.finfo(np.float32).tiny))
    return {"scheme": scheme, "tokens": int(len(cos)), "mean_cos": float(cos.mean()), "worst_cos": float(cos.min())}


def _fp16_scale(s: np.ndarray, check: bool = False) -> np.ndarray:
    """A scale as stored (float16), 1 where it is 0 so that all-zero tokens/channels stay zero.
    `check` refuses values float16 cannot hold (the per-token path keeps its original behaviour)."""
    s = np.asarray(s, dtype=np.float32)
    if check and (not np.isfinite(s).all() or s.max(initial=0) > np.finfo(np.float16).max):
        raise ConfigError("int8 tokens: values that are not finite or beyond float16's range cannot be stored as int8")
    s = s.astype(np.float16)
    return np.where(s > 0, s, np.float16(1.0)).astype(np.float16)
