"""PNG plots of a training run (loss and recall curves) and of zero-shot results (confusion matrix)."""

from __future__ import annotations

import json
import os

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


RECALL_PANEL = {"val_i2t_r1": "image→text R@1", "val_t2i_r1": "text→image R@1",
                "val_i2t_r5": "image→text R@5", "val_t2i_r5": "text→image R@5"}


def plot_curves(metrics_path, out_path, *, loss_label: str = "InfoNCE loss", panel: dict | None = None,
                panel_title: str = "validation retrieval", panel_ylabel: str = "recall", panel_ylim=(0, 1.02)) -> str:
    """Train and val loss (left) and validation metrics (right) against steps.  `panel` maps
    metric key -> label (default: ShareLock's val recall@1/5 both ways)."""
    plt = _pyplot()
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [r for r in records if "val_loss" in r]
    fig, (ax_loss, ax_panel) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax_loss.plot(*zip(*train), label="train", lw=1, alpha=0.8)
    if val:
        ax_loss.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val", ms=3)
    ax_loss.set(xlabel="step", ylabel=loss_label, title="loss")
    ax_loss.legend()
    for key, label in (panel or RECALL_PANEL).items():
        pts = [(r["step"], r[key]) for r in val if r.get(key) is not None]
        if pts:
            ax_panel.plot(*zip(*pts), "s--" if key.endswith("_r5") else "o-", ms=3, label=label)
    ax_panel.set(xlabel="step", ylabel=panel_ylabel, title=panel_title, ylim=panel_ylim)
    ax_panel.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return str(out_path)


def plot_confusion(matrix, class_names, out_path, title: str = "zero-shot confusion") -> str:
    """Row-normalized confusion matrix (true class rows, predicted class columns)."""
    plt = _pyplot()
    m = np.asarray(matrix, dtype=np.float64)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    n = len(class_names)
    size = max(4.0, min(16.0, 0.35 * n + 2))
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=max(5, 10 - n // 10))
    ax.set_yticks(range(n), class_names, fontsize=max(5, 10 - n // 10))
    ax.set(xlabel="predicted", ylabel="true", title=title)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return str(out_path)
