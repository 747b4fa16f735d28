"""Write one row block of one feature set: every array's shard whole, then the block's marker.

This is the only place feature bytes enter the store.  The order is the whole crash-safety
story: a kill before the marker leaves an unmarked block (a re-run recomputes it); a kill
after it leaves a finished block.  Nothing ever writes part of a shard, so two processes
never touch the same shard file, and a block written twice (a Dask retry) is written with
identical bytes, which the marker's checksums let `verify` prove.
"""

from __future__ import annotations

import hashlib
import os
import socket

import numpy as np

from . import format as fmt
from .store import Store, _now


def checksum(data: np.ndarray) -> str:
    """sha256 of an array's stored bytes (C order) plus its dtype and shape."""
    data = np.ascontiguousarray(data)
    h = hashlib.sha256(f"{data.dtype.str}{data.shape}".encode())
    h.update(data.view(np.uint8).reshape(-1) if data.size else b"")
    return h.hexdigest()


def block_checksums(store: Store, name: str, block: int) -> dict[str, str]:
    """Checksums of what the store holds now for one block of a feature set (for `verify`)."""
    start, stop = store.block_range(block)
    return {path: checksum(np.asarray(arr[start:stop])) for path, arr in store.feature_set(name).arrays().items()}


def write_block(
    store: Store,
    name: str,
    block: int,
    columns: dict[str, np.ndarray],
    valid: np.ndarray,
    failures: list[dict] | None = None,
    stats: dict | None = None,
) -> dict:
    """Write rows [start, stop) of block `block` for feature set `name`, then its marker.

    `columns` maps "pooled", "tokens", "tokens_scale" and "pixels" (if the feature set has
    pixels) to arrays with one row per block row; rows where `valid` is false are zeroed so
    their bytes are deterministic.  `failures` are dicts with at least `row` (absolute) and
    `reason`; `stats` (timings, worker) go into the marker as they are.  Returns the marker.
    """
    fs = store.feature_set(name)
    start, stop = store.block_range(block)
    n = stop - start
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != (n,):
        raise ValueError(f"block {block} has {n} rows, got valid of shape {valid.shape}")

    targets = dict(fs.arrays())
    targets[f"{fmt.FEATURES}/{name}/valid"] = fs.array("valid")
    data: dict[str, np.ndarray] = {f"{fmt.FEATURES}/{name}/valid": valid}
    for key, value in columns.items():
        path = f"{fmt.PIXELS}/{fs.pixels_name}" if key == "pixels" else f"{fmt.FEATURES}/{name}/{key}"
        if path not in targets:
            raise ValueError(f"feature set '{name}' has no '{key}' array")
        arr = targets[path]
        value = np.asarray(value)
        if value.shape != (n,) + arr.shape[1:]:
            raise ValueError(f"{path}: expected shape {(n,) + arr.shape[1:]}, got {value.shape}")
        value = value.astype(arr.dtype, copy=True)
        value[~valid] = 0
        data[path] = value
    missing = sorted(set(targets) - set(data))
    if missing:
        raise ValueError(f"block {block} of '{name}' is missing arrays: {', '.join(missing)}")

    for path, value in data.items():
        targets[path][start:stop] = value  # a whole shard: [start, stop) is exactly one shard

    uids = store.samples(fmt.UID, start, stop)
    failures = sorted(failures or [], key=lambda f: f["row"])
    for f in failures:
        f.setdefault("uid", str(uids[f["row"] - start]))
    marker = {
        "block": int(block),
        "rows": [int(start), int(stop)],
        "n_valid": int(valid.sum()),
        "n_invalid": int(n - valid.sum()),
        "failures": failures,
        "checksums": {path: checksum(value) for path, value in sorted(data.items())},
        "written_at": _now(),
        "host": f"{socket.gethostname()}:{os.getpid()}",
        **(stats or {}),
    }
    store.files.write_json(f"{fmt.PROGRESS}/{name}/{block}.json", marker)
    return marker

