"""featstore's own Loader, and the same Loader reading through zarr (`direct=False`).

The Loader's settings live here and only here (`LOADER`): the benchmark uses its defaults apart
from shuffle and seed, and records every default it ran with (read from the signature), so a
change to the Loader shows up in the results without touching the benchmark.
"""

from __future__ import annotations

import inspect

import numpy as np

from featstore.loader import Loader
from featstore.store import Store
from featstore.writer import write_block

from . import DIMS, Contender, Data

COLUMNS = {"img": "features/img/pooled", "txt": "features/txt/pooled"}
LOADER = {"shuffle": True}  # + seed=data.seed; everything else is the Loader's default


def loader_defaults() -> dict:
    """The Loader's keyword defaults, as the results record them."""
    out = {}
    for name, p in inspect.signature(Loader).parameters.items():
        if p.default is not inspect.Parameter.empty and isinstance(p.default, (int, float, str, bool, type(None))):
            out[name] = p.default
    return out


def build_store(path, data: Data, n: int | None = None) -> Store:
    """A featstore store of the first `n` rows (default all): uids, class labels, two feature sets."""
    n = data.n if n is None else n
    store = Store.create(path, rows_per_shard=data.rows_per_shard)
    store.register([f"s{i:08d}" for i in range(n)], labels=data.labels[:n])
    for k, d in DIMS.items():
        store.create_feature_set(k, {"model": f"synthetic-{k}", "dim": d}, d)
    for start, cols in data.blocks():
        if start >= n:
            break
        b = start // data.rows_per_shard
        for k, x in cols.items():
            x = x[: n - start]
            write_block(store, k, b, {"pooled": x}, np.ones(len(x), dtype=bool))
    return store


def open_loader(path, data: Data, **kw) -> Loader:
    settings = {**LOADER, "seed": data.seed, "pin_memory": data.pin_memory, **kw}
    return Loader(Store.open(path), COLUMNS, data.batch_size, **settings)


class Featstore(Contender):
    name = "featstore"
    settings = "featstore.Loader(store, {img, txt}, batch, shuffle=True, seed) with its defaults"

    @property
    def path(self):
        return self.data.root / "featstore" / "store.zarr"

    def build(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        build_store(self.path, self.data)

    def files(self):
        return [self.path / "features"]

    def open(self):
        return open_loader(self.path, self.data)

    def describe(self) -> dict:
        return {"settings": self.settings, "loader_defaults": loader_defaults(), "loader_settings": LOADER}

    def epoch_order(self) -> list[np.ndarray]:
        """The rows of each batch of one epoch, in serving order (untimed)."""
        return [b["row"].numpy().copy() for b in self.open()]


class ZarrLoader(Featstore):
    """The same Loader, the same store, every block read through zarr's own read path."""

    name = "zarr"
    settings = "the same featstore.Loader over the same store with direct=False (zarr's codec pipeline reads each block)"

    def build(self) -> None:  # reads the featstore contender's store
        if not (self.path / "zarr.json").exists():
            raise RuntimeError("the zarr contender reads the featstore contender's store: build that first")

    def open(self):
        return open_loader(self.path, self.data, direct=False)

    def describe(self) -> dict:
        return {"settings": self.settings, "loader_settings": {**LOADER, "direct": False}}


class FeatstoreReused(Featstore):
    """One Loader kept across rounds, as a trainer keeps it across epochs: every timed epoch is a
    later epoch of the same Loader (its window buffers already allocated and faulted in)."""

    name = "featstore_reused"
    settings = "the featstore contender's Loader, one object iterated epoch after epoch (a trainer's later epochs)"

    def build(self) -> None:  # reads the featstore contender's store
        self.loader = open_loader(self.path, self.data)
        for _ in self.loader:  # its first epoch, untimed
            pass

    def open(self):
        self.loader.set_epoch(self.loader.epoch)  # a whole epoch, as a trainer's loop starts one
        return self.loader
