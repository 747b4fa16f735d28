import json
import os

import pytest
import torch
from safetensors.torch import load_file

from featstore.errors import CheckpointError
from featstore.trainers import checkpoint
from featstore.trainers.sharelock.config import Config
from featstore.trainers.sharelock.model import FORMAT, VERSION, ShareLockModel, load_checkpoint

from sharelock_data import one_thread

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)

FEATURE_SETS = {"image": {"name": "img", "identity": {"model": "a"}, "dim": 16, "dtype": "float16"},
                "text": {"name": "txt", "identity": {"model": "b"}, "dim": 24, "dtype": "float16"}}


def _trained(cfg):
    torch.manual_seed(0)
    model = ShareLockModel(16, 24, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(3):
        zi, zt = model(torch.randn(32, 16), torch.randn(32, 24))
        (zi @ zt.T).diag().sum().neg().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _state(cfg, step=3):
    return {"format": FORMAT, "version": VERSION, "step": step, "config": cfg.to_dict(), "feature_sets": FEATURE_SETS, "loader": {"seed": 0, "epoch": 0, "offset": 0}}


def test_save_load_bit_exact(tmp_path):
    cfg = Config(hidden_dim=32, vision_head="mlp", vision_hidden_dim=20, learnable_logit_scale=True)
    model, opt = _trained(cfg)
    checkpoint.save(tmp_path / "last", model, _state(cfg), opt)
    ckpt = load_checkpoint(tmp_path, which="last", optimizer=True)
    assert ckpt.step == 3 and ckpt.config == cfg and ckpt.state["feature_sets"] == FEATURE_SETS
    saved, loaded = model.state_dict(), ckpt.model.state_dict()
    assert saved.keys() == loaded.keys()
    for k in saved:  # weights, BatchNorm running stats and counters, the logit scale
        assert saved[k].dtype == loaded[k].dtype and torch.equal(saved[k], loaded[k]), k
    assert not ckpt.model.training


def test_optimizer_and_rng_restore_continue_identically(tmp_path):
    cfg = Config(hidden_dim=32)
    model, opt = _trained(cfg)
    torch.manual_seed(5)
    checkpoint.save(tmp_path / "last", model, _state(cfg), opt)
    x = (torch.randn(32, 16), torch.randn(32, 24))  # drawn after the saved RNG state

    def one_step(m, o):
        m.train()
        zi, zt = m(*x)  # dropout draws from the global RNG
        (zi @ zt.T).diag().sum().neg().backward()
        o.step()
        return {k: v.clone() for k, v in m.state_dict().items()}

    torch.manual_seed(5)
    torch.randn(32, 16), torch.randn(32, 24)
    expected = one_step(model, opt)

    ckpt = load_checkpoint(tmp_path, which="last", optimizer=True)
    model2 = ShareLockModel(16, 24, cfg)
    model2.load_state_dict(ckpt.model.state_dict())
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2, weight_decay=1e-4)
    checkpoint.restore_optimizer(opt2, model2, ckpt)
    checkpoint.restore_rng(ckpt.tensors)
    torch.randn(32, 16), torch.randn(32, 24)
    got = one_step(model2, opt2)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


def test_files_are_safetensors_and_json(tmp_path):
    cfg = Config(hidden_dim=32)
    model, opt = _trained(cfg)
    checkpoint.save(tmp_path / "last", model, _state(cfg), opt)
    checkpoint.save(tmp_path / "best", model, _state(cfg))
    assert sorted(os.listdir(tmp_path / "last")) == ["checkpoint.json", "model.safetensors", "optimizer.safetensors"]
    assert sorted(os.listdir(tmp_path / "best")) == ["checkpoint.json", "model.safetensors"]
    tensors = load_file(tmp_path / "last" / "optimizer.safetensors")
    assert "rng/torch" in tensors and any(k.endswith("/exp_avg_sq") for k in tensors)
    state = json.loads((tmp_path / "last" / "checkpoint.json").read_text())
    assert state["format"] == FORMAT and state["optimizer"]["class"] == "Adam"
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp dirs left behind


def test_damaged_or_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing")
    cfg = Config(hidden_dim=32)
    model, _ = _trained(cfg)
    with pytest.raises(CheckpointError, match="no 'best'"):
        load_checkpoint(tmp_path)
    checkpoint.save(tmp_path / "best", model, _state(cfg))
    with open(tmp_path / "best" / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\1\2\3")
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(tmp_path)


def test_kill_mid_swap_falls_back_to_previous(tmp_path):
    cfg = Config(hidden_dim=32)
    model, opt = _trained(cfg)
    checkpoint.save(tmp_path / "last", model, _state(cfg, step=3), opt)
    os.rename(tmp_path / "last", tmp_path / ".last.old")  # killed between the two renames of the next save
    assert load_checkpoint(tmp_path, which="last").step == 3
    checkpoint.save(tmp_path / "last", model, _state(cfg, step=4), opt)
    assert load_checkpoint(tmp_path, which="last").step == 4
    assert not os.path.exists(tmp_path / ".last.old")


def test_model_agnostic_state_must_name_its_format(tmp_path):
    """checkpoint.py knows tensors and state, not models: a state without its format is refused,
    and a ShareLock loader refuses another model's checkpoint."""
    cfg = Config(hidden_dim=32)
    model, _ = _trained(cfg)
    with pytest.raises(ValueError, match="format and version"):
        checkpoint.save(tmp_path / "best", model, {"step": 3, "config": cfg.to_dict()})
    checkpoint.save(tmp_path / "best", model, {**_state(cfg), "format": "featstore-uta-checkpoint", "version": 2})
    raw = checkpoint.read(tmp_path, format="featstore-uta-checkpoint", version=2)
    assert raw.model is None and raw.weights.keys() == model.state_dict().keys()
    with pytest.raises(CheckpointError, match="is not a ShareLock checkpoint"):
        load_checkpoint(tmp_path)
    rebuilt = ShareLockModel.from_state(raw.state, raw.weights)
    assert rebuilt.config == cfg and all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(),
                                                                            model.state_dict().values()))
