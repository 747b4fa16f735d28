"""Issue 21's two fixes: int8 tokens dequantized in one pass (loader worker, training step) and the
warm-page check of mapped shards; caption batches tokenized a batch ahead on a worker thread, with
the linear weights of a bf16 text backbone cast once.  Every value must stay what it was."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from featstore import tokens as tok  # noqa: E402
from featstore.core.writes import write_block  # noqa: E402
from featstore.loader import Loader  # noqa: E402
from featstore.read.mapping import MappedArray  # noqa: E402
from featstore.store import Store  # noqa: E402
from featstore.tokens import dequantize_int8, encode_tokens, quantize_int8, quantize_int8_token_channel  # noqa: E402


def _whole_array(q, scale, dtype, channel=None):
    """The dequantization as it was: whole-array float32 products, then one cast."""
    x = q.astype(np.float32) * scale.astype(np.float32)[..., None]
    if channel is not None:
        x *= channel.astype(np.float32)[..., None, :]
    return x.astype(dtype)


def _tokens(n=37, t=9, d=24, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, t, d)) * rng.uniform(0.05, 40, (1, 1, d))).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("cells", [1, 300, 1 << 17])  # one row per chunk, ragged chunks, one chunk
def test_chunked_dequantize_is_bit_identical(monkeypatch, dtype, cells):
    monkeypatch.setattr(tok, "DEQUANT_CELLS", cells)
    x = _tokens()
    q, s, c = quantize_int8_token_channel(x)
    want = _whole_array(q, s, dtype, c)
    got = dequantize_int8(q, s, dtype, channel_scale=c)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    out = np.full(q.shape, np.nan, dtype)
    assert dequantize_int8(q, s, channel_scale=c, out=out) is out and out.tobytes() == want.tobytes()
    q1, s1 = quantize_int8(x)  # per token, no channel scale
    assert dequantize_int8(q1, s1, dtype).tobytes() == _whole_array(q1, s1, dtype).tobytes()
    # scales that broadcast over the first axis still go through the whole-array path
    assert dequantize_int8(q1[0], s1[0], dtype).tobytes() == _whole_array(q1[0], s1[0], dtype).tobytes()


def test_torch_dequantize_matches_numpy_float32_bit_for_bit():
    q, s, c = quantize_int8_token_channel(_tokens(seed=1))
    t = torch.from_numpy
    got = dequantize_int8(t(q), t(s), channel_scale=t(c))
    assert got.dtype == torch.float32
    assert got.numpy().tobytes() == _whole_array(q, s, np.float32, c).tobytes()
    got1 = dequantize_int8(t(q), t(s))
    assert got1.numpy().tobytes() == _whole_array(q, s, np.float32).tobytes()
    # and the fused path stays within the int8 tolerance of the original tokens
    x = _tokens(seed=1)
    cos = (got.numpy() * x).sum(-1) / (np.linalg.norm(got.numpy(), axis=-1) * np.linalg.norm(x, axis=-1))
    assert cos.min() > tok.MIN_COSINE


def _int8_store(path, n=80, t=8, d=32, r=16):
    """token x channel int8 tokens: `tokens` mapped (16 x 8 x 32 bytes = one page a block), the
    scales read into window buffers (their blocks are not whole pages)."""
    store = Store.create(path, rows_per_shard=r)
    store.register([f"u{i:04d}" for i in range(n)])
    store.create_feature_set("t8", {"model": "synthetic-t8"}, d, tokens=(t, d), token_dtype="int8",
                             token_scaling="token_channel")
    for b in range(store.n_blocks):
        a, z = store.block_range(b)
        x = _tokens(z - a, t, d, seed=b)
        cols, fidelity = encode_tokens(x, "token_channel")
        write_block(store, "t8", b, {"pooled": x.mean(1), **cols}, np.ones(z - a, bool), int8_fidelity=fidelity)
    return store


def test_loader_dequantized_batches_equal_the_raw_columns_dequantized(tmp_path):
    store = _int8_store(tmp_path / "s.zarr")
    served = Loader(store, {"t": "features/t8/tokens"}, 24, shuffle=True, seed=3)
    raw = Loader(store, {"t": "features/t8/tokens", "s": "features/t8/tokens_scale",
                         "c": "features/t8/tokens_channel_scale"}, 24, shuffle=True, seed=3, dequantize=False)
    kinds = {s.key: s.kind for c in raw.columns for s in c.sources()}
    assert kinds["t"] == "mapped" and kinds["s"] != "mapped"  # both read paths are exercised
    n = 0
    for a, b in zip(served, raw):
        assert torch.equal(a["row"], b["row"]) and a["t"].dtype == torch.float16 and b["t"].dtype == torch.int8
        want = _whole_array(b["t"].numpy(), b["s"].numpy(), np.float16, b["c"].numpy())
        assert a["t"].numpy().tobytes() == want.tobytes()
        n += len(a["row"])
    assert n == store.n_rows


def test_warm_page_check_sees_untouched_and_touched_pages(tmp_path):
    store = _int8_store(tmp_path / "s.zarr")
    arr = store.array("features/t8/tokens")
    mapped = MappedArray.of(arr, store.rows_per_shard, store.n_rows + 64, np.arange(store.n_blocks))
    assert mapped is not None
    assert mapped.view.ctypes.data % (2 << 20) == 0  # blocks of 2 MiB multiples can map large folios whole
    assert np.array_equal(mapped.view[: store.n_rows], np.asarray(arr[: store.n_rows]))
    np.asarray(mapped.view[: store.n_rows]).sum()  # touch every written row
    assert mapped._resident(*mapped._pages(0, store.n_rows))
    # rows past the written blocks are the reservation's own pages, never touched: not resident
    assert not mapped._resident(*mapped._pages(store.n_rows + 16, store.n_rows + 64))
    assert not mapped._resident(*mapped._pages(0, store.n_rows + 64))


@pytest.fixture(scope="module")
def minilm_pair():
    from featstore.pipelines.backbones import base, load_backbone

    keep = base.cast_linear_weights
    base.cast_linear_weights = lambda *a, **k: 0
    try:
        autocast_only = load_backbone("minilm", precision="bf16")
    finally:
        base.cast_linear_weights = keep
    return autocast_only, load_backbone("minilm", precision="bf16")


def test_bf16_linear_weights_cast_once_give_the_same_bits(minilm_pair):
    autocast_only, cast = minilm_pair
    linears = [m for m in cast.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert all(m.weight.dtype == torch.float32 for m in autocast_only.model.modules() if isinstance(m, torch.nn.Linear))
    norms = [m for m in cast.model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)  # autocast keeps these in float32
    texts = ["a dog", "two children walking near the beach at night under a bright sky", "", "snow on a mountain"]
    for batch in (texts, texts[:1], texts[1:2]):
        a, b = autocast_only.encode_texts(batch)["pooled"], cast.encode_texts(batch)["pooled"]
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_captions_are_tokenized_a_batch_ahead_on_a_worker(minilm_pair):
    from featstore.pipelines.blocks import _tokenized_ahead

    _, bb = minilm_pair
    seen = []
    real = bb.tokenize

    class Spy:  # the real backbone, recording which thread tokenizes
        def __getattr__(self, name):
            return getattr(bb, name)

        def tokenize(self, texts):
            seen.append(threading.get_ident())
            return real(texts)

    batches = [["a red car", "a city street at night with people"], ["a cat"], ["river", "old house", "tree"]]
    outs = [f()["pooled"] for f in _tokenized_ahead(Spy(), batches)]
    assert len(outs) == 3 and threading.get_ident() not in seen and len(seen) == 3
    for got, texts in zip(outs, batches):
        assert torch.equal(got, bb.encode_texts(texts)["pooled"])
    # padding is to each batch's longest caption, never to max_length
    enc = bb.tokenize(batches[2])
    assert enc["input_ids"].shape[1] == max(len(ids) for ids in bb.tokenizer(batches[2])["input_ids"]) < bb.max_length


def test_only_vetted_model_types_get_their_linears_cast():
    from types import SimpleNamespace

    from featstore.pipelines.backbones.base import cast_linear_weights

    def model(kind):
        m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        m.config = SimpleNamespace(model_type=kind)
        return m

    t5 = model("t5")  # T5 casts its activations to its linears' weight dtype: must stay float32
    assert cast_linear_weights(t5, torch.bfloat16, "cpu") == 0 and t5[0].weight.dtype == torch.float32
    bert = model("bert")
    assert cast_linear_weights(bert, None, "cpu") == 0 and bert[0].weight.dtype == torch.float32  # fp32: nothing
    assert cast_linear_weights(bert, torch.bfloat16, "cpu") == 1
    assert bert[0].weight.dtype == bert[0].bias.dtype == torch.bfloat16 and bert[1].weight.dtype == torch.float32
