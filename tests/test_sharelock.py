import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from featstore.errors import ConfigError
from featstore.trainers import backbone_link
from featstore.trainers.sharelock.config import Config
from featstore.trainers.contrastive import info_nce, retrieval_recall
from featstore.trainers.sharelock.model import ShareLock, ShareLockModel, count_parameters

from sharelock_data import FakeTextBackbone, one_thread, trained_run

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


def test_language_head_parameter_count_sharelock_defaults():
    # 4096-d LLM features, 768-d vision features: 4096→4096→4096→4096→768, built on the meta device
    # (no memory, no init cost).
    with torch.device("meta"):
        model = ShareLockModel(768, 4096, Config())
    assert count_parameters(model.text_head) == 53_515_008
    assert count_parameters(model) == 53_515_008  # identity vision head, fixed logit scale
    assert isinstance(model.image_head, nn.Identity) and model.embed_dim == 768


def test_head_structure():
    model = ShareLockModel(8, 12, Config(num_layers=3, hidden_dim=16, dropout=0.2))
    kinds = [type(m) for m in model.text_head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    assert model.text_head[3].p == 0.2 and model.text_head[0].in_features == 12 and model.text_head[-1].out_features == 8
    single = ShareLockModel(8, 12, Config(num_layers=1))
    assert [type(m) for m in single.text_head] == [nn.Linear]


def test_vision_mlp_and_embed_dim():
    model = ShareLockModel(8, 12, Config(num_layers=2, hidden_dim=16, vision_head="mlp", vision_num_layers=2,
                                         vision_hidden_dim=10, embed_dim=6))
    zi, zt = model.eval()(torch.randn(5, 8), torch.randn(5, 12))
    assert zi.shape == zt.shape == (5, 6)
    assert torch.allclose(zi.norm(dim=1), torch.ones(5)) and torch.allclose(zt.norm(dim=1), torch.ones(5))
    with pytest.raises(ConfigError, match="vision_head=mlp"):
        ShareLockModel(8, 12, Config(embed_dim=6))


def test_logit_scale_fixed_or_learnable():
    fixed = ShareLockModel(4, 4, Config(num_layers=1))
    assert "log_logit_scale" not in dict(fixed.named_parameters())
    assert fixed.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    learn = ShareLockModel(4, 4, Config(num_layers=1, learnable_logit_scale=True))
    assert "log_logit_scale" in dict(learn.named_parameters())


def test_info_nce_is_symmetric_clip_loss():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(6, 5), dim=1), F.normalize(torch.randn(6, 5), dim=1)
    logits = 10 * a @ b.T
    manual = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    assert info_nce(a, b, 10.0).item() == pytest.approx(manual.item(), rel=1e-6)
    assert info_nce(a, b, 10.0).item() == pytest.approx(info_nce(b, a, 10.0).item(), rel=1e-6)
    assert info_nce(a, a, 100.0).item() < 0.01  # perfectly aligned


def test_retrieval_recall():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(300, 16), dim=1)
    perfect = retrieval_recall(x, x, ks=(1, 5))
    assert perfect == {"i2t_r1": 1.0, "i2t_r5": 1.0, "t2i_r1": 1.0, "t2i_r5": 1.0}
    rand = retrieval_recall(x, F.normalize(torch.randn(300, 16), dim=1), ks=(1, 10), chunk=64)
    assert rand["i2t_r1"] < 0.05 and rand["t2i_r10"] < 0.15
    # swapping two captions breaks exactly those two images' R@1
    y = x.clone()
    y[[0, 1]] = y[[1, 0]]
    assert retrieval_recall(x, y, ks=(1,))["i2t_r1"] == pytest.approx(298 / 300)


def test_api_load_and_encode_features(tmp_path_factory):
    store_path, run_dir, _ = trained_run(tmp_path_factory)
    sl = ShareLock.load(run_dir)
    assert sl.feature_sets["image"]["name"] == "img" and sl.feature_sets["text"]["name"] == "txt"
    x = np.random.default_rng(0).standard_normal((7, 48)).astype(np.float16)
    z = sl.encode_image_features(x)
    assert z.shape == (7, 48) and z.dtype == torch.float32
    assert torch.allclose(z.norm(dim=1), torch.ones(7), atol=1e-5)
    t = sl.encode_text_features(torch.randn(3, 80))
    assert t.shape == (3, 48)
    assert sl.encode_text_features(np.zeros(80, np.float32)).shape == (1, 48)  # one vector
    last = ShareLock.load(run_dir, which="last")
    assert last.state["step"] >= sl.state["step"]


def test_api_encode_text_runs_the_recorded_backbone_once(tmp_path_factory, monkeypatch):
    _, run_dir, _ = trained_run(tmp_path_factory)
    fake, loads = FakeTextBackbone(), []

    def backbone_for(feature_set, device="cpu"):
        loads.append(feature_set["name"])
        return fake

    monkeypatch.setattr(backbone_link, "backbone_for", backbone_for)
    sl = ShareLock.load(run_dir)
    a = sl.encode_text(["a photo of a three.", "a seven"])
    b = sl.encode_text("a photo of a three.")
    assert loads == ["txt"]  # loaded lazily, once
    raw = fake.encode_texts(["a photo of a three."])["pooled"].half().float()  # as stored: fp16
    # a batch of two and a batch of one differ in the last float bits (blocked matmuls)
    assert torch.allclose(b, sl.encode_text_features(raw), atol=1e-6) and torch.allclose(a[0], b[0], atol=1e-6)


def test_load_options_from_identity():
    name, kw = backbone_link.load_options({"alias": "minilm", "model": "package:x", "pooling": "mean", "layer": None,
                                           "precision": "fp32", "modality": "text", "prefix": "", "max_length": 128})
    assert name == "minilm" and kw == {"pooling": "mean", "layer": None, "precision": "fp32", "modality": "text",
                                       "prefix": "", "max_length": 128}
    assert backbone_link.load_options({"alias": None, "model": "/models/x"})[0] == "/models/x"


class FakeImageBackbone:
    """An 'image backbone' on 8x8 crops: a fixed linear map of the pixels to 48 features."""

    modality, dim = "image", 48

    def __init__(self):
        from featstore.pipelines.preprocess import Preprocess

        self.preprocess = Preprocess(resize=8, crop=8)
        self.weight = torch.randn(3 * 8 * 8, 48, generator=torch.Generator().manual_seed(0))

    def encode_images(self, pixels):
        assert pixels.dtype == torch.uint8 and pixels.shape[1:] == (3, 8, 8)
        return {"pooled": (pixels.float().flatten(1) / 255) @ self.weight}


def test_api_encode_image_decodes_preprocesses_and_runs_the_backbone(tmp_path_factory, monkeypatch):
    import io

    from PIL import Image

    _, run_dir, _ = trained_run(tmp_path_factory)
    fake = FakeImageBackbone()
    monkeypatch.setattr(backbone_link, "backbone_for", lambda feature_set, device="cpu": fake)
    sl = ShareLock.load(run_dir)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    z = sl.encode_image([img, buf.getvalue()])
    pixels = torch.from_numpy(np.stack([fake.preprocess(img)] * 2))
    expected = sl.encode_image_features(fake.encode_images(pixels)["pooled"].half().float())
    assert z.shape == (2, 48) and torch.allclose(z, expected, atol=1e-6)
    assert torch.allclose(sl.encode_image(img), z[:1], atol=1e-6)


def test_caption_retrieval_definitions_and_ties():
    from featstore.trainers.contrastive import caption_retrieval

    torch.manual_seed(0)
    image = torch.randn(50, 16)
    text = torch.cat([image + 0.01 * torch.randn(50, 16), torch.randn(50, 16)])  # caption 1 matches, caption 2 is noise
    owner = torch.cat([torch.arange(50), torch.arange(50)])
    r = caption_retrieval(image, text, owner, ks=(1, 5))
    assert r["text_retrieval_recall@1"] == 1.0  # every image finds one of its captions first
    assert 0.5 <= r["image_retrieval_recall@1"] < 0.6  # half the captions find their image
    # a collapsed model (every score tied) scores chance, not 0 or 1: P(a positive in the top k)
    flat = caption_retrieval(torch.ones(10, 4), torch.ones(20, 4), torch.arange(20) % 10, ks=(1, 5))
    assert flat["image_retrieval_recall@1"] == pytest.approx(1 / 10) and flat["image_retrieval_recall@5"] == pytest.approx(5 / 10)
    assert flat["text_retrieval_recall@1"] == pytest.approx(2 / 20)  # 2 positives among 20 tied captions
    assert flat["text_retrieval_recall@5"] == pytest.approx(1 - (18 * 17 * 16 * 15 * 14) / (20 * 19 * 18 * 17 * 16))
