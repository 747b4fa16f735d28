"""trainers/uta/fresh_crops.py: the per-step random-resized crops (torchvision's rule, EVA-02's
parameters), cut from stored uint8 pixels, and the stored token grid resampled to a crop.
End to end (train-uta with fresh_crops=teacher / resample): tests/test_uta.py."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from featstore.trainers.uta.batch import flip_tokens
from featstore.trainers.uta.fresh_crops import cut, draw_crops, resample_tokens, step_crops
from featstore.trainers.uta.masks import step_generator

from imagedata import real_images


def _pixels(n=3, size=32):
    """Real photos (skimage), resized to size x size, as uint8 (n, 3, size, size)."""
    import numpy as np

    arrays = [np.asarray(img.resize((size, size))) for _, img in real_images(n)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def test_crops_follow_random_resized_crop_and_are_a_function_of_seed_and_step():
    boxes, flips = draw_crops(4000, step_generator(0, 7), scale_min=0.2)
    x0, y0, w, h = boxes.unbind(1)
    area, ratio = w * h, w / h
    assert (area >= 0.2 - 1e-6).all() and (area <= 1 + 1e-6).all()
    assert (ratio >= 3 / 4 - 1e-5).all() and (ratio <= 4 / 3 + 1e-5).all()
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + w <= 1 + 1e-6).all() and (y0 + h <= 1 + 1e-6).all()
    assert 0.45 < flips.float().mean() < 0.55 and area.std() > 0.1  # really random
    cfg = SimpleNamespace(seed=3, crop_scale_min=0.2)
    whole = step_crops(cfg, 5, 8)
    again = step_crops(cfg, 5, 8)
    assert torch.equal(whole[0], again[0]) and torch.equal(whole[1], again[1])  # a resumed run cuts the same
    assert not torch.equal(step_crops(cfg, 6, 8)[0], whole[0])  # another step, other crops
    shares = [step_crops(cfg, 5, 4, rank=r, world_size=2) for r in range(2)]  # two ranks: one process's crops
    assert torch.equal(torch.cat([s[0] for s in shares]), whole[0])


def test_cut_resizes_the_box_bicubic():
    x = _pixels()
    everything = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    keep, mirror = torch.zeros(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
    assert torch.equal(cut(x, everything, keep), x)  # the whole image at its size: itself
    assert torch.equal(cut(x, everything, mirror), x.flip(-1))  # and mirrored
    quarter = torch.tensor([[0.5, 0.0, 0.5, 0.5]] * 3)  # the top-right quarter, on pixel boundaries
    want = F.interpolate(x[..., :16, 16:].float(), size=32, mode="bicubic", align_corners=False)
    got = cut(x, quarter, keep).float()
    # rounding aside, torch's bicubic resize of the cropped box; at the box's inner edges the cubic taps
    # read the image's real neighbouring pixels, where crop-then-resize repeats the box's edge
    assert (got - want.round().clamp(0, 255))[..., 3:-3, 3:-3].abs().max() <= 1
    assert cut(x, quarter, keep).dtype == torch.uint8


def test_resampled_tokens_follow_the_crop():
    g, d = 8, 5
    ys, xs = torch.meshgrid(torch.arange(g).float(), torch.arange(g).float(), indexing="ij")
    field = torch.stack([xs, ys, xs + 2 * ys, torch.ones_like(xs), xs - ys], dim=-1).reshape(1, g * g, d)
    everything = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(resample_tokens(field, everything, torch.tensor([False])), field)
    assert torch.allclose(resample_tokens(field, everything, torch.tensor([True])), flip_tokens(field, torch.tensor([True])))
    # the central half: cell centres at 2.25, 2.75, ..., 5.75 in token units; bilinear keeps linear fields exact
    half = resample_tokens(field, torch.tensor([[0.25, 0.25, 0.5, 0.5]]), torch.tensor([False])).reshape(g, g, d)
    centres = 2 + (torch.arange(g) + 0.5) * 0.5 - 0.5
    assert torch.allclose(half[0, :, 0], centres) and torch.allclose(half[:, 0, 1], centres)
    assert torch.allclose(half[..., 2], half[..., 0] + 2 * half[..., 1])
    assert math.isclose(float(half[..., 3].mean()), 1.0)
