"""Zero-shot prompts: class names × templates → text features, cached in the store.

The built-in class lists and templates are CLIP_benchmark's (shipped as data files in
`trainers/data/`): ``classnames("imagenet1k")``, ``templates("imagenet1k")`` (the 80 OpenAI
templates), ``classnames("cifar10")``, ``templates("cifar10")``, ...

Prompt features come from the SAME text backbone (same identity) that made the checkpoint's text
feature set, and are kept under `prompts/<text feature set name>/` (a `text` str array and a
`pooled` array in the feature set's dtype, attrs = that identity), keyed by the prompt text: a
later eval encodes only texts it has not seen.  The store is opened r+ only to add missing texts.
A store this process cannot write (permissions, a read-only mount, format 1) keeps its prompts in
the user's cache instead: `$XDG_CACHE_HOME/featstore/prompts/<hash of the identity>.zarr` (default
`~/.cache/...`), the same layout, shared by every store whose text features have that identity
(prompt features depend only on the backbone and the text).  `cached(store, text_set)` reads both.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import numpy as np
import torch
import zarr

from featstore.core import format as fmt
from featstore.errors import ConfigError, FormatTooOld, ReadOnlyStore
from featstore.core.identity import canonical
from featstore.store import Store

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@functools.lru_cache(maxsize=None)
def _lists(fname: str) -> dict[str, tuple[str, ...]]:
    with open(os.path.join(_DATA, fname), encoding="utf-8") as f:
        return {k: tuple(v) for k, v in json.load(f)["lists"].items()}


def template_sets() -> list[str]:
    """Names `templates(name)` knows (plus "openai", the 80 ImageNet templates)."""
    return sorted([*_lists("templates.json"), "openai"])


def class_lists() -> list[str]:
    """Names `classnames(name)` knows: imagenet1k, cifar10, cifar100."""
    return sorted(_lists("classnames.json"))


def templates(name: str) -> list[str]:
    """A built-in template list ({c} = the class name), as CLIP_benchmark uses them:
    "imagenet1k" (= "openai": OpenAI's 80 ImageNet templates, CLIP_benchmark's fallback for any
    dataset), "cifar10"/"cifar100" (CLIP's 18 CIFAR templates), "sharelock" (the one template of
    ShareLock's official extraction, "A photo of a {c}"), "simple" ("a photo of a {c}.")."""
    lists = _lists("templates.json")
    key = "imagenet1k" if name == "openai" else name
    if key not in lists:
        raise ConfigError(f"unknown template set {name!r}; built-in: {', '.join(template_sets())}, or a file")
    return list(lists[key])


def classnames(name: str) -> list[str]:
    """A built-in class list in label order, as CLIP_benchmark evaluates the dataset: "imagenet1k"
    (OpenAI's curated 1000 names), "cifar10", "cifar100" (the datasets' label names)."""
    lists = _lists("classnames.json")
    if name not in lists:
        raise ConfigError(f"unknown class list {name!r}; built-in: {', '.join(class_lists())}, or a file (one name per line)")
    return list(lists[name])


SHARELOCK_TEMPLATES = templates("sharelock")
OPENAI_IMAGENET_TEMPLATES = templates("imagenet1k")  # the 80 templates of CLIP's Prompt_Engineering_for_ImageNet


def load_templates(templates_) -> list[str]:
    """A built-in set name (see `templates`), a file (one template per line, `{c}` or `{}` for the
    class) or a list."""
    if isinstance(templates_, (list, tuple)):
        out = [str(t) for t in templates_]
    elif isinstance(templates_, str) and templates_ in template_sets():
        out = templates(templates_)
    elif isinstance(templates_, (str, os.PathLike)) and os.path.isfile(templates_):
        with open(templates_) as f:
            out = [line.rstrip("\n") for line in f if line.strip()]
    else:
        raise ConfigError(f"templates must be one of {', '.join(template_sets())} or a file of templates, "
                          f"got {templates_!r} (no such file)")
    bad = [t for t in out if "{c}" not in t and "{}" not in t]
    if not out or bad:
        raise ConfigError(f"every template needs {{c}} where the class name goes: {bad[0] if bad else '(none given)'}")
    return out


def fill(template: str, name: str) -> str:
    return template.replace("{c}", name).replace("{}", name)


def class_prompts(class_names, templates) -> list[list[str]]:
    """For each class, its prompts (one per template)."""
    return [[fill(t, c) for t in templates] for c in class_names]


def read_class_names(store: Store, classes=None, label_field: str = fmt.LABEL) -> list[str]:
    """Class names in label order: a built-in list (`classnames`), a file (one name per line), or
    (None) the names the store keeps in `samples/<label_field>` attrs."""
    if classes is not None and str(classes) in class_lists():
        return classnames(str(classes))
    if classes is not None:
        try:
            with open(classes) as f:
                names = [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            raise ConfigError(f"classes {classes} is neither a built-in list ({', '.join(class_lists())}) "
                              "nor an existing file") from None
    else:
        names = list(store.array(f"{fmt.SAMPLES}/{label_field}").attrs.get("names") or [])
    if not names:
        raise ConfigError(f"no class names for samples/{label_field} in {store.path}: pass --classes "
                          f"{'|'.join(class_lists())} or FILE (one name per line)")
    return names


def label_field_of(store: Store, label_field: str | None, classes=None) -> str:
    """The sample field zero-shot scores against: `label_field` when given (it must exist), else
    `label` (which may be absent: the caller then skips zero-shot with a note, unless `classes`
    were given, which need labels)."""
    if label_field is None and classes is None:
        return fmt.LABEL
    field = label_field or fmt.LABEL
    if field not in store.sample_fields():
        have = [f for f in store.sample_fields() if f not in (fmt.UID, fmt.SOURCE, fmt.SOURCE_REF, fmt.CAPTION)]
        flag = f"--label-field {field}" if label_field else f"--classes {classes}"
        raise ConfigError(f"{flag}: the store has no samples/{field} to score zero-shot against (its label fields: "
                          f"{', '.join(have) or 'none'})")
    return field


def builtin_match(names: list[str]) -> str | None:
    """The built-in class list `names` equals, if any (a CIFAR store made from its dataset)."""
    return next((n for n in class_lists() if classnames(n) == list(names)), None)


def prompt_features(store_path, text_set: dict, texts: list[str], device="cpu", batch_size: int = 256,
                    encoder=None, notes: list | None = None) -> torch.Tensor:
    """Features (len(texts), D) float32 of `texts` under the text backbone `text_set`
    ({"name", "identity", "dtype"} as a checkpoint records it), from the caches where present;
    the rest are encoded and cached (in the store, or the user cache when the store cannot be
    written: `notes` says where).  `encoder`: a backbone to use instead of the recorded one (tests)."""
    store = Store.open(store_path)
    known = cached(store, text_set)
    missing = sorted({t for t in texts if t not in known})
    if missing:
        if encoder is None:
            from featstore.trainers.backbone_link import backbone_for

            encoder = backbone_for(text_set, device=device)
        dtype = np.dtype(text_set.get("dtype") or "float16")
        new = np.concatenate([encoder.encode_texts(missing[i : i + batch_size])["pooled"].float().cpu().numpy()
                              for i in range(0, len(missing), batch_size)]).astype(dtype)
        where = _keep(store_path, text_set, missing, new)
        if notes is not None and where != "store":
            notes.append(f"{store.path} cannot be written here: the {len(missing)} new prompt features were "
                         + (f"cached in {where}" if where else "not cached (no writable cache either: set XDG_CACHE_HOME)"))
        known.update(zip(missing, new))
    return torch.from_numpy(np.stack([np.asarray(known[t], dtype=np.float32) for t in texts]))


def cached(store: Store, text_set: dict) -> dict[str, np.ndarray]:
    """Every cached prompt feature of `text_set` ({"name", "identity", ...}): text -> features,
    from the store's `prompts/<name>/` (when made with the same identity) and the user cache."""
    out = {}
    try:
        group = store.root[f"{fmt.PROMPTS}/{text_set['name']}"]
    except KeyError:
        group = None
    if group is not None:
        out.update(_read(group, text_set["identity"]))
    path = user_cache_path(text_set["identity"])
    if os.path.isdir(path):
        try:
            out.update(_read(zarr.open_group(path, mode="r"), text_set["identity"]))
        except Exception:  # noqa: BLE001 - a damaged user cache is only a cache: recomputed
            pass
    return out


def user_cache_path(identity: dict) -> str:
    """Where prompts of a text backbone of `identity` are cached for stores that cannot be written."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(canonical(identity).encode()).hexdigest()[:16]
    return os.path.join(base, "featstore", "prompts", f"{digest}.zarr")


def _keep(store_path, text_set: dict, texts: list[str], pooled: np.ndarray) -> str | None:
    """Append to the store's cache; where the store cannot be written, to the user cache.
    Returns "store", the user cache's path, or None (nowhere)."""
    try:
        store = Store.open(store_path, mode="r+")
        prompts = store.root.require_group(fmt.PROMPTS)
        name = text_set["name"]
        group = prompts[name] if name in prompts else None
        if group is not None and canonical(group.attrs.get("identity")) != canonical(text_set["identity"]):
            del prompts[name]  # made by another backbone under this name: replaced
            group = None
        _append(group if group is not None else _create(prompts, name, text_set["identity"], pooled), texts, pooled)
        return "store"
    except (ReadOnlyStore, FormatTooOld, PermissionError, OSError):
        pass
    path = user_cache_path(text_set["identity"])
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.isdir(path):
            group = zarr.open_group(path, mode="r+")
        else:
            group = _create(zarr.open_group(os.path.dirname(path), mode="a"), os.path.basename(path),
                            text_set["identity"], pooled)
        _append(group, texts, pooled)
        return path
    except OSError:
        return None


def _read(group, identity: dict) -> dict[str, np.ndarray]:
    if canonical(group.attrs.get("identity")) != canonical(identity):
        return {}  # made by another backbone under this name
    n = int(group.attrs.get("n", 0))
    texts, pooled = np.asarray(group["text"][:n], dtype=object), np.asarray(group["pooled"][:n])
    return {str(t): p for t, p in zip(texts, pooled)}


def _create(parent, name: str, identity: dict, pooled: np.ndarray):
    group = parent.create_group(name, attributes={"identity": identity, "n": 0})
    group.create_array("text", shape=(0,), dtype=str, chunks=(4096,), fill_value="",
                       dimension_names=fmt.DIMS["prompts_text"])
    group.create_array("pooled", shape=(0, pooled.shape[1]), dtype=pooled.dtype, chunks=(1024, pooled.shape[1]),
                       compressors=None, fill_value=0, dimension_names=fmt.DIMS["prompts_pooled"])
    return group


def _append(group, texts: list[str], pooled: np.ndarray) -> None:
    n = int(group.attrs.get("n", 0))
    stop = n + len(texts)
    group["text"].resize((stop,))
    group["pooled"].resize((stop, pooled.shape[1]))
    group["text"][n:stop] = np.asarray(texts, dtype=object).astype(str)
    group["pooled"][n:stop] = pooled
    group.attrs["n"] = stop  # the commit point: rows past n are ignored by readers
