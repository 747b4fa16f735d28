"""Zero-shot prompts: class names × templates → text features, cached in the store.

Prompt features come from the SAME text backbone (same identity) that made the checkpoint's text
feature set, and are kept under `prompts/<text feature set name>/` (a `text` str array and a
`pooled` array in the feature set's dtype, attrs = that identity), keyed by the prompt text: a
later eval encodes only texts it has not seen.  The store is opened r+ only to add missing texts.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from featstore import format as fmt
from featstore.errors import ConfigError
from featstore.store import Store

SHARELOCK_TEMPLATES = ["a photo of a {c}."]

# The 80 ImageNet prompt templates of CLIP (Radford et al., 2021; "Prompt_Engineering_for_ImageNet").
OPENAI_IMAGENET_TEMPLATES = [
    'a bad photo of a {c}.',
    'a photo of many {c}.',
    'a sculpture of a {c}.',
    'a photo of the hard to see {c}.',
    'a low resolution photo of the {c}.',
    'a rendering of a {c}.',
    'graffiti of a {c}.',
    'a bad photo of the {c}.',
    'a cropped photo of the {c}.',
    'a tattoo of a {c}.',
    'the embroidered {c}.',
    'a photo of a hard to see {c}.',
    'a bright photo of a {c}.',
    'a photo of a clean {c}.',
    'a photo of a dirty {c}.',
    'a dark photo of the {c}.',
    'a drawing of a {c}.',
    'a photo of my {c}.',
    'the plastic {c}.',
    'a photo of the cool {c}.',
    'a close-up photo of a {c}.',
    'a black and white photo of the {c}.',
    'a painting of the {c}.',
    'a painting of a {c}.',
    'a pixelated photo of the {c}.',
    'a sculpture of the {c}.',
    'a bright photo of the {c}.',
    'a cropped photo of a {c}.',
    'a plastic {c}.',
    'a photo of the dirty {c}.',
    'a jpeg corrupted photo of a {c}.',
    'a blurry photo of the {c}.',
    'a photo of the {c}.',
    'a good photo of the {c}.',
    'a rendering of the {c}.',
    'a {c} in a video game.',
    'a photo of one {c}.',
    'a doodle of a {c}.',
    'a close-up photo of the {c}.',
    'a photo of a {c}.',
    'the origami {c}.',
    'the {c} in a video game.',
    'a sketch of a {c}.',
    'a doodle of the {c}.',
    'a origami {c}.',
    'a low resolution photo of a {c}.',
    'the toy {c}.',
    'a rendition of the {c}.',
    'a photo of the clean {c}.',
    'a photo of a large {c}.',
    'a rendition of a {c}.',
    'a photo of a nice {c}.',
    'a photo of a weird {c}.',
    'a blurry photo of a {c}.',
    'a cartoon {c}.',
    'art of a {c}.',
    'a sketch of the {c}.',
    'a embroidered {c}.',
    'a pixelated photo of a {c}.',
    'itap of the {c}.',
    'a jpeg corrupted photo of the {c}.',
    'a good photo of a {c}.',
    'a plushie {c}.',
    'a photo of the nice {c}.',
    'a photo of the small {c}.',
    'a photo of the weird {c}.',
    'the cartoon {c}.',
    'art of the {c}.',
    'a drawing of the {c}.',
    'a photo of the large {c}.',
    'a black and white photo of a {c}.',
    'the plushie {c}.',
    'a dark photo of a {c}.',
    'itap of a {c}.',
    'graffiti of the {c}.',
    'a toy {c}.',
    'itap of my {c}.',
    'a photo of a cool {c}.',
    'a photo of a small {c}.',
    'a tattoo of the {c}.',
]


def load_templates(templates) -> list[str]:
    """"sharelock", "openai", a file (one template per line, `{c}` or `{}` for the class) or a list."""
    if isinstance(templates, (list, tuple)):
        out = [str(t) for t in templates]
    elif templates == "sharelock":
        out = list(SHARELOCK_TEMPLATES)
    elif templates == "openai":
        out = list(OPENAI_IMAGENET_TEMPLATES)
    elif isinstance(templates, (str, os.PathLike)) and os.path.isfile(templates):
        with open(templates) as f:
            out = [line.rstrip("\n") for line in f if line.strip()]
    else:
        raise ConfigError(f"templates must be sharelock, openai or a file of templates, got {templates!r} (no such file)")
    bad = [t for t in out if "{c}" not in t and "{}" not in t]
    if not out or bad:
        raise ConfigError(f"every template needs {{c}} where the class name goes: {bad[0] if bad else '(none given)'}")
    return out


def fill(template: str, name: str) -> str:
    return template.replace("{c}", name).replace("{}", name)


def class_prompts(class_names, templates) -> list[list[str]]:
    """For each class, its prompts (one per template)."""
    return [[fill(t, c) for t in templates] for c in class_names]


def read_class_names(store: Store, classes_file=None, label_field: str = fmt.LABEL) -> list[str]:
    if classes_file is not None:
        try:
            with open(classes_file) as f:
                names = [line.strip() for line in f if line.strip()]
        except FileNotFoundError:
            raise ConfigError(f"classes file {classes_file} does not exist") from None
    else:
        names = list(store.array(f"{fmt.SAMPLES}/{label_field}").attrs.get("names") or [])
    if not names:
        raise ConfigError(f"no class names for samples/{label_field} in {store.path}: pass --classes FILE (one name per line)")
    return names


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
