"""Evaluate a trained ShareLock head on a store with CLIP_benchmark's protocol.

    result = evaluate("run/", "imagenet.zarr", classes="imagenet1k")

Zero-shot classification is CLIP_benchmark's ``zeroshot_classification`` (the protocol behind
ShareLock's published numbers): class names (a built-in curated list such as ``imagenet1k``, a
file, or the store's ``samples/<label_field>`` names) × templates (by default the class list's
CLIP_benchmark templates: the 80 OpenAI ImageNet templates unless the list has its own) → prompt
features by the checkpoint's own text backbone (cached in the store, see prompts.py) → language
head → per class the mean of the normalized prompt embeddings, renormalized → logits
``100 · normalize(image embedding) · classifier`` → ``acc1``, ``acc5`` and
``mean_per_class_recall`` over **every labelled row** of the store (``split=True``: only the rows
the checkpoint's training run held out).

Retrieval is CLIP_benchmark's ``zeroshot_retrieval`` with its names: each image's captions are its
rows in one or more text feature sets (the checkpoint's, e.g. several caption sets);
``image_retrieval_recall@k`` is text → image, ``text_retrieval_recall@k`` image → text (a hit when
any of the image's captions is in the top k), k = 1, 5, 10.

Feature sets whose identity differs from the ones the checkpoint was trained on are refused.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from featstore.core import format as fmt
from featstore.errors import CheckpointError, ConfigError
from featstore.store import Store

from featstore.trainers import checkpoint, prompts
from featstore.trainers.backbone_link import NOT_POOLED
from featstore.device import resolve_device
from featstore.trainers.retrieval import embed, gallery
from featstore.trainers.sharelock.heldout import heldout_rows
from featstore.trainers.sharelock.model import load_checkpoint


def evaluate(
    checkpoint_dir,
    store_path,
    *,
    classes=None,
    label_field: str | None = None,
    templates=None,
    split: bool = False,
    all_rows: bool | None = None,
    device: str = "cpu",
    batch_size: int = 4096,
    plot_path=None,
    which: str = "best",
    image: str | None = None,
    text=None,
    text_encoder=None,
) -> dict:
    """Returns a JSON-able dict: {"checkpoint", "step", "store", "split", "image", "text", "texts",
    "zero_shot": {...} | None, "retrieval": {...} | None, "notes": [...]}.

    `classes`: a built-in list name (`prompts.class_lists()`), a file, or None for the store's label
    names.  `label_field`: the sample field holding class indices; None: `label` when the store
    has one (zero-shot is skipped with a note otherwise), a name given must exist.  `templates`: a built-in set name, a file, a list, or None for the class list's own.
    `split`: evaluate only the held-out rows of the run (`all_rows=True` is the default, kept for
    old callers).  `image`/`text` name the store's feature sets when they differ from the names
    trained on (same identities required; `text` may be several, comma-separated or a list);
    `text_encoder` replaces the recorded text backbone (tests)."""
    if split and all_rows:
        raise ConfigError("pass either --split (the held-out rows) or --all (every row, the default), not both")
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint_dir, which=which)
    model = ckpt.model.to(dev).eval()
    trained = ckpt.state["feature_sets"]
    if trained["image"].get("identity") is None or trained["text"].get("identity") is None:
        raise CheckpointError(f"checkpoint {ckpt.path} records no feature-set identities (imported without a store): "
                              "re-run `featstore import-sharelock CKPT --out DIR --store S --image NAME --text NAME`")
    store = Store.open(store_path)
    image_name = image or trained["image"]["name"]
    checkpoint.check_identity(trained["image"], checkpoint.describe(store, image_name), ckpt.path, store.path)
    text_names, notes = _text_sets(store, ckpt, text)

    if split:
        record = ckpt.state.get("heldout", {"kind": "fraction", "val_fraction": ckpt.config.val_fraction})
        if record is None:
            raise ConfigError(f"checkpoint {ckpt.path} was not trained by featstore: its held-out rows are unknown, "
                              "so --split cannot be evaluated (evaluate every row of a test store instead)")
        rows = heldout_rows(store, record)
    else:
        rows = np.ones(store.n_rows, bool)
    result = {"checkpoint": ckpt.path, "step": ckpt.step, "store": store.path, "split": "val" if split else "all",
              "image": image_name, "text": trained["text"]["name"], "texts": text_names, "zero_shot": None,
              "retrieval": None, "notes": notes}
    image_path = f"{fmt.FEATURES}/{image_name}/pooled"

    # ---- zero-shot classification -------------------------------------------------------------
    label_field = prompts.label_field_of(store, label_field, classes)
    names, source = _class_names(store, classes, label_field, result["notes"])
    if names is not None:
        tpl_name = templates if templates is not None else _default_templates(classes, names)
        tpls = prompts.load_templates(tpl_name)
        labels = store.samples(label_field)
        if labels.max(initial=-1) >= len(names):
            raise ConfigError(f"samples/{label_field} has label {labels.max()} but only {len(names)} class names are given")
        per_class = prompts.class_prompts(names, tpls)
        feats = prompts.prompt_features(store.path, trained["text"], [p for ps in per_class for p in ps], device,
                                        encoder=text_encoder, notes=result["notes"])
        classifier = zero_shot_classifier(model, feats.view(len(names), len(tpls), -1), dev)
        z_image, row = embed(store, image_path, model.encode_image, rows & (labels >= 0), dev, batch_size, model.embed_dim)
        if len(row):
            logits = 100.0 * F.normalize(z_image, dim=-1) @ classifier
            zs = zero_shot_metrics(logits, labels[row], names, plot_path)
            zs.update(class_names=source, templates=tpl_name if isinstance(tpl_name, str) else "custom",
                      n_templates=len(tpls))
            result["zero_shot"] = zs
        else:
            result["notes"].append("no labelled rows with image features in the evaluated rows")

    # ---- retrieval ----------------------------------------------------------------------------
    if text_names:
        result["retrieval"] = gallery(store, model, image_path, text_names, rows, dev, batch_size, result["notes"])
    return result


# ---- zero-shot ------------------------------------------------------------------------------
@torch.no_grad()
def zero_shot_classifier(model, prompt_features: torch.Tensor, dev) -> torch.Tensor:
    """(D, classes): per class, the mean of its normalized prompt embeddings, renormalized
    (CLIP_benchmark's `zero_shot_classifier`, one class's prompts per forward as there).
    `prompt_features` is (classes, templates, text dim)."""
    columns = []
    for feats in prompt_features:
        emb = F.normalize(model.encode_text(feats.to(dev).float()).float(), dim=-1).mean(0)
        columns.append(emb / emb.norm())
    return torch.stack(columns, dim=1).cpu()


def zero_shot_metrics(logits: torch.Tensor, labels: np.ndarray, names: list[str], plot_path=None) -> dict:
    """CLIP_benchmark's metrics of (rows, classes) logits: `acc1`, `acc5` (nan under 5 classes),
    `mean_per_class_recall` (balanced accuracy over the classes present); plus `top1`/`top5`
    (top-min(5, classes)), the confusion matrix (up to 50 classes) and per-class top-1."""
    out = _zero_shot(logits, labels, names, plot_path)
    truth = torch.as_tensor(labels.astype(np.int64))
    k = min(5, len(names))
    top = logits.topk(k, 1, True, True)[1].t()
    correct = top.eq(truth.view(1, -1).expand_as(top))
    out["acc1"] = float(correct[:1].reshape(-1).float().sum()) / len(truth)
    out["acc5"] = float(correct[:5].reshape(-1).float().sum()) / len(truth) if len(names) >= 5 else float("nan")
    out["mean_per_class_recall"] = float(np.mean(list(out["per_class_top1"].values())))
    return out


def _zero_shot(logits: torch.Tensor, labels: np.ndarray, names: list[str], plot_path) -> dict:
    k = min(5, len(names))
    top = logits.topk(k, dim=1).indices.numpy()
    truth = labels.astype(np.int64)
    pred = logits.argmax(1).numpy()
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
            from featstore.trainers.plots import plot_confusion

            out["confusion_png"] = plot_confusion(confusion, names, plot_path,
                                                  title=f"zero-shot top-1 {out['top1']:.1%} ({len(truth)} images)")
        else:
            out["confusion_png"] = None  # unreadable beyond 50 classes
    if len(names) <= 50:
        out["confusion"] = confusion.tolist()
    return out


def _class_names(store: Store, classes, label_field: str, notes: list) -> tuple[list[str] | None, str | None]:
    if label_field not in store.sample_fields():
        notes.append(f"no samples/{label_field} in the store: zero-shot skipped")
        return None, None
    if classes is None and not store.array(f"{fmt.SAMPLES}/{label_field}").attrs.get("names"):
        notes.append(f"samples/{label_field} has no class names: pass --classes "
                     f"{'|'.join(prompts.class_lists())} or FILE for zero-shot")
        return None, None
    names = prompts.read_class_names(store, classes, label_field)
    if classes is not None and str(classes) in prompts.class_lists():
        return names, str(classes)
    if classes is not None:
        return names, f"file:{classes}"
    match = prompts.builtin_match(names)
    source = f"samples/{label_field}" + (f" (= {match})" if match else "")
    if not match and len(names) in {len(prompts.classnames(n)) for n in prompts.class_lists()}:
        notes.append(f"class names are the store's own samples/{label_field} names; CLIP_benchmark's protocol uses "
                     f"curated ones: pass --classes {'|'.join(prompts.class_lists())} if this is one of those datasets")
    return names, source


def _default_templates(classes, names: list[str]) -> str:
    """CLIP_benchmark's choice: the dataset's own templates, else the 80 ImageNet ones."""
    dataset = str(classes) if classes is not None and str(classes) in prompts.class_lists() else prompts.builtin_match(names)
    return dataset if dataset in prompts.template_sets() else "imagenet1k"


# ---- retrieval ------------------------------------------------------------------------------
def _text_sets(store: Store, ckpt, text) -> tuple[list[str], list[str]]:
    """The text feature sets to take captions from (checked against the training identities)."""
    trained = ckpt.state["feature_sets"]
    recorded = {t["name"]: t for t in trained.get("texts") or [trained["text"]]}
    notes = []
    if text is None:
        names = [n for n in recorded if n in store.feature_set_names()]
        if not names:
            notes.append(f"the store has none of the text feature sets trained on ({', '.join(recorded)}): retrieval skipped")
    else:
        names = [t for t in (text.split(",") if isinstance(text, str) else text) if t]
    for name in names:
        current = checkpoint.describe(store, name)
        want = recorded.get(name, trained["text"])
        # a renamed or other caption set: the same text backbone is what matters
        checkpoint.check_identity(want, current, ckpt.path, store.path, ignore=() if name in recorded else NOT_POOLED)
    return names, notes
