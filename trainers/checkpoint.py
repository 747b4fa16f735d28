"""Checkpoints: safetensors for tensors, json for everything else; nothing is ever unpickled.

    <run>/last/  model.safetensors       the heads' state_dict (weights, BatchNorm statistics, logit scale)
                 optimizer.safetensors   Adam's state per parameter (`state/<param>/<key>`) and the RNG
                                         states (`rng/torch`, `rng/cuda/<i>`), as tensors
                 checkpoint.json         config, step, loader state, best val, both feature sets'
                                         names + identities + dims, the store path, file checksums
    <run>/best/  model.safetensors + checkpoint.json   (the lowest validation loss so far)

A checkpoint directory is written whole beside its target, then swapped in by renames, so a kill
at any moment leaves the previous checkpoint or the new one, never a mix.
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

from .config import Config
from .sharelock import ShareLockModel

FORMAT = "featstore-sharelock-checkpoint"
VERSION = 1
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "checkpoint.json"


@dataclass
class Checkpoint:
    path: str  # the checkpoint directory (…/best or …/last)
    state: dict  # checkpoint.json
    config: Config
    model: ShareLockModel
    tensors: dict[str, torch.Tensor] | None  # optimizer.safetensors (None when not asked for or absent)

    @property
    def step(self) -> int:
        return int(self.state["step"])


# ---- saving -------------------------------------------------------------------------------
def save(ckpt_dir, model: torch.nn.Module, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write `model` (and, given `optimizer`, its state and the RNG states) plus `state` as a
    checkpoint directory, replacing any previous one there atomically."""
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
        checksums[fname] = _sha256(os.path.join(tmp, fname))
    state = {"format": FORMAT, "version": VERSION, **state, **extra, "files": checksums}
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


def resume_point(out_dir: str, resume: bool, load_fn=None):
    """Where a training run starts: None for a fresh run, else its `last` checkpoint loaded with
    the optimizer (`load_fn`, default ShareLock's `load`).  A directory that already holds a run
    is refused without `resume`, so a finished run is never overwritten by accident."""
    has_last = exists(out_dir, "last")
    if has_last and not resume:
        raise CheckpointError(f"{out_dir} already holds a training run: pass --resume to continue it, or pick another --out")
    if not (resume and has_last):
        return None
    return (load_fn or load)(out_dir, "last", optimizer=True)


def read_state(path, which: str = "best", expect: str = FORMAT) -> dict:
    """checkpoint.json of a checkpoint whose format is `expect` (ShareLock's unless told; UTA passes its own)."""
    ckpt_dir = resolve(path, which)
    try:
        with open(os.path.join(ckpt_dir, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt_dir}/{STATE_FILE} cannot be read ({e}): the checkpoint is damaged") from None
    if state.get("format") != expect:
        kind = "ShareLock" if expect == FORMAT else expect
        raise CheckpointError(f"{ckpt_dir} is not a {kind} checkpoint (format {state.get('format')!r})")
    if int(state.get("version", 0)) > VERSION:
        raise CheckpointError(f"{ckpt_dir} was written by a newer featstore (checkpoint version {state['version']}): "
                              "upgrade featstore")
    return state


def load(path, which: str = "best", optimizer: bool = False, verify: bool = True) -> Checkpoint:
    """Load a checkpoint: config, model (eval mode, on CPU) and, with `optimizer`, the tensors of
    optimizer.safetensors.  Files whose checksum differs from the one recorded are refused."""
    ckpt_dir = resolve(path, which)
    state = read_state(ckpt_dir)
    config = Config.from_dict(state["config"], where=f"{ckpt_dir}/{STATE_FILE}")
    fsets = state["feature_sets"]
    model = ShareLockModel(fsets["image"]["dim"], fsets["text"]["dim"], config)
    model.load_state_dict(_read(ckpt_dir, MODEL_FILE, state, verify))
    tensors = None
    if optimizer and OPTIMIZER_FILE in state["files"]:
        tensors = _read(ckpt_dir, OPTIMIZER_FILE, state, verify)
    return Checkpoint(ckpt_dir, state, config, model.eval(), tensors)


def _read(ckpt_dir: str, fname: str, state: dict, verify: bool) -> dict[str, torch.Tensor]:
    fpath = os.path.join(ckpt_dir, fname)
    if not os.path.isfile(fpath):
        raise CheckpointError(f"checkpoint {ckpt_dir} is missing {fname}")
    if verify and state["files"].get(fname) != _sha256(fpath):
        raise CheckpointError(f"checkpoint {ckpt_dir}: {fname} does not match its recorded checksum (damaged or replaced)")
    try:
        return load_file(fpath, device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {ckpt_dir}: {fname} cannot be read ({e})") from None


def _sha256(path: str) -> str:
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


def check_identity(recorded: dict, current: dict, ckpt_path: str, store_path: str) -> None:
    """Refuse a feature set whose identity differs from the one a checkpoint was trained on,
    naming both (`recorded`/`current` are {"name", "identity", ...} as in checkpoint.json)."""
    a, b = recorded.get("identity", {}), current.get("identity", {})

    def canon(x):
        return json.dumps(x, sort_keys=True, default=str)

    diff = [f"{k}: {a.get(k, '<absent>')!r} at training vs {b.get(k, '<absent>')!r} in the store"
            for k in sorted(set(a) | set(b)) if canon(a.get(k)) != canon(b.get(k))]
    if diff:
        raise IdentityMismatch(
            f"feature set '{current.get('name')}' in {store_path} is not the '{recorded.get('name')}' that checkpoint "
            f"{ckpt_path} was trained on ({'; '.join(diff)}): use features made by the same backbone"
        )
