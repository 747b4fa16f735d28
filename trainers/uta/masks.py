"""UTA's masks: which grid positions each sample keeps, a pure function of (seed, step).

Two ways to choose the dropped positions, both giving exactly K = round(N * (1 - mask_ratio)) kept
positions per sample (so every sample's kept tokens stack into one batch):

* "random": a uniform random subset (UTA's, MAE's);
* "block": BEiT's block-wise masking.  Rectangles are dropped one after another, each of a random
  area (between `block_min` patches and what is still to drop) and aspect ratio (log-uniform in
  [aspect, 1/aspect]), at a random place, never the grid's full width or height, until the target
  is reached; when ten tries in a row fail to add any position, the rest is topped up at random
  (BEiT stops short instead; an exact count keeps the batch rectangular).  BEiT's values:
  16 patches at least, aspect 0.3, on a 14 x 14 grid.

With reversed masking each sample also gets the complement of its mask (the "complement view"),
so every position is aligned once per step.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch

MASKINGS = ("random", "block")


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The random stream of one training step (masks and flips): a pure function of (seed, step),
    so a resumed run draws exactly what an uninterrupted one did.  `stream` 1 is validation."""
    state = np.random.SeedSequence([int(seed), int(stream), int(step)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def keep_count(n_tokens: int, mask_ratio: float) -> int:
    return min(n_tokens, max(1, int(round(n_tokens * (1.0 - mask_ratio)))))


def draw_masks(n_samples: int, n_tokens: int, mask_ratio: float, generator: torch.Generator,
               reversed_masking: bool = True, masking: str = "random", block_min: int = 16,
               block_aspect: float = 0.3) -> list[torch.Tensor]:
    """Kept positions per sample, sorted: [(B, K)] or, with reversed masking, [(B, K), (B, N-K)]
    (the complement of each sample's mask)."""
    keep_n = keep_count(n_tokens, mask_ratio)
    if masking == "random" or keep_n == n_tokens:
        order = torch.rand(n_samples, n_tokens, generator=generator).argsort(dim=1)
        kept, dropped = order[:, :keep_n], order[:, keep_n:]
    elif masking == "block":
        side = math.isqrt(n_tokens)
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
        dropped_masks = np.stack([block_mask(side, n_tokens - keep_n, rng, block_min, block_aspect)
                                  for _ in range(n_samples)])
        order = torch.from_numpy(np.argsort(dropped_masks, axis=1, kind="stable"))  # kept (False) first
        kept, dropped = order[:, :keep_n], order[:, keep_n:]
    else:
        raise ValueError(f"masking must be one of {', '.join(MASKINGS)}, got {masking!r}")
    masks = [kept.sort(dim=1).values]
    if reversed_masking and keep_n < n_tokens:
        masks.append(dropped.sort(dim=1).values)
    return masks


def block_mask(side: int, n_drop: int, rng: random.Random, block_min: int = 16, aspect: float = 0.3) -> np.ndarray:
    """(side * side,) bool, exactly `n_drop` positions True (dropped), BEiT-style blocks."""
    mask = np.zeros((side, side), dtype=bool)
    dropped = 0
    log_lo, log_hi = math.log(aspect), math.log(1.0 / aspect)
    while dropped < n_drop:
        left, added = n_drop - dropped, 0
        for _ in range(10):
            area = rng.uniform(min(block_min, left), left)
            ratio = math.exp(rng.uniform(log_lo, log_hi))
            h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if not (1 <= h < side and 1 <= w < side):
                continue
            top, lft = rng.randint(0, side - h), rng.randint(0, side - w)
            block = mask[top : top + h, lft : lft + w]
            new = h * w - int(block.sum())
            if 0 < new <= left:
                block[:] = True
                added = new
                break
        if not added:
            break
        dropped += added
    flat = mask.reshape(-1)
    if dropped < n_drop:
        free = np.flatnonzero(~flat).tolist()
        flat[rng.sample(free, n_drop - dropped)] = True
    return flat


def mask_groups(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Masks of the same length stacked into one forward pass (reversed masking at ratio 0.5 →
    one batch of 2B sequences); masks of different lengths stay separate passes."""
    groups: dict[int, list[torch.Tensor]] = {}
    for m in masks:
        groups.setdefault(m.shape[1], []).append(m)
    return [torch.cat(ms) for ms in groups.values()]
