"""The `dinov2` alias computes what torch.hub's ``dinov2_vitb14`` computes: its position embeddings
are resized by the hub's rule (scale factor (grid + 0.1) / trained grid, bicubic), not by
transformers' (output size).  A tiny random DINOv2 with DINOv2's real geometry (patch 14, trained
at 518 px: a 37x37 grid) is saved with save_pretrained, put in a hub cache under
facebook/dinov2-base and loaded through `load_backbone("dinov2")`; its outputs on real photos are
compared with a transcription of the hub model's forward (facebookresearch/dinov2,
``DinoVisionTransformer.prepare_tokens_with_masks`` / ``interpolate_pos_encoding`` / ``Block``,
as released: ``interpolate_offset=0.1``, ``interpolate_antialias=False``) run on the same weights.
No mocks."""

import copy
import math
import pickle
import shutil

import numpy as np
import pytest
import torch

from featstore.pipelines.backbones import load_backbone
from featstore.pipelines.backbones.dinov2 import HUB_POSITION_EMBEDDINGS, HubPositionEmbeddings
from featstore.pipelines.preprocess import Preprocess
from imagedata import SKIMAGE_NAMES, real_images

SHA = "0123456789abcdef0123456789abcdef0123abcd"
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14, image_size=518)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("tiny-dinov2-518") / "model"
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**TINY)).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hub_cache(tiny_dir, tmp_path_factory):
    """An HF hub cache holding the tiny model as facebook/dinov2-base (refs/main -> snapshot)."""
    cache = tmp_path_factory.mktemp("hub-cache")
    repo = cache / "models--facebook--dinov2-base"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    shutil.copytree(tiny_dir, repo / "snapshots" / SHA)
    return cache


@pytest.fixture
def sharelock(hub_cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache))
    return load_backbone("dinov2", tokens=True)


def photos(pre) -> torch.Tensor:
    """The scikit-image photos through the backbone's own recipe: uint8 (N, 3, 224, 224)."""
    images = real_images(len(SKIMAGE_NAMES))
    return torch.from_numpy(np.stack([pre(img) for _, img in images]))


# ---- the transcription of the hub model (facebookresearch/dinov2, dinov2/models + dinov2/layers) ----
def hub_state(hf_model) -> dict:
    """The HF port's weights under the hub model's names (qkv is one Linear in the hub code)."""
    sd = hf_model.state_dict()
    out = {
        "cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"],
    }
    for i in range(hf_model.config.num_hidden_layers):
        h, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[b + f"attn.qkv.{part}"] = torch.cat([sd[h + f"attention.{n}_proj.{part}"] for n in "qkv"])
            out[b + f"attn.proj.{part}"] = sd[h + f"attention.o_proj.{part}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[b + f"{n}.{part}"] = sd[h + f"{n}.{part}"]
        out[b + "ls1.gamma"] = sd[h + "layer_scale1.lambda1"]
        out[b + "ls2.gamma"] = sd[h + "layer_scale2.lambda1"]
    return out


def hub_pos_embed(pos_embed, x, w, h, patch_size, offset=0.1, antialias=False):
    """``interpolate_pos_encoding(x, w, h)``; w, h are x's dims 2 and 3 (the hub's names). Every
    hub version computes this for offset 0.1 (later ones ask for a size only when the offset is 0,
    the register models)."""
    n_tokens, n_pos = x.shape[1] - 1, pos_embed.shape[1] - 1
    if n_tokens == n_pos and w == h:
        return pos_embed
    pos = pos_embed.float()
    dim = x.shape[-1]
    w0, h0 = w // patch_size, h // patch_size
    m = int(math.sqrt(n_pos))
    assert m * m == n_pos
    scale = (float(w0 + offset) / m, float(h0 + offset) / m)  # a scale factor, not a size
    grid = torch.nn.functional.interpolate(pos[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2),
                                           scale_factor=scale, mode="bicubic", antialias=antialias)
    assert tuple(grid.shape[-2:]) == (w0, h0)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([pos[:, 0].unsqueeze(0), grid], dim=1).to(x.dtype)


def hub_forward(p: dict, x: torch.Tensor, *, heads: int, depth: int, patch_size: int, eps=1e-6, offset=0.1):
    """``forward_features``: (x_norm_clstoken, x_norm_patchtokens); no registers, no masks."""
    F = torch.nn.functional
    _, _, w, h = x.shape
    t = F.conv2d(x, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=patch_size)
    t = t.flatten(2).transpose(1, 2)  # PatchEmbed: B HW C
    t = torch.cat([p["cls_token"].expand(t.shape[0], -1, -1), t], dim=1)
    t = t + hub_pos_embed(p["pos_embed"], t, w, h, patch_size, offset=offset)
    B, N, C = t.shape
    for i in range(depth):
        b = f"blocks.{i}."
        y = F.layer_norm(t, (C,), p[b + "norm1.weight"], p[b + "norm1.bias"], eps)
        qkv = F.linear(y, p[b + "attn.qkv.weight"], p[b + "attn.qkv.bias"]).reshape(B, N, 3, heads, C // heads)
        q, k, v = (u.transpose(1, 2) for u in qkv.unbind(2))
        attn = (q @ k.transpose(-2, -1) * (C // heads) ** -0.5).softmax(-1)
        y = (attn @ v).transpose(1, 2).reshape(B, N, C)
        y = F.linear(y, p[b + "attn.proj.weight"], p[b + "attn.proj.bias"])
        t = t + y * p[b + "ls1.gamma"]
        y = F.layer_norm(t, (C,), p[b + "norm2.weight"], p[b + "norm2.bias"], eps)
        y = F.linear(F.gelu(F.linear(y, p[b + "mlp.fc1.weight"], p[b + "mlp.fc1.bias"])),
                     p[b + "mlp.fc2.weight"], p[b + "mlp.fc2.bias"])
        t = t + y * p[b + "ls2.gamma"]
    t = F.layer_norm(t, (C,), p["norm.weight"], p["norm.bias"], eps)
    return t[:, 0], t[:, 1:]


# ---- the tests ------------------------------------------------------------------------------------
def test_dinov2_alias_is_the_hub_model(sharelock, tiny_dir):
    from transformers import Dinov2Model

    assert sharelock.preprocess.crop == 224 and sharelock.token_shape == (16 * 16, 32)
    assert sharelock.identity["position_embeddings"] == HUB_POSITION_EMBEDDINGS
    px = photos(sharelock.preprocess)
    out = sharelock.encode_images(px)
    x = sharelock.preprocess.normalize(px)

    hf = Dinov2Model.from_pretrained(tiny_dir).eval()
    with torch.inference_mode():
        cls, patches = hub_forward(hub_state(hf), x, heads=2, depth=2, patch_size=14)
        hf_out = hf(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out["pooled"], cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["tokens"], patches, atol=1e-5, rtol=1e-5)

    # the two rules really differ, here by far more than the tolerance
    pos = hf.embeddings.position_embeddings.detach()
    tokens = torch.zeros(1, 1 + 16 * 16, 32)
    pos_gap = (hub_pos_embed(pos, tokens, 224, 224, 14) - hf.embeddings.interpolate_pos_encoding(tokens, 224, 224)).abs()
    assert pos_gap.max() > 0.1 * pos.abs().max()
    cls_gap = (hf_out[:, 0] - cls).abs().max().item()
    token_gap = (hf_out[:, 1:] - patches).abs().max().item()
    assert cls_gap > 1e-3 and token_gap > 1e-3, (cls_gap, token_gap)
    cosine = torch.nn.functional.cosine_similarity(hf_out[:, 0], cls, dim=1)
    token_cosine = torch.nn.functional.cosine_similarity(hf_out[:, 1:], patches, dim=2)
    print(f"\ntiny random DINOv2 (518 px, patch 14) at 224 px, {len(px)} skimage photos: cosine of CLS, "
          f"transformers' vs hub's position embeddings: mean {cosine.mean():.9f} (1 - mean {1 - cosine.mean():.3g}), "
          f"min {cosine.min():.9f}; patch tokens: mean {token_cosine.mean():.6f}, min {token_cosine.min():.6f}; "
          f"max |diff| CLS {cls_gap:.4g}, patch tokens {token_gap:.4g}; "
          f"max |diff| of the position embeddings {pos_gap.max():.4g} (max |pos| {pos.abs().max():.4g})")


def test_the_transcription_is_the_port_at_the_trained_grid(tiny_dir):
    """At 518 px (the trained 37x37 grid) neither rule resamples: the transcribed hub forward and
    transformers' port agree, so the transcription's blocks are right independently of the rule."""
    from transformers import Dinov2Model

    pre = Preprocess(resize=592, crop=518, interpolation="bilinear")
    x = pre.normalize(photos(pre)[:2])
    hf = Dinov2Model.from_pretrained(tiny_dir).eval()
    with torch.inference_mode():
        ref = hf(pixel_values=x).last_hidden_state
        cls, patches = hub_forward(hub_state(hf), x, heads=2, depth=2, patch_size=14)
    torch.testing.assert_close(cls, ref[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patches, ref[:, 1:], atol=1e-5, rtol=1e-5)


def test_a_path_keeps_transformers_rule(sharelock, tiny_dir):
    from transformers import Dinov2Model

    b = load_backbone(str(tiny_dir), tokens=True)
    assert "position_embeddings" not in b.identity
    px = photos(sharelock.preprocess)[:3]
    with torch.inference_mode():
        ref = Dinov2Model.from_pretrained(tiny_dir).eval()(pixel_values=b.preprocess.normalize(px)).last_hidden_state
    out = b.encode_images(px)
    torch.testing.assert_close(out["pooled"], ref[:, 0], atol=1e-5, rtol=1e-5)
    assert (sharelock.encode_images(px)["tokens"] - out["tokens"]).abs().max() > 1e-2


def test_hub_rule_survives_copies_and_leaves_the_trained_grid_alone(sharelock):
    px = photos(sharelock.preprocess)[:2]
    want = sharelock.encode_images(px)["pooled"]
    for model in (copy.deepcopy(sharelock.model), pickle.loads(pickle.dumps(sharelock.model))):
        assert isinstance(model.embeddings.interpolate_pos_encoding, HubPositionEmbeddings)
        with torch.inference_mode():
            got = model(pixel_values=sharelock.preprocess.normalize(px)).last_hidden_state[:, 0]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    emb = sharelock.model.embeddings
    at_518 = torch.zeros(1, 1 + 37 * 37, 32)
    assert emb.interpolate_pos_encoding(at_518, 518, 518) is emb.position_embeddings
