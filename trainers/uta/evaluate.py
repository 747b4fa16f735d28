"""Evaluate a UTA student on a store: token alignment, CLS alignment, zero-shot side by side.

    result = evaluate_uta("run/", "s.zarr", templates="openai")    # also: featstore eval --checkpoint run/ --store s.zarr

On the held-out rows (the uid-hash split the run held out; every row with `all_rows`):

* `loss`: the training objective (tokens + cls_weight * CLS, masked and reversed as configured)
  with fixed validation masks; `token_loss` and `cls_loss` its parts;
* `token_cos`: mean cosine of the student's tokens (whole image, every position) to the teacher's
  tokens on the student's grid; `token_cos_p05`: its 5th percentile over images;
* `cls_cosine`: cosine of the student's image embedding, head(norm(x)[:, 0]) (its CLS, as UTA's
  released model), to the teacher's pooled embedding `features/<teacher>/pooled`;
  `token_mean_cos`: the same for the mean of the student's head tokens;
* zero-shot: class names x templates -> prompt features -> top-1/5 of four image embeddings side
  by side: the student's CLS, the mean of the student's head tokens, the teacher's pooled
  embedding ("teacher CLS": CLIP's image_embeds) and the mean of the teacher's stored patch tokens.
  The prompts are encoded by the teacher's own text tower (the other tower of its two-tower
  CLIP/SigLIP checkpoint, `teacher.text_tower`) unless `text` (or the run's zero_shot_text)
  names a text feature set or prompt cache of the store; they are cached under `prompts/<name>/`
  and never encoded during training.  An embedding whose width differs from the text side's (raw
  `--layer K` tokens, say) is skipped with a note.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from featstore.core import format as fmt
from featstore.errors import BackboneError, ConfigError
from featstore.loader import Loader
from featstore.split import split_by_uid
from featstore.store import Store

from featstore.trainers import checkpoint, prompts
from featstore.device import resolve_device
from featstore.trainers.uta.batch import batch_pooled, loader_columns, on_device, prepare_batch
from featstore.trainers.uta.checkpoint_format import load_checkpoint
from featstore.trainers.uta.config import mask_options
from featstore.trainers.uta.loss import alignment_losses
from featstore.trainers.uta.masks import draw_masks, step_generator
from featstore.trainers.uta.student import UTAStudent
from featstore.trainers.uta.teacher import text_side_name, text_tower

EMBEDDINGS = {"student_cls": "student CLS", "student_token_mean": "student token mean",
              "teacher_cls": "teacher CLS (pooled)", "teacher_patch_mean": "teacher patch mean"}


@torch.no_grad()
def token_metrics(model: UTAStudent, loader: Loader, cfg, dev, autocast=None) -> dict:
    """Alignment metrics (val_*) over every row `loader` serves (columns input, target, pooled).
    Also returns, under "_embeddings", the L2-normalized image embeddings of EMBEDDINGS and their
    store rows (for zero-shot)."""
    autocast = autocast or contextlib.nullcontext()
    was_training = model.training
    model.eval()
    loader.set_epoch(0)
    sums = {"loss": 0.0, "token": 0.0, "cls": 0.0}
    n_images, per_image, cls_cos, mean_cos = 0, [], [], []
    z = {k: [] for k in EMBEDDINGS}
    rows = []
    for i, batch in enumerate(loader):
        x, t = prepare_batch(batch, model.arch, None, dev)
        pooled = batch_pooled(batch, dev)
        masks = draw_masks(len(x), model.n_tokens, cfg.mask_ratio, step_generator(cfg.seed, i, stream=1),
                           cfg.reversed_masking, **mask_options(cfg))
        with autocast:
            parts = alignment_losses(model, x, t, masks, pooled)
            tokens, cls = model.features(x)
        tokens, cls = tokens.float(), cls.float()
        loss = parts["token"] + cfg.cls_weight * parts["cls"] if cfg.cls_weight > 0 else parts["token"]
        sums["loss"] += float(loss) * len(x)
        sums["token"] += float(parts["token"]) * len(x)
        sums["cls"] += float(parts["cls"]) * len(x)
        n_images += len(x)
        per_image.append(F.cosine_similarity(tokens, t, dim=-1).mean(1).cpu())
        z["student_cls"].append(F.normalize(cls, dim=-1).cpu())
        z["student_token_mean"].append(F.normalize(tokens.mean(1), dim=-1).cpu())
        teacher = F.normalize(pooled, dim=-1).cpu()
        z["teacher_cls"].append(teacher)
        z["teacher_patch_mean"].append(F.normalize(on_device(batch, "target", dev).float().mean(1), dim=-1).cpu())
        cls_cos.append((z["student_cls"][-1] * teacher).sum(-1))  # the CLS head's width is the pooled one
        mean_cos.append((z["student_token_mean"][-1] * teacher).sum(-1) if tokens.shape[-1] == teacher.shape[-1] else None)
        rows.append(batch["row"].numpy())
    if was_training:
        model.train()
    if not n_images:
        raise ConfigError("no held-out rows to validate on: raise val_fraction")
    per_image = torch.cat(per_image)
    out = {"val_loss": sums["loss"] / n_images, "val_token_loss": sums["token"] / n_images,
           "val_cls_loss": sums["cls"] / n_images, "val_cls_cosine": float(torch.cat(cls_cos).mean()),
           "val_token_cos": float(per_image.mean()), "val_token_cos_p05": float(torch.quantile(per_image, 0.05)),
           "val_rows": n_images}
    if all(c is not None for c in mean_cos):
        out["val_token_mean_cos"] = float(torch.cat(mean_cos).mean())
    out["_embeddings"] = {**{k: torch.cat(v) for k, v in z.items()}, "rows": np.concatenate(rows)}
    return out


# ---- the text side ---------------------------------------------------------------------------------
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
                          f"`featstore extract --field caption --backbone clip-text-b16 --name {name}`, "
                          "or run `featstore eval` on the run once to cache the teacher's prompts") from None
    return {"name": name, "identity": dict(group.attrs.get("identity") or {}), "dtype": str(group["pooled"].dtype),
            "dim": int(group["pooled"].shape[1])}


def resolve_text_side(store: Store, teacher: dict, name: str | None, device="cpu", encoder=None):
    """(text set {"name", "identity", "dtype"}, encoder or None, where it comes from).  Default:
    the teacher's own text tower, cached as `prompts/<teacher>.text`; else the named text side."""
    own = text_side_name(teacher["name"])
    if name is not None and name != own:
        return text_set(store, name), encoder, "text side"
    tower = encoder or text_tower(teacher, device)
    return {"name": own, "identity": tower.identity, "dtype": "float32"}, tower, "the teacher's text tower"


def class_embeddings(store: Store, text: dict, names: list[str], templates, device="cpu", *, encoder=None,
                     cached_only: bool = False, notes: list | None = None) -> tuple[torch.Tensor | None, str | None]:
    """(C, D) L2-normalized class embeddings (mean of each class's normalized prompt features), or
    (None, why) when `cached_only` and some prompt is not cached yet."""
    tpls = prompts.load_templates(templates)
    texts = [p for ps in prompts.class_prompts(names, tpls) for p in ps]
    if cached_only:
        cached = prompts.cached(store, text)
        missing = sum(t not in cached for t in set(texts))
        if missing:
            return None, (f"{missing} of {len(set(texts))} prompts are not cached under prompts/{text['name']}: "
                          "run `featstore eval` on the run once to encode them")
        feats = torch.from_numpy(np.stack([np.asarray(cached[t], dtype=np.float32) for t in texts]))
    else:
        feats = prompts.prompt_features(store.path, text, texts, device, encoder=encoder, notes=notes)
    feats = F.normalize(feats.float(), dim=-1).view(len(names), len(tpls), -1)
    return F.normalize(feats.mean(1), dim=-1), None


def zero_shot_metrics(store: Store, embeddings: dict, text: dict, templates, label_field: str = fmt.LABEL, *,
                      classes_file=None, device="cpu", encoder=None, cached_only=False,
                      plot_path=None) -> tuple[dict | None, list[str]]:
    """Zero-shot top-1/5 of each image embedding of `token_metrics` against the class embeddings of
    the text side `text`; (None, notes) when something needed is missing."""
    if label_field not in store.sample_fields():
        return None, [f"no samples/{label_field} in the store: zero-shot skipped"]
    if classes_file is None and not store.array(f"{fmt.SAMPLES}/{label_field}").attrs.get("names"):
        return None, [f"samples/{label_field} has no class names: pass a classes file for zero-shot"]
    names = prompts.read_class_names(store, classes_file, label_field)
    notes = []
    classifier, why = class_embeddings(store, text, names, templates, device, encoder=encoder, cached_only=cached_only,
                                       notes=notes)
    if classifier is None:
        return None, [why]
    labels = store.samples(label_field)[embeddings["rows"]]
    if labels.max(initial=-1) >= len(names):
        raise ConfigError(f"samples/{label_field} has label {labels.max()} but only {len(names)} class names are given")
    keep = labels >= 0
    if not keep.any():
        return None, ["no labelled rows among the evaluated ones: zero-shot skipped"]
    truth = torch.from_numpy(labels[keep].astype(np.int64))
    out = {"rows": int(keep.sum()), "classes": len(names), "chance": 1.0 / len(names), "text": text["name"],
                      "templates": templates if isinstance(templates, str) else "custom",
                      "n_templates": len(prompts.load_templates(templates))}
    for key, label in EMBEDDINGS.items():
        z = embeddings[key][torch.from_numpy(keep)]
        if z.shape[1] != classifier.shape[1]:
            out[key] = None
            notes.append(f"{label} is {z.shape[1]}-d but the text side '{text['name']}' is {classifier.shape[1]}-d: "
                         "not one joint space, skipped")
            continue
        out[key] = _accuracy(z @ classifier.T, truth)
        if key == "student_cls" and plot_path is not None:
            out["confusion_png"] = _confusion_plot(z @ classifier.T, truth, names, plot_path, out[key]["top1"])
    return out, notes


def _accuracy(logits: torch.Tensor, truth: torch.Tensor) -> dict:
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {"top1": float((top[:, 0] == truth).float().mean()), "top5": float((top == truth[:, None]).any(1).float().mean())}


def _confusion_plot(logits, truth, names, path, top1) -> str | None:
    if len(names) > 50:
        return None  # unreadable beyond 50 classes
    from featstore.trainers.plots import plot_confusion

    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    np.add.at(confusion, (truth.numpy(), logits.argmax(1).numpy()), 1)
    return plot_confusion(confusion, names, path, title=f"UTA student CLS zero-shot top-1 {top1:.1%} ({len(truth)} images)")


# ---- the whole evaluation ---------------------------------------------------------------------------
def evaluate_uta(
    checkpoint_dir,
    store_path,
    *,
    which: str = "best",
    all_rows: bool = False,
    text: str | None = None,
    templates=None,
    classes_file=None,
    label_field: str | None = None,
    device: str = "cpu",
    batch_size: int = 256,
    max_rows: int | None = None,
    plot_path=None,
    text_encoder=None,
) -> dict:
    """Evaluate a UTA checkpoint (a train-uta --out directory, `best` by default) on a store whose
    teacher/input feature sets have the identities it was trained on.  `text` names a text side of
    the store (default: the run's zero_shot_text, else the teacher's own text tower);
    `text_encoder` replaces the text backbone (tests)."""
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
    columns, dequantize = loader_columns(input_col, teacher["name"], int8_on_device=False, store=store, pooled=True)
    metrics = token_metrics(model, Loader(store, columns, batch_size, shuffle=False, rows=rows, dequantize=dequantize,
                                           view=0, rank=0, world_size=1), cfg, dev)  # stored views: the centre crop
    embeddings = metrics.pop("_embeddings")
    result = {"checkpoint": ckpt.path, "step": ckpt.step, "store": store.path, "split": "all" if all_rows else "val",
              "teacher": teacher["name"], "input": inp["name"], "rows": metrics.pop("val_rows"),
              **{k[len("val_"):]: v for k, v in metrics.items()}, "zero_shot": None, "notes": []}
    asked = text or cfg.zero_shot_text
    label_field = prompts.label_field_of(store, label_field, classes_file)
    if label_field not in store.sample_fields():
        result["notes"].append(f"no samples/{label_field} in the store: zero-shot skipped")
        return result
    try:
        text_side, encoder, source = resolve_text_side(store, teacher, asked, device, text_encoder)
    except BackboneError as e:
        if asked:
            raise
        result["notes"].append(f"zero-shot skipped: {e}")
        return result
    zs, notes = zero_shot_metrics(store, embeddings, text_side, templates or cfg.zero_shot_templates, label_field,
                                  classes_file=classes_file, device=device, encoder=encoder, plot_path=plot_path)
    if zs is not None:
        zs["text_source"] = source
    result["zero_shot"], result["notes"] = zs, notes
    if source == "text side":
        _note_other_model(result["notes"], teacher, text_side)
    return result


def _note_other_model(notes: list, teacher: dict, text: dict) -> None:
    a = teacher.get("identity", {}).get("model")
    b = text.get("identity", {}).get("model")
    if a and b and a != b:
        notes.append(f"the text side '{text['name']}' comes from {b}, the teacher from {a}: zero-shot assumes one joint space")


def format_result(r: dict) -> str:
    """`featstore eval`'s text for a UTA run: alignment, then zero-shot of the four embeddings side by side."""
    lines = [f"UTA checkpoint {r['checkpoint']} (step {r['step']}) on {r['store']} [{r['split']}, {r['rows']:,} rows]: "
             f"teacher {r['teacher']}, input {r['input']}",
             f"  alignment: loss {r['loss']:.4f} (tokens {r['token_loss']:.4f}, CLS {r['cls_loss']:.4f}); token cosine "
             f"{r['token_cos']:.4f} (5th pct image {r['token_cos_p05']:.4f}); CLS cosine to the teacher's pooled "
             f"{r['cls_cosine']:.4f}"]
    zs = r.get("zero_shot")
    if zs:
        lines.append(f"  zero-shot over {zs['classes']} classes on {zs['rows']:,} rows ({zs['n_templates']} templates, "
                     f"prompts by {zs['text_source']} '{zs['text']}'):")
        lines.append(f"    {'':<24}{'top-1':>8}{'top-5':>8}")
        for key, label in EMBEDDINGS.items():
            acc = zs.get(key)
            lines.append(f"    {label:<24}" + (f"{100 * acc['top1']:>7.1f}%{100 * acc['top5']:>7.1f}%" if acc else f"{'-':>8}{'-':>8}"))
        lines.append(f"    {'chance':<24}{100 * zs['chance']:>7.1f}%")
        if zs.get("confusion_png"):
            lines.append(f"  confusion matrix (student CLS): {zs['confusion_png']}")
    lines += [f"  note: {n}" for n in r.get("notes", [])]
    return "\n".join(lines)
