import dataclasses
import math
import os

import pytest

from featstore.errors import ConfigError
from featstore.trainers.config import builtin_configs, config_path, parse_set
from featstore.trainers.sharelock.config import Config, load_config, valid_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_defaults_are_sharelock_published():
    c = Config()
    assert (c.num_layers, c.hidden_dim, c.dropout, c.vision_head) == (4, 4096, 0.2, "identity")
    assert c.logit_scale == pytest.approx(1 / 0.07) and not c.learnable_logit_scale
    assert (c.lr, c.weight_decay, c.warmup_steps, c.grad_clip) == (1e-3, 1e-4, 150, 1.0)
    assert (c.batch_size, c.accumulation_steps, c.steps) == (1024, 16, 5000)


def test_shipped_configs():
    """configs/sharelock.yaml is the official run: the model and optimiser of the defaults, and the
    official protocol (train.py / default_config.yaml of ShareLock's code)."""
    official = load_config(os.path.join(ROOT, "configs", "sharelock.yaml"))
    protocol = {"val_rows": 50000, "val_split": "official", "val_seed": 42, "val_every_batches": 500, "patience": 50, "min_delta": 0.1, "best_metric": "val_loss",
                "warmup_from_zero": True, "max_warmup_fraction": 1.0, "logit_scale": pytest.approx(math.exp(2.6592))}
    assert {k: getattr(official, k) for k in protocol} == protocol
    assert dataclasses.replace(official, **{k: getattr(Config(), k) for k in protocol}) == Config()
    demo = load_config(os.path.join(ROOT, "configs", "demo.yaml"))
    assert demo.hidden_dim < 4096 and demo.accumulation_steps == 1 and demo.steps <= 1000
    # by name, from the installed package data, whatever the working directory
    assert builtin_configs() == ["demo", "sharelock", "uta", "uta-b16"]
    assert load_config("sharelock") == official and load_config("demo.yaml") == demo
    assert config_path("uta").endswith(os.path.join("featstore", "configs", "uta.yaml")) or \
        config_path("uta") == os.path.join(ROOT, "configs", "uta.yaml")


def test_uta_b16_is_eva02s_pretraining_recipe():
    """configs/uta-b16.yaml: UTA-B/16 with EVA-02-B's pre-training hyper-parameters (baaivision/EVA,
    EVA-02/asuka: run_eva02_pretraining.py's defaults and the README's eva02_B command)."""
    from featstore.trainers.config import load_config as load_any
    from featstore.trainers.uta.config import UTAConfig

    b16 = load_any("uta-b16", base=UTAConfig())
    eva02 = {"lr": 1.5e-3, "adam_beta2": 0.98, "adam_eps": 1e-6, "weight_decay": 0.05, "grad_clip": 3.0,
             "batch_size": 2048, "drop_path": 0.0, "layer_scale": None, "min_lr_ratio": pytest.approx(1e-5 / 1.5e-3, rel=1e-4)}
    assert {k: getattr(b16, k) for k in eva02} == eva02
    assert (b16.student, b16.patch_size, b16.mask_ratio, b16.reversed_masking) == ("base", 16, 0.5, True)
    assert b16.warmup_steps * 150 == b16.steps  # one warm-up epoch of 150
    assert UTAConfig().adam_eps == 1e-8  # the general default stays torch's
    # the UTA configs train on a fresh crop every step with the teacher in the step (the exact targets);
    # the dataclass default keeps stored crops (no backbone loaded by a bare train_uta call)
    assert b16.fresh_crops == load_any("uta", base=UTAConfig()).fresh_crops == "teacher"
    assert UTAConfig().fresh_crops == "none"


def test_unknown_key_rejected_with_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["hiden_dim=12"])
    msg = str(e.value)
    assert "hiden_dim" in msg and "hidden_dim" in msg and "\n" not in msg
    assert all(k in msg for k in valid_keys())
    f = tmp_path / "c.yaml"
    f.write_text("steps: 10\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(f)


def test_set_parsing():
    assert parse_set("lr=1e-3")[0] == "lr"  # YAML 1.1 reads 1e-3 as a str; the float field coerces it
    assert parse_set("name=a=b") == ("name", "a=b")
    cfg = load_config(None, ["lr=1e-3", "steps=20", "patience=null", "learnable_logit_scale=true", "vision_head=mlp",
                             "logit_scale=10", "cache=ram", "embed_dim=32"])
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float)
    assert cfg.steps == 20 and cfg.patience is None and cfg.learnable_logit_scale is True
    assert cfg.vision_head == "mlp" and cfg.logit_scale == 10.0 and isinstance(cfg.logit_scale, float)
    assert cfg.cache == "ram" and cfg.embed_dim == 32
    assert parse_set(" steps = 7") == ("steps", 7)
    assert load_config(None, ["steps=5", "steps=6"]).steps == 6  # the last one wins


@pytest.mark.parametrize("item", ["steps", "=3", "steps=abc", "steps=1.5", "dropout=1.5", "lr=-1", "patience=yes",
                                  "vision_head=conv", "hidden_dim=null", "steps=[1, 2]", "cache=disk"])
def test_bad_values(item):
    with pytest.raises(ConfigError):
        load_config(None, [item])


def test_file_then_set_then_base(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 10\nhidden_dim: 64\n")
    base = dataclasses.replace(Config(), seed=7)
    cfg = load_config(f, ["hidden_dim=32"], base=base)
    assert (cfg.seed, cfg.steps, cfg.hidden_dim) == (7, 10, 32)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("steps: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
