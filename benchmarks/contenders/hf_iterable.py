"""Hugging Face `datasets`: an Arrow dataset on disk, streamed as a sharded IterableDataset.

The datasets docs ("Differences between Dataset and IterableDataset") recommend, for shuffled
training reads, `ds.to_iterable_dataset(num_shards=N)` (a fast approximate shuffle: shard order,
then a buffer) over `ds.shuffle()` (an index mapping, random reads).  Two ways to iterate it:

- `hf_iterable`: its fastest path, `.with_format("arrow").iter(batch_size)`, each Arrow batch
  turned into torch tensors by hand (zero copy from the gathered Arrow buffers), float16 kept.
- `hf_iterable_torch`: what the docs show for PyTorch, `.with_format("torch")` in a
  `DataLoader(batch_size, num_workers=cores)`; the torch formatter upcasts float16 to float32.

The columns are fixed-size lists of float16 (`List(Value("float16"), length=D)`).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from . import DIMS, Contender

NUM_SHARDS = 64
BUFFER = 1000  # IterableDataset.shuffle's default buffer_size, as in the docs' example


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class HFIterable(Contender):
    name = "hf_iterable"
    settings = (f"datasets.load_from_disk(...).to_iterable_dataset(num_shards={NUM_SHARDS}).shuffle(seed, "
                f"buffer_size={BUFFER}), .with_format('arrow').iter(batch_size), arrow→torch by hand (fp16 kept)")

    def __init__(self, data, path=None):
        super().__init__(data)
        self.path = path or (data.root / "hf_iterable")

    def build(self) -> None:
        import datasets
        import pyarrow as pa

        datasets.disable_progress_bars()
        tables = []
        for start, cols in self.data.blocks():
            t = {"row": pa.array(np.arange(start, start + len(cols["img"]), dtype=np.int64))}
            for k, x in cols.items():
                t[k] = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
            tables.append(pa.table(t))
        datasets.Dataset(pa.concat_tables(tables)).save_to_disk(str(self.path))

    def files(self):
        return [self.path]

    def _iterable(self):
        import datasets

        datasets.disable_progress_bars()
        ds = datasets.load_from_disk(str(self.path))
        return ds.to_iterable_dataset(num_shards=NUM_SHARDS).shuffle(seed=self.data.seed, buffer_size=BUFFER)

    def open(self):
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # zero-copy from Arrow
        ids = self._iterable().with_format("arrow")

        def epoch():
            for t in ids.iter(batch_size=self.data.batch_size):
                batch = {"row": torch.from_numpy(t.column("row").to_numpy())}
                for k, d in DIMS.items():
                    flat = t.column(k).combine_chunks().flatten().to_numpy(zero_copy_only=False)
                    batch[k] = torch.from_numpy(flat.reshape(len(t), d))
                yield batch

        return epoch()


class HFIterableTorch(HFIterable):
    name = "hf_iterable_torch"
    settings = (f"the same IterableDataset .with_format('torch') in DataLoader(batch_size, num_workers={_cores()}) "
                f"(the docs' PyTorch path; float16 comes back as float32)")

    def build(self) -> None:  # reads hf_iterable's files
        pass

    def open(self):
        ids = self._iterable().with_format("torch")
        workers = min(_cores(), NUM_SHARDS)
        return torch.utils.data.DataLoader(ids, batch_size=self.data.batch_size, num_workers=workers,
                                           pin_memory=self.data.pin_memory)
