"""Export one feature set's pooled features (or another of its arrays) for tools that want plain files.

`.npy`: an (n, D) array of the usable rows plus `<stem>.uids.txt` (one uid per line, same
order).  `.parquet`: columns `uid`, `row` and the array (a list of float32 per row).  int8
tokens are exported dequantized (float32) with their scales, per token or token x channel
(`featstore.tokens`), never as raw int8 that would read as wrong numbers.  A feature set with
K stored views exports (n, K, ...) (every view; parquet: a row's views one after the other), or
with `view=k` view k alone, (n, ...); its `view_crops` / `view_flips` export like any array.
"""

from __future__ import annotations

import os

import numpy as np

from featstore.errors import ConfigError
from featstore.store import Store
from featstore.tokens import dequantize_int8
from featstore.read.views import view_count


def export(store: Store, name: str, out: str, array: str = "pooled", view: int | None = None) -> dict:
    fs = store.feature_set(name)
    rows = np.flatnonzero(fs.usable_rows())
    int8 = array == "tokens" and fs.token_scaling is not None
    dtype = np.float32 if int8 else fs.array(array).dtype
    k = view_count(fs.array(array))
    if view is not None and not 0 <= int(view) < k:
        raise ConfigError(f"features/{name}/{array} holds {k} view(s) per row: --view {view} does not exist"
                          + (" (it has no stored views: omit --view)" if k == 1 else f" (0..{k - 1})"))

    def pick(x):  # one view of each row
        return x if view is None or k == 1 else x[:, int(view)]

    data = pick(np.zeros((0,) + fs.array(array).shape[1:], dtype=dtype))
    parts = []
    for b in np.unique(rows // store.rows_per_shard):  # whole blocks, then select
        start, stop = store.block_range(int(b))
        sel = rows[(rows >= start) & (rows < stop)] - start
        part = pick(np.asarray(fs.array(array)[start:stop])[sel])
        if int8:
            scale = pick(np.asarray(fs.array("tokens_scale")[start:stop])[sel])
            channel = (pick(np.asarray(fs.array("tokens_channel_scale")[start:stop])[sel])
                       if fs.token_scaling == "token_channel" else None)
            part = dequantize_int8(part, scale, np.float32, channel_scale=channel)
        parts.append(part)
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
    return {"feature_set": name, "rows": int(len(rows)), "shape": list(data.shape), "files": files,
            "view": None if view is None or k == 1 else int(view)}
