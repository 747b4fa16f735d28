"""The contenders of `bench_store.py`: one module per way of serving shuffled feature batches.

Every contender serves the same rows (two aligned float16 columns, "img" and "txt", plus the row
number) and implements one small interface, so the harness can time them all the same way:

    class Contender:
        name       results key: figures["<name>_samples_per_s"], ratios["featstore_vs_<name>"]
        settings   one line saying how it is used (its documented way), shown in results and README
        cold       False when a cold (page cache dropped) read means nothing (in-RAM tensors)
        build()       write its own files from the shared data (untimed)
        files()       the files a warm/cold pass reads or drops
        open()        an iterable over one epoch of batches {"row", "img", "txt"} (opening untimed)
        again()       (remote contenders) the next epoch of what the last open() made: the same
                      loader / dataset and its local cache, as a trainer's later epochs
        close()       drop handles and maps, so the page cache of its files can be dropped
        check()       untimed, before any timing: the bytes served are the rows' (returns the
                      rows an epoch serves); the default checks the first batch

A contender that cannot run here raises `Unavailable(reason)` from `build` or `open`; the harness
records the reason in the results instead of a figure.  `Data` is the shared source: the rows as
.npy files (`truth(rows)` reads them back for the untimed correctness check every contender
passes before it is timed), the featstore Loader's epoch order (for the contenders that replay it)
and the sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DIMS = {"img": 768, "txt": 4096}  # a ViT-B image feature and a Llama-3-8B caption feature
DTYPE = np.float16


class Unavailable(RuntimeError):
    """This contender cannot run on this machine; the message says why."""


@dataclass
class Data:
    root: Path  # scratch directory; each contender writes under root/<its name>
    n: int  # rows
    rows_per_shard: int
    batch_size: int
    seed: int
    labels: np.ndarray  # class of each row (rows sorted by class, as an image folder gives them)
    order: list[np.ndarray] = field(default_factory=list)  # the featstore Loader's epoch: its batch_rows()
    pin_memory: bool = False  # batches go to a GPU: contenders that can pin memory do

    @property
    def npy(self) -> Path:
        return self.root / "npy"

    def column(self, key: str) -> np.ndarray:
        """The whole column as a read-only memmap of its .npy file."""
        return np.load(self.npy / f"{key}.npy", mmap_mode="r")

    def blocks(self, step: int | None = None):
        """(start, {"img": rows, "txt": rows}) for consecutive row ranges of `step` (default R) rows."""
        step = step or self.rows_per_shard
        cols = {k: self.column(k) for k in DIMS}
        for start in range(0, self.n, step):
            yield start, {k: np.ascontiguousarray(c[start : start + step]) for k, c in cols.items()}

    def truth(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        return {k: self.column(k)[np.asarray(rows)] for k in DIMS}


def write_npy(root: Path, n: int, rows_per_shard: int, seed: int) -> None:
    """The rows, deterministic random float16 (all finite: the exponent's top bit cleared)."""
    (root / "npy").mkdir(parents=True, exist_ok=True)
    for k, d in DIMS.items():
        out = np.lib.format.open_memmap(root / "npy" / f"{k}.npy", "w+", DTYPE, (n, d))
        for start in range(0, n, rows_per_shard):
            stop = min(start + rows_per_shard, n)
            rng = np.random.default_rng([seed, start, d])
            out[start:stop] = (rng.integers(0, 1 << 16, (stop - start, d), dtype=np.uint16) & 0xBFFF).view(DTYPE)
        out.flush()
        del out


class Contender:
    name = "?"
    settings = ""
    cold = True

    def __init__(self, data: Data):
        self.data = data
        self.dir = data.root / self.name
        self.rows = data.n  # rows one epoch serves

    def build(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def files(self) -> list[Path]:
        return [self.dir]

    def open(self):  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass

    def check(self) -> int:
        """The first batch holds the right bytes for the rows it names; returns the rows an epoch serves."""
        try:
            batch = next(iter(self.open()))
            rows = batch["row"].numpy().astype(np.int64)
            assert len(rows) == min(self.data.batch_size, self.rows), f"{self.name}: first batch has {len(rows)} rows"
            want = self.data.truth(rows)
            for k in DIMS:
                got = batch[k].numpy()
                assert got.shape == want[k].shape, f"{self.name}/{k}: shape {got.shape}"
                assert np.array_equal(got.astype(np.float32), want[k].astype(np.float32)), f"{self.name}/{k}: wrong values"
        finally:
            self.close()
        return self.rows

    def describe(self) -> dict:
        """What goes into the results' params for this contender."""
        return {"settings": self.settings}
