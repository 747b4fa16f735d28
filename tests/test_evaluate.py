import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from featstore.errors import ConfigError, IdentityMismatch
from featstore.split import split_by_uid
from featstore.store import Store
from featstore.trainers import backbone_link
from featstore.trainers.sharelock.evaluate import evaluate
from featstore.trainers.prompts import OPENAI_IMAGENET_TEMPLATES, classnames, load_templates, templates

FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")

from readonly import read_only_prefix
from sharelock_data import CLASS_NAMES, IMAGE_IDENTITY, FakeTextBackbone, make_aligned_store, one_thread, trained_run

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture
def fake_backbone(monkeypatch):
    """The text backbone eval loads from the checkpoint's identity, replaced by the synthetic one."""
    fake = FakeTextBackbone()
    monkeypatch.setattr(backbone_link, "backbone_for", lambda feature_set, device="cpu": fake)
    return fake


def test_zero_shot_and_retrieval_far_above_chance(tmp_path_factory, tmp_path, fake_backbone):
    store_path, run_dir, _ = trained_run(tmp_path_factory)
    result = evaluate(run_dir, store_path, split=True, plot_path=tmp_path / "confusion.png")
    json.dumps(result)  # JSON-able
    zs = result["zero_shot"]
    store = Store.open(store_path)
    n_val = int(split_by_uid(store.uids(), 0.1)[1].sum())
    assert result["split"] == "val" and zs["rows"] == n_val and zs["classes"] == 10
    assert zs["templates"] == "imagenet1k" and zs["n_templates"] == 80  # CLIP_benchmark's default: the 80 OpenAI templates
    assert zs["class_names"] == "samples/label"
    assert zs["acc1"] > 0.6 and zs["acc5"] >= zs["acc1"] and zs["acc1"] == zs["top1"]  # chance: 0.1
    assert zs["mean_per_class_recall"] == pytest.approx(np.mean(list(zs["per_class_top1"].values())))
    assert np.asarray(zs["confusion"]).sum() == n_val
    with open(tmp_path / "confusion.png", "rb") as f:
        assert f.read(4) == b"\x89PNG"
    r = result["retrieval"]
    assert r["images"] == r["texts"] == n_val and r["text_sets"] == ["txt"] and r["captions_per_image"]["max"] == 1
    assert r["image_retrieval_recall@1"] > 0.5 and r["text_retrieval_recall@1"] > 0.5
    assert r["image_retrieval_recall@10"] >= r["image_retrieval_recall@5"] >= r["image_retrieval_recall@1"]
    assert result["step"] == json.load(open(f"{run_dir}/best/checkpoint.json"))["step"]


def test_every_row_by_default(tmp_path_factory, fake_backbone):
    store_path, run_dir, _ = trained_run(tmp_path_factory)
    result = evaluate(run_dir, store_path, templates="sharelock")
    assert result["split"] == "all" and result["zero_shot"]["rows"] == Store.open(store_path).n_rows
    assert result["retrieval"]["images"] == Store.open(store_path).n_rows
    with pytest.raises(ConfigError, match="not both"):
        evaluate(run_dir, store_path, split=True, all_rows=True)


def test_prompt_features_cached_in_store(tmp_path_factory, tmp_path, fake_backbone):
    store_path, run_dir, _ = trained_run(tmp_path_factory)
    store = make_aligned_store(tmp_path / "s.zarr", n=400)  # a fresh store: an empty cache
    first = evaluate(run_dir, store.path, templates="sharelock")  # ShareLock's template: one prompt per class
    assert sum(len(c) for c in fake_backbone.calls) == 10
    group = zarr.open_group(store.path, mode="r")["prompts/txt"]  # plain zarr can read it
    assert sorted(group["text"][:]) == sorted(f"A photo of a {c}" for c in CLASS_NAMES)
    assert group["pooled"].shape == (10, 80) and group["pooled"].dtype == np.float16
    assert tuple(group["pooled"].metadata.dimension_names) == ("prompt", "dim")
    assert tuple(group["text"].metadata.dimension_names) == ("prompt",)
    assert group.attrs["identity"] == json.loads(json.dumps(fake_backbone.identity))

    fake_backbone.calls.clear()
    again = evaluate(run_dir, store.path, templates="sharelock")
    assert fake_backbone.calls == [] and again["zero_shot"] == first["zero_shot"]  # all from the cache

    tpl = tmp_path / "templates.txt"
    tpl.write_text("A photo of a {c}\na drawing of the number {c}.\n")
    evaluate(run_dir, store.path, templates=str(tpl))
    assert sorted(fake_backbone.calls[0]) == sorted(f"a drawing of the number {c}." for c in CLASS_NAMES)  # only new texts
    assert zarr.open_group(store.path, mode="r")["prompts/txt"].attrs["n"] == 20


def test_all_rows_and_classes_file(tmp_path_factory, tmp_path, fake_backbone):
    store_path, run_dir, _ = trained_run(tmp_path_factory)
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(CLASS_NAMES) + "\n")
    result = evaluate(run_dir, store_path, classes=str(classes), all_rows=True, templates="simple")
    assert result["split"] == "all" and result["zero_shot"]["rows"] == Store.open(store_path).n_rows
    assert result["zero_shot"]["top1"] > 0.6 and result["zero_shot"]["class_names"] == f"file:{classes}"
    classes.write_text("zero\none\n")
    with pytest.raises(ConfigError, match="class names"):
        evaluate(run_dir, store_path, classes=str(classes))
    with pytest.raises(ConfigError, match="built-in"):
        evaluate(run_dir, store_path, classes="imagenet-21k")


def test_identity_mismatch_refused_naming_both(tmp_path_factory, tmp_path, fake_backbone):
    _, run_dir, _ = trained_run(tmp_path_factory)
    other = make_aligned_store(tmp_path / "o.zarr", n=200, image_identity={**IMAGE_IDENTITY, "model": "other-image"})
    with pytest.raises(IdentityMismatch) as e:
        evaluate(run_dir, other.path)
    msg = str(e.value)
    assert "'img'" in msg and run_dir in msg and "synthetic-image" in msg and "other-image" in msg


def test_other_feature_set_names_and_no_text_features(tmp_path_factory, tmp_path, fake_backbone):
    _, run_dir, _ = trained_run(tmp_path_factory)
    store = make_aligned_store(tmp_path / "r.zarr", n=300, image_name="img-renamed", text_name="other-text",
                               text_identity={"model": "unrelated"})
    result = evaluate(run_dir, store.path, image="img-renamed", templates="sharelock")  # the store lacks 'txt'
    assert result["zero_shot"]["top1"] > 0.5 and result["retrieval"] is None
    assert any("retrieval skipped" in n for n in result["notes"])
    with pytest.raises(IdentityMismatch):
        evaluate(run_dir, store.path, image="img-renamed", text="other-text")


def test_templates():
    assert len(OPENAI_IMAGENET_TEMPLATES) == len(set(OPENAI_IMAGENET_TEMPLATES)) == 80
    assert all("{c}" in t for t in OPENAI_IMAGENET_TEMPLATES)
    assert "itap of a {c}." in OPENAI_IMAGENET_TEMPLATES and load_templates("sharelock") == ["A photo of a {c}"]
    assert load_templates("openai") == templates("imagenet1k") == OPENAI_IMAGENET_TEMPLATES
    assert len(templates("cifar10")) == len(templates("cifar100")) == 18 and load_templates("simple") == ["a photo of a {c}."]
    assert len(classnames("imagenet1k")) == 1000 and len(set(classnames("imagenet1k"))) == 998  # OpenAI's list names
    # two pairs of classes alike ("missile", "sunglasses"), as CLIP_benchmark evaluates it
    assert classnames("imagenet1k")[:3] == ["tench", "goldfish", "great white shark"]
    assert classnames("cifar10")[0] == "airplane" and len(classnames("cifar100")) == 100
    with pytest.raises(ConfigError, match="built-in"):
        classnames("imagenet22k")
    with pytest.raises(ConfigError):
        load_templates("no-such-file.txt")
    with pytest.raises(ConfigError, match="class name goes"):
        load_templates(["a photo"])


# ---- real features: sklearn digits through extract (EfficientNet-Lite0 images, MiniLM captions) ----
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTIONS = ["a handwritten digit {w}", "the number {d} written by hand", "a scanned hand-drawn {d}",
            "handwriting showing the numeral {w}", "someone wrote the digit {d} with a pen", "{w}, as written on a form"]
DIGITS_PER_CLASS = 30  # 300 images: EfficientNet-Lite0 at 224 px dominates the cost on 2 cores


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    extract = pytest.importorskip("featstore.pipelines.extract").extract
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    from PIL import Image

    from imagedata import encode, write_shard

    digits = sklearn_datasets.load_digits()
    picked = np.concatenate([np.flatnonzero(digits.target == d)[:DIGITS_PER_CLASS] for d in range(10)])
    rng = np.random.default_rng(0)
    samples = []
    for i in picked:
        label = int(digits.target[i])
        ink = 255 - (digits.images[i] / 16.0 * 255).astype(np.uint8)  # dark ink on white
        img = Image.fromarray(ink).resize((64, 64), Image.BICUBIC)
        caption = CAPTIONS[rng.integers(len(CAPTIONS))].format(w=WORDS[label], d=label)
        samples.append({"key": f"{i:09d}", "image": encode(img, "PNG"), "ext": "png", "caption": caption,
                        "json": {"uid": f"digits-{i:05d}", "label": label}})
    d = tmp_path_factory.mktemp("digits")
    write_shard(d / "00000.tar", samples)
    store = d / "digits.zarr"
    quiet = dict(progress=False, log=lambda *_: None)
    extract(store, d, "efficientnet-lite0", rows_per_shard=128, batch_size=40, label_column="label", **quiet)
    extract(store, d, "minilm", field="caption", batch_size=128, **quiet)
    return str(store), {s["json"]["uid"]: s["image"] for s in samples}


@pytest.fixture(scope="module")
def digits_run(digits_store, tmp_path_factory):
    """A head trained on the digits store: (store path, run dir, summary)."""
    from featstore.trainers.sharelock.train import train_head

    run = tmp_path_factory.mktemp("digits-run") / "run"
    summary = train_head(digits_store[0], "efficientnet-lite0", "minilm", run, progress=False,
                         overrides=["hidden_dim=256", "batch_size=128", "accumulation_steps=1", "steps=150",
                                    "warmup_steps=15", "val_every=15", "patience=null", "save_every=150"])
    return digits_store[0], run, summary


def test_digits_zero_shot_far_above_chance(digits_store, digits_run, tmp_path):
    from featstore.trainers.sharelock.model import ShareLock

    digits_store, pngs = digits_store
    _, run, summary = digits_run
    assert summary["step"] == 150
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(WORDS) + "\n")
    templates = tmp_path / "templates.txt"  # worded unlike any caption: no digit / number / numeral / hand
    templates.write_text("a grey picture of a {c}.\nan image that shows a {c}.\n{c}\n")
    result = evaluate(run, digits_store, classes=str(classes), templates=str(templates), split=True)  # the real MiniLM
    zs = result["zero_shot"]
    assert zs["rows"] >= 15 and zs["top1"] > 0.4, zs  # chance: 0.1
    assert result["retrieval"]["text_retrieval_recall@5"] > 5 * 5 / result["retrieval"]["images"]
    group = zarr.open_group(digits_store, mode="r")["prompts/minilm"]
    assert group.attrs["n"] == 30 and group.attrs["identity"]["alias"] == "minilm"

    # the Python API on raw inputs runs the recorded backbones: PNG bytes → the stored features' embeddings
    sl = ShareLock.load(run)
    store = Store.open(digits_store)
    uids = store.uids()[:6]
    from_pngs = sl.encode_image([pngs[u] for u in uids])
    from_store = sl.encode_image_features(np.asarray(store.array("features/efficientnet-lite0/pooled")[:6]))
    assert torch.allclose(from_pngs, from_store, atol=2e-3)
    words = sl.encode_text([f"an image that shows a {w}." for w in WORDS])
    assert words.shape == (10, 1280)


def test_eval_on_a_store_this_user_cannot_write(digits_run, tmp_path, monkeypatch):
    """A store the user may read but not write (a shared dataset on a read-only mount): eval keeps the
    prompt features it encodes in the user's cache ($XDG_CACHE_HOME), says so, and leaves the store
    untouched.  Run as the user would: the `featstore eval` command, on a read-only mount of the store."""
    from featstore.trainers import prompts

    store_path, run, _ = digits_run
    store = tmp_path / "digits.zarr"
    shutil.copytree(store_path, store)
    (tmp_path / "templates.txt").write_text("a photo of the figure {c}.\n")  # prompts the store never cached
    (tmp_path / "classes.txt").write_text("\n".join(["zero", "one", "two", "three", "four", "five", "six", "seven",
                                                     "eight", "nine"]) + "\n")
    prefix = read_only_prefix(store)
    if prefix is None:
        pytest.skip("cannot make a store read-only for root here (no unshare)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    probe = subprocess.run([*prefix, sys.executable, "-c", f"import os; print(os.access({str(store)!r}, os.W_OK))"],
                           capture_output=True, text=True, env=env, check=True)
    assert probe.stdout.strip() == "False"  # the situation is real: nothing may write the store

    def files(root):
        return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
                      for d, _, fs in os.walk(root) for f in fs)

    before = files(store)
    r = subprocess.run([*prefix, FEATSTORE, "eval", "--checkpoint", str(run), "--store", str(store), "--classes",
                        str(tmp_path / "classes.txt"), "--templates", str(tmp_path / "templates.txt"), "--split", "--json"],
                       capture_output=True, text=True, env=env)
    subprocess.run(["chmod", "-R", "u+w", str(store)], check=False)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])  # this process looks where the user's eval wrote
    text_set = json.load(open(run / "best" / "checkpoint.json"))["feature_sets"]["text"]
    cache = prompts.user_cache_path(text_set["identity"])
    assert cache.startswith(str(tmp_path / "cache")) and os.path.isdir(cache)
    assert result["zero_shot"]["rows"] > 0 and result["zero_shot"]["n_templates"] == 1
    assert f"{store} cannot be written here: the 10 new prompt features were cached in {cache}" in result["notes"]
    assert files(store) == before  # the store is untouched
    cached = prompts.cached(Store.open(store), text_set)  # what a later eval reads back
    assert {f"a photo of the figure {c}." for c in ("zero", "nine")} <= set(cached)


def test_a_label_field_the_store_lacks_is_refused(digits_run):
    store_path, run, _ = digits_run
    r = subprocess.run([FEATSTORE, "eval", "--checkpoint", run, "--store", store_path, "--label-field", "nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and r.stderr == (
        "error: --label-field nope: the store has no samples/nope to score zero-shot against (its label fields: label)\n")
