"""ShareLock's real training data path: zips staged to local disk, one `.pt` file per feature.

What ShareLock's code does (github.com/JonaRuthardt/ShareLock, `sharelock/data/datasets.py` and
`data.py`, over JonaRuthardt/FeatureUtils' ZIP backend), re-implemented here from reading it:

- precompute writes, per backbone, uncompressed zip shards of 10,000 keys (FeatureUtils' default
  `shard_size`) named `shard_<time>_<pid>_<k>.zip`, holding one `torch.save`d tensor per key and
  feature, `<key>_<feature>.pt`, plus `metadata.json` (`key2shard`, `shards`, `feature_count`).
  Vision features are the backbone's fp32 output (768,) (with a `label` beside them); language
  features are fp32 (4096,) (the last token's hidden state, `.float()`), in their own directory.
- `VisionLanguageFeatureDataset.__init__` stages both: every zip extracted into `$TMPDIR/<shard>/`
  (`stage_data(features=["vision_features"])` for the image side).
- `__getitem__(idx)` opens `<staging>/<shard>/<key>_vision_features.pt` and
  `..._language_features.pt`, reads each into a BytesIO and `torch.load(weights_only=True)`s it.
- `DataModule.train_dataloader`: `DataLoader(batch_size=1024, shuffle=True, num_workers=16,
  pin_memory=True, prefetch_factor=12)`; here num_workers = this machine's cores (16 on a 16-core
  box, as ShareLock's config), pin_memory only when batches go to a GPU.

Staging (unzipping) is done once in `build` and timed separately (`stage_seconds`); the epoch
reads the staged files.  Only the first `rows` rows are written (a file per sample and feature).
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile

import numpy as np
import torch

from . import Contender

SHARD_KEYS = 10_000
FEATURES = {"img": ("vision", "vision_features"), "txt": ("language/captions", "language_features")}


def _pt(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    torch.save(torch.from_numpy(x.astype(np.float32)), buf)  # fp32, as the backbones' outputs
    return buf.getvalue()


class StagedFeatures(torch.utils.data.Dataset):
    """Per sample: the two staged .pt files, each read whole and torch.load-ed."""

    def __init__(self, staging: str, keys: list[str], key2shard: dict[str, str], seed: int):
        self.staging, self.key2shard = staging, key2shard
        keys = list(keys)
        np.random.default_rng(seed).shuffle(keys)  # ShareLock shuffles the ids once (rng.shuffle)
        self.idx2id = dict(enumerate(keys))

    def __len__(self):
        return len(self.idx2id)

    def _load(self, key: str, feature: str) -> torch.Tensor:
        with open(os.path.join(self.staging, self.key2shard[key], f"{key}_{feature}.pt"), "rb") as f:
            return torch.load(io.BytesIO(f.read()), weights_only=True)

    def __getitem__(self, idx):
        key = self.idx2id[idx]
        out = {"vision_features": self._load(key, "vision_features")}
        out["language_features"] = self._load(key, "language_features").squeeze()
        return out


class ShareLockStaged(Contender):
    name = "sharelock_staged"

    def __init__(self, data, rows: int):
        super().__init__(data)
        self.rows = min(rows, data.n)
        self.workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.settings = (f"ShareLock's VisionLanguageFeatureDataset path: zips staged to local disk, two .pt files "
                         f"torch.load-ed per sample (fp32), DataLoader(batch 1024, shuffle, num_workers={self.workers}, "
                         f"prefetch_factor=12); first {self.rows:,} rows")
        self.stage_seconds = None
        self.key2shard: dict[str, str] = {}

    @property
    def staging(self):
        return self.dir / "staging"

    def build(self) -> None:
        shards: dict[str, list[str]] = {k: [] for k in FEATURES}
        zips: dict[str, zipfile.ZipFile] = {}
        for start, cols in self.data.blocks():
            for i in range(start, min(start + len(cols["img"]), self.rows)):
                if i % SHARD_KEYS == 0:  # a new shard per backbone
                    for z in zips.values():
                        z.close()
                    for k, (sub, _) in FEATURES.items():
                        name = f"shard_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}_{i // SHARD_KEYS}"
                        (self.dir / sub).mkdir(parents=True, exist_ok=True)
                        zips[k] = zipfile.ZipFile(self.dir / sub / f"{name}.zip", "w")  # ZIP_STORED
                        shards[k].append(name)
                key = str(i)
                for k, (_, feature) in FEATURES.items():
                    zips[k].writestr(f"{key}_{feature}.pt", _pt(cols[k][i - start]))
                    if k == "img":
                        zips[k].writestr(f"{key}_label.pt", _pt(np.asarray(self.data.labels[i])))
                self.key2shard[key] = shards["img"][-1]
            if start + len(cols["img"]) >= self.rows:
                break
        for z in zips.values():
            z.close()
        for k, (sub, _) in FEATURES.items():  # FeatureUtils' metadata.json
            k2s = {key: shards[k][int(key) // SHARD_KEYS] for key in self.key2shard}
            meta = {"key2shard": k2s, "shards": shards[k], "feature_count": len(k2s)}
            (self.dir / sub / "metadata.json").write_text(json.dumps(meta))
        t = time.perf_counter()
        self._stage()
        self.stage_seconds = time.perf_counter() - t

    def _stage(self) -> None:
        """stage_data: extract each shard's zip into <staging>/<shard>/ (the image side: vision only)."""
        for k, (sub, feature) in FEATURES.items():
            meta = json.loads((self.dir / sub / "metadata.json").read_text())
            for shard in meta["shards"]:
                with zipfile.ZipFile(self.dir / sub / f"{shard}.zip") as zf:
                    members = [m for m in zf.namelist() if m.endswith(f"_{feature}.pt")]
                    zf.extractall(self.staging / shard, members)
        # both backbones' shards of the same keys have the same name here; ShareLock's differ by
        # timestamp and pid, which changes nothing about the reads
        self.key2shard = json.loads((self.dir / FEATURES["img"][0] / "metadata.json").read_text())["key2shard"]

    def files(self):
        return [self.staging]

    def dataset(self) -> StagedFeatures:
        return StagedFeatures(str(self.staging), list(self.key2shard), self.key2shard, self.data.seed)

    def open(self):
        loader = torch.utils.data.DataLoader(
            self.dataset(), batch_size=self.data.batch_size, shuffle=True, num_workers=self.workers,
            pin_memory=self.data.pin_memory, prefetch_factor=12 if self.workers else None,
            generator=torch.Generator().manual_seed(self.data.seed))
        return ({"img": b["vision_features"], "txt": b["language_features"]} for b in loader)

    def check(self) -> int:
        """The staged files hold the rows' values (as fp32); returns the rows an epoch serves."""
        ds = self.dataset()
        for idx in (0, len(ds) // 2, len(ds) - 1):
            key = ds.idx2id[idx]
            want = self.data.truth(np.array([int(key)]))
            got = ds[idx]
            assert np.array_equal(got["vision_features"].numpy(), want["img"][0].astype(np.float32)), key
            assert np.array_equal(got["language_features"].numpy(), want["txt"][0].astype(np.float32)), key
        return len(ds)

    def describe(self) -> dict:
        return {"settings": self.settings, "rows": self.rows, "workers": self.workers, "zip_keys": SHARD_KEYS,
                "dtype": "float32", "stage_seconds": None if self.stage_seconds is None else round(self.stage_seconds, 2)}
