"""The ShareLock head's configuration: one dataclass, a YAML file, and `--set KEY=VALUE` overrides.

    cfg = load_config("demo", ["steps=200", "lr=3e-4"])     # a built-in config by name, or a YAML path

The model and optimiser defaults are ShareLock's published ones (Ruthardt et al., 2024): a 4-layer
language MLP at width 4096 with BatchNorm and dropout 0.2, identity vision head, symmetric InfoNCE
at a fixed logit scale of 1/0.07, Adam (lr 1e-3, weight decay 1e-4), 150 warm-up steps then cosine,
grad-norm clip 1.0, micro-batches of 1024 (negatives only within a micro-batch) accumulated 16
times, 5000 steps.  The training protocol defaults suit any store (10% held out, validation every
steps/10, patience 5); `configs/sharelock.yaml` sets the official protocol (50,000 held-out rows,
validation every 500 micro-batches, patience 50 with min_delta 0.1, warm-up from lr 0, logit scale
exp(2.6592)).  Unknown keys and badly typed values are refused with one line that lists the valid keys.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, fields

import yaml

from featstore.device import resolve_device  # noqa: F401 - the trainers' name for it
from featstore.errors import ConfigError


# what validation measures (train_head.validate): the loss is lower-is-better, the recalls higher
BEST_METRICS = ("val_loss", "val_i2t_r1", "val_i2t_r5", "val_t2i_r1", "val_t2i_r5")


def need(ok: bool, what: str) -> None:
    """A config check: a one-line ConfigError when it fails."""
    if not ok:
        raise ConfigError(f"bad config: {what}")


class ConfigBase:
    """What every trainer config dataclass shares: the checks of the keys both trainers have
    (optimizer schedule, split, cadence), and plain-dict round trips through `apply`, so loading
    a saved config checks its keys and types like a config file does."""

    def _check_common(self) -> None:
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(0.0 <= self.max_warmup_fraction <= 1.0, "max_warmup_fraction must be in [0, 1]")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must be in [0, 1]")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}")
        need(0.0 < self.val_fraction < 1.0, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        need(self.cache in (None, "ram"), f"cache must be null or ram, got {self.cache!r}")
        need(self.shuffle_window is None or self.shuffle_window >= 1, f"shuffle_window must be >= 1 or null, got {self.shuffle_window}")
        need(self.cpu_threads is None or self.cpu_threads >= 1, f"cpu_threads must be >= 1 or null, got {self.cpu_threads}")
        need(self.val_every is None or self.val_every >= 1, f"val_every must be >= 1, got {self.val_every}")
        need(self.save_every >= 1, f"save_every must be >= 1, got {self.save_every}")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")


    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "config"):
        return apply(cls(), values, where)


@dataclass
class Config(ConfigBase):
    # ---- the heads ----
    num_layers: int = 4  # language head: num_layers-1 blocks of Linear-BN-ReLU-Dropout, then a Linear
    hidden_dim: int = 4096
    dropout: float = 0.2
    vision_head: str = "identity"  # identity | mlp
    vision_num_layers: int = 2  # used when vision_head is mlp
    vision_hidden_dim: int = 4096
    embed_dim: int | None = None  # the shared space; None = the vision feature width
    logit_scale: float = 1 / 0.07
    learnable_logit_scale: bool = False
    # ---- optimisation ----
    steps: int = 5000  # optimizer steps
    batch_size: int = 1024  # one micro-batch: the negatives of each row are the rest of its micro-batch
    accumulation_steps: int = 16  # micro-batches per optimizer step
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 150
    max_warmup_fraction: float = 0.1  # warm-up never longer than this fraction of `steps`
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    warmup_from_zero: bool = False  # the first warm-up update gets lr 0 (ShareLock's schedule), else lr / warmup
    grad_clip: float = 1.0  # max grad norm; 0 turns clipping off
    # ---- data ----
    seed: int = 0  # model init, dropout, the data order and which text set each row gets
    val_fraction: float = 0.1  # held out by uid hash (featstore.split), the same split for eval
    val_rows: int | None = None  # hold out exactly this many rows (smallest uid hash) instead; ShareLock: 50000
    cache: str | None = None  # None streams from the store; "ram" reads the train columns once
    shuffle_window: int | None = None  # the loader's read window per rank, in rows; None = the loader's default (by bytes)
    cpu_threads: int | None = None  # torch threads when training on CPU; None = torch's default (small heads: 1 is fastest)
    # ---- validation, early stopping, checkpoints ----
    val_every: int | None = None  # None = steps // 10; never more than that
    val_every_batches: int | None = None  # validate after every this many micro-batches instead (ShareLock: 500)
    val_max_rows: int = 10000  # retrieval recall during training on at most this many val rows
    best_metric: str = "val_loss"  # picks the best checkpoint and drives early stopping (or val_i2t_r1, ...: higher)
    patience: int | None = 5  # stop after this many validations without an improvement; None = never
    min_delta: float = 0.0  # an improvement must beat the best by more than this (ShareLock: 0.1)
    save_every: int = 500  # write the `last` checkpoint every this many steps (and at the end)
    log_every: int = 10  # a metrics.jsonl line every this many steps (and on validation steps)

    def validate(self) -> "Config":
        need(self.num_layers >= 1, f"num_layers must be >= 1, got {self.num_layers}")
        need(self.vision_num_layers >= 1, f"vision_num_layers must be >= 1, got {self.vision_num_layers}")
        need(self.hidden_dim >= 1 and self.vision_hidden_dim >= 1, "hidden widths must be >= 1")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.vision_head in ("identity", "mlp"), f"vision_head must be identity or mlp, got {self.vision_head!r}")
        need(self.embed_dim is None or self.embed_dim >= 1, f"embed_dim must be >= 1, got {self.embed_dim}")
        need(self.logit_scale > 0, f"logit_scale must be > 0, got {self.logit_scale}")
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need(self.batch_size >= 2, f"batch_size must be >= 2 (a contrastive batch needs negatives), got {self.batch_size}")
        need(self.accumulation_steps >= 1, f"accumulation_steps must be >= 1, got {self.accumulation_steps}")
        need(self.val_max_rows >= 2, f"val_max_rows must be >= 2, got {self.val_max_rows}")
        need(self.patience is None or self.patience >= 1, f"patience must be >= 1 or null, got {self.patience}")
        need(self.min_delta >= 0, f"min_delta must be >= 0, got {self.min_delta}")
        need(self.best_metric in BEST_METRICS, f"best_metric must be one of {', '.join(BEST_METRICS)}, got {self.best_metric!r}")
        need(self.val_rows is None or self.val_rows >= 2, f"val_rows must be >= 2 or null, got {self.val_rows}")
        need(self.val_every_batches is None or self.val_every_batches >= 1,
             f"val_every_batches must be >= 1 or null, got {self.val_every_batches}")
        self._check_common()
        return self


def valid_keys(cls=Config) -> list[str]:
    return [f.name for f in fields(cls)]


def apply(cfg: Config, values: dict, where: str) -> Config:
    """A copy of `cfg` with `values` applied (checked against the fields' types), validated.
    Works for any config dataclass with a `validate()` (ShareLock's `Config`, UTA's `UTAConfig`)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of key: value, got {type(values).__name__}")
    hints = typing.get_type_hints(type(cfg))
    out = dataclasses.replace(cfg)
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key '{key}' in {where}; valid keys: {', '.join(valid_keys(type(cfg)))}")
        setattr(out, key, _coerce(key, value, hints[key], where))
    return out.validate()


def parse_set(item: str) -> tuple[str, object]:
    """`KEY=VALUE` → (key, value), the value read as a YAML scalar (`1e-3`, `null`, `true`, `mlp`)."""
    key, sep, raw = str(item).partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)):
        raise ConfigError(f"--set {key}: expected one value, got {raw!r}")
    return key, value


def builtin_configs() -> list[str]:
    """Names `--config` takes besides a path: the YAML files shipped in `featstore.configs`."""
    from importlib.resources import files

    return sorted(p.name[: -len(".yaml")] for p in files("featstore.configs").iterdir() if p.name.endswith(".yaml"))


def config_path(config) -> str:
    """The YAML file `config` names: an existing path, or a built-in config by name (sharelock, uta, demo)."""
    from importlib.resources import files

    given = os.fspath(config)
    if os.path.isfile(given):
        return given
    name = given[: -len(".yaml")] if given.endswith(".yaml") else given
    if name in builtin_configs():
        return str(files("featstore.configs") / f"{name}.yaml")
    raise ConfigError(f"config {given} does not exist: give a YAML file or a built-in config ({', '.join(builtin_configs())})")


def load_config(config_file=None, overrides=(), base: Config | None = None) -> Config:
    """`base` (default: the ShareLock defaults; any config dataclass), then the YAML file (a path,
    or a built-in config's name: `builtin_configs()`), then each `KEY=VALUE`."""
    cfg = dataclasses.replace(base) if base is not None else Config()
    if config_file is not None:
        config_file = config_path(config_file)
        try:
            with open(config_file) as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {config_file} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {config_file} is not valid YAML: {str(e).splitlines()[0]}") from None
        cfg = apply(cfg, values, str(config_file))
    sets = dict(parse_set(item) for item in overrides or ())
    return apply(cfg, sets, "--set") if sets else cfg.validate()


def _coerce(key: str, value, hint, where: str):
    """`value` as the field's type: ints become floats where floats are wanted, '1e-3' a float,
    and None is accepted only by optional fields."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {key} cannot be null (expected {base.__name__})")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} must be {'null or ' if optional else ''}{base.__name__}, got {value!r}") from None
    return value
