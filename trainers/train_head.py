"""Train a ShareLock head on two feature sets of a store: read it top to bottom.

    summary = train_head("s.zarr", image="dinov2-small", text="minilm", out_dir="run/",
                         config_file="configs/demo.yaml", overrides=["steps=200"])
    train_head("cc3m.zarr", "dinov2", "llama-cap,llama-synth", "run/", config_file="configs/sharelock.yaml")

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
one never killed (on CPU; GPU kernels may not be bitwise deterministic).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from featstore.errors import ConfigError
from featstore.loader import Loader
from featstore.store import Store

from . import checkpoint, distributed
from .config import Config, apply, load_config
from .contrastive import info_nce, retrieval_recall
from .heldout import heldout, heldout_rows
from .loading import train_loader as rank_train_loader
from .sharelock import ShareLockModel, count_parameters
from .text_sets import check_one_backbone, text_names, train_text, val_choices, val_text

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


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
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    run = distributed.setup(device)  # DDP under torchrun (trainers/distributed.py), else one process
    dev = run.device

    # ---- config: defaults < checkpoint (on resume) < file < --set < --steps -----------------
    ckpt = checkpoint.resume_point(out_dir, resume)
    run.check_resume(ckpt)
    cfg = load_config(config_file, overrides, base=ckpt.config if ckpt else config)
    if steps is not None:
        cfg = apply(cfg, {"steps": steps}, "--steps")

    # ---- data: the uid-hash held-out rows, aligned columns --------------------------------------
    store = Store.open(store_path)
    texts = text_names(text)
    feature_sets = {"image": checkpoint.describe(store, image),
                    "texts": [checkpoint.describe(store, t) for t in texts]}
    feature_sets["text"] = feature_sets["texts"][0]  # the one prompts are encoded with
    check_one_backbone(feature_sets["texts"])
    if ckpt:  # a resumed run must see the same features
        recorded = ckpt.state["feature_sets"]
        recorded_texts = recorded.get("texts") or [recorded["text"]]
        if len(recorded_texts) != len(texts):
            raise ConfigError(f"{out_dir} was trained on {len(recorded_texts)} text feature set(s) "
                              f"({', '.join(t['name'] for t in recorded_texts)}), not {len(texts)}: resume with the same --text")
        for then, now in [(recorded["image"], feature_sets["image"]), *zip(recorded_texts, feature_sets["texts"])]:
            checkpoint.check_identity(then, now, ckpt.path, store.path)
    columns = {"image": f"features/{image}/pooled"}
    text_columns = ["text"] if len(texts) == 1 else [f"text{i}" for i in range(len(texts))]
    columns.update({c: f"features/{t}/pooled" for c, t in zip(text_columns, texts)})
    usable = np.logical_and.reduce([store.feature_set(n).usable_rows() for n in [image, *texts]])
    if ckpt and ckpt.state.get("heldout"):  # resumed: the very rows it held out (even if the store grew)
        heldout_record = ckpt.state["heldout"]
        val_mask = heldout_rows(store.uids(), heldout_record)
        train_mask = usable & ~val_mask
    else:
        train_mask, val_mask, heldout_record = heldout(store.uids(), cfg.val_fraction, cfg.val_rows, usable)
    train_loader = rank_train_loader(store, columns, cfg, run, rows=train_mask, pin_memory=dev.type == "cuda")
    val_loader = Loader(store, columns, cfg.batch_size, shuffle=False, rows=val_mask, cache=cfg.cache,
                        rank=0, world_size=1)  # rank 0 validates every val row
    if len(train_loader) == 0:
        raise ConfigError(f"the train split has {len(train_loader.served)} rows with '{image}' and every text set, "
                          f"fewer than one batch ({cfg.batch_size}): lower batch_size")
    if len(val_loader.served) < 2:
        raise ConfigError(f"the validation split has {len(val_loader.served)} usable rows: raise val_fraction or val_rows")
    val_choice = val_choices(store.n_rows, len(texts), cfg.seed)  # training draws per step, below

    # ---- model and optimizer -----------------------------------------------------------------
    threads_before = torch.get_num_threads()
    if cfg.cpu_threads and dev.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)  # restored at the end
    torch.manual_seed(cfg.seed)
    model = ShareLockModel(feature_sets["image"]["dim"], feature_sets["text"]["dim"], cfg).to(dev)
    step_model = run.wrap(model)  # DDP + global BatchNorm with several ranks; `model` is validated and saved
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    autocast = torch.autocast(dev.type, dtype=PRECISIONS[precision] or torch.bfloat16, enabled=precision != "fp32")
    higher_is_better = cfg.best_metric != "val_loss"
    worst = -math.inf if higher_is_better else math.inf
    step, best, bad_validations, stopped_early = 0, {cfg.best_metric: worst, "step": None}, 0, False
    early_stop_best = worst  # the value improvements are measured against (moves only by more than min_delta)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")

    # ---- resume: weights, Adam state, RNG, data position ---------------------------------------
    if ckpt:
        model.load_state_dict(ckpt.model.state_dict())
        checkpoint.restore_optimizer(optimizer, model, ckpt)
        checkpoint.restore_rng(ckpt.tensors)
        train_loader.load_state_dict(ckpt.state["loader"])
        step, best = ckpt.step, ckpt.state["best"]
        bad_validations, stopped_early = ckpt.state["bad_validations"], ckpt.state["stopped_early"]
        early_stop_best = ckpt.state.get("early_stop_best", best[cfg.best_metric])
    if run.is_main:  # only rank 0 writes
        if ckpt:
            _truncate_metrics(metrics_path, step)
        else:
            os.makedirs(out_dir, exist_ok=True)
            open(metrics_path, "w").close()
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)

    def state(step: int) -> dict:
        return {"step": step, "steps": cfg.steps, "config": cfg.to_dict(), "loader": train_loader.state_dict(),
                "best": best, "bad_validations": bad_validations, "stopped_early": stopped_early,
                "early_stop_best": early_stop_best, "heldout": heldout_record, "feature_sets": feature_sets,
                "store": os.path.abspath(store.path), "precision": precision, "device": str(dev),
                "torch": torch.__version__, "world_size": run.world_size, "per_rank_batch": train_loader.batch_size}

    def log(record: dict) -> None:
        if run.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def better(value, than, margin=0.0) -> bool:
        return value > than + margin if higher_is_better else value < than - margin

    def validate_and_keep_best(record: dict) -> None:
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

    # ---- the loop ----------------------------------------------------------------------------
    n_params = count_parameters(model)
    bar = tqdm(total=cfg.steps, initial=step, unit="step", disable=not (progress and run.is_main), dynamic_ncols=True,
               desc=f"train-head ({n_params:,} params)")
    batches = _forever(train_loader)
    start_step, t_loop = step, time.time()
    try:
        if step == 0:
            record = {"step": 0, "loss": None, "lr": 0.0, "world_size": run.world_size}
            validate_and_keep_best(record)
            log(record)
        while step < cfg.steps and not stopped_early:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
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
                    loss = distributed.info_nce(z_image, z_text, model.logit_scale)  # negatives from every rank
                    (loss / cfg.accumulation_steps).backward()
                loss_sum += loss.detach()
            loss_sum = run.mean(loss_sum)  # the global batch's loss
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            optimizer.step()
            step += 1

            record = {"step": step, "loss": loss_sum.item() / cfg.accumulation_steps, "lr": lr, "grad_norm": float(grad_norm)}
            if validation_due(step, cfg):
                validate_and_keep_best(record)
                stopped_early = run.broadcast(cfg.patience is not None and bad_validations >= cfg.patience)
            if "val_loss" in record or step % cfg.log_every == 0:
                log(record)
            if run.is_main and (step % cfg.save_every == 0 or step == cfg.steps or stopped_early):
                checkpoint.save(os.path.join(out_dir, "last"), model, state(step), optimizer)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", **({"val": f"{record['val_loss']:.4f}"} if "val_loss" in record else {}))
    finally:
        bar.close()
        batches.close()
        torch.set_num_threads(threads_before)
    run.barrier()  # rank 0's last checkpoint is written
    run.teardown()

    # ---- what it wrote ---------------------------------------------------------------------------
    from .plots import plot_curves

    curves = plot_curves(metrics_path, os.path.join(out_dir, "curves.png")) if run.is_main else None
    final = _last_validation(metrics_path) if run.is_main else {}
    seconds = time.time() - t_loop
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
        "steps_per_s": (step - start_step) / seconds if step > start_step and seconds > 0 else None,
        "seconds": time.time() - t0,
        "resumed_from": ckpt.step if ckpt else None,
        "rank": run.rank,
        "world_size": run.world_size,
        "files": {"metrics": metrics_path, "curves": curves, "config": os.path.join(out_dir, "config.yaml"),
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


def lr_at(step: int, cfg: Config) -> float:
    """The learning rate of update number `step` (0-based): linear warm-up over
    min(warmup_steps, max_warmup_fraction * steps) updates, then a cosine to lr * min_lr_ratio.
    The warm-up's first update gets lr/warmup, or 0 with `warmup_from_zero` (transformers'
    get_cosine_schedule_with_warmup, which ShareLock uses)."""
    warmup = min(cfg.warmup_steps, int(cfg.max_warmup_fraction * cfg.steps))
    if step < warmup:
        return cfg.lr * (step if getattr(cfg, "warmup_from_zero", False) else step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _val_every(cfg: Config) -> int:
    cap = max(1, cfg.steps // 10)
    return min(cfg.val_every, cap) if cfg.val_every else cap


def validation_due(step: int, cfg: Config) -> bool:
    """Whether optimizer step `step` (1-based, just taken) ends with a validation: at the end;
    with `val_every_batches` V, after each step that completes micro-batch V, 2V, ... (while that
    is at least every steps/10; else every steps/10); otherwise every `_val_every(cfg)` steps."""
    if step == cfg.steps:
        return True
    per_step, v = cfg.accumulation_steps, cfg.val_every_batches
    if v and v / per_step <= max(1, cfg.steps // 10):
        return (step * per_step) // v > ((step - 1) * per_step) // v
    return step % _val_every(cfg) == 0


def _forever(loader: Loader):
    """Batches across epochs (the loader moves to the next epoch by itself after a full pass)."""
    empty_passes = 0
    while True:
        served = 0
        it = iter(loader)
        try:
            for batch in it:
                served += 1
                yield batch
        finally:
            it.close()
        empty_passes = 0 if served else empty_passes + 1
        if empty_passes > 1 or loader.num_rows < loader.batch_size:
            raise ConfigError("the training loader served no batch: the train split has fewer rows than one batch")
        if not served and loader.offset >= loader.num_rows:
            loader.set_epoch(loader.epoch + 1)  # resumed exactly at the end of an epoch


def _truncate_metrics(path: str, step: int) -> None:
    """Drop lines a killed run logged after its last checkpoint; they are logged again."""
    keep = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except (json.JSONDecodeError, KeyError):
                    break  # a half-written last line
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _last_validation(path: str) -> dict:
    last = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "val_loss" in rec:
                last = rec
    return last
