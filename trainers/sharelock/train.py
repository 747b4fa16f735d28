"""Train a ShareLock head on two feature sets of a store: read it top to bottom.

    summary = train_head("s.zarr", image="dinov2-small", text="minilm", out_dir="run/",
                         config_file="demo", overrides=["steps=200"])  # a built-in config, or a path
    train_head("cc3m.zarr", "dinov2", "llama-cap,llama-synth", "run/", config_file="sharelock")

Writes into `out_dir`:
    metrics.jsonl   one json per logged step: step, loss, lr, grad_norm; on validation steps also
                    val_loss and val recall@1/5 both ways (val_i2t_r1, val_t2i_r5, ...)
    curves.png      train/val loss and val recall against steps
    config.yaml     the resolved config (the checkpoints carry it too)
    last/, best/    checkpoints (see checkpoint.py)

Validation runs at step 0, every `val_every` (at most steps/10) steps — or, with
`val_every_batches`, after the optimizer step completing each such number of micro-batches
(ShareLock's official cadence: 500) — and at the end.  The best checkpoint is the validation with
the best `best_metric`; early stopping counts validations that do not beat the best by more than
`min_delta`.  Several text feature sets (`text="a,b,c"`, e.g. several caption sets) are sampled
uniformly per row and step, as ShareLock picks one caption file per sample.  A step never decodes
an image nor runs a backbone: it reads stored columns (fp16, or fp32 when extracted so) and casts
them to fp32 on the device.  `resume=True` continues the `last` checkpoint exactly: weights, Adam state,
RNG state and the loader's (seed, epoch, offset), so a killed run ends with the same weights as
one never killed (on CPU; GPU kernels may not be bitwise deterministic).  A resumed run must be the
same run: a changed config (but `steps` and how it runs: trainers/loop.py), store, feature set or
precision is refused, every difference on its own line.  Ctrl-C saves `last` at the step in progress
and stops with a line saying to re-run with --resume.  Before the first step, every block it reads is
checked against its marker's checksum (`featstore.core.integrity`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import numpy as np
import torch

from featstore.errors import ConfigError
from featstore.core.integrity import check_blocks
from featstore.loader import Loader
from featstore.store import Store

from featstore.trainers import checkpoint, ddp, loop
from featstore.trainers.config import apply
from featstore.trainers.sharelock.config import Config, load_config
from featstore.trainers.contrastive import info_nce, retrieval_recall
from featstore.trainers.sharelock.heldout import heldout, heldout_rows
from featstore.trainers.train_loader import train_loader as rank_train_loader, without_duplicates
from featstore.trainers.sharelock.model import FORMAT, VERSION, ShareLockModel, load_checkpoint
from featstore.trainers.sharelock.text_sets import check_modalities, check_one_backbone, text_names, train_text, val_choices, val_text


def train_head(
    store_path,
    image: str,
    text,
    out_dir,
    *,
    config: Config | None = None,
    config_file=None,
    overrides=(),
    steps: int | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train (or, with `resume`, continue) a ShareLock head on `features/<image>/pooled` and
    `features/<text>/pooled` (`text`: one name, or several as "a,b,c" or a list, sampled per
    row); returns a JSON-able summary.  Config: `config` (default: ShareLock's),
    then `config_file`, then `overrides` ("KEY=VALUE"), then `steps`; on resume the checkpoint's
    config replaces `config`."""
    t0 = time.time()
    out_dir = os.path.abspath(str(out_dir))
    loop.check_precision(precision)
    run = ddp.setup(device)  # DDP under torchrun (trainers/ddp.py), else one process
    dev = run.device

    # ---- config: defaults < checkpoint (on resume) < file < --set < --steps -----------------
    ckpt = checkpoint.resume_point(out_dir, resume, load_checkpoint)
    run.check_resume(ckpt)  # the same world size
    cfg = load_config(config_file, overrides, base=ckpt.config if ckpt else config)
    if steps is not None:
        cfg = apply(cfg, {"steps": steps}, "--steps")
    notes: list[str] = []

    # ---- data: the uid-hash held-out rows, aligned columns --------------------------------------
    store = Store.open(store_path)
    texts = text_names(text)
    feature_sets = {"image": checkpoint.describe(store, image),
                    "texts": [checkpoint.describe(store, t) for t in texts]}
    feature_sets["text"] = feature_sets["texts"][0]  # the one prompts are encoded with
    check_modalities(feature_sets["image"], feature_sets["texts"])
    check_one_backbone(feature_sets["texts"])
    # the store by its id; by its path against a checkpoint that recorded none (saved before store ids)
    by_id = not ckpt or bool(ckpt.state.get("store_id"))
    settings = {"store": (store.meta.get("store_id") if by_id else None) or os.path.abspath(store.path), "image": image, "text": ",".join(texts),
           "precision": precision}
    if ckpt:  # a resumed run must see the same features and settings
        recorded = ckpt.state["feature_sets"]
        recorded_texts = recorded.get("texts") or [recorded["text"]]
        for then, now in [(recorded["image"], feature_sets["image"]), *zip(recorded_texts, feature_sets["texts"])]:
            checkpoint.check_identity(then, now, ckpt.path, store.path)
        recorded = {"store": ckpt.state.get("store_id") or ckpt.state["store"], "image": recorded["image"]["name"],
                        "text": ",".join(t["name"] for t in recorded_texts), "precision": ckpt.state.get("precision")}
        loop.check_resume(out_dir, ckpt.step, ckpt.config.to_dict(), cfg.to_dict(), recorded, settings, notes)
    columns = {"image": f"features/{image}/pooled"}
    text_columns = ["text"] if len(texts) == 1 else [f"text{i}" for i in range(len(texts))]
    columns.update({c: f"features/{t}/pooled" for c, t in zip(text_columns, texts)})
    usable = np.logical_and.reduce([store.feature_set(n).usable_rows() for n in [image, *texts]])
    if ckpt and ckpt.state.get("heldout"):  # resumed: the very rows it held out (even if the store grew)
        heldout_record = ckpt.state["heldout"]
        val_mask = heldout_rows(store, heldout_record)
        train_mask = usable & ~val_mask
    else:
        train_mask, val_mask, heldout_record = heldout(store.uids(), cfg.val_fraction, cfg.val_rows, usable,
                                                           split=cfg.val_split, seed=cfg.val_seed)
    train_mask = without_duplicates(store, cfg, train_mask, notes)
    train_loader = rank_train_loader(store, columns, cfg, run, rows=train_mask, pin_memory=dev.type == "cuda")
    val_loader = Loader(store, columns, cfg.batch_size, shuffle=False, rows=val_mask, cache=cfg.cache,
                        rank=0, world_size=1)  # rank 0 validates every val row
    if len(train_loader) == 0:
        raise loop.too_few_rows(len(train_loader.served), f"rows with '{image}' and every text set", cfg.batch_size)
    if len(val_loader.served) < 2:
        raise ConfigError(f"the validation split has {len(val_loader.served)} usable rows: raise val_fraction or val_rows")
    check_blocks(store, [image, *texts], arrays=("pooled", "valid"))  # what it reads is what extraction wrote
    val_choice = val_choices(store.n_rows, len(texts), cfg.seed)  # training draws per step, below

    # ---- model and optimizer -----------------------------------------------------------------
    threads_before = loop.set_threads(cfg, dev)  # restored at the end
    torch.manual_seed(cfg.seed)
    model = ShareLockModel(feature_sets["image"]["dim"], feature_sets["text"]["dim"], cfg).to(dev)
    step_model = run.wrap(model)  # DDP + global BatchNorm with several ranks; `model` is validated and saved
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    autocast = loop.autocast(dev, precision)
    higher_is_better = cfg.best_metric != "val_loss"
    worst = -math.inf if higher_is_better else math.inf
    step, best, bad_validations, stopped_early = 0, {cfg.best_metric: worst, "step": None}, 0, False
    early_stop_best = worst  # the value improvements are measured against (moves only by more than min_delta)
    metrics = loop.Metrics(out_dir, writer=run.is_main)  # only rank 0 writes

    # ---- resume: weights, Adam state, RNG, data position ---------------------------------------
    if ckpt:
        loop.restore(ckpt, model, optimizer, train_loader)
        step, best = ckpt.step, ckpt.state["best"]
        bad_validations, stopped_early = ckpt.state["bad_validations"], ckpt.state["stopped_early"]
        early_stop_best = ckpt.state.get("early_stop_best", best[cfg.best_metric])
    if run.is_main:
        loop.start_output(out_dir, cfg, metrics, ckpt)

    def state(step: int) -> dict:
        return {"format": FORMAT, "version": VERSION, "step": step, "steps": cfg.steps, "config": cfg.to_dict(),
                "loader": train_loader.state_dict(), "best": best, "bad_validations": bad_validations, "stopped_early": stopped_early,
                "early_stop_best": early_stop_best, "heldout": heldout_record, "feature_sets": feature_sets,
                "store": os.path.abspath(store.path), "store_id": store.meta.get("store_id"), "precision": precision,
                "device": str(dev), "torch": torch.__version__, "world_size": run.world_size,
                "per_rank_batch": train_loader.batch_size}

    def better(value, than, margin=0.0) -> bool:
        return value > than + margin if higher_is_better else value < than - margin

    def validate_and_keep_best(record: dict, final: bool = False) -> None:
        nonlocal best, bad_validations, early_stop_best
        if run.is_main:  # the other ranks wait at the barrier: rank 0 validates, as one process would
            record.update(validate(model, val_loader, cfg, dev, autocast,
                                   pick_text=lambda b: val_text(b, text_columns, val_choice)))
            value = record[cfg.best_metric]
            if better(value, early_stop_best, cfg.min_delta):
                early_stop_best, bad_validations = value, 0
            else:
                bad_validations += 1
            if better(value, best[cfg.best_metric]):
                best = {"val_loss": record["val_loss"], cfg.best_metric: value, "step": record["step"]}
                checkpoint.save(os.path.join(out_dir, "best"), model, state(record["step"]))
        run.barrier()

    def early_stop() -> bool:
        nonlocal stopped_early
        stopped_early = run.broadcast(cfg.patience is not None and bad_validations >= cfg.patience)
        return stopped_early

    def train_step(step: int, batches) -> tuple[float, float]:
        model.train()
        run.seed_step(cfg.seed, step)  # dropout per rank, a pure function of (seed, step, rank)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=dev)
        for micro in range(cfg.accumulation_steps):  # negatives only within each (global) micro-batch
            batch = next(batches)
            x_image = batch["image"].to(dev, non_blocking=True).float()
            x_text = train_text(batch, text_columns, cfg.seed, step).to(dev, non_blocking=True).float()
            # DDP averages the gradients once per step, at the last micro-batch
            last = micro == cfg.accumulation_steps - 1
            with step_model.no_sync() if run.enabled and not last else contextlib.nullcontext():
                with autocast:
                    z_image, z_text = step_model(x_image, x_text)
                loss = ddp.info_nce(z_image, z_text, model.logit_scale)  # negatives from every rank
                (loss / cfg.accumulation_steps).backward()
            loss_sum += loss.detach()
        loss_sum = run.mean(loss_sum)  # the global batch's loss
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        optimizer.step()
        return loss_sum.item() / cfg.accumulation_steps, float(grad_norm)

    # ---- the loop (trainers/loop.py, shared with train-uta) ----------------------------------
    try:
        ran = loop.run_steps(run=run, cfg=cfg, model=model, optimizer=optimizer, loader=train_loader, out_dir=out_dir,
                             step=step, resumed=bool(ckpt), metrics=metrics, state=state,
                             validate=validate_and_keep_best, train_step=train_step, desc="train-head",
                             progress=progress, stopped_early=stopped_early, early_stop=early_stop)
    finally:
        torch.set_num_threads(threads_before)
    step, n_params = ran["step"], ran["params"]

    # ---- what it wrote ---------------------------------------------------------------------------
    from featstore.trainers.plots import plot_curves

    curves = plot_curves(metrics.path, os.path.join(out_dir, "curves.png")) if run.is_main else None
    final = metrics.last_validation()
    return {
        "out_dir": out_dir,
        "step": step,
        "steps": cfg.steps,
        "stopped_early": stopped_early,
        "best": best,
        "final": final,
        "params": n_params,
        "train_rows": int(train_loader.num_rows) * run.world_size,
        "val_rows": int(len(val_loader.served)),
        "heldout": heldout_record,
        "text_sets": texts,
        "steps_per_s": ran["steps_per_s"],
        "seconds": time.time() - t0,
        "resumed_from": ckpt.step if ckpt else None,
        "notes": notes,
        "rank": run.rank,
        "world_size": run.world_size,
        "files": {"metrics": metrics.path, "curves": curves, "config": os.path.join(out_dir, "config.yaml"),
                  "last": os.path.join(out_dir, "last"), "best": os.path.join(out_dir, "best")},
    }


@torch.no_grad()
def validate(model: ShareLockModel, loader: Loader, cfg: Config, dev: torch.device, autocast, pick_text=None) -> dict:
    """Val loss (InfoNCE in micro-batches of `batch_size`, as in training, weighted by rows) and
    recall@1/5 both ways among the first `val_max_rows` val rows.  `pick_text(batch)` gives the
    text column of a batch (default: `batch["text"]`)."""
    model.eval()
    loader.set_epoch(0)
    total, n, z_images, z_texts, kept = 0.0, 0, [], [], 0
    for batch in loader:
        x_text = pick_text(batch) if pick_text else batch["text"]
        with autocast:
            z_image, z_text = model(batch["image"].to(dev).float(), x_text.to(dev).float())
        if len(z_image) >= 2:
            total += float(info_nce(z_image, z_text, model.logit_scale)) * len(z_image)
            n += len(z_image)
        if kept < cfg.val_max_rows:
            z_images.append(z_image[: cfg.val_max_rows - kept].float().cpu())
            z_texts.append(z_text[: cfg.val_max_rows - kept].float().cpu())
            kept += len(z_images[-1])
    model.train()
    recall = retrieval_recall(torch.cat(z_images), torch.cat(z_texts), ks=(1, 5))
    return {"val_loss": total / max(n, 1), **{f"val_{k}": v for k, v in recall.items()}}
