"""mosaic streaming: `MDSWriter` shards (columns `ndarray:float16:D`, no compression, its default
64 MB shard size), read by `StreamingDataset(local=..., shuffle=True, batch_size=B)` through its
`StreamingDataLoader(batch_size=B, num_workers=cores)`: its docs say `shuffle=True` with the
defaults (shuffle_algo "py1e", shuffle_block_size max(4M/nodes, 2^18)) is the performant choice,
and to pass the batch size to the dataset too.  Remotely (`remote.py`): `remote="s3://..."`,
`local=<cache>`, the endpoint from `S3_ENDPOINT_URL`.

Importing: `import streaming` runs its package `__init__`, which imports its vision dataset zoo
and with it torchvision, whose wheels are CUDA builds that break this machine's CPU torch.  The
classes used here live in `streaming.base`; `import_streaming()` imports that subpackage without
running the top-level `__init__` (nothing of streaming's code is changed or skipped on the read
path).
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import types

from . import DIMS, Contender, Unavailable

COLUMNS = {"row": "int64", **{k: f"ndarray:float16:{d}" for k, d in DIMS.items()}}


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def import_streaming():
    """streaming.base (MDSWriter, StreamingDataset, StreamingDataLoader), without the package __init__."""
    if "streaming.base" in sys.modules:
        return sys.modules["streaming.base"]
    spec = importlib.util.find_spec("streaming")
    if spec is None:
        raise Unavailable("mosaicml-streaming is not installed (pip install -e '.[bench]')")
    if "streaming" not in sys.modules:
        pkg = types.ModuleType("streaming")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["streaming"] = pkg
    import streaming.base as base

    return base


def write(out_dir, data, n: int | None = None) -> None:
    base = import_streaming()
    n = data.n if n is None else n
    with base.MDSWriter(out=str(out_dir), columns=COLUMNS, compression=None) as w:
        for start, cols in data.blocks():
            for i in range(start, min(start + len(cols["img"]), n)):
                w.write({"row": i, **{k: x[i - start] for k, x in cols.items()}})
            if start + len(cols["img"]) >= n:
                break


def loader(data, local, remote=None):
    base = import_streaming()
    base.util.clean_stale_shared_memory()
    ds = base.StreamingDataset(local=str(local), remote=remote, shuffle=True, shuffle_seed=data.seed,
                               batch_size=data.batch_size)
    return ds, base.StreamingDataLoader(ds, batch_size=data.batch_size, num_workers=_cores(), pin_memory=data.pin_memory)


class Mosaic(Contender):
    name = "mosaic"
    settings = (f"streaming.MDSWriter(columns ndarray:float16:D, no compression) → StreamingDataset(local, shuffle=True, "
                f"batch_size) → StreamingDataLoader(batch_size, num_workers={_cores()})")

    def __init__(self, data):
        super().__init__(data)
        self.ds = None

    def build(self) -> None:
        write(self.dir, self.data)

    def open(self):
        self.ds, dl = loader(self.data, self.dir)
        return dl

    def close(self) -> None:
        self.ds = None  # its shared memory goes with it
        gc.collect()
        import_streaming().util.clean_stale_shared_memory()
