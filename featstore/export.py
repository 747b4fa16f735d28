"""Export one feature set's pooled features for tools that want plain files.

`.npy`: an (n, D) array of the usable rows plus `<stem>.uids.txt` (one uid per line, same
order).  `.parquet`: columns `uid`, `row` and `pooled` (a list of float32 per row).
"""

from __future__ import annotations

import os

import numpy as np

from .errors import ConfigError
from .store import Store


def export(store: Store, name: str, out: str, array: str = "pooled") -> dict:
    fs = store.feature_set(name)
    rows = np.flatnonzero(fs.usable_rows())
    data = np.zeros((0,) + fs.array(array).shape[1:], dtype=fs.array(array).dtype)
    parts = []
    for b in np.unique(rows // store.rows_per_shard):  # whole blocks, then select
        start, stop = store.block_range(int(b))
        sel = rows[(rows >= start) & (rows < stop)] - start
        parts.append(np.asarray(fs.array(array)[start:stop])[sel])
    if parts:
        data = np.concatenate(parts)
    uids = store.uids()[rows] if len(rows) else np.array([], dtype=str)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".npy"):
        np.save(out, data)
        side = out[: -len(".npy")] + ".uids.txt"
        with open(side, "w", encoding="utf-8") as f:
            f.writelines(f"{u}\n" for u in uids)
        files = [out, side]
    elif out.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        flat = data.reshape(len(data), -1).astype(np.float32)
        width = flat.shape[1]
        values = pa.array(flat.reshape(-1), type=pa.float32())
        table = pa.table({
            "uid": pa.array([str(u) for u in uids], type=pa.string()),
            "row": pa.array(rows.astype(np.int64)),
            array: pa.FixedSizeListArray.from_arrays(values, width),
        })
        pq.write_table(table, out)
        files = [out]
    else:
        raise ConfigError(f"--out must end in .npy or .parquet, not {os.path.basename(out)!r}")
    return {"feature_set": name, "rows": int(len(rows)), "shape": list(data.shape), "files": files}
