"""Zero-shot prompts: class names × templates → text features, cached in the store.

The built-in class lists and templates are CLIP_benchmark's (shipped as data files in
`trainers/data/`): ``classnames("imagenet1k")``, ``templates("imagenet1k")`` (the 80 OpenAI
templates), ``classnames("cifar10")``, ``templates("cifar10")``, ...

Prompt features come from the SAME text backbone (same identity) that made the checkpoint's text
feature set, and are kept under `prompts/<text feature set name>/` (a `text` str array and a
`pooled` array in the feature set's dtype, attrs = that identity), keyed by the prompt text: a
later eval encodes only texts it has not seen.  The store is opened r+ only to add missing texts.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import torch

from featstore import format as fmt
from featstore.errors import ConfigError
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


def builtin_match(names: list[str]) -> str | None:
    """The built-in class list `names` equals, if any (a CIFAR store made from its dataset)."""
    return next((n for n in class_lists() if classnames(n) == list(names)), None)


def prompt_features(store_path, text_set: dict, texts: list[str], device="cpu", batch_size: int = 256,
                    encoder=None) -> torch.Tensor:
    """Features (len(texts), D) float32 of `texts` under the text backbone `text_set`
    ({"name", "identity", "dtype"} as a checkpoint records it), from the store's cache where present.
    `encoder`: a backbone to use instead of loading the recorded one (tests)."""
    name, identity = text_set["name"], text_set["identity"]
    store = Store.open(store_path)
    cached = _read_cache(store, name, identity)
    missing = sorted({t for t in texts if t not in cached})
    if missing:
        if encoder is None:
            from .backbone_link import backbone_for

            encoder = backbone_for(text_set, device=device)
        dtype = np.dtype(text_set.get("dtype") or "float16")
        new = np.concatenate([encoder.encode_texts(missing[i : i + batch_size])["pooled"].float().cpu().numpy()
                              for i in range(0, len(missing), batch_size)]).astype(dtype)
        _append_cache(Store.open(store_path, mode="r+"), name, identity, missing, new)
        cached.update(zip(missing, new))
    return torch.from_numpy(np.stack([np.asarray(cached[t], dtype=np.float32) for t in texts]))


def _cache_path(name: str) -> str:
    return f"{fmt.PROMPTS}/{name}"


def _read_cache(store: Store, name: str, identity: dict) -> dict[str, np.ndarray]:
    try:
        group = store.root[_cache_path(name)]
    except KeyError:
        return {}
    if _canon(group.attrs.get("identity")) != _canon(identity):
        return {}  # made by another backbone under this name: recomputed (and replaced) below
    n = int(group.attrs.get("n", 0))
    texts, pooled = np.asarray(group["text"][:n]), np.asarray(group["pooled"][:n])
    return {str(t): p for t, p in zip(texts, pooled)}


def _append_cache(store: Store, name: str, identity: dict, texts: list[str], pooled: np.ndarray) -> None:
    prompts = store.root.require_group(fmt.PROMPTS)
    group = prompts[name] if name in prompts else None
    if group is not None and _canon(group.attrs.get("identity")) != _canon(identity):
        del prompts[name]
        group = None
    if group is None:
        group = prompts.create_group(name, attributes={"identity": identity, "n": 0})
        group.create_array("text", shape=(0,), dtype=str, chunks=(4096,), fill_value="")
        group.create_array("pooled", shape=(0, pooled.shape[1]), dtype=pooled.dtype, chunks=(1024, pooled.shape[1]),
                           compressors=None, fill_value=0)
    n = int(group.attrs.get("n", 0))
    stop = n + len(texts)
    group["text"].resize((stop,))
    group["pooled"].resize((stop, pooled.shape[1]))
    group["text"][n:stop] = np.asarray(texts, dtype=object).astype(str)
    group["pooled"][n:stop] = pooled
    group.attrs["n"] = stop  # the commit point: rows past n are ignored by readers


def _canon(x):
    import json

    return json.dumps(x, sort_keys=True, default=str)
