import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from featstore.errors import CheckpointError, ConfigError, IdentityMismatch, UnknownFeatureSet
from featstore.loader import Loader
from featstore.split import split_by_uid
from featstore.store import Store
from featstore.trainers.sharelock import train as train_head_module
from featstore.trainers.sharelock.config import Config, load_config
from featstore.trainers.loop import lr_at
from featstore.trainers.sharelock.train import train_head

from sharelock_data import IMAGE_IDENTITY, RUN_OVERRIDES, FakeTextBackbone, make_aligned_store, one_thread, trained_run
from signals import default_sigint

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)
TESTS = os.path.dirname(os.path.abspath(__file__))
FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")
TINY = ["hidden_dim=64", "batch_size=64", "accumulation_steps=1", "log_every=1", "patience=null", "warmup_steps=0"]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _weights(run_dir, which="last"):
    return load_file(os.path.join(run_dir, which, "model.safetensors"))


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_synthetic_alignment_retrieval_far_above_chance(tmp_path_factory):
    store_path, run_dir, summary = trained_run(tmp_path_factory)
    final = summary["final"]
    n_val = summary["val_rows"]
    assert n_val > 100 and summary["step"] == 150 and not summary["stopped_early"]
    # chance R@1 is 1/n_val (< 1%); two noisy nonlinear views of one latent are matched by the heads
    assert final["val_i2t_r1"] > 0.5 and final["val_t2i_r1"] > 0.5
    first = _metrics(run_dir)[0]
    assert final["val_loss"] < 0.5 * first["val_loss"]
    assert summary["best"]["val_loss"] <= final["val_loss"]
    # the split is featstore's uid-hash split
    store = Store.open(store_path)
    assert n_val == int(split_by_uid(store.uids(), 0.1)[1].sum())


def test_metrics_cadence_and_files(tmp_path_factory):
    _, run_dir, summary = trained_run(tmp_path_factory)
    records = _metrics(run_dir)
    assert all({"step", "loss", "lr"} <= r.keys() for r in records)
    val_steps = [r["step"] for r in records if "val_loss" in r]
    assert val_steps[0] == 0 and val_steps[-1] == summary["steps"]
    assert max(np.diff(val_steps)) <= summary["steps"] / 10
    for r in records:
        if "val_loss" in r:
            assert {"val_i2t_r1", "val_i2t_r5", "val_t2i_r1", "val_t2i_r5"} <= r.keys()
    assert [r["step"] for r in records] == sorted({r["step"] for r in records})  # one line per logged step
    with open(os.path.join(run_dir, "curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(os.path.join(run_dir, "last"))) == ["checkpoint.json", "model.safetensors", "optimizer.safetensors"]
    state = json.load(open(os.path.join(run_dir, "last", "checkpoint.json")))
    assert state["step"] == 150 and {"seed", "epoch", "offset", "fingerprint"} <= state["loader"].keys()
    assert state["feature_sets"]["image"]["name"] == "img" and state["feature_sets"]["image"]["identity"] == IMAGE_IDENTITY
    assert state["feature_sets"]["text"]["dim"] == 80 and os.path.isabs(state["store"])
    assert state["config"]["hidden_dim"] == 256
    best = json.load(open(os.path.join(run_dir, "best", "checkpoint.json")))
    assert best["step"] == summary["best"]["step"]


def test_refuses_existing_run_without_resume(tmp_path_factory):
    store_path, run_dir, _ = trained_run(tmp_path_factory)
    with pytest.raises(CheckpointError, match="--resume"):
        train_head(store_path, "img", "txt", run_dir, overrides=RUN_OVERRIDES, progress=False)


def test_resume_refuses_changed_feature_set_identity(tmp_path_factory, tmp_path):
    store_path, run_dir, _ = trained_run(tmp_path_factory)
    other = make_aligned_store(tmp_path / "other.zarr", n=300, image_identity={**IMAGE_IDENTITY, "version": 2})
    with pytest.raises(IdentityMismatch) as e:
        train_head(other.path, "img", "txt", run_dir, resume=True, progress=False)
    assert "img" in str(e.value) and run_dir in str(e.value) and "version" in str(e.value)


def test_bad_arguments_fail_before_work(tmp_path_factory, tmp_path):
    store_path, _, _ = trained_run(tmp_path_factory)
    with pytest.raises(ConfigError, match="valid keys"):
        train_head(store_path, "img", "txt", tmp_path / "a", overrides=["batchsize=3"], progress=False)
    with pytest.raises(UnknownFeatureSet, match="nope"):
        train_head(store_path, "nope", "txt", tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="--set batch_size=N"):
        train_head(store_path, "img", "txt", tmp_path / "c", overrides=["batch_size=100000"], progress=False)
    with pytest.raises(ConfigError, match="precision"):
        train_head(store_path, "img", "txt", tmp_path / "d", precision="fp8", progress=False)
    with pytest.raises(ConfigError, match="device"):
        train_head(store_path, "img", "txt", tmp_path / "e", device="warp-drive", progress=False)
    assert not os.path.exists(tmp_path / "a")


def test_lr_schedule():
    cfg = Config(steps=100, warmup_steps=150, lr=1.0)  # warm-up capped at 10% of steps
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and 0 < lrs[-1] < 0.01
    long = Config(steps=5000, lr=1e-3)
    assert lr_at(149, long) == pytest.approx(1e-3) and lr_at(148, long) < 1e-3


def test_early_stopping_keeps_best(tmp_path_factory, tmp_path, monkeypatch):
    store_path, _, _ = trained_run(tmp_path_factory)
    calls = []

    def worse_every_time(*args, **kwargs):
        calls.append(1)
        return {"val_loss": float(len(calls)), "val_i2t_r1": 0.0}

    monkeypatch.setattr(train_head_module, "validate", worse_every_time)
    summary = train_head(store_path, "img", "txt", tmp_path / "run", overrides=TINY + ["steps=100", "patience=2"],
                         progress=False)
    assert summary["stopped_early"] and summary["step"] == 20  # validations at 0 (best), 10, 20
    assert summary["best"] == {"val_loss": 1.0, "step": 0}
    assert json.load(open(tmp_path / "run" / "last" / "checkpoint.json"))["step"] == 20


def test_bf16_autocast_runs(tmp_path_factory, tmp_path):
    store_path, _, _ = trained_run(tmp_path_factory)
    summary = train_head(store_path, "img", "txt", tmp_path / "run", overrides=TINY + ["steps=3"], precision="bf16",
                         progress=False)
    assert summary["step"] == 3 and np.isfinite(summary["final"]["val_loss"])


def test_stop_at_epoch_end_then_resume_is_exact(tmp_path_factory, tmp_path):
    """Constant lr (so the schedule does not depend on `steps`): 2 epochs + 3 steps in one go equal
    1 epoch, stop, then resume to the same end; the stop lands exactly on the epoch boundary."""
    store_path, _, _ = trained_run(tmp_path_factory)
    store = Store.open(store_path)
    cols = {"image": "features/img/pooled", "text": "features/txt/pooled"}
    per_epoch = len(Loader(store, cols, 64, rows=split_by_uid(store.uids(), 0.1)[0], drop_last=True))
    over = TINY + ["min_lr_ratio=1.0", "accumulation_steps=1", "save_every=1000"]
    end = 2 * per_epoch + 3
    train_head(store_path, "img", "txt", tmp_path / "a", overrides=over, steps=end, progress=False)
    train_head(store_path, "img", "txt", tmp_path / "b", overrides=over, steps=per_epoch, progress=False)
    state = json.load(open(tmp_path / "b" / "last" / "checkpoint.json"))
    assert state["loader"]["epoch"] == 0 and state["loader"]["offset"] == per_epoch * 64
    summary = train_head(store_path, "img", "txt", tmp_path / "b", steps=end, resume=True, progress=False)
    assert summary["resumed_from"] == per_epoch and summary["step"] == end
    _assert_same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    loss_a = {r["step"]: r["loss"] for r in _metrics(tmp_path / "a")}
    loss_b = {r["step"]: r["loss"] for r in _metrics(tmp_path / "b")}
    assert loss_a == loss_b


CHILD = textwrap.dedent("""
    import json, sys, time
    import torch
    torch.set_num_threads(1)
    store, out, block_at, flag, overrides = sys.argv[1:6]
    step, calls = torch.optim.Adam.step, [0]

    def hanging_step(self, *a, **k):  # hang inside optimizer step number `block_at`, after telling the parent
        calls[0] += 1
        if calls[0] == int(block_at):
            with open(flag + ".tmp", "w") as f:  # what training imported so far: never a backbone
                json.dump(sorted(m for m in sys.modules if m.startswith("featstore.pipelines")), f)
            import os
            os.replace(flag + ".tmp", flag)
            time.sleep(600)
        return step(self, *a, **k)

    torch.optim.Adam.step = hanging_step
    from featstore.trainers.sharelock.train import train_head
    train_head(store, "img", "txt", out, overrides=json.loads(overrides), progress=False)
""")


def test_sigkill_then_resume_reaches_the_same_weights(tmp_path_factory, tmp_path):
    store_path, _, _ = trained_run(tmp_path_factory)
    over = TINY + ["steps=30", "accumulation_steps=2", "save_every=10", "warmup_steps=5", "dropout=0.3"]
    flag, out = tmp_path / "hanging", tmp_path / "killed"
    args = [sys.executable, "-c", CHILD, store_path, str(out), "13", str(flag), json.dumps(over)]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the uninterrupted reference run, while the child starts up
        train_head(store_path, "img", "txt", tmp_path / "straight", overrides=over, progress=False)
        deadline = time.time() + 300  # a guard against a hung test, not a timing assertion
        while not flag.exists():
            if child.poll() is not None:
                pytest.fail(f"training exited before it could be killed: {child.stderr.read()[-2000:]}")
            assert time.time() < deadline, "the child never reached step 13"
            time.sleep(0.05)
        assert json.load(open(out / "last" / "checkpoint.json"))["step"] == 10  # killed 3 steps after a checkpoint
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert json.loads(flag.read_text()) == []  # training imported no backbone / decoding code
    assert max(r["step"] for r in _metrics(out)) == 12  # it logged steps 11, 12 that the resume re-does

    summary = train_head(store_path, "img", "txt", out, resume=True, progress=False)
    assert summary["resumed_from"] == 10 and summary["step"] == 30
    _assert_same(_weights(tmp_path / "straight"), _weights(out))
    _assert_same(load_file(tmp_path / "straight" / "last" / "optimizer.safetensors"),
                 load_file(out / "last" / "optimizer.safetensors"))
    assert _metrics(tmp_path / "straight") == _metrics(out)


# ---- ShareLock's official training protocol (configs/sharelock.yaml) ----------------------------
def test_validation_every_500_micro_batches():
    from featstore.trainers.loop import validation_due

    cfg = Config(steps=5000, accumulation_steps=16, val_every_batches=500)
    due = [s for s in range(1, 5001) if validation_due(s, cfg)]
    # after the optimizer step that completes micro-batch 500, 1000, ... (Lightning validates at the micro-batch)
    assert due[:4] == [32, 63, 94, 125] and len(due) == 5000 * 16 // 500 and due[-1] == 5000  # the 160th is the end
    assert all(s * 16 >= k * 500 > (s - 1) * 16 for k, s in enumerate(due[:-1], start=1))
    coarse = Config(steps=100, accumulation_steps=1, val_every_batches=500)  # coarser than steps/10: steps/10 wins
    assert [s for s in range(1, 101) if validation_due(s, coarse)] == list(range(10, 101, 10))


def test_warmup_from_zero_is_transformers_cosine_schedule():
    """ShareLock's schedule is transformers' get_cosine_schedule_with_warmup(150, 5000)."""
    from transformers import get_cosine_schedule_with_warmup

    cfg = load_config(os.path.join(os.path.dirname(TESTS), "configs", "sharelock.yaml"))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=150, num_training_steps=5000)
    theirs = []
    for _ in range(5000):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [lr_at(s, cfg) for s in range(5000)]
    assert ours[0] == 0.0 and ours == pytest.approx(theirs, rel=1e-9, abs=1e-15)


def _fake_validations(monkeypatch, values, key="val_loss"):
    calls = []

    def scripted(*args, **kwargs):
        calls.append(1)
        v = values[min(len(calls), len(values)) - 1]
        return {"val_loss": v if key == "val_loss" else 1.0, "val_i2t_r1": 0.0, "val_t2i_r1": v if key != "val_loss" else 0.0}

    monkeypatch.setattr(train_head_module, "validate", scripted)


def test_early_stopping_min_delta_and_best_checkpoint(tmp_path_factory, tmp_path, monkeypatch):
    """Lightning's EarlyStopping(min_delta=0.1): only a loss lower than the best by more than 0.1
    resets the count; ModelCheckpoint still keeps the lowest loss (every small improvement)."""
    store_path, _, _ = trained_run(tmp_path_factory)
    _fake_validations(monkeypatch, [1.0, 0.96, 0.92, 0.88, 0.84])
    summary = train_head(store_path, "img", "txt", tmp_path / "run", progress=False,
                         overrides=TINY + ["steps=100", "patience=2", "min_delta=0.1"])
    assert summary["stopped_early"] and summary["step"] == 20  # 0.96 and 0.92 are not 0.1 below 1.0
    assert summary["best"] == {"val_loss": 0.92, "step": 20}
    assert json.load(open(tmp_path / "run" / "best" / "checkpoint.json"))["step"] == 20


def test_best_metric_higher_is_better(tmp_path_factory, tmp_path, monkeypatch):
    store_path, _, _ = trained_run(tmp_path_factory)
    _fake_validations(monkeypatch, [0.1, 0.5, 0.3, 0.2], key="val_t2i_r1")
    summary = train_head(store_path, "img", "txt", tmp_path / "run", progress=False,
                         overrides=TINY + ["steps=100", "patience=2", "best_metric=val_t2i_r1"])
    assert summary["step"] == 30 and summary["best"] == {"val_loss": 1.0, "val_t2i_r1": 0.5, "step": 10}


def test_fixed_validation_row_count_and_several_caption_sets(tmp_path):
    """val_rows holds out exactly that many rows, found again by eval --split; several text
    feature sets (ShareLock's several caption files) are drawn per row."""
    from featstore.trainers.sharelock.evaluate import evaluate
    from featstore.trainers.sharelock.text_sets import train_text as _train_text

    store = make_aligned_store(tmp_path / "s.zarr", n=800, more_captions=("txt2",))
    over = ["hidden_dim=128", "batch_size=64", "accumulation_steps=2", "steps=30", "warmup_steps=3", "patience=null",
            "val_rows=150", "val_every_batches=5"]
    summary = train_head(store.path, "img", "txt,txt2", tmp_path / "run", overrides=over, progress=False)
    assert summary["val_rows"] == 150 and summary["heldout"]["kind"] == "count" and summary["text_sets"] == ["txt", "txt2"]
    assert [r["step"] for r in _metrics(tmp_path / "run") if "val_loss" in r] == [0, 3, 5, 8, 10, 13, 15, 18, 20, 23, 25, 28, 30]
    state = json.load(open(tmp_path / "run" / "last" / "checkpoint.json"))
    assert [t["name"] for t in state["feature_sets"]["texts"]] == ["txt", "txt2"] and state["feature_sets"]["text"]["name"] == "txt"
    result = evaluate(tmp_path / "run", store.path, split=True, templates="sharelock", text_encoder=FakeTextBackbone())
    assert result["zero_shot"]["rows"] == 150
    assert result["retrieval"]["images"] == 150 and result["retrieval"]["texts"] == 300  # two captions per image
    assert result["retrieval"]["captions_per_image"] == {"min": 2, "max": 2, "mean": 2.0}
    # each row draws its caption set uniformly, as a pure function of (seed, step, row): the same
    # whichever rows share its batch (so a DDP rank draws what one process would)
    rows = torch.arange(4000)
    batch = {"image": torch.zeros(4000, 1), "text0": torch.zeros(4000, 1), "text1": torch.ones(4000, 1), "row": rows}
    drawn = _train_text(batch, ["text0", "text1"], 0, 5)
    assert 0.45 < drawn.mean() < 0.55
    assert torch.equal(drawn, _train_text(batch, ["text0", "text1"], 0, 5))
    assert not torch.equal(drawn, _train_text(batch, ["text0", "text1"], 0, 6))
    half = {k: v[2000:] for k, v in batch.items()}
    assert torch.equal(drawn[2000:], _train_text(half, ["text0", "text1"], 0, 5))
    with pytest.raises(ConfigError) as e:  # a changed text set, listed as a difference of its own
        train_head(store.path, "img", "txt", tmp_path / "run", steps=40, resume=True, progress=False)
    assert e.value.args[0].splitlines()[1:] == ["  text: 'txt,txt2' in the run vs 'txt' now"]


def test_caption_sets_of_other_backbones_are_refused(tmp_path):
    store = make_aligned_store(tmp_path / "s.zarr", n=300, more_captions=("txt2",))
    other = make_aligned_store(tmp_path / "o.zarr", n=300, text_name="other", text_identity={"model": "another-llm"})
    with pytest.raises(IdentityMismatch, match="different text backbones"):
        train_head(store.path, "img", "txt,img", tmp_path / "a", overrides=TINY, progress=False)
    with pytest.raises(ConfigError, match="distinct"):
        train_head(store.path, "img", "txt,txt", tmp_path / "b", overrides=TINY, progress=False)
    assert other.feature_set_names() == ["img", "other"]


def test_float32_pooled_features_end_to_end(tmp_path, tiny_dinov2_path):
    """`extract --dtype float32` keeps pooled features in float32 (LLM features have large
    activations); training and the checkpoint see float32; asking float16 of that name is refused."""
    from featstore.pipelines.extract import extract

    from imagedata import real_images

    folder = tmp_path / "images"
    folder.mkdir()
    captions = {}
    for i, (name, img) in enumerate(real_images(40)):
        img.resize((48, 40)).save(folder / f"{i:03d}.png")
        captions[f"{i:03d}"] = f"a picture called {name.replace('-', ' ')} number {i}"
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    store = tmp_path / "s.zarr"
    quiet = dict(progress=False, log=lambda *_: None, captions=str(tmp_path / "captions.json"), rows_per_shard=16)
    extract(store, folder, tiny_dinov2_path, name="img", dtype="float32", **quiet)
    extract(store, folder, "minilm", field="caption", name="cap", dtype="float32", **quiet)
    s = Store.open(store)
    assert s.array("features/cap/pooled").dtype == np.float32 and s.feature_set("cap").identity["pooled_dtype"] == "float32"
    summary = train_head(store, "img", "cap", tmp_path / "run", progress=False,
                         overrides=TINY + ["batch_size=8", "steps=3", "val_fraction=0.3"])
    state = json.load(open(tmp_path / "run" / "last" / "checkpoint.json"))
    assert summary["step"] == 3 and state["feature_sets"]["text"]["dtype"] == "float32"
    with pytest.raises(IdentityMismatch, match="pooled_dtype"):  # another dtype asked for: another feature set
        extract(store, folder, "minilm", field="caption", name="cap", dtype="float16", **quiet)
    assert extract(store, folder, "minilm", field="caption", name="cap", **quiet)["blocks_written"] == 0  # kept


# ---- as a newcomer runs it: the `featstore train-head` command ---------------------------------------
CLI_RUN = ["--set", "hidden_dim=64", "--set", "batch_size=64", "--set", "accumulation_steps=1", "--set", "log_every=1",
           "--set", "patience=null", "--set", "cpu_threads=1", "--set", "warmup_steps=10", "--steps", "300"]


def _cli(*args, **kwargs):
    return subprocess.run([FEATSTORE, *map(str, args)], capture_output=True, text=True, **kwargs)


def test_ctrl_c_saves_a_checkpoint_then_resume_continues_exactly(tmp_path_factory, tmp_path):
    """Ctrl-C (SIGINT) mid-run: a checkpoint at the step it stopped, one line saying to re-run with
    --resume, and the re-run with --resume ends with the weights of a run never interrupted.  The
    uninterrupted run writes its progress into a log file: a few hundred bytes for 300 steps."""
    store_path, _, _ = trained_run(tmp_path_factory)
    head = ["train-head", "--store", store_path, "--image", "img", "--text", "txt"]
    with open(tmp_path / "straight.log", "w") as log:  # a log file, as `featstore train-head ... > log 2>&1`
        subprocess.run([FEATSTORE, *head, "--out", tmp_path / "straight", *CLI_RUN], stdout=log, stderr=log, check=True)
    assert os.path.getsize(tmp_path / "straight.log") < 2500, (tmp_path / "straight.log").read_text()

    out = tmp_path / "stopped"
    cmd = [FEATSTORE, *head, "--out", str(out), *CLI_RUN]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        deadline = time.time() + 300  # a guard against a hung test, not a timing assertion
        while not (os.path.exists(out / "metrics.jsonl") and len(_metrics(out)) > 30):
            assert child.poll() is None and time.time() < deadline, child.communicate()
            time.sleep(0.02)
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
    stopped = json.load(open(out / "last" / "checkpoint.json"))["step"]
    assert child.returncode == 130 and 30 <= stopped < 300, stderr
    assert stderr.strip().splitlines()[-1] == (f"interrupted: stopped at step {stopped}, checkpoint saved in {out}/last: "
                                               "re-run the same command with --resume to continue from there")
    assert "Traceback" not in stderr and "finished blocks" not in stderr
    assert max(r["step"] for r in _metrics(out)) == stopped

    resumed = _cli(*cmd[1:], "--resume", "--no-progress", check=True)
    assert resumed.stdout.startswith("trained 300/300 steps") and "note:" not in resumed.stdout
    assert resumed.stderr == ""  # --no-progress: no bar at all
    _assert_same(_weights(tmp_path / "straight"), _weights(out))
    assert [r["step"] for r in _metrics(out)] == [r["step"] for r in _metrics(tmp_path / "straight")]


def test_resume_with_other_settings_is_refused_listing_each(tmp_path_factory, tmp_path):
    store_path, shared_run, _ = trained_run(tmp_path_factory)
    run_dir = str(tmp_path / "run")
    shutil.copytree(shared_run, run_dir)
    other = make_aligned_store(tmp_path / "copy.zarr", n=2000)  # the same features, another store
    r = _cli("train-head", "--store", other.path, "--image", "img", "--text", "txt", "--out", run_dir, "--resume",
             "--set", "batch_size=64", "--set", "lr=0.01", "--precision", "bf16")
    first, *diff = r.stderr.splitlines()
    assert r.returncode == 2 and r.stdout == "" and first.startswith(f"error: --resume: {run_dir} was trained with other")
    assert [d.split(":")[0].strip() for d in diff] == ["store", "precision", "batch_size", "lr"]
    assert "  batch_size: 128 in the run vs 64 now" in diff and "  precision: 'fp32' in the run vs 'bf16' now" in diff
    # more steps is allowed: the run goes on, and says what that does to the schedule
    s = train_head(store_path, "img", "txt", run_dir, resume=True, steps=160, progress=False)
    assert s["resumed_from"] == 150 and s["step"] == 160 and "steps changed from 150 to 160" in s["notes"][0]
    with pytest.raises(ConfigError, match="already at step 160"):
        train_head(store_path, "img", "txt", run_dir, resume=True, steps=100, progress=False)


def test_newcomer_mistakes_are_one_clear_line(tmp_path):
    """Swapped --image/--text, a shard changed on disk, and the default batch size on a small store."""
    store = make_aligned_store(tmp_path / "s.zarr", n=300, image_identity={**IMAGE_IDENTITY, "field": "image"},
                               text_identity={"model": "synthetic-text", "field": "caption"})
    base = ["train-head", "--store", store.path, "--out"]
    r = _cli(*base, tmp_path / "a", "--image", "txt", "--text", "img")
    assert r.returncode == 2 and r.stderr == ("error: --image 'txt' holds text features and --text 'img' holds image "
                                              "features: swap --image and --text\n")
    r = _cli(*base, tmp_path / "b", "--image", "img", "--text", "txt")  # the default batch_size 1024, 300 rows
    assert r.returncode == 2 and "--set batch_size=N" in r.stderr and r.stderr.count("\n") == 1

    shard = tmp_path / "s.zarr" / "features" / "txt" / "pooled" / "c" / "1" / "0"  # block 1's shard file
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # one byte of one feature, changed on disk
    shard.write_bytes(bytes(data))
    r = _cli(*base, tmp_path / "c", "--image", "img", "--text", "txt", "--set", "batch_size=32")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and not os.path.exists(tmp_path / "c"), r.stderr
    assert "features/txt/pooled block 1 (rows 128-256)" in r.stderr and "does not match the checksum" in r.stderr
    assert "PROBLEM: features/txt block 1" in _cli("verify", "--store", store.path).stdout


def test_official_split_is_sharelocks_seed_42_shuffle_and_survives_growth(tmp_path):
    """val_split official holds out what ShareLock's datasets.py holds out of features saved in the
    store's row order: `rng = random.Random(42); rng.shuffle(keys); keys[:val_split_num]` (keys =
    the usable samples, as list_keys lists the saved ones); eval --split finds the same uids after
    the store grew."""
    import random

    from featstore.trainers.sharelock.evaluate import evaluate
    from featstore.trainers.sharelock.heldout import heldout_rows

    store = make_aligned_store(tmp_path / "s.zarr", n=640)
    over = TINY + ["steps=4", "val_rows=120", "val_split=official", "val_every_batches=2"]
    summary = train_head(store.path, "img", "txt", tmp_path / "run", overrides=over, progress=False)
    record = summary["heldout"]
    assert record["kind"] == "official" and record["seed"] == 42 and summary["val_rows"] == 120

    keys = [str(u) for u in store.uids()]  # ShareLock's own three lines, on the same keys
    rng = random.Random(42)
    rng.shuffle(keys)
    assert sorted(record["uids"].split("\n")) == sorted(keys[:120])
    val = heldout_rows(Store.open(store.path), record)
    assert sorted(str(u) for u in store.uids()[val]) == sorted(keys[:120])

    grown = Store.open(store.path, mode="r+")  # more samples arrive: the held-out uids stay the held-out uids
    grown.register([f"t{i:05d}" for i in range(300)], captions=["a cat"] * 300, labels=np.zeros(300, int))
    again = heldout_rows(Store.open(store.path), record)
    assert len(again) == 940 and np.array_equal(np.flatnonzero(again), np.flatnonzero(val))
    state = json.load(open(tmp_path / "run" / "last" / "checkpoint.json"))
    assert state["heldout"] == record
    from sharelock_data import FakeTextBackbone as Fake
    r = evaluate(tmp_path / "run", store.path, split=True, templates="sharelock", text_encoder=Fake())
    assert r["zero_shot"]["rows"] == 120

    with pytest.raises(ConfigError, match="set val_rows"):
        train_head(store.path, "img", "txt", tmp_path / "run2", overrides=TINY + ["val_split=official"], progress=False)
    with pytest.raises(ConfigError, match="val_split must be one of"):
        train_head(store.path, "img", "txt", tmp_path / "run3", overrides=TINY + ["val_split=shuffle"], progress=False)


def test_skip_duplicates_trains_without_a_dedup_records_duplicates(tmp_path):
    """`featstore dedup` then `train-head --set skip_duplicates=img`: the copies leave the train
    split (their originals stay); after the store grows the stale record is refused in one line."""
    rng = np.random.default_rng(5)
    copies = [(int(c), int(o)) for c, o in zip(rng.choice(np.arange(300, 600), 40, replace=False),
                                                 rng.choice(300, 40, replace=False))]
    store = make_aligned_store(tmp_path / "s.zarr", n=600, copies=copies)
    r = _cli("dedup", "--store", store.path, "--features", "img", "--threshold", "0.999", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["near_dup_rows"] == 40, r.stdout + r.stderr
    run = ["train-head", "--store", store.path, "--image", "img", "--text", "txt", "--steps", "3", "--json",
           "--set", "batch_size=32", "--set", "hidden_dim=32", "--set", "log_every=1", "--set", "warmup_steps=0"]
    r = _cli(*run, "--out", tmp_path / "dedup", "--set", "skip_duplicates=img")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    train = split_by_uid(Store.open(store.path).uids(), 0.1)[0]
    left_out = sum(bool(train[c]) for c, _ in copies)
    assert f"{left_out:,} duplicate rows of the train split left out (dedup record 'img')" in summary["notes"]
    keep = train.copy()
    keep[[c for c, _ in copies]] = False
    want = Loader(Store.open(store.path), {"x": "features/img/pooled"}, 32, shuffle=True, rows=keep, drop_last=True).num_rows
    assert summary["train_rows"] == want
    Store.open(store.path, mode="r+").register(["late-arrival"])
    r = _cli(*run, "--out", tmp_path / "stale", "--set", "skip_duplicates=img")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "stale" in r.stderr and "featstore dedup" in r.stderr, r.stderr
    r = _cli(*run, "--out", tmp_path / "none", "--set", "skip_duplicates=exact")
    assert r.returncode == 2 and "no duplicate record 'exact'" in r.stderr, r.stderr
