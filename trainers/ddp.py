"""Multi-process training (DDP on torch.distributed), shared by both training loops.

    torchrun --nproc_per_node 4 -m featstore train-head --store s.zarr ... --device cuda

`setup(device)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and
joins the process group: gloo on CPU, nccl on CUDA with each rank on cuda:LOCAL_RANK.  Without
torchrun (or with one process) it returns a one-process `Dist` whose methods do nothing, so a loop
reads the same either way and a single process trains exactly as it always did.

What a loop relies on:

- **The config's `batch_size` is the global batch**: each rank reads `batch_size / world_size` rows
  per step (`per_rank_batch`) through the Loader's rank share with drop_last, so every rank gets the
  same number of batches (a rank with one batch fewer would leave the others waiting forever in a
  collective).  The same config therefore trains the same method at any world size.
- **Contrastive negatives across ranks** (`info_nce`): every rank's embeddings are gathered with
  their gradients (`all_gather_with_grad`), each rank scores its own rows against all B and the loss
  is the mean of those rows (CLIP-style "local loss"); DDP's gradient average then equals the
  gradient of the single-process loss at global batch B.
- **BatchNorm over the global batch** (`GlobalBatchNorm`, put in by `wrap`): the same statistics
  a single process computes over B rows; parameters and buffers keep BatchNorm's names, so a
  checkpoint loads into the plain model.
- **Rank 0 validates and writes** (checkpoints, metrics.jsonl, plots); the other ranks wait at
  `barrier()`, and take rank 0's decisions (early stopping) through `broadcast`.  Validation thus
  gives exactly the numbers of a single process at the same weights.
- **Randomness per rank** (`seed_step`): dropout / drop path are reseeded each step from
  (seed, step, rank), so a resumed multi-process run draws what an uninterrupted one did without
  saving every rank's RNG state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from featstore.errors import CheckpointError, ConfigError

from featstore.device import resolve_device

# How long ranks wait in a collective, e.g. for rank 0's validation and checkpoint writes
# (torch's defaults, 10 min for nccl, are shorter than a large validation can take).
TIMEOUT = timedelta(minutes=60)


@dataclass
class Dist:
    """This process's place in the run; a one-process run has rank 0 of world size 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # True when `setup` started the process group (and teardown ends it)

    @property
    def is_main(self) -> bool:
        """The rank that validates and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # ---- batches -----------------------------------------------------------------------------
    def per_rank_batch(self, batch_size: int) -> int:
        """Rows each rank reads per step for a global batch of `batch_size`."""
        if batch_size % self.world_size:
            raise ConfigError(f"batch_size {batch_size} (the global batch) does not split evenly over {self.world_size} "
                              f"processes: use a multiple of {self.world_size}")
        return batch_size // self.world_size

    # ---- collectives (no-ops in one process) -------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def broadcast(self, value):
        """Rank 0's `value` (any picklable object) on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is True on any (a Ctrl-C seen by one rank stops them all
        at the same step)."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of a (detached) tensor over ranks."""
        if not self.enabled:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world_size

    def same_everywhere(self, value, what: str, fix: str) -> None:
        """Refuse, on every rank, a `value` that differs between ranks."""
        if not self.enabled:
            return
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            seen = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ConfigError(f"the ranks disagree on {what} ({seen}): {fix}")

    # ---- the model ---------------------------------------------------------------------------
    def wrap(self, module: nn.Module, unused_parameters: bool = False) -> nn.Module:
        """`module` ready for the training step: in one process itself; else its BatchNorm layers
        made global (in place: `module` stays the model to validate and save) and DDP around it.
        `unused_parameters`: some parameters get no gradient in a step (DDP must look for them)."""
        if not self.enabled:
            return module
        global_batchnorm(module)
        return nn.parallel.DistributedDataParallel(module, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                                                   find_unused_parameters=unused_parameters)

    def seed_step(self, seed: int, step: int) -> None:
        """Reseed torch's RNG (dropout, drop path) from (seed, step, rank) in a multi-process run."""
        if self.enabled:
            state = np.random.SeedSequence([int(seed), 7, int(step), self.rank]).generate_state(2, dtype=np.uint32)
            torch.manual_seed(int(state[0]) << 32 | int(state[1]))

    # ---- resume ------------------------------------------------------------------------------
    def check_resume(self, ckpt) -> None:
        """Every rank resumes from the same checkpoint, at the world size it was trained at (each
        rank's share of the data order depends on it: another world size would skip or repeat rows)."""
        self.same_everywhere(ckpt.step if ckpt else None, "the checkpoint to resume from (None: a fresh run)",
                             "--out must be a directory every rank reads (one node, or a shared filesystem)")
        if ckpt is None:
            return
        saved = int(ckpt.state.get("world_size", 1))
        if saved != self.world_size:
            how = "without torchrun" if saved == 1 else f"on {saved} processes in all (one node: torchrun --nproc_per_node {saved})"
            raise CheckpointError(
                f"checkpoint {ckpt.path} was trained on {saved} process(es), this run has {self.world_size}: "
                f"resume it {how} (each rank's share of the data order depends on the world size)")

    def teardown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup(device) -> Dist:
    """This process's `Dist`: in the process group the caller started, else from torchrun's
    environment when WORLD_SIZE > 1 (starting the group, which `teardown` then ends), else a
    one-process run on `device`."""
    dev = resolve_device(device)
    joined = dist.is_available() and dist.is_initialized()  # e.g. by the caller's own launcher
    world = dist.get_world_size() if joined else int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist(device=dev)
    rank = dist.get_rank() if joined else int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if dev.type == "cuda":
        if dev.index is not None and dev.index != local:
            raise ConfigError(f"under torchrun each rank trains on cuda:LOCAL_RANK; --device {device} names one GPU "
                              "for all: pass --device cuda")
        if local >= torch.cuda.device_count():
            raise ConfigError(f"rank {rank} has LOCAL_RANK {local} but this node has {torch.cuda.device_count()} "
                              f"CUDA device(s): use --nproc_per_node {torch.cuda.device_count()} or fewer")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif dev.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"multi-process training runs on cpu (gloo) or cuda (nccl), not on {dev.type}")
    if not joined:
        if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
            raise ConfigError(f"WORLD_SIZE={world} is set but MASTER_ADDR/MASTER_PORT are not: launch with torchrun")
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=dev if dev.type == "cuda" else None)
    elif backend not in str(dist.get_backend()):
        raise ConfigError(f"the process group runs {dist.get_backend()}, but training on {dev.type} needs {backend}")
    return Dist(rank=dist.get_rank(), world_size=world, local_rank=local, device=dev, owns_group=not joined)


# ---- collectives with gradients ----------------------------------------------------------------
class _AllGather(torch.autograd.Function):
    """Every rank's rows, concatenated in rank order; backward hands each rank the sum over ranks
    of the gradient of its own rows (every rank's loss depends on them)."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(ctx.world)[ctx.rank]


class _AllReduceSum(torch.autograd.Function):
    """The sum over ranks; backward sums the gradients over ranks the same way."""

    @staticmethod
    def forward(ctx, x):
        y = x.contiguous().clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(world_size * n, ...) from every rank's (n, ...) (the same n everywhere), rank order;
    gradients flow back to the rank each row came from.  In one process: `x`."""
    return _AllGather.apply(x) if _multi() else x


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x) if _multi() else x


def _multi() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch: this rank's rows against every rank's.  Rank r's
    rows are rows [r*n, (r+1)*n) of the global batch, so the mean over ranks of this value is the
    single-process `contrastive.info_nce` of the whole global batch (and so are its gradients,
    once DDP averages them).  In one process it is `contrastive.info_nce` itself."""
    if not _multi():
        from featstore.trainers.contrastive import info_nce as local

        return local(image, text, logit_scale)
    image, text = image.float(), text.float()
    all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)
    target = torch.arange(len(image), device=image.device) + dist.get_rank() * len(image)
    i2t = logit_scale * image @ all_text.T
    t2i = logit_scale * text @ all_image.T
    return 0.5 * (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target))


# ---- BatchNorm over the global batch ---------------------------------------------------------
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (every rank's rows, two
    passes: the mean, then the variance around it), with gradients through both; identical to
    BatchNorm outside a multi-process run and in eval mode.  Same parameters and buffers as
    nn.BatchNorm1d/2d/3d.  (torch's SyncBatchNorm does this on GPUs only.)"""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _multi()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        sums = all_reduce_sum_with_grad(torch.cat([xf.sum(dims), xf.new_full((1,), x.numel() // x.shape[1])]))
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centred = xf - mean.view(shape)
        var = all_reduce_sum_with_grad((centred * centred).sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
        return y.to(x.dtype)


def global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer inside `module` by a GlobalBatchNorm with the same state (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new.to(next(child.buffers(), torch.zeros(())).device).train(child.training))
        else:
            global_batchnorm(child)
    return module
