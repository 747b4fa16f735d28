"""Train a ShareLock head on two feature sets of a store: read it top to bottom.

    summary = train_head("s.zarr", image="dinov2-small", text="minilm", out_dir="run/",
                         config_file="configs/demo.yaml", overrides=["steps=200"])

Writes into `out_dir`:
    metrics.jsonl   one json per logged step: step, loss, lr, grad_norm; on validation steps also
                    val_loss and val recall@1/5 both ways (val_i2t_r1, val_t2i_r5, ...)
    curves.png      train/val loss and val recall against steps
    config.yaml     the resolved config (the checkpoints carry it too)
    last/, best/    checkpoints (see checkpoint.py)

Validation runs at step 0, every `val_every` (at most steps/10) steps, and at the end.  A step
never decodes an image nor runs a backbone: it reads two stored fp16 columns and casts them to
fp32 on the device.  `resume=True` continues the `last` checkpoint exactly: weights, Adam state,
RNG state and the loader's (seed, epoch, offset), so a killed run ends with the same weights as
one never killed (on CPU; GPU kernels may not be bitwise deterministic).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import torch
import yaml
from tqdm.auto import tqdm

from featstore.errors import ConfigError
from featstore.loader import Loader
from featstore.split import split_by_uid
from featstore.store import Store

from . import checkpoint, distributed
from .config import Config, apply, load_config
from .contrastive import info_nce, retrieval_recall
from .loading import train_loader as rank_train_loader
from .sharelock import ShareLockModel, count_parameters

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def train_head(
    store_path,
    image: str,
    text: str,
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
    `features/<text>/pooled`; returns a JSON-able summary.  Config: `config` (default: ShareLock's),
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

    # ---- data: the shared uid-hash split, two aligned columns --------------------------------
    store = Store.open(store_path)
    feature_sets = {"image": checkpoint.describe(store, image), "text": checkpoint.describe(store, text)}
    if ckpt:
        for role in ("image", "text"):
            checkpoint.check_identity(ckpt.state["feature_sets"][role], feature_sets[role], ckpt.path, store.path)
    train_mask, val_mask = split_by_uid(store.uids(), cfg.val_fraction)
    columns = {"image": f"features/{image}/pooled", "text": f"features/{text}/pooled"}
    train_loader = rank_train_loader(store, columns, cfg, run, rows=train_mask, pin_memory=dev.type == "cuda")
    val_loader = Loader(store, columns, cfg.batch_size, shuffle=False, rows=val_mask, cache=cfg.cache)
    if len(train_loader) == 0:
        raise ConfigError(f"the train split has {len(train_loader.served)} rows with both '{image}' and '{text}', "
                          f"fewer than one batch ({cfg.batch_size}): lower batch_size")
    if len(val_loader.served) < 2:
        raise ConfigError(f"the validation split has {len(val_loader.served)} usable rows: raise val_fraction")

    # ---- model and optimizer -----------------------------------------------------------------
    threads_before = torch.get_num_threads()
    if cfg.cpu_threads and dev.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)  # restored at the end
    torch.manual_seed(cfg.seed)
    model = ShareLockModel(feature_sets["image"]["dim"], feature_sets["text"]["dim"], cfg).to(dev)
    step_model = run.wrap(model)  # DDP + global BatchNorm with several ranks; `model` is validated and saved
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    autocast = torch.autocast(dev.type, dtype=PRECISIONS[precision] or torch.bfloat16, enabled=precision != "fp32")
    val_every = _val_every(cfg)
    step, best, bad_validations, stopped_early = 0, {"val_loss": math.inf, "step": None}, 0, False
    metrics_path = os.path.join(out_dir, "metrics.jsonl")

    # ---- resume: weights, Adam state, RNG, data position ---------------------------------------
    if ckpt:
        model.load_state_dict(ckpt.model.state_dict())
        checkpoint.restore_optimizer(optimizer, model, ckpt)
        checkpoint.restore_rng(ckpt.tensors)
        train_loader.load_state_dict(ckpt.state["loader"])
        step, best = ckpt.step, ckpt.state["best"]
        bad_validations, stopped_early = ckpt.state["bad_validations"], ckpt.state["stopped_early"]
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
                "feature_sets": feature_sets, "store": os.path.abspath(store.path), "precision": precision,
                "device": str(dev), "torch": torch.__version__, "world_size": run.world_size,
                "per_rank_batch": train_loader.batch_size}

    def log(record: dict) -> None:
        if run.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def validate_and_keep_best(record: dict) -> None:
        nonlocal best, bad_validations
        if run.is_main:  # the other ranks wait at the barrier: rank 0 validates, as one process would
            record.update(validate(model, val_loader, cfg, dev, autocast))
            if record["val_loss"] < best["val_loss"]:
                best, bad_validations = {"val_loss": record["val_loss"], "step": record["step"]}, 0
                checkpoint.save(os.path.join(out_dir, "best"), model, state(record["step"]))
            else:
                bad_validations += 1
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
                x_text = batch["text"].to(dev, non_blocking=True).float()
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
            if step % val_every == 0 or step == cfg.steps:
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
        "steps_per_s": (step - start_step) / seconds if step > start_step and seconds > 0 else None,
        "seconds": time.time() - t0,
        "resumed_from": ckpt.step if ckpt else None,
        "rank": run.rank,
        "world_size": run.world_size,
        "files": {"metrics": metrics_path, "curves": curves, "config": os.path.join(out_dir, "config.yaml"),
                  "last": os.path.join(out_dir, "last"), "best": os.path.join(out_dir, "best")},
    }


@torch.no_grad()
def validate(model: ShareLockModel, loader: Loader, cfg: Config, dev: torch.device, autocast) -> dict:
    """Val loss (InfoNCE in micro-batches of `batch_size`, as in training, weighted by rows) and
    recall@1/5 both ways among the first `val_max_rows` val rows."""
    model.eval()
    loader.set_epoch(0)
    total, n, z_images, z_texts, kept = 0.0, 0, [], [], 0
    for batch in loader:
        with autocast:
            z_image, z_text = model(batch["image"].to(dev).float(), batch["text"].to(dev).float())
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
    min(warmup_steps, max_warmup_fraction * steps) updates, then a cosine to lr * min_lr_ratio."""
    warmup = min(cfg.warmup_steps, int(cfg.max_warmup_fraction * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _val_every(cfg: Config) -> int:
    cap = max(1, cfg.steps // 10)
    return min(cfg.val_every, cap) if cfg.val_every else cap


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
