"""`featstore extract` end to end on real data: shards, HF datasets and folders of real images;
tiny saved DINOv2/Llama models plus the packaged EfficientNet-Lite0 and MiniLM."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from featstore.errors import ConfigError, IdentityMismatch
from featstore.pipelines.extract import extract
from featstore.store import Store
from featstore.tools.verify import verify
from imagedata import bad_input_samples, encode, real_images, write_shard
from signals import default_sigint

FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")
QUIET = dict(progress=False, log=lambda *_: None)


def feature_bytes(path, name):
    g = zarr.open_group(str(path), mode="r")
    return {k: np.asarray(a[:]).tobytes() for k, a in g[f"features/{name}"].arrays()}


@pytest.fixture(scope="module")
def images():
    return real_images(24)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, images):
    """The same 24 real images as two img2dataset-style shards (uid in json, caption in txt)."""
    d = tmp_path_factory.mktemp("wds")
    samples = [{"key": f"{i:09d}", "image": encode(img), "caption": f"a photo of {name}",
                "json": {"uid": f"img-{name}", "label": i % 3}} for i, (name, img) in enumerate(images)]
    write_shard(d / "00000.tar", samples[:13])
    write_shard(d / "00001.tar", samples[13:])
    return d


@pytest.fixture(scope="module")
def bad_shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    samples, img_reason, cap_reason = bad_input_samples()
    write_shard(d / "00000.tar", samples)
    return d, img_reason, cap_reason


def test_image_and_caption_features_from_shards(tmp_path, shards, tiny_dinov2_path, tiny_llama_path):
    store = tmp_path / "s.zarr"
    s = extract(store, shards, tiny_dinov2_path, name="dino", rows_per_shard=8, batch_size=4, label_column="label", **QUIET)
    assert s["rows_registered"] == 24 and s["blocks_written"] == 3 and s["valid"] == 24
    s = extract(store, shards, tiny_llama_path, name="llama", field="caption", batch_size=5, **QUIET)
    assert s["valid"] == 24 and s["rows_registered"] == 0  # the manifest is already there
    st = Store.open(store)
    assert st.uids()[0] == "img-astronaut" and st.samples("label").tolist()[:4] == [0, 1, 2, 0]
    assert st.feature_set("dino").array("pooled").shape == (24, 32)
    assert st.feature_set("dino").identity["field"] == "image"
    assert st.feature_set("llama").array("pooled").shape == (24, 32)
    assert verify(st)["ok"]
    # a re-run does nothing and says so
    again = extract(store, shards, tiny_dinov2_path, name="dino", **QUIET)
    assert again["blocks_written"] == 0 and again["blocks_missing"] == 0


def test_real_models_give_meaningful_features(tmp_path, shards, images):
    store = tmp_path / "s.zarr"
    extract(store, shards, "efficientnet-lite0", rows_per_shard=16, batch_size=8, tokens=True, token_dtype="int8",
            pixels="crops224", **QUIET)
    extract(store, shards, "minilm", field="caption", **QUIET)
    st = Store.open(store)
    fs = st.feature_set("efficientnet-lite0")
    x = np.asarray(fs.array("pooled")[:]).astype(np.float32)
    assert x.shape == (24, 1280) and np.isfinite(x).all() and (x.std(0) > 0).any()
    assert fs.array("tokens").shape == (24, 49, 1280) and fs.array("tokens").dtype == np.int8
    px = st.pixels("crops224")
    assert px.shape == (24, 3, 224, 224) and px.attrs["feature_set"] == "efficientnet-lite0"
    assert np.asarray(px[0]).std() > 10  # a real crop, not zeros
    t = np.asarray(st.feature_set("minilm").array("pooled")[:]).astype(np.float32)
    assert t.shape == (24, 384)
    names = [n for n, _ in images]
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    i, j = names.index("astronaut"), names.index("rocket")
    assert (t @ t.T)[i, j] > (t @ t.T)[i, names.index("coffee")]  # MiniLM: astronaut ~ rocket
    # skimage's "chelsea" and "cat" are the same photo: their image features are nearest neighbours
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -1)
    c = names.index("chelsea")
    assert sim[c].argmax() == names.index("cat") and sim[c].max() > 0.99


def test_bad_inputs_never_stop_a_job(tmp_path, bad_shard):
    d, img_reason, cap_reason = bad_shard
    store = tmp_path / "s.zarr"
    s = extract(store, d, "efficientnet-lite0", name="img", rows_per_shard=8, batch_size=4, **QUIET)
    t = extract(store, d, "minilm", name="txt", field="caption", **QUIET)
    st = Store.open(store)
    assert s["duplicates_rejected"] == 1 and st.n_rows == len(img_reason)
    assert st.manifest_record()["duplicates"][0]["uid"] == "good"
    uids = st.uids().tolist()
    for name, expected in (("img", img_reason), ("txt", cap_reason)):
        fs = st.feature_set(name)
        valid = np.asarray(fs.array("valid")[:])
        reasons = {f["uid"]: f["reason"] for m in fs.markers().values() for f in m["failures"]}
        for uid, want in expected.items():
            row = uids.index(uid)
            if want is None:
                assert valid[row], f"{name}: {uid} should be valid, got {reasons.get(uid)}"
            elif want != "*":
                assert not valid[row] and reasons[uid] == want, f"{name}: {uid}: {reasons.get(uid)}"
            else:
                assert valid[row] or reasons[uid]
    assert t["invalid_by_reason"] == {"empty-caption": 2, "non-utf8-caption": 1}
    out = subprocess.run([FEATSTORE, "inspect", "--store", str(store)], capture_output=True, text=True, check=True).stdout
    assert "too-large" in out and "(e.g. bomb)" in out and "1 duplicate uids rejected" in out
    assert verify(st)["ok"]
    # EXIF orientation was applied: the 64x32 landscape photo stands upright after decode
    from featstore.pipelines.preprocess import decode_image
    samples, _, _ = bad_input_samples()
    rotated = next(x for x in samples if x["json"]["uid"] == "exif-rotated")
    assert decode_image(rotated["image"]).size == (32, 64)


def test_same_images_as_webdataset_hf_and_folder_land_on_the_same_rows(tmp_path, shards, images, tiny_dinov2_path):
    import datasets

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    captions, records = {}, []
    for i, (name, img) in enumerate(images):
        rel = f"sub/img-{name}" if i % 2 else f"img-{name}"
        data = encode(img)
        (folder / f"{rel}.jpg").write_bytes(data)
        captions[rel] = f"a photo of {name}"
        records.append({"uid": rel, "image": {"bytes": data, "path": None}, "caption": f"a photo of {name}"})
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    hf = datasets.Dataset.from_list(records).cast_column("image", datasets.Image())
    hf.save_to_disk(str(tmp_path / "hf"))
    # the webdataset uids are img-<name>; give the folder uids the same names
    wds = tmp_path / "wds"
    wds.mkdir()
    samples = [{"key": f"{i:09d}", "image": encode(img), "caption": f"a photo of {name}",
                "json": {"uid": f"sub/img-{name}" if i % 2 else f"img-{name}"}} for i, (name, img) in enumerate(images)]
    write_shard(wds / "00000.tar", samples)
    out = {}
    for kind, src, kw in [("webdataset", wds, {}), ("hf", tmp_path / "hf", {"uid_field": "uid"}),
                          ("folder", folder, {"captions": str(tmp_path / "captions.json")})]:
        path = tmp_path / f"{kind}.zarr"
        extract(path, src, tiny_dinov2_path, name="dino", rows_per_shard=8, source_type=kind, **kw, **QUIET)
        st = Store.open(path)
        order = np.argsort(st.uids())
        out[kind] = (st.uids()[order], np.asarray(st.feature_set("dino").array("pooled")[:])[order],
                     st.samples("caption")[order])
    for kind in ("hf", "folder"):
        np.testing.assert_array_equal(out[kind][0], out["webdataset"][0])
        np.testing.assert_array_equal(out[kind][1], out["webdataset"][1])
        np.testing.assert_array_equal(out[kind][2], out["webdataset"][2])


def test_identity_mismatch_and_overwrite(tmp_path, shards, tiny_dinov2_path):
    store = tmp_path / "s.zarr"
    extract(store, shards, tiny_dinov2_path, name="dino", rows_per_shard=8, **QUIET)
    r = subprocess.run([FEATSTORE, "extract", "--store", str(store), "--source", str(shards), "--backbone", tiny_dinov2_path,
                        "--name", "dino", "--pooling", "mean", "--no-progress"], capture_output=True, text=True)
    first, *keys = r.stderr.splitlines()  # the refusal, then one line per differing key
    assert r.returncode == 2 and first.startswith("error: feature set 'dino'") and "--overwrite" in first
    assert keys and all(k.startswith("  ") and len(k) < 200 for k in keys)
    assert "  pooling: 'cls' in the store vs 'mean' now" in keys
    s = extract(store, shards, tiny_dinov2_path, name="dino", pooling="mean", overwrite=True, **QUIET)
    assert s["blocks_written"] == 3
    with pytest.raises(ConfigError, match="text backbone"):
        extract(store, shards, tiny_dinov2_path, name="x", field="caption", **QUIET)


def test_deterministic_bytes_across_runs_and_batch_sizes_of_text(tmp_path, shards):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    extract(a, shards, "minilm", field="caption", rows_per_shard=8, batch_size=3, **QUIET)
    extract(b, shards, "minilm", field="caption", rows_per_shard=8, batch_size=3, **QUIET)
    assert feature_bytes(a, "minilm") == feature_bytes(b, "minilm")


def test_kill_mid_extract_then_rerun_gives_the_same_bytes(tmp_path, shards, tiny_dinov2_path):
    args = ["extract", "--source", str(shards), "--backbone", tiny_dinov2_path, "--name", "dino",
            "--rows-per-shard", "2", "--batch-size", "2", "--no-progress"]
    # the clean run and the re-run in this process (the same `extract` the command calls); the kill in a real one
    extract(tmp_path / "clean.zarr", shards, tiny_dinov2_path, name="dino", rows_per_shard=2, batch_size=2, **QUIET)
    proc = subprocess.Popen([FEATSTORE, *args, "--store", str(tmp_path / "killed.zarr")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "killed.zarr" / "_progress" / "dino"
    deadline = time.time() + 120
    while not (progress.exists() and any(n.endswith("-1.json") for n in os.listdir(progress))) \
            and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = Store.open(tmp_path / "killed.zarr")
    assert 0 < len(st.feature_set("dino").missing_blocks()) < st.n_blocks
    assert verify(st)["ok"]
    said = []
    extract(tmp_path / "killed.zarr", shards, tiny_dinov2_path, name="dino", batch_size=2, progress=False, log=said.append)
    assert "already done" in said[0]
    assert verify(Store.open(tmp_path / "killed.zarr"))["ok"]
    assert feature_bytes(tmp_path / "killed.zarr", "dino") == feature_bytes(tmp_path / "clean.zarr", "dino")


def test_cli_summary_and_one_line_errors(tmp_path, shards):
    out = subprocess.run([FEATSTORE, "extract", "--store", str(tmp_path / "s.zarr"), "--source", str(shards),
                          "--backbone", "minilm", "--field", "caption", "--json", "--no-progress"],
                         capture_output=True, text=True, check=True)
    s = json.loads(out.stdout)
    assert s["rows_written"] == 24 and s["feature_set"] == "minilm" and s["rows_per_s"] > 0
    for bad, msg in [(["--backbone", "no-such-model"], "dinov2-small"),
                     (["--backbone", "facebook/dinov2-small"], "local path"),
                     (["--backbone", "minilm", "--source", str(tmp_path / "nope")], "nope")]:
        cmd = [FEATSTORE, "extract", "--store", str(tmp_path / "t.zarr"), "--source", str(shards), *bad, "--no-progress"]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr


# ---- int8 tokens: token x channel for new feature sets, per-token ones kept -----------------------------
def test_int8_tokens_get_token_x_channel_scaling_checked_per_block(tmp_path, shards, tiny_dinov2_path):
    from featstore.core import format as fmt
    from featstore.tools.export import export
    from featstore.tools.inspect import summarize
    from featstore.tokens import MIN_COSINE, dequantize_int8

    store = tmp_path / "s.zarr"
    extract(store, shards, tiny_dinov2_path, name="f16", tokens=True, rows_per_shard=8, **QUIET)
    extract(store, shards, tiny_dinov2_path, name="q", tokens=True, token_dtype="int8", **QUIET)
    st = Store.open(store)
    fs = st.feature_set("q")
    assert fs.token_scaling == "token_channel" and fs.identity["token_scaling"] == "token_channel"
    n, t, d = fs.array("tokens").shape
    channel = fs.array("tokens_channel_scale")
    assert channel.shape == (n, d) and channel.dtype == np.float16
    assert tuple(channel.metadata.dimension_names) == ("row", "token_dim")
    assert fs.array("tokens").attrs["dequantize"] == fmt.DEQUANTIZE["token_channel"]
    for b, m in fs.markers().items():  # every block's fidelity, in its marker
        f = m["int8_fidelity"]
        assert f["scheme"] == "token_channel" and f["tokens"] == m["n_valid"] * t and f["worst_cos"] >= MIN_COSINE, (b, f)
    assert summarize(st)["feature_sets"]["q"]["int8_fidelity"]["tokens"] == n * t
    # export dequantizes with both scales: the float16 run's tokens, to int8 precision
    out = export(st, "q", str(tmp_path / "q.npy"), "tokens")
    got = np.load(tmp_path / "q.npy")
    want = dequantize_int8(np.asarray(fs.array("tokens")[:]), np.asarray(fs.array("tokens_scale")[:]), np.float32,
                           channel_scale=np.asarray(channel[:]))
    assert out["shape"] == [n, t, d] and got.dtype == np.float32 and np.array_equal(got, want)
    ref = np.asarray(st.feature_set("f16").array("tokens")[:]).astype(np.float32)
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() > 0.99
    assert verify(st)["ok"]
    # verify covers the channel scale
    g = zarr.open_group(str(store), mode="r+")
    g["features/q/tokens_channel_scale"][8:16] = np.asarray(g["features/q/tokens_channel_scale"][8:16]) * 2
    problems = verify(Store.open(store))["problems"]
    assert any("block 1" in p and "tokens_channel_scale does not match" in p for p in problems), problems


def test_per_token_int8_feature_sets_keep_reading_and_resuming(tmp_path, shards, tiny_dinov2_path):
    """A per-token int8 set (as featstore made them before token x channel) resumes per-token."""
    from featstore.loader import Loader
    from featstore.tokens import dequantize_int8

    whole = tmp_path / "whole.zarr"
    extract(whole, shards, tiny_dinov2_path, name="q", tokens=True, token_dtype="int8", token_scaling="token",
            rows_per_shard=8, **QUIET)
    store = tmp_path / "s.zarr"
    extract(store, shards / "00000.tar", tiny_dinov2_path, name="q", tokens=True, token_dtype="int8",
            token_scaling="token", rows_per_shard=8, **QUIET)
    fs = Store.open(store).feature_set("q")
    assert fs.token_scaling == "token" and "token_scaling" not in fs.identity and "tokens_channel_scale" not in fs.group
    s = extract(store, shards, tiny_dinov2_path, name="q", tokens=True, token_dtype="int8", **QUIET)  # the default
    assert s["rows_written"] == 11 and s["blocks_missing"] == 0
    assert feature_bytes(store, "q") == feature_bytes(whole, "q")
    st = Store.open(store)
    assert verify(st)["ok"] and "int8_fidelity" in st.feature_set("q").marker(2)
    batch = next(iter(Loader(st, {"t": "features/q/tokens"}, 24, shuffle=False)))
    fs = st.feature_set("q")
    want = dequantize_int8(np.asarray(fs.array("tokens")[:]), np.asarray(fs.array("tokens_scale")[:]))
    assert np.array_equal(batch["t"].numpy(), want)
    with pytest.raises(IdentityMismatch, match="token_scaling"):
        extract(store, shards, tiny_dinov2_path, name="q", tokens=True, token_dtype="int8", token_scaling="token_channel",
                **QUIET)


def test_int8_blocks_below_the_fidelity_threshold_are_refused(tmp_path, shards, tiny_dinov2_path, monkeypatch):
    from featstore.errors import FidelityTooLow

    monkeypatch.setenv("FEATSTORE_MIN_INT8_COSINE", "1.01")  # above any cosine: every block is refused
    store = tmp_path / "s.zarr"
    with pytest.raises(FidelityTooLow, match="block 0 of features/q: int8 tokens .* below 1.01; the block was not written"):
        extract(store, shards, tiny_dinov2_path, name="q", tokens=True, token_dtype="int8", rows_per_shard=8, **QUIET)
    st = Store.open(store)
    assert st.feature_set("q").missing_blocks() == [0, 1, 2] and verify(st)["ok"]


def test_cli_choices_are_the_librarys():
    from featstore.pipelines.choices import POOLINGS, SOURCE_TYPES

    out = subprocess.run([FEATSTORE, "extract", "--help"], capture_output=True, text=True, check=True).stdout
    assert f"[{'|'.join(SOURCE_TYPES)}]" in out and f"[{'|'.join(POOLINGS)}]" in out
    assert "parquet" in SOURCE_TYPES and "pooler" in POOLINGS


def test_ctrl_c_with_decode_workers_is_one_line(tmp_path, shards, tiny_dinov2_path):
    """Ctrl-C reaches every process of the terminal's process group: the decode workers stay quiet
    (no traceback each), extract ends with its one line, and leaves a store `verify` passes (that a
    re-run then completes it is test_kill_mid_extract_then_rerun_gives_the_same_bytes)."""
    args = [FEATSTORE, "extract", "--source", str(shards), "--backbone", tiny_dinov2_path, "--name", "dino",
            "--rows-per-shard", "2", "--batch-size", "2", "--num-workers", "2", "--no-progress",
            "--store", str(tmp_path / "s.zarr")]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_sigint)
    progress = tmp_path / "s.zarr" / "_progress" / "dino"
    deadline = time.time() + 300  # a guard against a hung test, not a timing assertion
    try:
        while not (progress.exists() and any(n.endswith("-1.json") for n in os.listdir(progress))):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr
    assert stderr == "interrupted: finished blocks are kept; re-run the same command to continue\n"
    st = Store.open(tmp_path / "s.zarr")
    assert 0 < len(st.feature_set("dino").missing_blocks()) < st.n_blocks and verify(st)["ok"]
