"""A real store of synthetic, alignable features for the ShareLock trainer tests.

Each sample has a latent z = (its class's centre) + noise.  The image features are one noisy
nonlinear view of z, the caption features another (different maps, different widths), so a head
can only match them by learning the shared latent.  `FakeTextBackbone` encodes a class prompt
("... {class name} ...") as the caption view of that class's centre, for zero-shot tests.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from featstore.store import Store
from featstore.core.writes import write_block

LATENT, IMAGE_DIM, TEXT_DIM, N_CLASSES = 12, 48, 80, 10
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_IDENTITY = {"model": "synthetic-image", "dim": IMAGE_DIM, "version": 1}
TEXT_IDENTITY = {"model": "synthetic-text", "dim": TEXT_DIM, "version": 1}


def _maps(seed: int = 123):
    rng = np.random.default_rng(seed)
    return {
        "centres": rng.standard_normal((N_CLASSES, LATENT)) * 1.2,
        "a1": rng.standard_normal((LATENT, 64)) / np.sqrt(LATENT), "a2": rng.standard_normal((64, IMAGE_DIM)) / 8,
        "b1": rng.standard_normal((LATENT, 96)) / np.sqrt(LATENT), "b2": rng.standard_normal((96, TEXT_DIM)) / np.sqrt(96),
    }


M = _maps()


def image_view(z, rng):
    return np.tanh(z @ M["a1"]) @ M["a2"] + 0.05 * rng.standard_normal((len(z), IMAGE_DIM))


def text_view(z, rng=None):
    x = np.maximum(z @ M["b1"], 0) @ M["b2"]
    return x if rng is None else x + 0.05 * rng.standard_normal((len(z), TEXT_DIM))


def make_aligned_store(path, n: int = 2000, rows_per_shard: int = 128, seed: int = 0, image_identity=None,
                       text_identity=None, image_name: str = "img", text_name: str = "txt",
                       more_captions: tuple[str, ...] = (), copies=()) -> Store:
    """`more_captions` names further text feature sets: other noisy caption views of the same rows
    by the same text backbone (identity field "caption2", "caption3", ...), like several caption files.
    `copies`: (row, of_row) pairs whose features are the same as another row's (planted duplicates)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, n)
    z = M["centres"][labels] + 0.7 * rng.standard_normal((n, LATENT))
    img, txt = image_view(z, rng).astype(np.float32), text_view(z, rng).astype(np.float32)
    for row, of in copies:
        img[row], txt[row], labels[row] = img[of], txt[of], labels[of]
    store = Store.create(str(path), rows_per_shard=rows_per_shard)
    store.register([f"s{i:05d}" for i in range(n)], captions=[f"a {CLASS_NAMES[y]}" for y in labels], labels=labels,
                   label_names=CLASS_NAMES)
    views = [(image_name, image_identity or IMAGE_IDENTITY, img), (text_name, text_identity or TEXT_IDENTITY, txt)]
    for i, name in enumerate(more_captions):
        other = text_view(z + 0.3 * rng.standard_normal(z.shape), rng).astype(np.float32)
        views.append((name, {**(text_identity or TEXT_IDENTITY), "field": f"caption{i + 2}"}, other))
    for name, identity, x in views:
        store.create_feature_set(name, identity, x.shape[1])
        for b in range(store.n_blocks):
            start, stop = store.block_range(b)
            write_block(store, name, b, {"pooled": x[start:stop]}, np.ones(stop - start, bool))
    return store


class FakeTextBackbone:
    """Stands in for the text backbone of `TEXT_IDENTITY`: a prompt naming class c is encoded as
    the caption view of c's centre (plus a little prompt-dependent noise)."""

    modality = "text"
    identity = TEXT_IDENTITY
    dim = TEXT_DIM

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode_texts(self, texts):
        self.calls.append(list(texts))
        out = []
        for t in texts:
            words = t.replace(".", " ").replace(",", " ").split()
            c = next(i for i, name in enumerate(CLASS_NAMES) if name in words)
            rng = np.random.default_rng(zlib.crc32(t.encode()))
            out.append(text_view(M["centres"][c][None] + 0.2 * rng.standard_normal((1, LATENT)))[0])
        return {"pooled": torch.tensor(np.stack(out), dtype=torch.float32)}


# One small trained run shared by the trainer, evaluate and API tests (trained once per session).
RUN_OVERRIDES = ["hidden_dim=256", "batch_size=128", "accumulation_steps=1", "steps=150", "warmup_steps=15",
                 "save_every=50", "log_every=5", "patience=null"]
_CACHE: dict = {}


def trained_run(tmp_path_factory):
    """(store path, run dir, summary) of a ShareLock head trained on `make_aligned_store`."""
    if "run" not in _CACHE:
        from featstore.trainers.sharelock.train import train_head

        base = tmp_path_factory.mktemp("sharelock-run")
        store = make_aligned_store(base / "s.zarr")
        summary = train_head(store.path, "img", "txt", base / "run", overrides=RUN_OVERRIDES, progress=False)
        _CACHE["run"] = (str(base / "s.zarr"), str(base / "run"), summary)
    return _CACHE["run"]


def one_thread():
    """Run torch on one thread (tiny matrices: threads only contend on a shared 2-core box); a
    generator for a fixture: restores the previous setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
