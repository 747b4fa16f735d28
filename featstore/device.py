"""The one device check of every job (extract, train-head, train-uta, eval): a name becomes a
torch.device, or a ConfigError that names the problem in one line."""

from __future__ import annotations

from featstore.errors import ConfigError


def resolve_device(name) -> "torch.device":  # noqa: F821 - torch is imported only when asked
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but CUDA is not available here; use --device cpu")
    return dev
