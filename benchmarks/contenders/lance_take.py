"""Lance (`pylance`): a Lance dataset of fixed-size-list float16 columns, read by random access.

Lance's point is fast random access, so the shuffle is a full random permutation: each batch is
`ds.take(sorted(batch rows), columns=...)` (its documented random-access call; sorting within a
batch is free for training and faster for Lance), the next batch's take running in one
read-ahead thread while this one is turned into torch tensors (zero copy from Arrow).  Written
with `lance.write_dataset` defaults.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import DIMS, Contender


def _batches(data):
    import pyarrow as pa

    for start, cols in data.blocks():
        t = {"row": pa.array(np.arange(start, start + len(cols["img"]), dtype=np.int64))}
        for k, x in cols.items():
            t[k] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
        yield pa.record_batch(t)


class Lance(Contender):
    name = "lance"
    settings = ("lance.write_dataset (defaults); full random permutation, per batch ds.take(sorted rows, columns) "
                "with one batch of read-ahead in a thread; arrow→torch zero copy")

    def build(self) -> None:
        import lance
        import pyarrow as pa

        first = next(_batches(self.data))
        reader = pa.RecordBatchReader.from_batches(first.schema, _batches(self.data))
        lance.write_dataset(reader, str(self.dir))

    def open(self):
        import lance

        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        ds = lance.dataset(str(self.dir))
        perm = np.random.default_rng(self.data.seed).permutation(self.data.n)
        b = self.data.batch_size
        batches = [np.sort(perm[i : i + b]) for i in range(0, len(perm), b)]
        columns = ["row", *DIMS]

        def epoch():
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = pool.submit(ds.take, batches[0], columns=columns)
                for i in range(len(batches)):
                    t = pending.result()
                    if i + 1 < len(batches):
                        pending = pool.submit(ds.take, batches[i + 1], columns=columns)
                    out = {"row": torch.from_numpy(t.column("row").to_numpy())}
                    for k, d in DIMS.items():
                        flat = t.column(k).combine_chunks().flatten().to_numpy(zero_copy_only=False)
                        out[k] = torch.from_numpy(flat.reshape(len(t), d))
                    yield out

        return epoch()
