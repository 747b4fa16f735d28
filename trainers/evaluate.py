"""Evaluate a trained ShareLock head on a store: zero-shot classification and retrieval.

    result = evaluate("run/", "s.zarr", templates="openai", plot_path="run/confusion.png")

Zero-shot: class names (a file, or `samples/<label_field>` attrs "names") × templates → prompts →
text features by the checkpoint's own text backbone (cached in the store, see prompts.py) →
language head → per-class mean of the normalized embeddings, renormalized → top-1/top-5 of the
vision-head embeddings of the labelled held-out rows (the same uid-hash split training held out;
every row with `all_rows`).  Retrieval: recall@1/5/10 image→text and text→image among the
held-out rows that have both features.  Feature sets whose identity differs from the ones the
checkpoint was trained on are refused (IdentityMismatch).
"""

from __future__ import annotations

import numpy as np
import torch

from featstore import format as fmt
from featstore.errors import ConfigError
from featstore.loader import Loader
from featstore.split import split_by_uid
from featstore.store import Store

from . import checkpoint, prompts
from .config import resolve_device
from .contrastive import retrieval_recall


def evaluate(
    checkpoint_dir,
    store_path,
    *,
    classes_file=None,
    label_field: str = fmt.LABEL,
    templates="sharelock",
    all_rows: bool = False,
    device: str = "cpu",
    batch_size: int = 4096,
    plot_path=None,
    which: str = "best",
    image: str | None = None,
    text: str | None = None,
    text_encoder=None,
) -> dict:
    """Returns a JSON-able dict: {"checkpoint", "step", "store", "split", "image", "text",
    "zero_shot": {...} | None, "retrieval": {...} | None, "notes": [...]}.  `image`/`text` name the
    store's feature sets when they differ from the names trained on (same identities required);
    `text_encoder` replaces the recorded text backbone (tests)."""
    dev = resolve_device(device)
    ckpt = checkpoint.load(checkpoint_dir, which=which)
    model = ckpt.model.to(dev).eval()
    trained = ckpt.state["feature_sets"]
    store = Store.open(store_path)
    image_name, text_name = image or trained["image"]["name"], text or trained["text"]["name"]
    checkpoint.check_identity(trained["image"], checkpoint.describe(store, image_name), ckpt.path, store.path)
    has_text = text_name in store.feature_set_names()
    if has_text:
        checkpoint.check_identity(trained["text"], checkpoint.describe(store, text_name), ckpt.path, store.path)

    uids = store.uids()
    rows = np.ones(len(uids), bool) if all_rows else split_by_uid(uids, ckpt.config.val_fraction)[1]
    result = {"checkpoint": ckpt.path, "step": ckpt.step, "store": store.path, "split": "all" if all_rows else "val",
              "image": image_name, "text": text_name, "zero_shot": None, "retrieval": None, "notes": []}

    # ---- zero-shot classification -------------------------------------------------------------
    names = None
    if label_field in store.sample_fields():
        if classes_file is not None or store.array(f"{fmt.SAMPLES}/{label_field}").attrs.get("names"):
            names = prompts.read_class_names(store, classes_file, label_field)
        else:
            result["notes"].append(f"samples/{label_field} has no class names: pass --classes FILE for zero-shot")
    elif classes_file is not None:
        raise ConfigError(f"the store has no samples/{label_field} to score zero-shot against (--label-field?)")
    else:
        result["notes"].append(f"no samples/{label_field} in the store: zero-shot skipped")
    if names is not None:
        tpls = prompts.load_templates(templates)
        per_class = prompts.class_prompts(names, tpls)
        feats = prompts.prompt_features(store.path, trained["text"], [p for ps in per_class for p in ps], device,
                                        encoder=text_encoder)
        with torch.no_grad():
            emb = _encode(model.encode_text, feats, dev, batch_size).view(len(names), len(tpls), -1)
            classifier = torch.nn.functional.normalize(emb.mean(1), dim=-1)
        labels = store.samples(label_field)
        if labels.max(initial=-1) >= len(names):
            raise ConfigError(f"samples/{label_field} has label {labels.max()} but only {len(names)} class names are given")
        z_image, row = _embed_rows(store, {"image": f"{fmt.FEATURES}/{image_name}/pooled"}, rows & (labels >= 0),
                                   model, dev, batch_size)
        if len(row):
            result["zero_shot"] = _zero_shot(z_image["image"] @ classifier.T, labels[row], names, plot_path)
            result["zero_shot"].update(templates=templates if isinstance(templates, str) else "custom", n_templates=len(tpls))
        else:
            result["notes"].append("no labelled rows with image features in the evaluated split")

    # ---- retrieval ----------------------------------------------------------------------------
    if has_text:
        cols = {"image": f"{fmt.FEATURES}/{image_name}/pooled", "text": f"{fmt.FEATURES}/{text_name}/pooled"}
        z, row = _embed_rows(store, cols, rows, model, dev, batch_size)
        if len(row) >= 2:
            result["retrieval"] = {"rows": int(len(row)), **retrieval_recall(z["image"], z["text"], ks=(1, 5, 10))}
        else:
            result["notes"].append("fewer than 2 rows with both features in the evaluated split: retrieval skipped")
    else:
        result["notes"].append(f"the store has no feature set '{text_name}': retrieval skipped")
    return result


def _zero_shot(logits: torch.Tensor, labels: np.ndarray, names: list[str], plot_path) -> dict:
    k = min(5, len(names))
    top = logits.topk(k, dim=1).indices.numpy()
    truth = labels.astype(np.int64)
    pred = top[:, 0]
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(confusion, (truth, pred), 1)
    out = {
        "rows": int(len(truth)),
        "classes": len(names),
        "top1": float((pred == truth).mean()),
        "top5": float((top == truth[:, None]).any(1).mean()),  # top-min(5, classes)
        "chance": 1.0 / len(names),
        "per_class_top1": {n: float(confusion[i, i] / confusion[i].sum()) for i, n in enumerate(names) if confusion[i].sum()},
    }
    if plot_path is not None:
        if len(names) <= 50:
            from .plots import plot_confusion

            out["confusion_png"] = plot_confusion(confusion, names, plot_path,
                                                  title=f"zero-shot top-1 {out['top1']:.1%} ({len(truth)} images)")
        else:
            out["confusion_png"] = None  # unreadable beyond 50 classes
    if len(names) <= 50:
        out["confusion"] = confusion.tolist()
    return out


@torch.no_grad()
def _embed_rows(store: Store, columns: dict, rows: np.ndarray, model, dev, batch_size: int):
    """Embeddings of `rows` (in row order) for each column through its head, and the rows served
    (those valid in every column's feature set)."""
    heads = {"image": model.encode_image, "text": model.encode_text}
    loader = Loader(store, columns, batch_size, shuffle=False, rows=rows)
    out = {k: [] for k in columns}
    served = []
    for batch in loader:
        for k in columns:
            out[k].append(heads[k](batch[k].to(dev).float()).float().cpu())
        served.append(batch["row"].numpy())
    dim = getattr(model, "embed_dim", 0)
    return ({k: torch.cat(v) if v else torch.zeros(0, dim) for k, v in out.items()},
            np.concatenate(served) if served else np.zeros(0, np.int64))


@torch.no_grad()
def _encode(head, x: torch.Tensor, dev, batch_size: int) -> torch.Tensor:
    return torch.cat([head(x[i : i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)])
