"""The limits: a numpy memmap gathered in the Loader's own order with one copy, and in-RAM tensors.

`memmap` is what the page cache allows: `np.load(..., mmap_mode="r")` of the .npy files, and each
batch (the rows featstore's Loader serves, in its order) gathered straight from the mapping into a
fresh tensor with `np.take(..., out=)` - one copy per byte, in the consuming thread, no read-ahead.
`ram` is the same order over torch tensors already in memory, `t[rows]`, what a trainer writes
when everything fits in RAM (no files, so no cold figure).  Note torch's CPU gather of float16
rows (`t[rows]`, `index_select`) is several times slower than numpy's `np.take` of the same bytes.
"""

from __future__ import annotations

import numpy as np
import torch

from . import DIMS, Contender


def _empty(n: int, d: int, pin: bool) -> torch.Tensor:
    return torch.empty((n, d), dtype=torch.float16, pin_memory=pin)


class MemmapOneCopy(Contender):
    name = "memmap"
    settings = ("np.load(mmap_mode='r') of .npy files; each batch of the Loader's order gathered straight from "
                "the mapping into a fresh tensor with np.take(out=): one copy, consuming thread only")

    def build(self) -> None:  # reads the shared .npy files
        pass

    def files(self):
        return [self.data.npy]

    def open(self):
        cols = {k: self.data.column(k) for k in DIMS}
        order, pin = self.data.order, self.data.pin_memory

        def epoch():
            for rows in order:
                batch = {"row": torch.from_numpy(rows)}
                for k, m in cols.items():
                    out = _empty(len(rows), DIMS[k], pin)
                    np.take(m, rows, axis=0, out=out.numpy(), mode="clip")  # clip: no buffered out
                    batch[k] = out
                yield batch

        return epoch()


class InRam(Contender):
    name = "ram"
    settings = "torch tensors already in RAM; each batch of the Loader's order as t[rows] (what a trainer writes)"
    cold = False

    def __init__(self, data):
        super().__init__(data)
        self.tensors = None

    def build(self) -> None:
        self.tensors = {k: torch.from_numpy(np.array(self.data.column(k))) for k in DIMS}  # a copy: no map

    def files(self):
        return []

    def open(self):
        tensors, order = self.tensors, self.data.order

        def epoch():
            for rows in order:
                idx = torch.from_numpy(rows)
                yield {"row": idx, **{k: t[idx] for k, t in tensors.items()}}

        return epoch()
