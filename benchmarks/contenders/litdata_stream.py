"""litdata (Lightning): `optimize` into its chunked format, read by `StreamingDataset` through its
`StreamingDataLoader`, as its README shows (chunk_bytes="64MB", shuffle=True, workers = cores).

Its shuffle: chunks in a random order, items shuffled inside windows of each chunk
(`item_shuffle_window`, default 256).  Remotely (`remote.py`) the same dataset reads an s3:// URL
with `storage_options={"endpoint_url": ...}`, downloading chunks into a local cache first.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from . import DIMS, Contender

CHUNK_BYTES = "64MB"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _rows(block: int, npy: str, rows_per_block: int, n: int):
    """optimize's fn: every row of one block as a sample dict (runs in litdata's worker processes)."""
    cols = {k: np.load(os.path.join(npy, f"{k}.npy"), mmap_mode="r") for k in DIMS}
    start = block * rows_per_block
    for i in range(start, min(start + rows_per_block, n)):
        yield {"row": i, **{k: np.ascontiguousarray(c[i]) for k, c in cols.items()}}


def write(out_dir, data, n: int | None = None) -> None:
    from litdata import optimize

    n = data.n if n is None else n
    blocks = list(range(-(-n // data.rows_per_shard)))
    fn = functools.partial(_rows, npy=str(data.npy), rows_per_block=data.rows_per_shard, n=n)
    optimize(fn=fn, inputs=blocks, output_dir=str(out_dir), chunk_bytes=CHUNK_BYTES, num_workers=min(_cores(), len(blocks)),
             mode="overwrite")


def loader(input_dir, data, cache_dir=None, storage_options=None):
    from litdata import StreamingDataLoader, StreamingDataset

    kw = {} if cache_dir is None else {"cache_dir": str(cache_dir)}
    if storage_options:
        kw["storage_options"] = storage_options
    ds = StreamingDataset(str(input_dir), shuffle=True, seed=data.seed, **kw)
    return StreamingDataLoader(ds, batch_size=data.batch_size, num_workers=_cores(), pin_memory=data.pin_memory)


class Litdata(Contender):
    name = "litdata"
    settings = (f"litdata.optimize(chunk_bytes='{CHUNK_BYTES}') → StreamingDataset(dir, shuffle=True, seed) → "
                f"StreamingDataLoader(batch_size, num_workers={_cores()})")

    def build(self) -> None:
        write(self.dir, self.data)

    def open(self):
        return loader(self.dir, self.data)
