"""Train a UTA student on a store's teacher tokens: read it top to bottom.

    summary = train_uta("s.zarr", teacher="clip-vit-b16", pixels="crops", out_dir="run/",
                        student="tiny", overrides=["steps=2000"])

Each step streams two row-aligned columns from the store — the uint8 crops `pixels/<name>` (or, in
light mode, another backbone's tokens) and the teacher's tokens `features/<teacher>/tokens` (int8
ones dequantized by the loader's thread on CPU, on the device on a GPU) — draws the step's masks,
and aligns the student's kept tokens with the teacher's (trainers/uta/loss.py).  No image is decoded and
no teacher runs in the step.  A teacher extracted with `--views K` serves one of its K stored views
per image per epoch (the same view in pixels, tokens and pooled; `trainers/uta/stored_views.py`), and
validation reads view 0, the centre crop.

Writes into `out_dir` (the train-head conventions, trainers/checkpoint.py's files):
    metrics.jsonl   one json per logged step: step, loss, lr, grad_norm; on validation steps also
                    on the held-out rows: val_loss (the objective, fixed masks), val_token_loss,
                    val_cls_loss, val_cls_cosine (the student's CLS embedding, whole image, vs the
                    teacher's pooled embedding), val_token_cos, val_token_cos_p05 and
                    val_token_mean_cos (the mean of the student's head tokens vs the teacher's
                    pooled); at the final validation also val_zero_shot_top1/5 and
                    val_teacher_zero_shot_top1 when the prompts of `zero_shot_text` are cached
    curves.png      train/val loss, val cosines against steps
    config.yaml     the resolved config
    last/, best/    checkpoints: model.safetensors, optimizer.safetensors (last), checkpoint.json
                    (config, architecture incl. both grids and the interpolation, step, loader
                    state, the teacher's and input's names + identities)

Validation runs at step 0, every `val_every` (at most steps/10) steps and at the end.  `resume=True`
continues `last` exactly: weights, AdamW state, RNG, the loader's (seed, epoch, offset); masks and
flips are a pure function of (seed, step), so a killed run ends with the same weights (on CPU).  As
in train-head (trainers/loop.py): a resumed run with other settings is refused, each difference on
its own line, and Ctrl-C saves `last` at the step in progress and says to re-run with --resume.
"""

from __future__ import annotations

import math
import os
import time
import warnings

import torch

from featstore.core import format as fmt
from featstore.errors import CheckpointError, ConfigError
from featstore.loader import Loader
from featstore.split import split_by_uid
from featstore.store import Store
from featstore.read.views import view_count

from featstore.trainers import checkpoint, loop
from featstore.trainers.config import apply, load_config
from featstore.trainers.ddp import Dist, setup
from featstore.trainers.uta.evaluate import text_set, token_metrics, zero_shot_metrics
from featstore.trainers.train_loader import train_loader as rank_train_loader, without_duplicates
from featstore.trainers.uta.arch import resolve_arch, same_crop
from featstore.trainers.uta.batch import batch_pooled, interpolate_grid, loader_columns, on_device, prepare_batch
from featstore.trainers.uta.checkpoint_format import FORMAT, load_checkpoint, VERSION
from featstore.trainers.uta.config import mask_options, UTAConfig
from featstore.trainers.uta.fresh_crops import check_fresh_crops, crop_batch, load_teacher, step_crops
from featstore.trainers.uta.loss import alignment_loss
from featstore.trainers.uta.masks import draw_masks, step_generator
from featstore.trainers.uta.student import UTAStudent
from featstore.trainers.uta.stored_views import ViewsRepeat, check_flips, crop_identity, views_note

CURVES_PANEL = {"val_token_cos": "token cosine (val)", "val_token_cos_p05": "token cosine, 5th pct image",
                "val_cls_cosine": "CLS embedding cosine to teacher pooled", "val_zero_shot_top1": "zero-shot top-1"}


def train_uta(
    store_path,
    teacher: str,
    pixels: str | None,
    out_dir,
    *,
    student: str | None = None,
    student_input: str | None = None,
    mask_ratio: float | None = None,
    steps: int | None = None,
    config: UTAConfig | None = None,
    config_file=None,
    overrides=(),
    device: str = "cpu",
    precision: str = "fp32",
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train (or, with `resume`, continue) a UTA student against `features/<teacher>/tokens`, from
    `pixels/<pixels>` or, with `student_input`, from `features/<student_input>/tokens` (light mode).
    Config: `config` (default UTAConfig()), then `config_file`, then `overrides` ("KEY=VALUE"), then
    the explicit `student`, `student_input`, `mask_ratio`, `steps` (None = leave as configured); on
    resume the checkpoint's config replaces `config`.  Returns a JSON-able summary."""
    t0 = time.time()
    out_dir = os.path.abspath(str(out_dir))
    loop.check_precision(precision)
    run = setup(device)  # DDP under torchrun (trainers/ddp.py), else one process
    dev = run.device

    # ---- config: defaults < checkpoint (on resume) < file < --set < explicit arguments ----------
    ckpt = checkpoint.resume_point(out_dir, resume, load_checkpoint)
    run.check_resume(ckpt)
    cfg = load_config(config_file, overrides, base=ckpt.config if ckpt else (config or UTAConfig()))
    explicit = {"student": student, "student_input": student_input, "mask_ratio": mask_ratio, "steps": steps}
    explicit = {k: v for k, v in explicit.items() if v is not None}
    if explicit:
        cfg = apply(cfg, explicit, "the arguments")

    # ---- data: teacher tokens + the student's input, same crop, the shared uid-hash split -----------
    store = Store.open(store_path)
    sources = describe_sources(store, teacher, pixels, cfg.student_input)
    notes: list[str] = []
    # the store by its id; by its path against a checkpoint that recorded none (saved before store ids)
    by_id = not ckpt or bool(ckpt.state.get("store_id"))
    settings = {"store": (store.meta.get("store_id") if by_id else None) or os.path.abspath(store.path), "teacher": teacher,
                "input": sources["input"]["name"], "precision": precision}
    if ckpt:
        for role in ("teacher", "input"):
            checkpoint.check_identity(ckpt.state[role], sources[role], ckpt.path, store.path)
        recorded = {"store": ckpt.state.get("store_id") or ckpt.state["store"], "teacher": ckpt.state["teacher"]["name"],
                        "input": ckpt.state["input"]["name"], "precision": ckpt.state.get("precision")}
        loop.check_resume(out_dir, ckpt.step, ckpt.config.to_dict(), cfg.to_dict(), recorded, settings, notes)
    tdesc, idesc = sources["teacher"], sources["input"]
    if cfg.student_input and pixels:
        notes.append(f"light mode: the student reads features/{cfg.student_input}/tokens; pixels '{pixels}' are not used")
    if cfg.zero_shot_text:
        text_set(store, cfg.zero_shot_text)  # a missing text side fails now, not after training
    arch = resolve_arch(cfg, teacher_tokens=tdesc["tokens"], pixels_shape=idesc.get("shape"),
                        pixels_identity=idesc.get("identity"), input_tokens=idesc.get("tokens"),
                        teacher_pooled_dim=tdesc["dim"])
    if ckpt and ckpt.state["arch"] != arch:
        raise CheckpointError(f"checkpoint {ckpt.path} was trained with another student architecture "
                              f"({ckpt.state['arch']}); resume with the same student settings")
    check_flips(cfg, tdesc)
    check_fresh_crops(cfg, teacher_views=store.feature_set(teacher).views, light_mode=bool(cfg.student_input))
    crop_teacher = load_teacher(tdesc, dev) if cfg.fresh_crops == "teacher" else None  # frozen, in the step
    if cfg.fresh_crops != "none":
        notes.append(f"fresh crops every step (scale {cfg.crop_scale_min}-1, flip 0.5): targets "
                     + ("from the teacher run on each crop (exact)" if crop_teacher else "resampled from the stored grid (approximate)"))
    train_mask, val_mask = split_by_uid(store.uids(), cfg.val_fraction)
    val_mask &= (val_mask.cumsum() <= cfg.val_max_rows)
    columns, dequantize = loader_columns(idesc["column"], teacher, int8_on_device=dev.type != "cpu", store=store,
                                         pooled=cfg.cls_weight > 0)
    # stored views: one per row per epoch, the same in pixels, tokens and pooled; validation on view 0
    train_mask = without_duplicates(store, cfg, train_mask, notes)
    train_loader = rank_train_loader(store, columns, cfg, run, rows=train_mask, pin_memory=dev.type == "cuda",
                                     dequantize=dequantize, view="epoch")
    val_loader = Loader(store, {**columns, "pooled": f"{fmt.FEATURES}/{teacher}/pooled"}, cfg.batch_size,
                        shuffle=False, rows=val_mask, dequantize=dequantize, view=0,
                        rank=0, world_size=1)  # rank 0 validates every val row
    if len(train_loader) == 0:
        raise loop.too_few_rows(len(train_loader.served), "usable rows", cfg.batch_size)
    if len(val_loader.served) < 1:
        raise ConfigError("the validation split has no usable rows: raise val_fraction")
    epochs_note = views_note(cfg.steps, len(train_loader), train_loader.views)
    if epochs_note:
        notes.append(epochs_note)
        if run.is_main:
            warnings.warn(epochs_note, ViewsRepeat, stacklevel=2)

    # ---- model and optimizer --------------------------------------------------------------------------
    threads_before = loop.set_threads(cfg, dev)  # restored at the end
    torch.manual_seed(cfg.seed)
    model = UTAStudent(arch).to(dev)
    # DDP around the loss with several ranks (`model` is validated and saved); a parameter may get no
    # gradient in a step (a separate CLS head with cls_weight 0), hence unused_parameters
    objective = run.wrap(Objective(model), unused_parameters=True)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, cfg.adam_beta2), eps=cfg.adam_eps)
    autocast = loop.autocast(dev, precision)
    step, best = 0, {"val_loss": math.inf, "step": None}
    metrics = loop.Metrics(out_dir, writer=run.is_main)  # only rank 0 writes

    # ---- resume: weights, AdamW state, RNG, data position -----------------------------------------
    if ckpt:
        loop.restore(ckpt, model, optimizer, train_loader)
        step, best = ckpt.step, ckpt.state["best"]
    if run.is_main:
        loop.start_output(out_dir, cfg, metrics, ckpt)

    def state(step: int) -> dict:
        return {"format": FORMAT, "version": VERSION, "step": step, "steps": cfg.steps, "config": cfg.to_dict(),
                "arch": arch, "loader": train_loader.state_dict(), "best": best, "teacher": tdesc,
                "input": idesc, "store": os.path.abspath(store.path), "store_id": store.meta.get("store_id"),
                "precision": precision, "device": str(dev), "torch": torch.__version__, "world_size": run.world_size,
                "per_rank_batch": train_loader.batch_size}

    def validate_and_keep_best(record: dict, final: bool = False) -> None:
        nonlocal best
        if run.is_main:  # the other ranks wait at the barrier: rank 0 validates, as one process would
            record.update(validate(model, val_loader, cfg, dev, autocast, store=store, zero_shot=final, notes=notes))
            if record["val_loss"] < best["val_loss"]:
                best = {"val_loss": record["val_loss"], "step": record["step"]}
                checkpoint.save(os.path.join(out_dir, "best"), model, state(record["step"]))
        run.barrier()

    # ---- the loop (trainers/loop.py, shared with train-head) ------------------------------------------
    def one_step(step: int, batches) -> tuple[float, float]:
        return train_step(model, optimizer, next(batches), step, cfg, dev, autocast, run=run, objective=objective,
                          teacher=crop_teacher)

    try:
        ran = loop.run_steps(run=run, cfg=cfg, model=model, optimizer=optimizer, loader=train_loader, out_dir=out_dir,
                             step=step, resumed=bool(ckpt), metrics=metrics, state=state,
                             validate=validate_and_keep_best, train_step=one_step, desc="train-uta", progress=progress)
    finally:
        torch.set_num_threads(threads_before)
    step, n_params = ran["step"], ran["params"]

    # ---- what it wrote (rank 0) ----------------------------------------------------------------------------
    from featstore.trainers.plots import plot_curves

    curves = None
    if run.is_main:
        curves = plot_curves(metrics.path, os.path.join(out_dir, "curves.png"), loss_label="1 - cosine (kept tokens)",
                             panel=CURVES_PANEL, panel_title="validation alignment", panel_ylabel="cosine / accuracy",
                             panel_ylim=(-0.05, 1.02))
    return {
        "out_dir": out_dir,
        "step": step,
        "steps": cfg.steps,
        "best": best,
        "final": metrics.last_validation(),
        "params": n_params,
        "train_rows": int(train_loader.num_rows) * run.world_size,
        "val_rows": int(len(val_loader.served)),
        "steps_per_s": ran["steps_per_s"],
        "seconds": time.time() - t0,
        "resumed_from": ckpt.step if ckpt else None,
        "rank": run.rank,
        "world_size": run.world_size,
        "student": {"preset": cfg.student, "input": arch["input"], "width": arch["width"], "depth": arch["depth"],
                    "heads": arch["heads"], "patch_size": arch["patch_size"], "grid": arch["grid"],
                    "teacher_grid": arch["teacher_grid"], "grid_interpolation": arch["grid_interpolation"],
                    **{k: arch[k] for k in ("mlp", "mlp_dim", "sub_ln", "rope", "abs_pos_embed", "layer_scale",
                                            "drop_path", "cls_head")}},
        "teacher": teacher,
        "input": idesc["name"],
        "notes": notes,
        "files": {"metrics": metrics.path, "curves": curves, "config": os.path.join(out_dir, "config.yaml"),
                  "last": os.path.join(out_dir, "last"), "best": os.path.join(out_dir, "best")},
    }


class Objective(torch.nn.Module):
    """The alignment loss as a module's forward, so DDP can wrap it (DDP syncs gradients of what
    runs inside its forward; the loss calls the student's embed/encode, not its forward)."""

    def __init__(self, model: UTAStudent):
        super().__init__()
        self.model = model

    def forward(self, x, targets, masks, pooled, cls_weight: float) -> torch.Tensor:
        return alignment_loss(self.model, x, targets, masks, pooled, cls_weight)


def train_step(model: UTAStudent, optimizer, batch: dict, step: int, cfg: UTAConfig, dev, autocast, *,
               run: Dist | None = None, objective: torch.nn.Module | None = None, teacher=None) -> tuple[float, float]:
    """One optimizer step on one batch ({"input", "target", "pooled"} as the loader serves them;
    "pooled" only with cls_weight > 0): this step's flips and masks (a pure function of seed and
    step; with `fresh_crops`, this step's crops and their targets, trainers/uta/fresh_crops.py), the alignment loss (tokens + cls_weight * CLS), backward, grad clip, AdamW.  Returns
    (loss, grad norm).  The benchmark times exactly this.

    Under DDP (`run` with several ranks, `objective` the DDP-wrapped `Objective`) this rank's batch
    is rows [rank*b, (rank+1)*b) of the global batch: flips and masks are drawn for the whole global
    batch and this rank takes its rows' share, so every image gets what one process would give it.
    Every rank's loss is a mean over the same number of (image, mask, position) terms, so DDP's
    gradient average is the gradient of the global batch's loss, and the loss returned is the
    mean over ranks: the single-process loss at the global batch."""
    run = run or Dist()
    model.train()
    if cfg.cls_weight > 0 and "pooled" not in batch:
        raise ConfigError("cls_weight > 0 needs the teacher's pooled embeddings in each batch (a 'pooled' column)")
    run.seed_step(cfg.seed, step)  # drop path per rank, a pure function of (seed, step, rank)
    n = len(batch["target"])
    mine = slice(run.rank * n, (run.rank + 1) * n)  # this rank's rows of the global batch
    g = step_generator(cfg.seed, step)
    flip = (torch.rand(n * run.world_size, generator=g) < cfg.hflip)[mine] if cfg.hflip > 0 else None
    pooled = batch_pooled(batch, dev)
    if cfg.fresh_crops == "none":
        x, targets = prepare_batch(batch, model.arch, flip, dev)
    else:  # a new crop of every image (the stored pixels, cut on the device) and its teacher targets
        boxes, crop_flips = step_crops(cfg, step, n, run.rank, run.world_size)
        stored = on_device(batch, "target", dev) if cfg.fresh_crops == "resample" else None
        x, t, pooled = crop_batch(cfg.fresh_crops, teacher, on_device(batch, "input", dev), stored, pooled, boxes, crop_flips)
        targets = interpolate_grid(t, model.arch["grid"], model.arch["grid_interpolation"] or "bilinear").float()
    masks = draw_masks(n * run.world_size, model.n_tokens, cfg.mask_ratio, g, cfg.reversed_masking, **mask_options(cfg))
    masks = [m[mine] for m in masks]
    with autocast:
        loss = (objective or Objective(model))(x, targets, masks, pooled, cfg.cls_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    optimizer.step()
    return run.mean(loss.detach()).item(), float(grad_norm)


def describe_sources(store: Store, teacher: str, pixels: str | None, student_input: str | None) -> dict:
    """What the run reads, as its checkpoint records it: {"teacher": ..., "input": ...} with names,
    identities and shapes; refuses a teacher without tokens and an input from another crop (or
    other stored views)."""
    fs = store.feature_set(teacher)
    if not fs.attrs.get("tokens"):
        raise ConfigError(f"feature set '{teacher}' has no tokens: extract the teacher with --tokens")
    tdesc = {**checkpoint.describe(store, teacher), "tokens": list(fs.attrs["tokens"]), "token_dtype": fs.attrs.get("token_dtype")}
    if fs.views > 1:
        tdesc["views"] = fs.identity.get("views")
    teacher_pre = crop_identity(fs)
    if student_input:
        sfs = store.feature_set(student_input)
        if not sfs.attrs.get("tokens"):
            raise ConfigError(f"feature set '{student_input}' has no tokens: extract it with --tokens for light mode")
        same_crop(crop_identity(sfs), teacher_pre, f"student input '{student_input}'", f"teacher '{teacher}'")
        idesc = {**checkpoint.describe(store, student_input), "kind": "tokens", "tokens": list(sfs.attrs["tokens"]),
                 "column": f"{fmt.FEATURES}/{student_input}/tokens"}
    else:
        if not pixels:
            raise ConfigError("give the student's input: --pixels NAME (crops stored with --pixels at extraction) "
                              "or --student-input NAME (light mode)")
        px = store.pixels(pixels)
        identity = dict(px.attrs.get("identity") or {})
        same_crop(identity, teacher_pre, f"pixels '{pixels}'", f"teacher '{teacher}'")
        k = view_count(px)  # a view axis after row: the student sees one (3, H, W) view at a time
        idesc = {"name": pixels, "kind": "pixels", "identity": identity, "shape": list(px.shape[1 + (k > 1):]),
                 "feature_set": px.attrs.get("feature_set"), "column": f"{fmt.PIXELS}/{pixels}"}
    return {"teacher": tdesc, "input": idesc}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices and conv kernels; none on biases, norms, the CLS
    token and position embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "pos_embed" in name or "cls_token" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def validate(model: UTAStudent, loader: Loader, cfg: UTAConfig, dev, autocast, *, store: Store | None = None,
             zero_shot: bool = False, notes: list | None = None) -> dict:
    """Val loss (fixed masks), token and CLS cosines; on the final validation also zero-shot of the
    student's CLS (and the teacher's pooled, as the reference) through the cached prompt features
    of `cfg.zero_shot_text` (never encodes text here)."""
    metrics = token_metrics(model, loader, cfg, dev, autocast)
    embeddings = metrics.pop("_embeddings")
    metrics.pop("val_rows")
    if zero_shot and cfg.zero_shot_text and store is not None:
        zs, why = zero_shot_metrics(store, embeddings, text_set(store, cfg.zero_shot_text), cfg.zero_shot_templates,
                                    cached_only=True)
        if zs is not None and zs["student_cls"]:
            metrics.update(val_zero_shot_top1=zs["student_cls"]["top1"], val_zero_shot_top5=zs["student_cls"]["top5"])
            if zs["teacher_cls"]:
                metrics["val_teacher_zero_shot_top1"] = zs["teacher_cls"]["top1"]
        if notes is not None:
            notes.extend(why)
    return metrics
