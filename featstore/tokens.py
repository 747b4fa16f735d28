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
cosine per token (optionally over a subset of channels).

In a store (`encode_tokens`, what extraction's writer runs on every block): a token x channel
feature set holds `tokens` (row, token, token_dim) int8, `tokens_scale` (row, token) float16 and
`tokens_channel_scale` (row, token_dim) float16, and reads back as
`tokens * tokens_scale[..., None] * tokens_channel_scale[..., None, :]`; a per-token one (the
layout before token x channel, still read and resumed) has no channel scale.  Each row is
quantized on its own, so a row's bytes never depend on the rows beside it.  Every block's mean
and worst token cosine go into its marker, and a block whose worst cosine is below
`MIN_COSINE` is refused (`check_fidelity`).
"""

from __future__ import annotations

import os

import numpy as np

from featstore.errors import ConfigError, FidelityTooLow

SCHEMES = ("token", "token_channel")
# The worst token cosine (int8 read back vs the backbone's output) a stored block may have.  Real
# tokens stay far above it under token x channel scaling (MiniLM's raw residual stream: worst
# 0.998; EfficientNet-Lite0's feature map: 0.9999, tests/test_tokens.py); what falls below it is
# a row whose energy sits in values a handful of int8 levels cannot hold.  The environment
# variable FEATSTORE_MIN_INT8_COSINE overrides it (e.g. 0 to store whatever int8 keeps).
MIN_COSINE = 0.99
CHUNK_ROWS = 64  # rows quantized at a time: bounds the float32 temporaries of a large block
DEQUANT_CELLS = 1 << 17  # values dequantized at a time (a 512 KiB float32 product, kept in cache)


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


def dequantize_int8(q: np.ndarray, scale: np.ndarray, dtype=np.float16, channel_scale: np.ndarray | None = None,
                    out: np.ndarray | None = None) -> np.ndarray:
    """q * scale[..., None] (per token), times channel_scale[..., None, :] when given (token x channel).
    numpy arrays give `dtype` (into `out` when given, an array of q's shape): one multiply per
    scale, in float32, over a few rows at a time so the float32 product never leaves the cache
    (the same float32 products and the same final cast as a whole-array q.astype(float32) * ...,
    so the values are bit-identical to it).  torch tensors (the training step's, on their device)
    give float32 there: one float32 copy of q, each scale multiplied into it in place."""
    if not isinstance(q, np.ndarray) and hasattr(q, "unsqueeze"):
        x = q.float().mul_(scale.unsqueeze(-1))  # mul_ computes in float32 (fp16 scales promoted)
        return x.mul_(channel_scale.unsqueeze(-2)) if channel_scale is not None else x
    dtype = np.dtype(dtype if out is None else out.dtype)
    out = np.empty(q.shape, dtype) if out is None else out
    s = np.asarray(scale, dtype=np.float32)[..., None]
    c = None if channel_scale is None else np.asarray(channel_scale, dtype=np.float32)[..., None, :]
    if q.ndim < 2 or q.size == 0 or any(a.ndim != q.ndim or len(a) != len(q) for a in (s, c) if a is not None):
        x = q.astype(np.float32) * s  # scales that broadcast over the first axis: the whole array at once
        if c is not None:
            x *= c
        out[...] = x
        return out
    step = max(1, DEQUANT_CELLS // max(1, q[0].size))
    tmp = np.empty((min(step, len(q)),) + q.shape[1:], np.float32)
    for a in range(0, len(q), step):
        b = min(len(q), a + step)
        t = np.multiply(q[a:b], s[a:b], out=tmp[: b - a], dtype=np.float32)
        if c is None:
            out[a:b] = t
        else:
            np.multiply(t, c[a:b], out=out[a:b], casting="same_kind")  # float32 products, then the cast
    return out


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
    cos = _cosines(a, b)
    return {"scheme": scheme, "tokens": int(len(cos)), "mean_cos": float(cos.mean()), "worst_cos": float(cos.min())}


def encode_tokens(x: np.ndarray, scheme: str = "token_channel", valid: np.ndarray | None = None) -> tuple[dict, dict | None]:
    """int8 columns of a block of token rows (N, T, D), quantized row by row under `scheme`, and
    their fidelity over the `valid` rows (None when there are none).  Rows that are not valid are
    quantized as zeros (their bytes are zeroed by the writer anyway).

    Returns ({"tokens", "tokens_scale"[, "tokens_channel_scale"]}, {"scheme", "tokens",
    "mean_cos", "worst_cos"})."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown int8 scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    x = np.asarray(x)
    n, t, d = x.shape
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, dtype=bool)
    cols = {"tokens": np.zeros((n, t, d), np.int8), "tokens_scale": np.ones((n, t), np.float16)}
    if scheme == "token_channel":
        cols["tokens_channel_scale"] = np.ones((n, d), np.float16)
    cos_sum, count, worst = 0.0, 0, 1.0
    for a in range(0, n, CHUNK_ROWS):
        b = min(n, a + CHUNK_ROWS)
        chunk = np.asarray(x[a:b], dtype=np.float32).copy()
        ok = valid[a:b]
        chunk[~ok] = 0
        if scheme == "token_channel":
            q, s, c = quantize_int8_token_channel(chunk)
            cols["tokens_channel_scale"][a:b] = c
        else:
            q, s, c = (*quantize_int8(chunk), None)
        cols["tokens"][a:b], cols["tokens_scale"][a:b] = q, s
        if ok.any():
            cos = _cosines(chunk[ok].reshape(-1, d),
                           dequantize_int8(q[ok], s[ok], np.float32, None if c is None else c[ok]).reshape(-1, d))
            cos_sum, count, worst = cos_sum + float(cos.sum(dtype=np.float64)), count + len(cos), min(worst, float(cos.min()))
    fidelity = {"scheme": scheme, "tokens": count, "mean_cos": cos_sum / count, "worst_cos": worst} if count else None
    return cols, fidelity


def merge_fidelity(a: dict | None, b: dict | None) -> dict | None:
    """The fidelity of two sets of tokens together (a block written in two parts)."""
    if not a or not b:
        return dict(a or b) if (a or b) else None
    n = a["tokens"] + b["tokens"]
    return {"scheme": b["scheme"], "tokens": n, "mean_cos": (a["mean_cos"] * a["tokens"] + b["mean_cos"] * b["tokens"]) / n,
            "worst_cos": min(a["worst_cos"], b["worst_cos"])}


def min_cosine() -> float:
    """The threshold in force: FEATSTORE_MIN_INT8_COSINE, else MIN_COSINE."""
    value = os.environ.get("FEATSTORE_MIN_INT8_COSINE")
    if value is None:
        return MIN_COSINE
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"FEATSTORE_MIN_INT8_COSINE must be a number, not {value!r}") from None


def check_fidelity(fidelity: dict | None, where: str, threshold: float | None = None) -> None:
    """Refuse (FidelityTooLow) int8 tokens whose worst token cosine is below `threshold`
    (default: `min_cosine()`)."""
    threshold = min_cosine() if threshold is None else threshold
    if fidelity and fidelity["worst_cos"] < threshold:
        raise FidelityTooLow(
            f"{where}: int8 tokens ({fidelity['scheme']} scaling) would read back with a worst token cosine of "
            f"{fidelity['worst_cos']:.4f} (mean {fidelity['mean_cos']:.5f}), below {threshold}; the block was not "
            "written: store these tokens as float16 (--token-dtype float16 with another --name, or --overwrite)")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of `a` to the same row of `b`; rows zero on both sides count as 1."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    both_zero = (na == 0) & (nb == 0)
    return np.where(both_zero, 1.0, (a * b).sum(-1) / np.maximum(na * nb, np.finfo(np.float32).tiny))


def _fp16_scale(s: np.ndarray, check: bool = False) -> np.ndarray:
    """A scale as stored (float16), 1 where it is 0 so that all-zero tokens/channels stay zero.
    `check` refuses values float16 cannot hold (the per-token path keeps its original behaviour)."""
    s = np.asarray(s, dtype=np.float32)
    if check and (not np.isfinite(s).all() or s.max(initial=0) > np.finfo(np.float16).max):
        raise ConfigError("int8 tokens: values that are not finite or beyond float16's range cannot be stored as int8")
    s = s.astype(np.float16)
    return np.where(s > 0, s, np.float16(1.0)).astype(np.float16)
