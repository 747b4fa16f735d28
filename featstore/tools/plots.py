"""A feature set's summary plots, drawn from a sample of whole row blocks (`featstore inspect --plots`).

    <store>/plots/<feature set>/norms.png  histogram of the pooled features' L2 norms (every stored view)
                                pca.png    the sample's first two principal components (unit vectors),
                                           coloured by source (several sources) or label (labelled rows)
                                dims.png   per-dimension mean and standard deviation, each sorted:
                                           dead or collapsed dimensions show at one end

The sample is at most `max_rows` usable rows (done and valid) from the row blocks with done rows
(the block summary), taken in a seeded random order, each block read whole (one slice), until the sample is full: O(sample) reading,
never the column, whatever the store's size.  `featstore serve` lists these PNGs beside the
feature set.  Written to a temp name and renamed, so a reader never sees half a PNG.
"""

from __future__ import annotations

import os

import numpy as np

from featstore.core import format as fmt
from featstore.read.served import usable_in_block

PLOTS = "plots"
MAX_ROWS = 5000


def sample_rows(store, name: str, max_rows: int = MAX_ROWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(store rows, pooled float32 of shape (rows, views, dim)) of at most `max_rows` usable rows."""
    fs = store.feature_set(name)
    pooled = fs.array("pooled")
    rows, parts, have = [], [], 0
    done = np.flatnonzero(fs.done_summary()[0] > 0)  # blocks with done rows, from the block summary
    for b in np.random.default_rng(seed).permutation(done).tolist():
        mask = usable_in_block(store, [name], b)
        if not mask.any():
            continue
        start, stop = store.block_range(b)
        x = np.asarray(pooled[start:stop]).astype(np.float32)[mask]
        take = min(len(x), max_rows - have)
        rows.append(start + np.flatnonzero(mask)[:take])
        parts.append(x[:take].reshape(take, fs.views, -1))
        have += take
        if have >= max_rows:
            break
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, fs.views, int(pooled.shape[-1])), np.float32)
    order = np.argsort(np.concatenate(rows), kind="stable")
    return np.concatenate(rows)[order], np.concatenate(parts)[order]


def _colours(store, rows: np.ndarray) -> tuple[np.ndarray | None, str]:
    """A per-row colour key: the source when rows come from several, else the label, else none."""
    fields = store.sample_fields()
    if len(store.sources) > 1 and fmt.SOURCE in fields:
        return np.asarray(store.samples_at(fmt.SOURCE, rows)), "source"
    if fmt.LABEL in fields:
        labels = np.asarray(store.samples_at(fmt.LABEL, rows))
        if (labels >= 0).any():
            return labels, "label"
    return None, ""


def _save(fig, path: str) -> str:
    tmp = f"{path}.tmp-{os.getpid()}"  # not *.png: serve never lists a half-written plot
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)
    return path


def write_plots(store, name: str, max_rows: int = MAX_ROWS, seed: int = 0) -> dict:
    """Draw the three plots of feature set `name` into <store>/plots/<name>/; returns
    {"feature_set", "rows" (in the sample), "files": [paths]}.  A set with no usable rows gets none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, x = sample_rows(store, name, max_rows, seed)
    out = {"feature_set": name, "rows": int(len(rows)), "files": []}
    if not len(rows):
        return out
    folder = os.path.join(store.path, PLOTS, name)
    os.makedirs(folder, exist_ok=True)
    views = f", {x.shape[1]} views" if x.shape[1] > 1 else ""

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.hist(np.linalg.norm(x, axis=-1).reshape(-1), bins=50, color="tab:blue")
    ax.set(title=f"{name}: ‖pooled‖ (n={len(rows):,}{views})", xlabel="L2 norm", ylabel="rows")
    fig.tight_layout()
    out["files"].append(_save(fig, os.path.join(folder, "norms.png")))
    plt.close(fig)

    v = x[:, 0]
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    v = v - v.mean(0)
    _, s, vt = np.linalg.svd(v, full_matrices=False)
    xy = v @ vt[:2].T if len(vt) >= 2 else np.c_[v @ vt[:1].T, np.zeros(len(v))]
    explained = (s[:2] ** 2 / max(float((s ** 2).sum()), 1e-12)).tolist()
    key, what = _colours(store, rows)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ax.scatter(xy[:, 0], xy[:, 1], s=4, c=key, cmap="tab10" if key is not None else None, alpha=0.6)
    ax.set(title=f"{name}: PCA of unit pooled vectors" + (f" (colour: {what})" if what else ""),
           xlabel=f"PC1 ({100 * explained[0]:.1f}%)", ylabel=f"PC2 ({100 * explained[-1]:.1f}%)")
    fig.tight_layout()
    out["files"].append(_save(fig, os.path.join(folder, "pca.png")))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(np.sort(x[:, 0].mean(0)), label="mean", color="tab:blue")
    ax.plot(np.sort(x[:, 0].std(0)), label="std", color="tab:orange")
    ax.set(title=f"{name}: per-dimension statistics ({x.shape[-1]} dims, sorted)", xlabel="dimension (sorted)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out["files"].append(_save(fig, os.path.join(folder, "dims.png")))
    plt.close(fig)
    return out
