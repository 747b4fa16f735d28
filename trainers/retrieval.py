"""Retrieval on stored features, no head (`featstore eval-retrieval`): CLIP_benchmark's protocol.

    result = stored_retrieval("coco.zarr", "clip", ["clip-cap", "clip-cap2"])

For feature sets already in one embedding space: a CLIP image feature set (``image_embeds``) and
caption sets of the same CLIP (``text_embeds``), each caption set one caption per image (several
sets: several captions per image, as the trained-head path takes them).  The rows, the gallery
(images with at least one caption) and the metrics are the head path's
(`trainers/sharelock/evaluate.py`'s retrieval, `trainers/contrastive.caption_retrieval`): `gallery`
below is that selection with the head as a parameter (the shared trainers/ modules may not import
sharelock/, so the head path can call it instead of its own copy), here with the identity in place
of the head: ``image_retrieval_recall@k`` text -> image, ``text_retrieval_recall@k``
image -> text, k = 1, 5, 10.  Rows are read block by block through the Loader.  A feature set
with stored views is scored on view 0.

The sets must name the same model (``model``, ``revision`` and ``weights_hash`` of their
identities), the image set be computed from images and the others from captions, and all have
one width; anything else is refused with one line.
"""

from __future__ import annotations

import numpy as np
import torch

from featstore.core import format as fmt
from featstore.errors import ConfigError, IdentityMismatch
from featstore.loader import Loader
from featstore.store import Store
from featstore.trainers.contrastive import caption_retrieval

SAME_MODEL = ("model", "revision", "weights_hash")


class _Unchanged:
    """The stored features as they are (view 0 of stored views): the head path's model slot."""

    def __init__(self, dim: int):
        self.embed_dim = dim

    @staticmethod
    def encode_image(x: torch.Tensor) -> torch.Tensor:
        return x[:, 0] if x.ndim == 3 else x

    encode_text = encode_image


def check_same_space(store: Store, image: str, texts: list[str]) -> int:
    """The common width of the sets; refused (one line) unless they are one model's two towers."""
    img = store.feature_set(image)
    if img.field != "image":
        raise ConfigError(f"--image '{image}' was computed from captions: give an image feature set")
    want = {k: img.identity.get(k) for k in SAME_MODEL}
    if not want["model"]:
        raise IdentityMismatch(f"feature set '{image}' records no model: its embedding space is unknown")
    dim = int(img.array("pooled").shape[-1])
    for name in texts:
        fs = store.feature_set(name)
        if fs.field != fmt.CAPTION:
            raise ConfigError(f"--text '{name}' was computed from images: give caption feature sets "
                              "(`featstore extract --field caption`)")
        got = {k: fs.identity.get(k) for k in SAME_MODEL}
        if got != want:
            diff = ", ".join(f"{k} {got[k]!r} vs {want[k]!r}" for k in SAME_MODEL if got[k] != want[k])
            raise IdentityMismatch(f"'{name}' and '{image}' are not one model's embedding space ({diff}): stored-feature "
                                   "retrieval needs both towers of one CLIP; train a head for other pairs "
                                   "(`featstore train-head`, then `featstore eval`)")
        if int(fs.array("pooled").shape[-1]) != dim:
            raise IdentityMismatch(f"'{name}' has width {fs.array('pooled').shape[-1]}, '{image}' {dim}: not one space")
    return dim


def stored_retrieval(store_path, image: str, text, *, batch_size: int = 4096) -> dict:
    """{"store", "image", "text_sets", "images", "texts", "captions_per_image", the six
    recall@k, "notes"} over every row usable in the image set and at least one caption set."""
    texts = [t for t in (text.split(",") if isinstance(text, str) else list(text)) if t]
    if not texts:
        raise ConfigError("give at least one caption feature set (--text NAME[,NAME2])")
    store = Store.open(store_path)
    dim = check_same_space(store, image, texts)
    notes: list[str] = []
    rows = np.ones(store.n_rows, bool)
    result = gallery(store, _Unchanged(dim), f"{fmt.FEATURES}/{image}/pooled", texts, rows, torch.device("cpu"),
                     batch_size, notes)
    if result is None:
        raise ConfigError(f"fewer than 2 images of '{image}' have a caption in {', '.join(texts)}: nothing to retrieve")
    return {"store": store.path, "image": image, **result, "notes": notes}


def gallery(store, model, image_path: str, text_names: list[str], rows: np.ndarray, dev, batch_size: int,
            notes: list) -> dict | None:
    """CLIP_benchmark's retrieval of `model`'s embeddings (`encode_image`, `encode_text`,
    `embed_dim`) of the `rows` valid in the image set and in caption sets `text_names`: each image
    (in row order) with its captions, one per caption set where that row is valid; images without
    a caption are left out.  None (with a note) under 2 images."""
    z_image, image_rows = embed(store, image_path, model.encode_image, rows, dev, batch_size, model.embed_dim)
    texts, owners = [], []
    for name in text_names:
        z, text_rows = embed(store, f"{fmt.FEATURES}/{name}/pooled", model.encode_text, rows, dev, batch_size,
                             model.embed_dim)
        keep = np.isin(text_rows, image_rows)
        texts.append(z[torch.from_numpy(keep)])
        owners.append(text_rows[keep])
    order = np.argsort(image_rows, kind="stable")
    image_rows, z_image = image_rows[order], z_image[torch.from_numpy(order)]
    owner_rows = np.concatenate(owners)
    captioned = np.isin(image_rows, owner_rows)
    image_rows, z_image = image_rows[captioned], z_image[torch.from_numpy(captioned)]
    if len(image_rows) < 2:
        notes.append("fewer than 2 images with a caption in the evaluated rows: retrieval skipped")
        return None
    owner = np.searchsorted(image_rows, owner_rows)
    per_image = np.bincount(owner, minlength=len(image_rows))
    out = {"images": int(len(image_rows)), "texts": int(len(owner)), "text_sets": list(text_names),
           "captions_per_image": {"min": int(per_image.min()), "max": int(per_image.max()), "mean": float(per_image.mean())}}
    out.update(caption_retrieval(z_image, torch.cat(texts), owner, ks=(1, 5, 10)))
    return out


@torch.no_grad()
def embed(store: Store, path: str, head, rows: np.ndarray, dev, batch_size: int, dim: int):
    """`head` of the features at `path` of the `rows` valid there, read batch by batch, and those rows."""
    loader = Loader(store, {"x": path}, batch_size, shuffle=False, rows=rows, rank=0, world_size=1)
    out, served = [], []
    for batch in loader:
        out.append(head(batch["x"].to(dev).float()).float().cpu())
        served.append(batch["row"].numpy())
    if not out:
        return torch.zeros(0, dim), np.zeros(0, np.int64)
    return torch.cat(out), np.concatenate(served)


def format_result(r: dict) -> str:
    def recalls(kind):
        return "/".join(f"{100 * r[f'{kind}_retrieval_recall@{k}']:.1f}" for k in (1, 5, 10))

    return (f"retrieval of '{r['image']}' vs {', '.join(r['text_sets'])} on {r['images']:,} images / {r['texts']:,} "
            f"captions: image_retrieval (text->image) R@1/5/10 {recalls('image')}%  text_retrieval (image->text) "
            f"{recalls('text')}%")
