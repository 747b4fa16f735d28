"""Checkpoints of any model: safetensors for tensors, json for everything else; nothing is ever unpickled.

    <run>/last/  model.safetensors       the model's state_dict (weights, BatchNorm statistics, ...)
                 optimizer.safetensors   the optimizer's state per parameter (`state/<param>/<key>`) and
                                         the RNG states (`rng/torch`, `rng/cuda/<i>`), as tensors
                 checkpoint.json         the trainer's state: format + version (which model it is),
                                         config, step, loader state, best val, what it read (names +
                                         identities of feature sets, the store), file checksums
    <run>/best/  model.safetensors + checkpoint.json   (the best validation so far)

This module knows tensors and state, not models: each model builds itself from a checkpoint
(`ShareLockModel.from_state`, `UTAStudent.from_state`) and names its own format
(`sharelock.load_checkpoint`, `uta.load_checkpoint`).  A checkpoint directory is written whole
beside its target, then swapped in by renames, so a kill at any moment leaves the previous
checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from featstore.errors import CheckpointError, IdentityMismatch
from featstore.core.identity import identity_diff, lines

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "checkpoint.json"


@dataclass
class Checkpoint:
    path: str  # the checkpoint directory (…/best or …/last)
    state: dict  # checkpoint.json
    weights: dict[str, torch.Tensor]  # model.safetensors
    tensors: dict[str, torch.Tensor] | None  # optimizer.safetensors (None when not asked for or absent)
    model: torch.nn.Module | None = None  # set by the model's own loader (from_state)
    config: object = None  # the model's config dataclass, likewise

    @property
    def step(self) -> int:
        return int(self.state["step"])


# ---- saving -------------------------------------------------------------------------------
def save(ckpt_dir, model: torch.nn.Module, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write `model` (and, given `optimizer`, its state and the RNG states) plus `state` (which
    names its "format" and "version") as a checkpoint directory, replacing any previous one there
    atomically."""
    if "format" not in state or "version" not in state:
        raise ValueError("a checkpoint's state must name its format and version (the model's FORMAT, VERSION)")
    ckpt_dir = os.path.abspath(str(ckpt_dir))
    parent, name = os.path.split(ckpt_dir)
    tmp, old = os.path.join(parent, f".{name}.tmp-{os.getpid()}"), os.path.join(parent, f".{name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    files = {MODEL_FILE: {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}}
    extra = {}
    if optimizer is not None:
        tensors, extra = _optimizer_tensors(model, optimizer)
        tensors.update(rng_tensors())
        files[OPTIMIZER_FILE] = tensors
    checksums = {}
    for fname, tensors in files.items():
        save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
        checksums[fname] = sha256(os.path.join(tmp, fname))
    state = {**state, **extra, "files": checksums}
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    for fname in os.listdir(tmp):
        _fsync(os.path.join(tmp, fname))
    if os.path.exists(ckpt_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(ckpt_dir, old)  # a kill from here to the next rename leaves `.<name>.old`, which load() falls back to
    os.rename(tmp, ckpt_dir)
    shutil.rmtree(old, ignore_errors=True)
    _fsync(parent)


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng/cuda/{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, groups = {}, []
    for group in optimizer.param_groups:
        groups.append({"hyper": {k: v for k, v in group.items() if k != "params" and _json_scalar(v)},
                       "params": [names[id(p)] for p in group["params"]]})
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
                tensors[f"state/{names[id(p)]}/{key}"] = t.detach().cpu().contiguous()
    return tensors, {"optimizer": {"class": type(optimizer).__name__, "param_groups": groups}}


def restore_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Put the saved Adam state back into `optimizer` (built over `model`'s parameters)."""
    saved = ckpt.state.get("optimizer")
    if ckpt.tensors is None or saved is None:
        raise CheckpointError(f"checkpoint {ckpt.path} has no optimizer state: resume from a `last` checkpoint")
    if saved["class"] != type(optimizer).__name__ or len(saved["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint {ckpt.path} holds a {saved['class']} state that does not fit this optimizer")
    names = {id(p): n for n, p in model.named_parameters()}
    sd = optimizer.state_dict()
    for gi, (group, saved_group) in enumerate(zip(optimizer.param_groups, saved["param_groups"])):
        if [names[id(p)] for p in group["params"]] != saved_group["params"]:
            raise CheckpointError(f"checkpoint {ckpt.path}: optimizer parameters differ from the model's")
        sd["param_groups"][gi].update(saved_group["hyper"])
        for p, idx in zip(group["params"], sd["param_groups"][gi]["params"]):
            prefix = f"state/{names[id(p)]}/"
            state = {k[len(prefix):]: v for k, v in ckpt.tensors.items() if k.startswith(prefix)}
            if state:
                sd["state"][idx] = state
    optimizer.load_state_dict(sd)


# ---- loading ------------------------------------------------------------------------------
def resolve(path, which: str = "best") -> str:
    """The checkpoint directory for `path`: itself when it holds checkpoint.json, else `path/<which>`
    (falling back to a `.last.old` left by a kill mid-swap)."""
    path = os.path.abspath(str(path))
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    for candidate in (os.path.join(path, which), os.path.join(path, f".{which}.old")):
        if os.path.isfile(os.path.join(candidate, STATE_FILE)):
            return candidate
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}: check the path (a training --out directory)")
    raise CheckpointError(f"{path} holds no '{which}' checkpoint ({STATE_FILE} not found): is it a training --out directory?")


def exists(run_dir, which: str = "last") -> bool:
    try:
        resolve(run_dir, which)
        return True
    except CheckpointError:
        return False


def resume_point(out_dir: str, resume: bool, load_fn):
    """Where a training run starts: None for a fresh run, else its `last` checkpoint loaded with
    the optimizer by `load_fn` (the model's `load_checkpoint`).  A directory that already holds a
    run is refused without `resume`, so a finished run is never overwritten by accident."""
    has_last = exists(out_dir, "last")
    if has_last and not resume:
        raise CheckpointError(f"{out_dir} already holds a training run: pass --resume to continue it, or pick another --out")
    if not (resume and has_last):
        return None
    return load_fn(out_dir, "last", optimizer=True)


def format_of(path, which: str = "best") -> str | None:
    """The format a checkpoint's checkpoint.json names, or None where there is no readable one."""
    try:
        with open(os.path.join(resolve(path, which), STATE_FILE)) as f:
            return json.load(f).get("format")
    except (CheckpointError, OSError, ValueError, AttributeError):
        return None


def read_state(path, which: str = "best", *, format: str, version: int, kind: str | None = None) -> dict:
    """checkpoint.json of a checkpoint of `format`, refusing other formats and versions newer
    than `version` (`kind` names the model in messages)."""
    ckpt_dir = resolve(path, which)
    try:
        with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt_dir}/{STATE_FILE} cannot be read ({e}): the checkpoint is damaged") from None
    kind = kind or format
    if state.get("format") != format:
        raise CheckpointError(f"{ckpt_dir} is not a {kind} checkpoint (format {state.get('format')!r})")
    if int(state.get("version", 0)) > version:
        raise CheckpointError(f"{ckpt_dir} was written by a newer featstore ({kind} checkpoint version "
                              f"{state['version']}): upgrade featstore")
    return state


def read(path, which: str = "best", *, format: str, version: int, kind: str | None = None, optimizer: bool = False,
         verify: bool = True, check=None) -> Checkpoint:
    """A checkpoint's state and tensors: checkpoint.json (see `read_state`; `check(state, dir)` may
    refuse it further before any tensor is read), model.safetensors and, with `optimizer`,
    optimizer.safetensors.  Files whose checksum differs from the one recorded are refused."""
    ckpt_dir = resolve(path, which)
    state = read_state(ckpt_dir, format=format, version=version, kind=kind)
    if check is not None:
        check(state, ckpt_dir)
    weights = read_tensors(ckpt_dir, MODEL_FILE, state, verify)
    tensors = None
    if optimizer and OPTIMIZER_FILE in state.get("files", {}):
        tensors = read_tensors(ckpt_dir, OPTIMIZER_FILE, state, verify)
    return Checkpoint(ckpt_dir, state, weights, tensors)


def read_tensors(ckpt_dir: str, fname: str, state: dict, verify: bool = True) -> dict[str, torch.Tensor]:
    """One safetensors file of a checkpoint, checked against the checksum its state recorded."""
    fpath = os.path.join(ckpt_dir, fname)
    if not os.path.isfile(fpath):
        raise CheckpointError(f"checkpoint {ckpt_dir} is missing {fname}")
    if verify and state.get("files", {}).get(fname) != sha256(fpath):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {fname} does not match its recorded checksum (damaged or replaced)")
    try:
        return load_file(fpath, device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {ckpt_dir}: {fname} cannot be read ({e})") from None


def sha256(path: str) -> str:
    """The hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (
        isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v))


def describe(store, name: str) -> dict:
    """What a checkpoint records of a feature set it was trained on."""
    fs = store.feature_set(name)
    return {"name": name, "identity": fs.identity, "dim": int(fs.attrs["dim"]), "dtype": str(fs.array("pooled").dtype)}


def check_identity(recorded: dict, current: dict, ckpt_path: str, store_path: str, ignore=()) -> None:
    """Refuse a feature set whose identity differs from the one a checkpoint was trained on,
    naming both and each differing key on its own line (`recorded`/`current` are
    {"name", "identity", ...} as in checkpoint.json; `ignore`: keys that may differ)."""
    diff = identity_diff(recorded.get("identity") or {}, current.get("identity") or {}, then="at training",
                         now="in the store", ignore=ignore)
    if diff:
        raise IdentityMismatch(
            f"feature set '{current.get('name')}' in {store_path} is not the '{recorded.get('name')}' that checkpoint "
            f"{ckpt_path} was trained on (use features made by the same backbone):{lines(diff)}"
        )
