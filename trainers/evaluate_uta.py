"""Evaluate a UTA student on a store: token alignment, image-embedding alignment, zero-shot.

    result = evaluate_uta("run/", "s.zarr", text="clip-text", templates="openai")

On the held-out rows (the uid-hash split the run held out; every row with `all_rows`):

* `loss`: the training objective (masked, reversed as configured) with fixed validation masks;
* `token_cos`: mean cosine of the student's tokens (unmasked input, every position) to the teacher's
  tokens on the student's grid; `token_cos_p05`: its 5th percentile over images (per-image means);
* `pooled_cos`: cosine of the student's image embedding (mean of its head tokens) to the teacher's
  stored image embedding `features/<teacher>/pooled`;
* zero-shot: class names x templates -> prompt features of the teacher's text side (the
  `prompts/<text>/` cache trainers/prompts.py keeps; missing prompts are encoded by the text
  backbone here, never during training) -> top-1/5 of the student's embedding, beside the teacher's
  own embedding as the reference.  Meaningful when the teacher tokens live in the joint image-text
  space (CLIP's default: post_layernorm -> visual_projection).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from featstore import format as fmt
from featstore.errors import ConfigError
from featstore.loader import Loader
from featstore.split import split_by_uid
from featstore.store import Store

from . import checkpoint, prompts
from .config import resolve_device
from .evaluate import _zero_shot
from .uta import UTAStudent, alignment_loss, draw_masks, load_checkpoint, prepare_batch, step_generator


@torch.no_grad()
def token_metrics(model: UTAStudent, loader: Loader, cfg, dev, autocast=None) -> dict:
    """Alignment metrics over every row `loader` serves (columns input, target and pooled).
    Returns the metrics and, under "_embeddings", the student's and teacher's L2-normalized image
    embeddings with their store rows (for zero-shot)."""
    import contextlib

    autocast = autocast or contextlib.nullcontext()
    was_training = model.training
    model.eval()
    loader.set_epoch(0)
    arch = model.arch
    loss_sum, n_images, per_image, pooled_cos = 0.0, 0, [], []
    z_student, z_teacher, rows = [], [], []
    for i, batch in enumerate(loader):
        x, t = prepare_batch(batch, arch, None, dev)
        masks = draw_masks(len(x), model.n_tokens, cfg.mask_ratio, step_generator(cfg.seed, i, stream=1),
                           cfg.reversed_masking)
        with autocast:
            loss = alignment_loss(model, x, t, masks)
            out = model(x).float()
        loss_sum += float(loss) * len(x)
        n_images += len(x)
        per_image.append(F.cosine_similarity(out, t, dim=-1).mean(1).cpu())
        z = F.normalize(out.mean(1), dim=-1).cpu()
        z_student.append(z)
        if "pooled" in batch:
            zt = F.normalize(batch["pooled"].float(), dim=-1)
            z_teacher.append(zt)
            pooled_cos.append((z * zt).sum(-1))
        rows.append(batch["row"].numpy())
    if was_training:
        model.train()
    if not n_images:
        raise ConfigError("no held-out rows to validate on: raise val_fraction")
    per_image = torch.cat(per_image)
    out = {"val_loss": loss_sum / n_images, "val_token_cos": float(per_image.mean()),
           "val_token_cos_p05": float(torch.quantile(per_image, 0.05)), "val_rows": n_images}
    if pooled_cos:
        out["val_pooled_cos"] = float(torch.cat(pooled_cos).mean())
    out["_embeddings"] = {"student": torch.cat(z_student), "teacher": torch.cat(z_teacher) if z_teacher else None,
                          "rows": np.concatenate(rows)}
    return out


def text_set(store: Store, name: str) -> dict:
    """{"name", "identity", "dtype", "dim"} of a text side: a text feature set of the store, or a
    `prompts/<name>/` cache alone."""
    if name in store.feature_set_names():
        return checkpoint.describe(store, name)
    try:
        group = store.root[f"{fmt.PROMPTS}/{name}"]
    except KeyError:
        raise ConfigError(f"the store has no text feature set or prompt cache '{name}' (features/{name} or "
                          f"prompts/{name}): extract the teacher's text tower over the captions, e.g. "
                          f"`featstore extract --field caption --backbone clip-text-b16 --name {name}`") from None
    return {"name": name, "identity": dict(group.attrs.get("identity") or {}), "dtype": str(group["pooled"].dtype),
            "dim": int(group["pooled"].shape[1])}


def class_embeddings(store: Store, text: dict, names: list[str], templates, device="cpu", *, encoder=None,
                     cached_only: bool = False) -> tuple[torch.Tensor | None, str | None]:
    """(C, D) L2-normalized class embeddings (mean of each class's normalized prompt features), or
    (None, why) when `cached_only` and some prompt is not cached yet."""
    tpls = prompts.load_templates(templates)
    texts = [p for ps in prompts.class_prompts(names, tpls) for p in ps]
    if cached_only:
        cached = prompts._read_cache(store, text["name"], text["identity"])
        missing = sum(t not in cached for t in set(texts))
        if missing:
            return None, (f"{missing} of {len(set(texts))} prompts are not cached under prompts/{text['name']}: "
                          "run evaluate_uta with this text side once to encode them")
        feats = torch.from_numpy(np.stack([np.asarray(cached[t], dtype=np.float32) for t in texts]))
    else:
        feats = prompts.prompt_features(store.path, text, texts, device, encoder=encoder)
    feats = F.normalize(feats.float(), dim=-1).view(len(names), len(tpls), -1)
    return F.normalize(feats.mean(1), dim=-1), None


def zero_shot_metrics(store: Store, embeddings: dict, text_name: str, templates, label_field: str = fmt.LABEL, *,
                      classes_file=None, device="cpu", encoder=None, cached_only=False,
                      plot_path=None) -> tuple[dict | None, list[str]]:
    """Zero-shot top-1/5 of the student's (and, as the reference, the teacher's) image embeddings
    from `token_metrics`; (None, notes) when something needed is missing."""
    notes = []
    if label_field not in store.sample_fields():
        return None, [f"no samples/{label_field} in the store: zero-shot skipped"]
    if classes_file is None and not store.array(f"{fmt.SAMPLES}/{label_field}").attrs.get("names"):
        return None, [f"samples/{label_field} has no class names: pass a classes file for zero-shot"]
    names = prompts.read_class_names(store, classes_file, label_field)
    text = text_set(store, text_name)
    dim = embeddings["student"].shape[1]
    if text["dim"] != dim:
        return None, [f"text side '{text_name}' is {text['dim']}-d but the teacher's tokens are {dim}-d: not one "
                      "joint space, zero-shot skipped"]
    classifier, why = class_embeddings(store, text, names, templates, device, encoder=encoder, cached_only=cached_only)
    if classifier is None:
        return None, [why]
    labels = store.samples(label_field)[embeddings["rows"]]
    if labels.max(initial=-1) >= len(names):
        raise ConfigError(f"samples/{label_field} has label {labels.max()} but only {len(names)} class names are given")
    keep = torch.from_numpy(labels >= 0)
    if not bool(keep.any()):
        return None, ["no labelled rows among the evaluated ones: zero-shot skipped"]
    out = _zero_shot(embeddings["student"][keep] @ classifier.T, labels[labels >= 0], names, plot_path)
    if embeddings.get("teacher") is not None:
        ref = _zero_shot(embeddings["teacher"][keep] @ classifier.T, labels[labels >= 0], names, None)
        out["teacher_top1"], out["teacher_top5"] = ref["top1"], ref["top5"]
    out.update(text=text_name, templates=templates if isinstance(templates, str) else "custom")
    return out, notes


def evaluate_uta(
    checkpoint_dir,
    store_path,
    *,
    which: str = "best",
    all_rows: bool = False,
    text: str | None = None,
    templates=None,
    classes_file=None,
    label_field: str = fmt.LABEL,
    device: str = "cpu",
    batch_size: int = 256,
    max_rows: int | None = None,
    plot_path=None,
    text_encoder=None,
) -> dict:
    """Evaluate a UTA checkpoint (a train-uta --out directory, `best` by default) on a store whose
    teacher/input feature sets have the identities it was trained on.  `text` names the teacher's
    text side (default: the run's zero_shot_text); `text_encoder` replaces its backbone (tests)."""
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint_dir, which=which)
    cfg, state = ckpt.config, ckpt.state
    model = ckpt.model.to(dev).eval()
    store = Store.open(store_path)
    teacher, inp = state["teacher"], state["input"]
    checkpoint.check_identity(teacher, checkpoint.describe(store, teacher["name"]), ckpt.path, store.path)
    if inp["kind"] == "tokens":
        checkpoint.check_identity(inp, checkpoint.describe(store, inp["name"]), ckpt.path, store.path)
        input_col = f"{fmt.FEATURES}/{inp['name']}/tokens"
    else:
        checkpoint.check_identity(inp, {"name": inp["name"], "identity": dict(store.pixels(inp["name"]).attrs["identity"])},
                                  ckpt.path, store.path)
        input_col = f"{fmt.PIXELS}/{inp['name']}"
    uids = store.uids()
    rows = np.ones(len(uids), bool) if all_rows else split_by_uid(uids, cfg.val_fraction)[1]
    if max_rows is not None:
        rows &= np.cumsum(rows) <= max_rows
    columns = {"input": input_col, "target": f"{fmt.FEATURES}/{teacher['name']}/tokens",
               "pooled": f"{fmt.FEATURES}/{teacher['name']}/pooled"}
    loader = Loader(store, columns, batch_size, shuffle=False, rows=rows)
    metrics = token_metrics(model, loader, cfg, dev)
    embeddings = metrics.pop("_embeddings")
    result = {"checkpoint": ckpt.path, "step": ckpt.step, "store": store.path, "split": "all" if all_rows else "val",
              "teacher": teacher["name"], "input": inp["name"], "rows": metrics.pop("val_rows"),
              **{k[len("val_"):]: v for k, v in metrics.items()}, "zero_shot": None, "notes": []}
    text = text or cfg.zero_shot_text
    if text:
        zs, notes = zero_shot_metrics(store, embeddings, text, templates or cfg.zero_shot_templates, label_field,
                                      classes_file=classes_file, device=device, encoder=text_encoder, plot_path=plot_path)
        result["zero_shot"], result["notes"] = zs, result["notes"] + notes
        _note_other_model(result["notes"], teacher, store, text)
    else:
        result["notes"].append("no text side given (text= or the run's zero_shot_text): zero-shot skipped")
    return result


def _note_other_model(notes: list, teacher: dict, store: Store, text_name: str) -> None:
    a = teacher.get("identity", {}).get("model")
    b = text_set(store, text_name).get("identity", {}).get("model")
    if a and b and a != b:
        notes.append(f"the text side '{text_name}' comes from {b}, the teacher from {a}: zero-shot assumes one joint space")
