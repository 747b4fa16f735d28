"""`featstore import-sharelock`: an official ShareLock checkpoint (PyTorch Lightning ``.ckpt``,
e.g. ``ShareLock-CC3M.ckpt``) -> a featstore checkpoint that `ShareLock.load` and `featstore eval` use.

    import_sharelock("ShareLock-CC12M.ckpt", "sharelock-cc12m/", store="imagenet.zarr", image="dinov2", text="llama3-8b")

**Loading without unpickling anything else.**  A Lightning checkpoint is a pickle whose
``hyper_parameters`` is an OmegaConf ``DictConfig``, so ``torch.load(weights_only=True)`` refuses
it.  Here it is loaded with ``weights_only=True`` and an explicit allow-list of the names such a
file holds, each bound to an inert stand-in defined below, never to the real class (omegaconf need
not be installed and none of its code runs):

* the OmegaConf containers and value nodes (``omegaconf.dictconfig.DictConfig``, ``...ListConfig``,
  ``omegaconf.nodes.AnyNode`` and the typed nodes, ``omegaconf.base.Metadata``/``ContainerMetadata``)
  -> empty classes: the unpickler creates them with ``object.__new__`` and fills their ``__dict__``
  with the pickled state (plain data); they have no methods, and calling one with arguments fails;
* the type names the metadata mentions (``typing.Any``, ``builtins.dict``, ``builtins.int``, ...) ->
  inert, non-callable markers;
* ``collections.defaultdict`` (OmegaConf's resolver cache) -> a function that returns an empty
  plain dict and accepts no other argument than the ``dict`` marker.

Everything else (tensors, ``OrderedDict``, plain containers and scalars) is what ``weights_only``
allows anyway; any other global in the file is refused with one line, and nothing is loaded.
The containers are then read back into plain dicts (`plain`), never resolved or executed.

**Mapping.**  The official model's trainable weights are ``language_projector.projection.*`` (an
``nn.Sequential`` of [Linear, BatchNorm1d, ReLU, Dropout(0.2)] blocks and a final Linear, exactly
featstore's language head, ``text_head.*``) and, when the vision projector has layers,
``vision_projector.projection.*`` (-> ``image_head.*``).  Widths and depths come from the weight
shapes; the official logit scale exp(2.6592) and its training protocol go into the config.
With ``store``, ``image`` must name a feature set of it and ``text`` a feature set or a text
backbone (alias or path, loaded once to record its identity: an ImageNet store has no captions),
so that eval checks the image features and encodes prompts with the recorded backbone.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections import OrderedDict

import torch

from featstore.errors import CheckpointError, ConfigError, FeatstoreError
from featstore.store import Store

from featstore.trainers import checkpoint
from featstore.trainers.sharelock.config import Config
from featstore.trainers.loop import count_parameters
from featstore.trainers.sharelock.model import FORMAT, VERSION, ShareLockModel

LOGIT_SCALE = math.exp(2.6592)  # sharelock/utils/misc.py: logit_scale = torch.tensor(2.6592).exp()
VISION, LANGUAGE = "vision_projector.projection.", "language_projector.projection."
FROZEN_ENCODERS = ("vision_encoder.", "language_encoder.")  # present only if a run saved its backbones


# ---- the allow-list -----------------------------------------------------------------------------
class _StandIn:
    """Base of the inert stand-ins: state lands in __dict__, nothing runs."""

    __qualified__ = ""

    def __repr__(self) -> str:
        return f"<{self.__qualified__} stand-in>"


def _stand_in(qualified: str) -> type:
    return type(qualified.rsplit(".", 1)[1], (_StandIn,), {"__qualified__": qualified, "__module__": __name__})


OMEGACONF_CONTAINERS = {q: _stand_in(q) for q in ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig")}
OMEGACONF_NODES = {q: _stand_in(q) for q in (
    "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode", "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode", "omegaconf.nodes.BytesNode")}
OMEGACONF_METADATA = {q: _stand_in(q) for q in ("omegaconf.base.Metadata", "omegaconf.base.ContainerMetadata")}


class _TypeName:
    """A type the metadata names (ref_type, object_type, key_type): a label, not callable."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


TYPE_NAMES = {q: _TypeName(q) for q in (
    "typing.Any", "typing.Dict", "typing.List", "builtins.dict", "builtins.list", "builtins.tuple", "builtins.int",
    "builtins.float", "builtins.str", "builtins.bool", "builtins.bytes", "builtins.object")}


def _empty_dict(*args):
    """Stands in for `collections.defaultdict` (OmegaConf's resolver cache, `defaultdict(dict)`)."""
    if args not in ((), (TYPE_NAMES["builtins.dict"],)):
        raise pickle.UnpicklingError("collections.defaultdict is allowed only as defaultdict(dict)")
    return {}


def allow_list() -> list[tuple[object, str]]:
    """(stand-in, qualified name) pairs for `torch.serialization.safe_globals`."""
    named = {**OMEGACONF_CONTAINERS, **OMEGACONF_NODES, **OMEGACONF_METADATA, **TYPE_NAMES,
             "collections.defaultdict": _empty_dict}
    return [(obj, name) for name, obj in named.items()]


def load_lightning_checkpoint(path) -> dict:
    """`torch.load(path, weights_only=True)` with only `allow_list()` added (see the module doc)."""
    try:
        with torch.serialization.safe_globals(allow_list()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except (pickle.UnpicklingError, TypeError, AttributeError, RuntimeError, ValueError, EOFError) as e:
        what = re.search(r"GLOBAL ([\w.]+)", str(e))
        detail = (f"it holds {what.group(1)}, which is not on the allow-list of what a ShareLock checkpoint holds"
                  if what else (str(e).strip().splitlines() or [type(e).__name__])[0][:200])
        raise CheckpointError(f"{path} cannot be loaded as a ShareLock checkpoint ({detail}); nothing was loaded") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return ckpt


def plain(obj, depth: int = 0):
    """OmegaConf stand-ins (and containers of them) as plain dicts, lists and scalars."""
    if depth > 100:
        raise CheckpointError("the checkpoint's hyper-parameters nest more than 100 levels deep")
    if isinstance(obj, tuple(OMEGACONF_CONTAINERS.values())):
        content = vars(obj).get("_content")
        if content is None or isinstance(content, str):  # None, "???" (missing) or an interpolation, kept as text
            return content
        if isinstance(content, dict):
            return {str(k): plain(v, depth + 1) for k, v in content.items()}
        return [plain(v, depth + 1) for v in content]
    if isinstance(obj, tuple(OMEGACONF_NODES.values())):
        return plain(vars(obj).get("_val"), depth + 1)
    if isinstance(obj, dict):
        return {str(k): plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, depth + 1) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"unexpected {type(obj).__name__} in the checkpoint's hyper-parameters")


# ---- the mapping --------------------------------------------------------------------------------
def head_of(state_dict: dict, prefix: str, where: str) -> tuple[dict, dict] | None:
    """({our index: tensors}, shape) of one projector, checking it is ShareLock's MLP layout:
    Linear at 4j, BatchNorm1d at 4j+1 (j < layers-1), ReLU and Dropout between (no weights)."""
    own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not own:
        return None
    linear = sorted(int(k.split(".")[0]) for k, v in own.items() if k.endswith(".weight") and v.ndim == 2)
    layers = len(linear)
    expected = {f"{4 * j}.{p}" for j in range(layers) for p in ("weight", "bias")}
    expected |= {f"{4 * j + 1}.{p}" for j in range(layers - 1)
                 for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    if linear != [4 * j for j in range(layers)] or set(own) != expected:
        odd = sorted(set(own) ^ expected)[:4]
        raise CheckpointError(f"{where}: {prefix}* is not ShareLock's projector layout "
                              f"(Linear/BatchNorm1d/ReLU/Dropout blocks); unexpected or missing: {', '.join(odd)}")
    w = [own[f"{4 * j}.weight"] for j in range(layers)]
    for a, b in zip(w, w[1:]):
        if a.shape[0] != b.shape[1]:
            raise CheckpointError(f"{where}: {prefix}* layer widths do not chain ({tuple(a.shape)} then {tuple(b.shape)})")
    shape = {"in": int(w[0].shape[1]), "hidden": int(w[0].shape[0]), "out": int(w[-1].shape[0]), "layers": layers}
    return own, shape


def _config(hp: dict, text: dict, vision: dict | None) -> Config:
    """Our config: the architecture from the weights, ShareLock's training protocol from its
    hyper-parameters (defaults: the official values, as configs/sharelock.yaml)."""
    training, data, logging = (hp.get(k) or {} for k in ("training", "data", "logging"))

    def pick(d: dict, key: str, default):
        value = d.get(key, default)
        return default if value is None or isinstance(value, (dict, list)) else value

    values = dict(
        num_layers=text["layers"], hidden_dim=text["hidden"] if text["layers"] > 1 else 4096, dropout=0.2,
        vision_head="mlp" if vision else "identity", embed_dim=text["out"] if vision else None,
        logit_scale=LOGIT_SCALE, learnable_logit_scale=False,
        steps=int(pick(training, "max_steps", 5000)), batch_size=int(pick(training, "batch_size", 1024)),
        accumulation_steps=int(pick(training, "accumulate_grad_batches", 16)),
        lr=float(pick(training, "learning_rate", 1e-3)), weight_decay=float(pick(training, "weight_decay", 1e-4)),
        warmup_steps=int(pick(training, "lr_warmup_steps", 150)), warmup_from_zero=True, max_warmup_fraction=1.0,
        grad_clip=float(pick(training, "max_grad_norm", 1.0)), seed=int(pick(hp, "seed", 0)),
        val_rows=int(pick(data, "val_split_num", 50000)), val_split="official", val_seed=int(pick(hp, "seed", 42)),
        val_every_batches=int(pick(logging, "val_check_interval", 500)),
        patience=int(pick(training, "early_stopping_patience", 50)) if pick(training, "early_stopping", True) else None,
        min_delta=0.1,
    )
    if vision:
        values.update(vision_num_layers=vision["layers"], vision_hidden_dim=vision["hidden"] if vision["layers"] > 1 else 4096)
    try:
        return Config.from_dict(values, where="the checkpoint's hyper-parameters")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def _feature_set(store: Store | None, name: str | None, role: str, dim: int) -> dict:
    """What the checkpoint records of the features a head reads (name, identity, width, dtype)."""
    if store is None:
        return {"name": None, "identity": None, "dim": dim, "dtype": "float32"}
    if name in store.feature_set_names():
        described = checkpoint.describe(store, name)
    elif role == "text":  # no captions in the store (ImageNet): the text backbone itself
        from featstore.pipelines.backbones import load_backbone

        bb = load_backbone(name, modality="text")
        described = {"name": bb.name, "identity": dict(bb.identity, field="caption", precision=bb.precision),
                     "dim": bb.dim, "dtype": "float32"}
    else:
        raise ConfigError(f"--image {name}: the store {store.path} has no such feature set "
                          f"(it has: {', '.join(store.feature_set_names()) or 'none'}); extract it with --backbone dinov2")
    if described["dim"] != dim:
        raise ConfigError(f"--{role} {name} gives {described['dim']}-d features but the checkpoint's {role} head takes {dim}-d")
    return described


def import_sharelock(ckpt_path, out_dir, *, store=None, image: str | None = None, text: str | None = None) -> dict:
    """Convert `ckpt_path` into a featstore checkpoint directory `out_dir`; returns a summary."""
    if store is not None and not (image and text):
        raise ConfigError("with --store, name the feature sets the heads read: --image NAME --text NAME")
    if store is None and (image or text):
        raise ConfigError("--image/--text name feature sets of a store: pass --store S too")
    ckpt_path, out_dir = os.path.abspath(str(ckpt_path)), os.path.abspath(str(out_dir))
    sha = _sha256(ckpt_path)
    _check_out_dir(out_dir, sha)
    ckpt = load_lightning_checkpoint(ckpt_path)
    hp = plain(ckpt.get("hyper_parameters") or {})
    if not isinstance(hp, dict):
        raise CheckpointError(f"{ckpt_path}: hyper_parameters is a {type(hp).__name__}, not a mapping")

    state_dict = ckpt["state_dict"]
    unknown = sorted(k for k in state_dict if not k.startswith((VISION, LANGUAGE, *FROZEN_ENCODERS)))
    if unknown:
        raise CheckpointError(f"{ckpt_path} holds weights ShareLock's model does not have ({', '.join(unknown[:3])}): "
                              "is it a ShareLock checkpoint?")
    language = head_of(state_dict, LANGUAGE, ckpt_path)
    if language is None:
        raise CheckpointError(f"{ckpt_path} has no {LANGUAGE}* weights: is it a ShareLock checkpoint?")
    vision = head_of(state_dict, VISION, ckpt_path)
    text_shape, vision_shape = language[1], vision[1] if vision else None
    _check_against_hyper_parameters(hp, text_shape, vision_shape, ckpt_path)
    cfg = _config(hp, text_shape, vision_shape)
    image_dim = vision_shape["in"] if vision else text_shape["out"]

    opened = Store.open(store) if store is not None else None
    feature_sets = {"image": _feature_set(opened, image, "image", image_dim),
                    "text": _feature_set(opened, text, "text", text_shape["in"])}
    feature_sets["texts"] = [feature_sets["text"]]
    model = ShareLockModel(image_dim, text_shape["in"], cfg)
    weights = {f"text_head.{k}": v for k, v in language[0].items()}
    if vision:
        weights.update({f"image_head.{k}": v for k, v in vision[0].items()})
    missing, unexpected = model.load_state_dict(OrderedDict(weights), strict=False)
    if unexpected or set(missing) != {"log_logit_scale"}:
        raise CheckpointError(f"{ckpt_path}: its weights do not fit featstore's head (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")

    model_hp = hp.get("model") or {}
    state = {
        "format": FORMAT, "version": VERSION, "step": int(ckpt.get("global_step") or 0), "steps": cfg.steps, "config": cfg.to_dict(),
        "feature_sets": feature_sets, "store": opened.path if opened else None, "heldout": None,
        "best": {"val_loss": _best_score(ckpt), "step": int(ckpt.get("global_step") or 0)},
        "imported_from": {
            "path": ckpt_path, "sha256": sha, "format": "pytorch-lightning checkpoint (ShareLock)",
            "lightning_version": ckpt.get("pytorch-lightning_version"), "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"), "hyper_parameters": hp,
            "backbones": {"vision": model_hp.get("vision_encoder"), "language": model_hp.get("language_encoder")},
        },
    }
    checkpoint.save(out_dir, model, state)
    return {"out_dir": out_dir, "step": state["step"], "params": count_parameters(model, trainable_only=False),
            "image": feature_sets["image"], "text": feature_sets["text"], "config": cfg.to_dict(),
            "backbones": state["imported_from"]["backbones"]}


def _check_against_hyper_parameters(hp: dict, text: dict, vision: dict | None, where: str) -> None:
    """The depths the weights have must be the ones the run's config says (when it says)."""
    model = hp.get("model") or {}
    for name, shape in (("language_projector", text), ("vision_projector", vision)):
        said = (model.get(name) or {}).get("num_layers")
        has = shape["layers"] if shape else 0
        if isinstance(said, int) and said != has and not (said < 1 and has == 0):
            raise CheckpointError(f"{where}: its config says model.{name}.num_layers={said} but its weights have {has} "
                                  "Linear layers: the file is inconsistent")


def _best_score(ckpt: dict):
    for key, value in (ckpt.get("callbacks") or {}).items():
        if str(key).startswith("ModelCheckpoint") and isinstance(value, dict):
            score = value.get("best_model_score")
            if isinstance(score, torch.Tensor) and score.numel() == 1:
                return float(score)
    return None


def _check_out_dir(out_dir: str, sha: str) -> None:
    """`out_dir` must be new, empty, or this same import done before (a re-run replaces it)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir} is a file: pick a new --out directory")
    if not os.path.exists(out_dir) or not os.listdir(out_dir):
        return
    try:
        previous = checkpoint.read_state(out_dir, format=FORMAT, version=VERSION)
    except FeatstoreError:
        previous = {}
    if (previous.get("imported_from") or {}).get("sha256") != sha:
        raise CheckpointError(f"{out_dir} already exists and is not an import of this checkpoint: pick a new --out")


def _sha256(path: str) -> str:
    try:
        return checkpoint.sha256(path)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory: pass the .ckpt file") from None
