"""Check that the blocks a reader is about to serve hold the bytes their markers recorded.

Every block marker carries a sha256 of each array over its extent (`writer.checksum`).  A reader
that trains on a feature set checks those before its first step, once per run: a shard changed
on disk since it was written (bit rot, a bad copy, an edit) is refused with the block it is in,
rather than served.  The blocks are read straight from their shard files where the layout allows
(`shardfile.LocalShards`, memory speed), else through zarr.  `featstore verify` checks the
same checksums and everything else besides.
"""

from __future__ import annotations

import numpy as np

from featstore.core import format as fmt
from featstore.errors import CorruptData
from featstore.core.shardfile import LocalShards
from featstore.core.writes import checksum


def check_blocks(store, names, arrays=("pooled", "valid")) -> int:
    """Compare `arrays` of each feature set in `names`, block by block, with the checksums in
    the blocks' markers; raise CorruptData naming the first block that differs.  Returns the
    number of (block, array) pairs checked."""
    checked = 0
    for name in names:
        fs = store.feature_set(name)
        for key in arrays:
            path = f"{fmt.FEATURES}/{name}/{key}"
            arr = fs.array(key)
            r = store.rows_per_shard
            direct = LocalShards.of(arr, r)
            buf = None
            for block, marker in sorted(fs.markers().items()):
                expected = (marker.get("checksums") or {}).get(path)
                start, stop = marker["rows"]
                if expected is None or stop > arr.shape[0]:
                    continue  # nothing recorded to compare with (`featstore verify` reports odd markers)
                shape = (stop - start,) + tuple(arr.shape[1:])
                if buf is None or buf.shape != shape:
                    buf = np.empty(shape, dtype=arr.dtype)
                b = start // r  # a block's rows [start, stop) lie in shard b
                if direct is None or not direct.read(b, start - b * r, stop - b * r, buf):
                    buf = np.asarray(arr[start:stop])
                if checksum(buf) != expected:
                    raise CorruptData(f"{path} block {block} (rows {start}-{stop}) in {store.path} does not match the "
                                      "checksum written with it (changed on disk since): run `featstore verify --store "
                                      f"{store.path}` to list every damaged block, then re-extract '{name}' (--overwrite)")
                checked += 1
    return checked
