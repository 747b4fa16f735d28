"""Trainer configs: a dataclass per trainer (ShareLock's `sharelock/config.py:Config`, UTA's
`uta/config.py:UTAConfig`), read from a YAML file and `--set KEY=VALUE` overrides.

    cfg = load_config("uta", ["steps=200", "lr=3e-4"], base=UTAConfig())   # a built-in config by name, or a YAML path

Unknown keys and badly typed values are refused with one line that lists the valid keys.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import fields

import yaml

from featstore.errors import ConfigError


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
        need(self.skip_duplicates is None or (isinstance(self.skip_duplicates, str) and self.skip_duplicates),
             f"skip_duplicates must be a dedup record's name (exact, or a feature set) or null, got {self.skip_duplicates!r}")


    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "config"):
        return apply(cls(), values, where)


def valid_keys(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def apply(cfg, values: dict, where: str):
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


def load_config(config_file=None, overrides=(), *, base):
    """`base` (a trainer's config dataclass: its defaults, or a checkpoint's config), then the YAML
    file (a path, or a built-in config's name: `builtin_configs()`), then each `KEY=VALUE`."""
    cfg = dataclasses.replace(base)
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
