"""featstore's own Loader, and the same Loader reading through zarr (`direct=False`).

The Loader's settings live here and only here: `LOADER` for the local contenders (its defaults
apart from shuffle and seed) and `REMOTE_LOADER`, added for the contenders that read the store
over S3 (contenders/remote.py).  The results record every keyword default the Loader ran with
(read from its signature) and what those defaults came to on this data (the window in rows, the
batches it mixes, the rows per run, how each column is read), so a change to the Loader shows up
in the results without touching the benchmark.
"""

from __future__ import annotations

import inspect

import numpy as np

from featstore.loader import Loader
from featstore.store import Store
from featstore.core.writes import write_block

from . import DIMS, Contender, Data

COLUMNS = {"img": "features/img/pooled", "txt": "features/txt/pooled"}
LOADER = {"shuffle": True}  # + seed=data.seed (and pin_memory when batches go to a GPU); the rest: defaults


def remote_loader_args(cache_dir) -> dict:
    """Extra Loader arguments of the featstore contender that reads the store over S3: the one
    place to set them.  `cache="disk"`, what the Loader's documentation recommends for training
    from object storage (each shard object fetched whole once, later epochs read locally), with
    the cache in `cache_dir`, which the contender empties before each first epoch (as the peers'
    caches are)."""
    return {"cache": "disk", "cache_dir": str(cache_dir)}


def loader_defaults() -> dict:
    """The Loader's keyword defaults, as the results record them."""
    out = {}
    for name, p in inspect.signature(Loader).parameters.items():
        if p.default is not inspect.Parameter.empty and isinstance(p.default, (int, float, str, bool, type(None))):
            out[name] = p.default
    return out


def effective(loader: Loader) -> dict:
    """What the settings came to on this store: the shuffle window and how each column is read."""
    return {"window_rows": loader.window, "batches_per_window": loader.batches_per_window, "run_rows": loader.run_rows,
            "mode": loader.mode, "buffer_bound_bytes": loader.buffer_bound, "prefetch": loader.prefetch,
            "read_threads": loader.read_threads, "read_ahead": loader.read_ahead,
            "read_path": {c.alias: c.source.kind for c in loader.columns}}


def describe_settings(kw: dict, eff: dict) -> str:
    given = ", ".join(f"{k}={v!r}" for k, v in kw.items())
    paths = sorted(set(eff["read_path"].values()))
    return (f"featstore.Loader(store, {{img, txt}}, batch, {given}, seed), other arguments default: window "
            f"{eff['window_rows']:,} rows ({eff['batches_per_window']} batches mixed, runs of {eff['run_rows']} rows), "
            f"prefetch {eff['prefetch']}, read_threads {eff['read_threads']}, read_ahead {eff['read_ahead']}; "
            f"columns read {'/'.join(paths)}")


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
    settings = {**LOADER, "seed": data.seed, **({"pin_memory": True} if data.pin_memory else {}), **kw}
    return Loader(Store.open(path), COLUMNS, data.batch_size, **settings)


class Featstore(Contender):
    name = "featstore"
    extra: dict = {}  # Loader arguments beyond LOADER

    @property
    def path(self):
        return self.data.root / "featstore" / "store.zarr"

    def build(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        build_store(self.path, self.data)
        self.settings = describe_settings({**LOADER, **self.extra}, effective(open_loader(self.path, self.data, **self.extra)))

    def files(self):
        return [self.path / "features"]

    def open(self):
        return open_loader(self.path, self.data, **self.extra)

    def describe(self) -> dict:
        loader = open_loader(self.path, self.data, **self.extra)
        return {"settings": self.settings, "loader_defaults": loader_defaults(), "loader_settings": {**LOADER, **self.extra},
                "effective": effective(loader)}

    def epoch_order(self) -> list[np.ndarray]:
        """The rows of each batch of one epoch, in serving order: the Loader's own `batch_rows()`."""
        return self.open().batch_rows()

    def shuffle_quality(self) -> float:
        """The Loader's own figure for its epoch, over the store's labels (`Loader.shuffle_quality`)."""
        return self.open().shuffle_quality()

    def check(self) -> int:
        """Untimed: one whole epoch serves exactly `batch_rows()`, batch by batch, with the right bytes."""
        loader = self.open()
        want = loader.batch_rows()
        got = 0
        for i, batch in enumerate(loader):
            rows = batch["row"].numpy()
            assert np.array_equal(rows, want[i]), f"{self.name}: batch {i} is not batch_rows()[{i}]"
            if i in (0, len(want) - 1):
                truth = self.data.truth(rows)
                for k in DIMS:
                    assert np.array_equal(batch[k].numpy(), truth[k]), f"{self.name}/{k}: wrong values in batch {i}"
            got += len(rows)
        assert got == self.data.n and i == len(want) - 1, f"{self.name}: served {got} rows in {i + 1} batches"
        return got


class ZarrLoader(Featstore):
    """The same Loader, the same store, every block read through zarr's own read path."""

    name = "zarr"
    extra = {"direct": False}

    def build(self) -> None:  # reads the featstore contender's store
        if not (self.path / "zarr.json").exists():
            raise RuntimeError("the zarr contender reads the featstore contender's store: build that first")
        eff = effective(open_loader(self.path, self.data, **self.extra))
        self.settings = "the same store and Loader with direct=False (zarr's own codec pipeline reads each run); " + \
            describe_settings({**LOADER, **self.extra}, eff).split("), other arguments default: ", 1)[1]

    def check(self) -> int:
        return Contender.check(self)


class FeatstoreReused(Featstore):
    """One Loader kept across rounds, as a trainer keeps it across epochs: every timed epoch is a
    later epoch of the same Loader."""

    name = "featstore_reused"
    cold = False  # its mapping keeps its pages resident: a later epoch of a live loader is warm by nature

    def release(self) -> None:
        """Before the cold rounds: drop the Loader (its mapping would pin the store's pages)."""
        self.loader = None

    def build(self) -> None:  # reads the featstore contender's store
        self.loader = open_loader(self.path, self.data)
        for _ in self.loader:  # its first epoch, untimed
            pass
        self.settings = "the featstore contender's Loader, one object iterated epoch after epoch (a trainer's later epochs)"

    def open(self):
        self.loader.set_epoch(self.loader.epoch)  # a whole epoch, as a trainer's loop starts one
        return self.loader

    def check(self) -> int:
        return Contender.check(self)
