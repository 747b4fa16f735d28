"""`featstore import-sharelock` on a checkpoint built here exactly as ShareLock's official training
writes one: a PyTorch Lightning checkpoint dict (its top-level keys, the LightningModule's
state_dict, optimizer and scheduler states, callback states) whose `hyper_parameters` is the
OmegaConf DictConfig ShareLock passes to `save_hyperparameters` (Lightning stores it as is, with
`hparams_type`), pickled by `torch.save` as Lightning does.  omegaconf is used here only to build
that file; the import runs with omegaconf made unimportable."""

import json
import os
import pickle
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from featstore.errors import CheckpointError, ConfigError
from featstore.store import Store
from featstore.trainers.sharelock.evaluate import evaluate
from featstore.trainers.sharelock.import_official import import_sharelock
from featstore.trainers.sharelock.model import ShareLock, load_checkpoint
from featstore.core.writes import write_block

import omegaconf  # a test dependency, only to build the fixture the way ShareLock's train.py makes its config

FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")
TEXT_DIM, HIDDEN, IMAGE_DIM = 32, 64, 24  # the tiny Llama's width; the vision (= shared) width
# ShareLock's configs/default_config.yaml, with the tiny widths
CONFIG = f"""
seed: 42
experiment_name: "base"
data:
  dataset: ["cc3m"]
  caption_files: ["captions.json"]
  num_workers: 16
  val_split_num: 50000
  precomputed_features_dir: "/features"
model:
  embedding_space_dim: 768
  vision_encoder: "dinov2_vitb14"
  vision_projector: {{hidden_size: 4096, num_layers: 0, normalize: True}}
  language_encoder: "meta-llama/Meta-Llama-3-8B"
  language_projector: {{hidden_size: {HIDDEN}, num_layers: 4, normalize: True}}
training:
  max_steps: 5000
  lr_warmup_steps: 150
  learning_rate: 0.001
  lr_schedule: "cosine"
  batch_size: 1024
  accumulate_grad_batches: 16
  max_grad_norm: 1
  weight_decay: 0.0001
  early_stopping: True
  early_stopping_patience: 50
logging: {{save_dir: "logs/", save_checkpoint: True, log_every_n_steps: 10, val_check_interval: 500}}
"""


def official_language_projector() -> nn.Sequential:
    """The layout of ShareLock's `Projection` (4 layers): [Linear, BatchNorm1d, ReLU, Dropout(0.2)] x 3, Linear."""
    layers, width = [], TEXT_DIM
    for _ in range(3):
        layers += [nn.Linear(width, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.ReLU(), nn.Dropout(0.2)]
        width = HIDDEN
    return nn.Sequential(*layers, nn.Linear(width, IMAGE_DIM))


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(path of the .ckpt, the trained projector it holds, the OmegaConf config)."""
    from omegaconf import DictConfig, OmegaConf
    from transformers import get_cosine_schedule_with_warmup

    torch.manual_seed(0)
    projector = official_language_projector()
    optimizer = torch.optim.Adam(projector.parameters(), lr=1e-3, weight_decay=1e-4)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=150, num_training_steps=5000)
    for _ in range(5):  # a few steps: real BatchNorm statistics, Adam moments, scheduler state
        loss = projector(torch.randn(16, TEXT_DIM)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    config = OmegaConf.merge(OmegaConf.create(CONFIG), OmegaConf.from_dotlist(["experiment_name=cc3m-run"]))
    state_dict = OrderedDict((f"language_projector.projection.{k}", v) for k, v in projector.state_dict().items())
    ckpt = {
        "epoch": 2, "global_step": 5, "pytorch-lightning_version": "2.4.0", "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 80}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': 'validation_loss', 'mode': 'min', 'every_n_train_steps': 0}": {
                "monitor": "validation_loss", "best_model_score": torch.tensor(5.25), "best_model_path": "logs/best_model.ckpt",
                "current_score": torch.tensor(5.5), "dirpath": "logs/", "best_k_models": {"logs/best_model.ckpt": torch.tensor(5.25)},
                "kth_best_model_path": "logs/best_model.ckpt", "kth_value": torch.tensor(5.25), "last_model_path": ""},
            "EarlyStopping{'monitor': 'validation_loss', 'mode': 'min'}": {
                "wait_count": 3, "stopped_epoch": 0, "best_score": torch.tensor(5.25), "patience": 50},
        },
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "hparams_name": "config",
        "hyper_parameters": config,
        "hparams_type": DictConfig,
    }
    path = tmp_path_factory.mktemp("official") / "ShareLock-tiny.ckpt"
    torch.save(ckpt, path)
    return str(path), projector.eval(), config


@pytest.fixture(scope="module")
def eval_store(tmp_path_factory):
    """An image-only labelled store (like ImageNet val): image features, no captions."""
    rng = np.random.default_rng(0)
    store = Store.create(str(tmp_path_factory.mktemp("eval") / "s.zarr"), rows_per_shard=32)
    n = 60
    store.register([f"val-{i:03d}" for i in range(n)], labels=np.arange(n) % 3, label_names=["cat", "dog", "car"])
    store.create_feature_set("dinov2", {"model": "synthetic-dinov2", "version": 1}, IMAGE_DIM)
    x = rng.standard_normal((n, IMAGE_DIM)).astype(np.float32)
    for b in range(store.n_blocks):
        start, stop = store.block_range(b)
        write_block(store, "dinov2", b, {"pooled": x[start:stop]}, np.ones(stop - start, bool))
    return store.path


def _blocked_env(tmp_path) -> dict:
    """PYTHONPATH first holds packages named omegaconf and pytorch_lightning that fail on import."""
    for name in ("omegaconf", "pytorch_lightning", "lightning"):
        (tmp_path / "blocked" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "blocked" / name / "__init__.py").write_text(f"raise ImportError('{name} must not be needed')\n")
    return {**os.environ, "PYTHONPATH": str(tmp_path / "blocked")}


def _cli(*args, env=None, check=True):
    out = subprocess.run([FEATSTORE, *map(str, args)], capture_output=True, text=True, env=env)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_plain_weights_only_load_refuses_the_official_format(official):
    with pytest.raises(pickle.UnpicklingError, match="omegaconf"):
        torch.load(official[0], weights_only=True)


def test_import_then_load_and_eval(official, eval_store, tiny_llama_path, tmp_path):
    path, projector, config = official
    out = tmp_path / "sharelock-tiny"
    summary = json.loads(_cli("import-sharelock", path, "--out", out, "--store", eval_store, "--image", "dinov2",
                              "--text", tiny_llama_path, "--json", env=_blocked_env(tmp_path)).stdout)
    assert summary["step"] == 5 and summary["backbones"] == {"vision": "dinov2_vitb14", "language": "meta-llama/Meta-Llama-3-8B"}
    assert summary["image"]["name"] == "dinov2" and summary["image"]["identity"]["model"] == "synthetic-dinov2"
    assert summary["text"]["identity"]["recipe"] == "decoder" and summary["text"]["dim"] == TEXT_DIM

    # the same outputs as the official projector on the same weights (eval mode: BN statistics, no dropout)
    sl = ShareLock.load(out)
    x = torch.randn(7, TEXT_DIM)
    torch.testing.assert_close(sl.encode_text_features(x), F.normalize(projector(x), dim=-1), atol=1e-6, rtol=1e-5)
    y = torch.randn(5, IMAGE_DIM)
    torch.testing.assert_close(sl.encode_image_features(y), F.normalize(y, dim=-1))  # no vision layers: identity + L2
    cfg = sl.config
    assert (cfg.num_layers, cfg.hidden_dim, cfg.vision_head, cfg.dropout) == (4, HIDDEN, "identity", 0.2)
    assert (cfg.val_rows, cfg.patience, cfg.val_every_batches, cfg.warmup_from_zero) == (50000, 50, 500, True)
    assert cfg.logit_scale == pytest.approx(14.2848566)
    state = json.load(open(out / "checkpoint.json"))
    assert state["imported_from"]["hyper_parameters"] == omegaconf.OmegaConf.to_container(config)
    assert state["best"]["val_loss"] == 5.25 and state["imported_from"]["lightning_version"] == "2.4.0"

    # featstore eval runs on it: image features checked, prompts encoded by the recorded text backbone
    r = json.loads(_cli("eval", "--checkpoint", out, "--store", eval_store, "--templates", "simple", "--json").stdout)
    assert r["zero_shot"]["rows"] == 60 and r["zero_shot"]["classes"] == 3 and r["retrieval"] is None
    assert Store.open(eval_store).root["prompts"][os.path.basename(tiny_llama_path)].attrs["n"] == 3
    with pytest.raises(ConfigError, match="held-out rows are unknown"):
        evaluate(out, eval_store, split=True)

    # idempotent: the same import again replaces it; another directory's content is never overwritten
    again = import_sharelock(path, out, store=eval_store, image="dinov2", text=tiny_llama_path)
    assert again["step"] == 5
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="new --out"):
        import_sharelock(path, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_import_without_store_records_no_identities(official, eval_store, tmp_path):
    out = tmp_path / "bare"
    import_sharelock(official[0], out)
    ckpt = load_checkpoint(out)
    assert ckpt.state["feature_sets"]["image"]["identity"] is None and ckpt.model.text_dim == TEXT_DIM
    with pytest.raises(CheckpointError, match="--store S --image NAME --text NAME"):
        evaluate(out, eval_store)
    with pytest.raises(ConfigError, match="--image NAME --text NAME"):
        import_sharelock(official[0], tmp_path / "half", store=eval_store, image="dinov2")
    with pytest.raises(ConfigError, match="no such feature set"):
        import_sharelock(official[0], tmp_path / "half", store=eval_store, image="dinov3", text="x")


class Payload:
    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


class CallsAStandIn:
    def __reduce__(self):
        return (omegaconf.DictConfig, ({"a": 1},))  # an allow-listed name, called with arguments


def test_anything_else_in_the_pickle_is_refused(official, tmp_path):
    flag = tmp_path / "ran"
    errors = []
    for i, payload in enumerate([Payload(flag), CallsAStandIn()]):
        bad = tmp_path / f"bad{i}.ckpt"
        ckpt = torch.load(official[0], weights_only=False)  # the test's own file
        ckpt["hyper_parameters"] = payload
        torch.save(ckpt, bad)
        with pytest.raises(CheckpointError, match="nothing was loaded") as e:
            import_sharelock(bad, tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists()
        errors.append(str(e.value))
    err = _cli("import-sharelock", tmp_path / "bad0.ckpt", "--out", tmp_path / "out", check=False)  # as the user sees it
    assert err.returncode == 2 and err.stderr.count("\n") == 1 and "nothing was loaded" in err.stderr
    assert "system, which is not on the allow-list" in errors[0]
    assert not flag.exists()
