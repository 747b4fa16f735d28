"""What both training loops (sharelock/train.py, uta/train.py) share, so each reads top to bottom.

    PRECISIONS, autocast(dev, precision)      the precision table and its autocast context
    lr_at(step, cfg)                          linear warm-up, then cosine
    validation_due(step, cfg)                 the validation cadence (steps/10 at most, or every N micro-batches)
    forever(loader)                           batches across epochs
    Metrics(out_dir)                          metrics.jsonl: start / resume, append, last validation
    progress_bar(...), show(bar, record)      a bar that is throttled when it goes to a log file
    StopOnInterrupt()                         Ctrl-C asks the loop to save a checkpoint and stop
    check_resume(...)                         a resumed run must be the same run: differences refused
    count_parameters(model), set_threads(cfg, dev)
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time

import torch
import yaml
from tqdm.auto import tqdm

from featstore.errors import ConfigError, Interrupted
from featstore.core.identity import identity_diff, lines
from featstore.trainers import checkpoint

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
# config keys a resumed run may change: how it runs, not what it trains (steps: see check_resume)
OPERATIONAL_KEYS = ("cpu_threads", "cache", "log_every", "save_every")
TTY_REFRESH_S, LOG_REFRESH_S = 0.1, 30.0  # a bar into a log file is redrawn at most every 30 s


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def autocast(dev: torch.device, precision: str):
    """The forward pass's autocast context (disabled for fp32)."""
    check_precision(precision)
    return torch.autocast(dev.type, dtype=PRECISIONS[precision] or torch.bfloat16, enabled=precision != "fp32")


def count_parameters(module: torch.nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def set_threads(cfg, dev: torch.device) -> int:
    """Use `cfg.cpu_threads` torch threads when training on CPU; returns the number before (to restore)."""
    before = torch.get_num_threads()
    if getattr(cfg, "cpu_threads", None) and dev.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    return before


# ---- schedule and cadence -----------------------------------------------------------------------
def lr_at(step: int, cfg) -> float:
    """The learning rate of update number `step` (0-based): linear warm-up over
    min(warmup_steps, max_warmup_fraction * steps) updates, then a cosine to lr * min_lr_ratio.
    The warm-up's first update gets lr/warmup, or 0 with `warmup_from_zero` (transformers'
    get_cosine_schedule_with_warmup, which ShareLock uses)."""
    warmup = min(cfg.warmup_steps, int(cfg.max_warmup_fraction * cfg.steps))
    if step < warmup:
        return cfg.lr * (step if getattr(cfg, "warmup_from_zero", False) else step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def val_every(cfg) -> int:
    """Validate every this many steps: `val_every`, never more than steps/10."""
    cap = max(1, cfg.steps // 10)
    return min(cfg.val_every, cap) if cfg.val_every else cap


def validation_due(step: int, cfg) -> bool:
    """Whether optimizer step `step` (1-based, just taken) ends with a validation: at the end;
    with `val_every_batches` V, after each step that completes micro-batch V, 2V, ... (while that
    is at least every steps/10; else every steps/10); otherwise every `val_every(cfg)` steps."""
    if step == cfg.steps:
        return True
    per_step, v = getattr(cfg, "accumulation_steps", 1), getattr(cfg, "val_every_batches", None)
    if v and v / per_step <= max(1, cfg.steps // 10):
        return (step * per_step) // v > ((step - 1) * per_step) // v
    return step % val_every(cfg) == 0


def forever(loader):
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


def too_few_rows(rows: int, what: str, batch_size: int) -> ConfigError:
    """The refusal of a train split smaller than one batch, naming the flag that fixes it."""
    smaller = max(2, min(batch_size // 2, rows))
    return ConfigError(f"the train split has {rows:,} {what}, fewer than one batch of {batch_size:,}: "
                       f"lower it with --set batch_size=N (e.g. --set batch_size={smaller})")


# ---- metrics.jsonl --------------------------------------------------------------------------------
class Metrics:
    """`<out_dir>/metrics.jsonl`: one json object per logged step; with `writer=False` (a rank
    other than 0) it writes and reads nothing."""

    def __init__(self, out_dir: str, writer: bool = True):
        self.path, self.writer = os.path.join(out_dir, "metrics.jsonl"), writer

    def start(self, resumed_step: int | None) -> None:
        """A fresh file, or (resumed) the file cut back to the checkpoint's step: lines a killed
        run logged after its last checkpoint are logged again."""
        if not self.writer:
            return
        if resumed_step is None:
            open(self.path, "w").close()
        else:
            truncate_metrics(self.path, resumed_step)

    def log(self, record: dict) -> None:
        if not self.writer:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def last_validation(self) -> dict:
        return last_validation(self.path) if self.writer else {}


def truncate_metrics(path: str, step: int) -> None:
    """Keep the lines of `path` up to `step` (and nothing after a half-written line)."""
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


def last_validation(path: str) -> dict:
    last = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if "val_loss" in rec:
                last = rec
    return last


# ---- progress -----------------------------------------------------------------------------------
def progress_bar(total: int, initial: int, desc: str, enabled: bool = True, file=None):
    """A tqdm bar of steps on stderr.  Into a terminal it redraws ~10 times a second; into a log
    file (not a terminal) at most every 30 s, so a long run's log stays small."""
    file = file or sys.stderr
    tty = bool(getattr(file, "isatty", lambda: False)())
    return tqdm(total=total, initial=initial, unit="step", disable=not enabled, dynamic_ncols=tty, desc=desc,
                file=file, mininterval=TTY_REFRESH_S if tty else LOG_REFRESH_S,
                maxinterval=max(10.0, TTY_REFRESH_S if tty else LOG_REFRESH_S))


def show(bar, record: dict) -> None:
    """One step done: the bar advances, its postfix shows the loss (and val loss); redrawn only
    when the bar's own interval says so."""
    extra = {"val": f"{record['val_loss']:.4f}"} if "val_loss" in record else {}
    bar.set_postfix(loss=f"{record['loss']:.4f}", **extra, refresh=False)
    bar.update(1)


# ---- Ctrl-C -------------------------------------------------------------------------------------
class StopOnInterrupt:
    """Between `start()` and `stop()` (in the main thread; elsewhere it does nothing), the first
    SIGINT only sets `requested`: the loop finishes the step in progress (saving `last` there,
    `save_last(step)`), leaves, and `stop_here` raises `interrupted(...)`.  A second SIGINT raises
    KeyboardInterrupt at once (no checkpoint), which `error` turns into its own line.

        interrupt = StopOnInterrupt(out_dir, save_last, barrier=run.barrier).start()
        try:
            stop = interrupt.agree(run)
            while step < steps and not stop:
                ...one step...
                stop = interrupt.agree(run)     # one decision for every rank
                ...save_last(step) when due or stop...
            interrupt.stop_here(step, finished=step >= steps)
        except KeyboardInterrupt as e:
            raise interrupt.error(e, step) from None
        finally:
            interrupt.stop()
    """

    def __init__(self, out_dir: str, save_last, log=None, barrier=None):
        self.requested = False
        self.out_dir, self.save_last, self.barrier = out_dir, save_last, barrier
        self._previous = None
        self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def start(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def stop(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        if self.requested:
            # torchrun forwards the terminal's Ctrl-C to every rank, which got it already: that
            # second SIGINT is the same request (torchrun kills ranks that take over 30 s)
            if under_torchrun:
                return
            raise KeyboardInterrupt
        self.requested = True
        again = "" if under_torchrun else " (Ctrl-C again to stop at once, without one)"
        self._log(f"\ninterrupt: saving a checkpoint after this step{again}")

    def agree(self, run) -> bool:
        """Whether to stop after this step, the same on every rank (`run`: trainers.distributed.Dist):
        a Ctrl-C seen by any rank stops them all at the same step.  Call it once per step, on
        every rank, and use what it returns (it also becomes `requested`)."""
        self.requested = run.any(self.requested)
        return self.requested

    def stop_here(self, step: int, finished: bool) -> None:
        """After the loop: a run that stopped because it was asked to ends with `interrupted`
        (its checkpoint is saved; at step 0, before any step, it is saved here).  With several
        ranks, every rank waits at `barrier` first, so none exits while rank 0 still saves."""
        if self.requested and not finished:
            if step == 0:
                self.save_last(0)
            if self.barrier is not None:
                self.barrier()
            raise interrupted(step, self.out_dir)

    def error(self, exc: KeyboardInterrupt, step: int) -> Interrupted:
        """What a KeyboardInterrupt inside the loop becomes: itself when it is already the line."""
        return exc if isinstance(exc, Interrupted) else interrupted(step, self.out_dir, saved=False)


def interrupted(step: int, out_dir: str, saved: bool = True) -> Interrupted:
    """The one line a Ctrl-C'd training run ends with."""
    if saved:
        return Interrupted(f"stopped at step {step}, checkpoint saved in {out_dir}/last: re-run the same "
                           "command with --resume to continue from there")
    return Interrupted(f"stopped during step {step + 1}, before its checkpoint: re-run the same command with "
                       f"--resume to continue from the last checkpoint in {out_dir}/last (if any)")


# ---- resume ---------------------------------------------------------------------------------------
def check_resume(out_dir: str, ckpt_step: int, recorded_config: dict, config: dict, recorded_run: dict,
                 run: dict, notes: list | None = None) -> None:
    """Refuse to resume a run with settings that change what it trains: any config key but the
    OPERATIONAL_KEYS and `steps`, or what it reads (`run`: store, feature sets, precision, ...),
    listing every difference on its own line.  `steps` may change (a run can be extended, or
    stopped earlier, as long as it is not below the step reached): the cosine then runs to the
    new total from where the run is, which `notes` says."""
    then = {k: v for k, v in recorded_config.items() if k not in OPERATIONAL_KEYS and k != "steps"}
    now = {k: v for k, v in config.items() if k not in OPERATIONAL_KEYS and k != "steps"}
    diff = identity_diff(recorded_run, run, then="in the run", now="now", keys=list(recorded_run))
    diff += identity_diff(then, now, then="in the run", now="now")
    if diff:
        raise ConfigError(f"--resume: {out_dir} was trained with other settings (resume with the run's own, or train "
                          f"these into a new --out):{lines(diff)}")
    old, new = int(recorded_config["steps"]), int(config["steps"])
    if new < ckpt_step:
        raise ConfigError(f"--resume: {out_dir} is already at step {ckpt_step}, past --steps {new}: "
                          f"ask for {ckpt_step} steps or more")
    if new != old and notes is not None:
        notes.append(f"steps changed from {old} to {new} on resume: the lr schedule now runs to step {new} "
                     f"from step {ckpt_step}")


# ---- the loop both trainers run ---------------------------------------------------------------------
def restore(ckpt, model: torch.nn.Module, optimizer, loader) -> None:
    """Continue checkpoint `ckpt` exactly: its weights, optimizer state, RNG and the loader's position."""
    model.load_state_dict(ckpt.model.state_dict())
    checkpoint.restore_optimizer(optimizer, model, ckpt)
    checkpoint.restore_rng(ckpt.tensors)
    loader.load_state_dict(ckpt.state["loader"])


def start_output(out_dir: str, cfg, metrics: Metrics, ckpt) -> None:
    """Rank 0's run directory: the metrics file (cut back to the checkpoint's step on resume) and config.yaml."""
    os.makedirs(out_dir, exist_ok=True)
    metrics.start(ckpt.step if ckpt else None)
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def run_steps(*, run, cfg, model, optimizer, loader, out_dir: str, step: int, resumed: bool, metrics: Metrics,
              state, validate, train_step, desc: str, progress: bool, stopped_early: bool = False,
              early_stop=None) -> dict:
    """Steps `step`..cfg.steps of a training run, the same for train-head and train-uta, which
    pass what differs: `train_step(step, batches) -> (loss, grad_norm)` (one optimizer step, its
    micro-batches drawn from `batches`), `validate(record, final)` (rank 0 validates into `record`
    and keeps `best`; every rank calls it), `state(step)` (the checkpoint's state dict) and
    `early_stop()` (after a validation: stop now? the same on every rank).  Around them: the lr
    schedule, validation at step 0 and when due, metrics, `last` checkpoints, Ctrl-C (every rank
    stops at the same step; `StopOnInterrupt`), DDP barriers.  `run`: trainers.distributed.Dist."""
    from featstore.trainers import checkpoint

    n_params = count_parameters(model)
    bar = progress_bar(cfg.steps, step, f"{desc} ({n_params:,} params)", progress and run.is_main)
    batches = forever(loader)
    start_step, t_loop = step, time.time()

    def save_last(step: int) -> None:
        if run.is_main:
            checkpoint.save(os.path.join(out_dir, "last"), model, state(step), optimizer)

    interrupt = StopOnInterrupt(out_dir, save_last, barrier=run.barrier,
                                log=None if run.is_main else (lambda msg: None)).start()
    try:
        if step == 0 and not resumed:  # a run resumed from its step-0 checkpoint has validated already
            record = {"step": 0, "loss": None, "lr": 0.0, "world_size": run.world_size}
            validate(record, False)
            metrics.log(record)
        stop = interrupt.agree(run)
        while step < cfg.steps and not stopped_early and not stop:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = train_step(step, batches)
            step += 1

            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm}
            if validation_due(step, cfg):
                validate(record, step == cfg.steps)
                stopped_early = bool(early_stop()) if early_stop else False
            if "val_loss" in record or step % cfg.log_every == 0:
                metrics.log(record)
            stop = interrupt.agree(run)  # Ctrl-C on any rank: every rank saves and stops at this step
            if step % cfg.save_every == 0 or step == cfg.steps or stopped_early or stop:
                save_last(step)
            show(bar, record)
        interrupt.stop_here(step, finished=step >= cfg.steps or stopped_early)
    except KeyboardInterrupt as e:  # a second Ctrl-C, or one before the loop took over SIGINT
        raise interrupt.error(e, step) from None
    finally:
        interrupt.stop()
        bar.close()
        batches.close()
    run.barrier()  # rank 0's last checkpoint is written
    run.teardown()
    seconds = time.time() - t_loop
    return {"step": step, "stopped_early": stopped_early, "params": n_params,
            "steps_per_s": (step - start_step) / seconds if step > start_step and seconds > 0 else None}
