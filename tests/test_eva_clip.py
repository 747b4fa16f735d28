"""EVA-CLIP as a registry backbone (pipelines/backbones/eva_clip.py): a tiny random EVA-CLIP saved in
open_clip's hub layout with its checkpoint in both real key layouts (open_clip/timm ``visual.trunk.*``
+ ``text.*``, and EVA's own ``visual.blocks.*`` + ``text.*`` with its rotary buffers), loaded by
`load_backbone(path)`, against a transcription of the reference maths (tests/eva_clip_reference.py);
the real EVA02-CLIP-B/16 key names and configs mapped onto our modules; strict refusals; the CLI
extracting pooled + tokens from real photos; the offline hub alias; UTA's zero-shot text tower."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from featstore.errors import BackboneError
from featstore.pipelines.backbones import REGISTRY, load_backbone
from featstore.pipelines.backbones.eva_clip import EvaClipVision, text_config
from featstore.pipelines.backbones.eva_clip_weights import SPEC_FILE, map_text, map_vision, read_spec
from eva_clip_reference import save_tiny_eva_clip, tokenize_ref
from imagedata import encode, real_images, write_shard
from sharelock_data import one_thread

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)

# The tiny model: EVA-CLIP's own config format (model_configs/EVA02-CLIP-B-16.json's keys), small sizes
TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8, "mlp_ratio": 2.6667,
                       "eva_model_name": "eva-clip-tiny", "drop_path_rate": 0.0, "xattn": True, "fusedLN": True, "rope": True,
                       "pt_hw_seq_len": 16, "intp_freq": True, "naiveswiglu": True, "subln": True},
        "text_cfg": {"context_length": 16, "vocab_size": 521, "width": 32, "heads": 2, "layers": 2, "xattn": True,
                     "fusedLN": True}}

# ---- the real names, from the sources (EVA-CLIP/rei/eva_clip, open_clip, timm/models/eva.py) ----------------
B16_EVA_CONFIG = {  # baaivision/EVA EVA-CLIP/rei/eva_clip/model_configs/EVA02-CLIP-B-16.json
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "head_width": 64, "patch_size": 16, "mlp_ratio": 2.6667,
                   "eva_model_name": "eva-clip-b-16-X", "drop_path_rate": 0.0, "xattn": True, "fusedLN": True, "rope": True,
                   "pt_hw_seq_len": 16, "intp_freq": True, "naiveswiglu": True, "subln": True},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12, "xattn": True,
                 "fusedLN": True}}
B16_OPEN_CLIP_CONFIG = {  # mlfoundations/open_clip src/open_clip/model_configs/EVA02-B-16.json
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "timm_model_name": "eva02_base_patch16_clip_224", "timm_model_pretrained": False,
                   "timm_pool": "token", "timm_proj": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    "custom_text": True}
# one block of EVA02-CLIP-B/16 (width 768, SwiGLU hidden int(768 * 2.6667) = 2048), each layout's names
B16_EVA_BLOCK = {  # EVAVisionTransformer: Block(subln=True, naiveswiglu=True), Attention(subln, qkv_bias), SwiGLU
    "visual.blocks.0.norm1.weight": (768,), "visual.blocks.0.norm1.bias": (768,),
    "visual.blocks.0.attn.q_bias": (768,), "visual.blocks.0.attn.v_bias": (768,),
    "visual.blocks.0.attn.q_proj.weight": (768, 768), "visual.blocks.0.attn.k_proj.weight": (768, 768),
    "visual.blocks.0.attn.v_proj.weight": (768, 768),
    "visual.blocks.0.attn.inner_attn_ln.weight": (768,), "visual.blocks.0.attn.inner_attn_ln.bias": (768,),
    "visual.blocks.0.attn.proj.weight": (768, 768), "visual.blocks.0.attn.proj.bias": (768,),
    "visual.blocks.0.attn.rope.freqs_cos": (196, 64), "visual.blocks.0.attn.rope.freqs_sin": (196, 64),
    "visual.blocks.0.norm2.weight": (768,), "visual.blocks.0.norm2.bias": (768,),
    "visual.blocks.0.mlp.w1.weight": (2048, 768), "visual.blocks.0.mlp.w1.bias": (2048,),
    "visual.blocks.0.mlp.w2.weight": (2048, 768), "visual.blocks.0.mlp.w2.bias": (2048,),
    "visual.blocks.0.mlp.ffn_ln.weight": (2048,), "visual.blocks.0.mlp.ffn_ln.bias": (2048,),
    "visual.blocks.0.mlp.w3.weight": (768, 2048), "visual.blocks.0.mlp.w3.bias": (768,),
}
B16_EVA_REST = {"visual.cls_token": (1, 1, 768), "visual.pos_embed": (1, 197, 768),
                "visual.patch_embed.proj.weight": (768, 3, 16, 16), "visual.patch_embed.proj.bias": (768,),
                "visual.rope.freqs_cos": (196, 64), "visual.rope.freqs_sin": (196, 64),
                "visual.norm.weight": (768,), "visual.norm.bias": (768,),
                "visual.head.weight": (512, 768), "visual.head.bias": (512,)}
B16_TIMM_BLOCK = {  # timm Eva: EvaBlock(qkv_fused=False, swiglu_mlp, scale_mlp, scale_attn_inner) under open_clip's visual.trunk
    "visual.trunk.blocks.0.norm1.weight": (768,), "visual.trunk.blocks.0.norm1.bias": (768,),
    "visual.trunk.blocks.0.attn.q_proj.weight": (768, 768), "visual.trunk.blocks.0.attn.q_proj.bias": (768,),
    "visual.trunk.blocks.0.attn.k_proj.weight": (768, 768),
    "visual.trunk.blocks.0.attn.v_proj.weight": (768, 768), "visual.trunk.blocks.0.attn.v_proj.bias": (768,),
    "visual.trunk.blocks.0.attn.norm.weight": (768,), "visual.trunk.blocks.0.attn.norm.bias": (768,),
    "visual.trunk.blocks.0.attn.proj.weight": (768, 768), "visual.trunk.blocks.0.attn.proj.bias": (768,),
    "visual.trunk.blocks.0.norm2.weight": (768,), "visual.trunk.blocks.0.norm2.bias": (768,),
    "visual.trunk.blocks.0.mlp.fc1_g.weight": (2048, 768), "visual.trunk.blocks.0.mlp.fc1_g.bias": (2048,),
    "visual.trunk.blocks.0.mlp.fc1_x.weight": (2048, 768), "visual.trunk.blocks.0.mlp.fc1_x.bias": (2048,),
    "visual.trunk.blocks.0.mlp.norm.weight": (2048,), "visual.trunk.blocks.0.mlp.norm.bias": (2048,),
    "visual.trunk.blocks.0.mlp.fc2.weight": (768, 2048), "visual.trunk.blocks.0.mlp.fc2.bias": (768,),
}
B16_TIMM_REST = {"visual.trunk.cls_token": (1, 1, 768), "visual.trunk.pos_embed": (1, 197, 768),
                 "visual.trunk.patch_embed.proj.weight": (768, 3, 16, 16), "visual.trunk.patch_embed.proj.bias": (768,),
                 "visual.trunk.norm.weight": (768,), "visual.trunk.norm.bias": (768,),
                 "visual.trunk.head.weight": (512, 768), "visual.trunk.head.bias": (512,)}
B16_TEXT_BLOCK = {  # open_clip / EVA TextTransformer's ResidualAttentionBlock (CustomTextCLIP: under text.)
    "text.transformer.resblocks.0.ln_1.weight": (512,), "text.transformer.resblocks.0.ln_1.bias": (512,),
    "text.transformer.resblocks.0.attn.in_proj_weight": (1536, 512), "text.transformer.resblocks.0.attn.in_proj_bias": (1536,),
    "text.transformer.resblocks.0.attn.out_proj.weight": (512, 512), "text.transformer.resblocks.0.attn.out_proj.bias": (512,),
    "text.transformer.resblocks.0.ln_2.weight": (512,), "text.transformer.resblocks.0.ln_2.bias": (512,),
    "text.transformer.resblocks.0.mlp.c_fc.weight": (2048, 512), "text.transformer.resblocks.0.mlp.c_fc.bias": (2048,),
    "text.transformer.resblocks.0.mlp.c_proj.weight": (512, 2048), "text.transformer.resblocks.0.mlp.c_proj.bias": (512,),
}
B16_TEXT_REST = {"text.token_embedding.weight": (49408, 512), "text.positional_embedding": (77, 512),
                 "text.ln_final.weight": (512,), "text.ln_final.bias": (512,), "text.text_projection": (512, 512),
                 "logit_scale": ()}


def _every_block(block: dict, n: int) -> dict:
    return {k.replace(".0.", f".{i}.", 1): s for i in range(n) for k, s in block.items()}


def _meta(names: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in names.items()}


def test_real_b16_configs_and_key_names_fit_our_modules(tmp_path):
    """EVA's and open_clip's EVA02-CLIP-B/16 configs describe the same model, and every real key of
    either checkpoint layout maps onto a weight of our towers with its real shape (meta tensors)."""
    specs = []
    for i, cfg in enumerate([B16_EVA_CONFIG, {"model_cfg": B16_OPEN_CLIP_CONFIG}]):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / SPEC_FILE).write_text(json.dumps(cfg))
        specs.append(read_spec(tmp_path / str(i)))
    assert specs[0].vision == specs[1].vision and specs[0].text == specs[1].text and specs[0].embed_dim == 512
    spec = specs[0]
    assert (spec.vision.mlp_dim, spec.vision.heads, spec.vision.pt_grid, spec.vision.grid, spec.text.act) == (2048, 12, 16, 14, "gelu")
    with torch.device("meta"):
        vision = EvaClipVision(spec.vision, spec.embed_dim).state_dict()
        from transformers import CLIPTextModelWithProjection

        tok = type("Tok", (), {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407})()
        text = CLIPTextModelWithProjection(text_config(spec, tok)).state_dict()
    text_keys = _meta({**_every_block(B16_TEXT_BLOCK, 12), **B16_TEXT_REST})
    for block, rest in [(B16_EVA_BLOCK, B16_EVA_REST), (B16_TIMM_BLOCK, B16_TIMM_REST)]:
        sd = {**_meta({**_every_block(block, 12), **rest}), **text_keys}
        mapped, _, rope = map_vision(sd, spec.vision)
        assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in vision.items()}
        assert len(rope) == (26 if block is B16_EVA_BLOCK else 0)
        tmapped, _ = map_text(sd)
        assert {k: tuple(v.shape) for k, v in tmapped.items()} == {k: tuple(v.shape) for k, v in text.items()}


# ---- the tiny model, saved in both layouts ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{layout: directory}: the same random tiny EVA-CLIP (reference modules) saved as open_clip's hub layout
    (open_clip_model.safetensors, timm names) and EVA's (a .pt with visual.blocks.* and rotary buffers)."""
    root = tmp_path_factory.mktemp("eva-clip")
    return {**save_tiny_eva_clip(root, TINY), "root": root}


@pytest.mark.parametrize("kind", ["open_clip", "eva"])
def test_image_embeddings_and_tokens_equal_the_reference(tiny, kind):
    bb = load_backbone(str(tiny["dirs"][kind]), tokens=True)
    assert bb.identity["recipe"] == "eva-clip-vision" and bb.identity["eva_clip"]["checkpoint_layout"] == kind
    assert bb.dim == 16 and bb.token_shape == (16, 16)
    pre = bb.identity["preprocess"]
    assert (pre["resize"], pre["crop"], pre["interpolation"]) == (32, 32, "bicubic") and pre["mean"][0] == pytest.approx(0.48145466)
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8))
    out = bb.encode_images(pixels)
    with torch.no_grad():
        x = bb.preprocess.normalize(pixels)
        feats = tiny["visual"].features(x)
        pooled, tokens = tiny["visual"].head(feats[:, 0]), tiny["visual"].head(feats[:, 1:])
    assert (out["pooled"] - pooled).abs().max() < 1e-5
    assert (out["tokens"] - tokens).abs().max() < 1e-5
    raw = load_backbone(str(tiny["dirs"][kind]), tokens=True, token_projection=False, pooling="cls").encode_images(pixels)
    assert (raw["tokens"] - feats[:, 1:]).abs().max() < 1e-5 and (raw["pooled"] - feats[:, 0]).abs().max() < 1e-5


TEXTS = ["a photo of a cat", "dog", "a photo of a dog, to the cat to the dog to the cat to the dog"]  # the last one is cut


@pytest.mark.parametrize("kind", ["open_clip", "eva"])
def test_text_embeddings_equal_the_reference(tiny, kind):
    bb = load_backbone(str(tiny["dirs"][kind]), modality="text")
    assert bb.identity["recipe"] == "eva-clip-text" and bb.identity["hidden_act"] == "gelu" and bb.dim == 16
    out = bb.encode_texts(TEXTS)["pooled"]
    ids = tokenize_ref(bb.tokenizer, TEXTS, TINY["text_cfg"]["context_length"])
    assert (ids[2] != 0).all()  # truncated to the context, EOT last
    with torch.no_grad():
        ref = tiny["text"](ids)
    assert (out - ref).abs().max() < 1e-5
    alone = bb.encode_texts(TEXTS[1:2])["pooled"]  # padding by batch mates changes nothing
    assert (alone - out[1:2]).abs().max() < 1e-5


def _save_variant(tiny, kind, name, edit):
    from safetensors.torch import save_file

    src = tiny["dirs"][kind]
    d = tiny["root"] / name
    d.mkdir()
    for f in src.iterdir():
        if f.suffix in (".json", ".txt"):
            (d / f.name).write_text(f.read_text())
    sd = edit(dict(tiny[f"{kind}_sd"]))
    sd = {k: x.detach().clone().contiguous() for k, x in sd.items()}
    if kind == "eva":
        torch.save(sd, d / "EVA02_CLIP_tiny_psz8.pt")
    else:
        save_file(sd, str(d / "open_clip_model.safetensors"))
    return str(d)


def _drop(key):
    return lambda sd: {k: v for k, v in sd.items() if k != key}


def _add(key):
    return lambda sd: {**sd, key: torch.zeros(3)}


@pytest.mark.parametrize("kind, edit, modality, words", [
    ("open_clip", _drop("visual.trunk.blocks.1.attn.q_proj.bias"), "image", ["1 weights missing", "vit.blocks.1.attn.q_bias"]),
    ("eva", _drop("visual.blocks.0.mlp.ffn_ln.weight"), "image", ["1 weights missing", "vit.blocks.0.mlp.ffn_ln.weight"]),
    ("open_clip", _add("visual.trunk.blocks.0.attn.gate.weight"), "image", ["unexpected", "attn.gate.weight"]),
    ("open_clip", _add("visual.trunk.blocks.0.attn.gate.weight"), "text", ["unexpected", "attn.gate.weight"]),
    ("eva", _add("text.cls_emb"), "image", ["unexpected", "text.cls_emb"]),
    ("eva", _drop("text.transformer.resblocks.1.attn.in_proj_bias"), "text", ["3 weights missing", "layers.1.self_attn"]),
    ("open_clip", _add("text.transformer.resblocks.0.attn.in_proj_scale"), "text", ["unexpected", "in_proj_scale"]),
    ("eva", lambda sd: {**sd, "visual.rope.freqs_cos": sd["visual.rope.freqs_cos"] * 0.5}, "image", ["rotary table"]),
])
def test_a_missing_or_unexpected_key_is_refused_in_one_line(tiny, kind, edit, modality, words):
    path = _save_variant(tiny, kind, f"bad-{kind}-{modality}-{abs(hash(tuple(words)))}", edit)
    with pytest.raises(BackboneError) as info:
        load_backbone(path, modality=modality)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_a_checkpoint_pickling_objects_is_refused(tiny):
    """Training checkpoints that pickle an argparse Namespace beside the weights are not unpickled."""
    import argparse

    path = _save_variant(tiny, "eva", "pickled", lambda sd: sd)
    torch.save({"state_dict": tiny["eva_sd"], "args": argparse.Namespace(lr=1e-3)}, f"{path}/EVA02_CLIP_tiny_psz8.pt")
    with pytest.raises(BackboneError) as info:
        load_backbone(path)
    assert "\n" not in str(info.value) and "weights_only=True" in str(info.value)


def test_cli_extract_stores_pooled_and_tokens_of_real_photos(tiny, tmp_path):
    from click.testing import CliRunner

    from featstore.command.cli import main
    from featstore.store import Store

    images = real_images(6)
    samples = [{"key": f"{i:09d}", "image": encode(img), "json": {"uid": f"img-{name}"}} for i, (name, img) in enumerate(images)]
    (tmp_path / "src").mkdir()
    write_shard(tmp_path / "src" / "00000.tar", samples)
    args = ["extract", "--store", tmp_path / "s.zarr", "--source", tmp_path / "src", "--backbone", tiny["dirs"]["open_clip"],
            "--name", "eva", "--tokens", "--pixels", "px", "--batch-size", "4", "--no-progress"]
    out = CliRunner().invoke(main, [str(a) for a in args])
    assert out.exit_code == 0, out.output
    store = Store.open(tmp_path / "s.zarr")
    fs = store.feature_set("eva")
    pooled = np.asarray(fs.array("pooled")[:]).astype(np.float32)
    tokens = np.asarray(fs.array("tokens")[:]).astype(np.float32)
    assert pooled.shape == (6, 16) and tokens.shape == (6, 16, 16)
    assert fs.identity["recipe"] == "eva-clip-vision" and fs.identity["tokens"].startswith("head(norm(x)")
    bb = load_backbone(str(tiny["dirs"]["open_clip"]), tokens=True)
    again = bb.encode_images(torch.from_numpy(np.asarray(store.pixels("px")[:])))  # the stored crops, re-encoded
    assert np.abs(again["pooled"].numpy() - pooled).max() < 2e-2  # features are stored as float16
    assert np.abs(again["tokens"].numpy() - tokens).max() < 2e-2


@pytest.mark.parametrize("alias", ["eva02-clip-b16", "eva02-clip-l14", "eva02-clip-l14-336", "eva02-clip-text-b16"])
def test_hub_alias_offline_fails_with_one_line(alias, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError) as info:
        load_backbone(alias)
    msg = str(info.value)
    assert "\n" not in msg and "local path" in msg and REGISTRY[alias].source in msg


def test_uta_zero_shot_gets_the_eva_clip_text_tower(tiny):
    """UTA's `text_tower` finds the text tower of the checkpoint an EVA-CLIP teacher was extracted with."""
    from featstore.trainers.uta.teacher import text_tower

    image = load_backbone(str(tiny["dirs"]["eva"]), tokens=True)
    tower = text_tower({"name": "eva", "identity": image.identity})
    assert tower.identity["recipe"] == "eva-clip-text" and tower.identity["weights_hash"] == image.identity["weights_hash"]
    ids = tokenize_ref(tower.tokenizer, TEXTS[:2], TINY["text_cfg"]["context_length"])
    with torch.no_grad():
        assert (tower.encode_texts(TEXTS[:2])["pooled"] - tiny["text"](ids)).abs().max() < 1e-5
