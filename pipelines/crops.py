"""Stored views (`extract --views K`): K augmented crops per image, each with its own backbone outputs.

View 0 is the backbone recipe's own crop (resize + centre crop: the bytes a store without views
holds, what evaluation reads).  Views 1..K-1 are random-resized crops, each mirrored left-right
with probability `flip`:

- the crop box follows torchvision's ``RandomResizedCrop.get_params`` (the one EVA-02's pre-training
  uses through its own copy): up to 10 tries of an area fraction uniform in `scale` and an aspect
  ratio log-uniform in `ratio`, rounded to whole pixels, at a uniform position; else the centre
  crop of the whole image clamped to `ratio`;
- the box is cut from the decoded original (EXIF orientation applied) and resized to the
  recipe's crop size with its interpolation (`Preprocess.resized_crop`), then mirrored.

Every draw comes from ``numpy.random.default_rng(SeedSequence([seed, crc32(uid), k]))``: a view
is a pure function of (seed, the sample's uid, k, the image), so re-runs, other block layouts,
other batch sizes and a store that grew all give the same crop of a uid.  The defaults are
EVA-02's MIM pre-training augmentation (UTA builds on EVA-02; UTA's release has no training code):
scale (0.2, 1.0), ratio (3/4, 4/3), flip 0.5.  torchvision's own default scale is (0.08, 1.0).

Each view's box is stored as fractions of the original's height and width, (y0, x0, h, w)
float32 (`view_crops`), and its mirroring as `view_flips`; `view_box_pixels` turns a stored box
back into the pixel box, so the stored pixels can be recomputed from the original image.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from featstore.errors import BadSample, ConfigError

from .preprocess import Preprocess, decode_image

VIEWS_NAME = "featstore-views-v1"
EVA02_SCALE = (0.2, 1.0)
EVA02_RATIO = (3.0 / 4.0, 4.0 / 3.0)
EVA02_FLIP = 0.5


@dataclass(frozen=True)
class ViewSpec:
    """How K views per image are made; `identity()` is recorded with the feature set."""

    k: int
    seed: int = 0
    scale: tuple[float, float] = EVA02_SCALE
    ratio: tuple[float, float] = EVA02_RATIO
    flip: float = EVA02_FLIP

    def __post_init__(self):
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))
        object.__setattr__(self, "ratio", tuple(float(v) for v in self.ratio))
        object.__setattr__(self, "flip", float(self.flip))
        if self.k < 1:
            raise ConfigError(f"--views must be >= 1, not {self.k}")
        if self.seed < 0:
            raise ConfigError(f"--view-seed must be >= 0, not {self.seed}")
        (s0, s1), (r0, r1) = self.scale, self.ratio
        if len(self.scale) != 2 or not 0 < s0 <= s1 <= 1:
            raise ConfigError(f"--view-scale must be two area fractions 0 < min <= max <= 1, not {self.scale}")
        if len(self.ratio) != 2 or not 0 < r0 <= r1:
            raise ConfigError(f"--view-ratio must be two aspect ratios 0 < min <= max, not {self.ratio}")
        if not 0.0 <= self.flip <= 1.0:
            raise ConfigError(f"--view-flip must be a probability in [0, 1], not {self.flip}")

    def identity(self) -> dict:
        return {"name": VIEWS_NAME, "k": self.k, "seed": self.seed, "scale": list(self.scale), "ratio": list(self.ratio),
                "flip": self.flip, "view0": "centre crop", "crop": "random-resized", "draws": "seed, crc32(uid), view"}

    @classmethod
    def from_identity(cls, identity: dict) -> "ViewSpec":
        if identity.get("name") != VIEWS_NAME:
            raise ConfigError(f"views {identity.get('name')!r} are not {VIEWS_NAME!r}")
        return cls(identity["k"], identity["seed"], identity["scale"], identity["ratio"], identity["flip"])


def view_rng(seed: int, uid: str, k: int) -> np.random.Generator:
    """The generator of view `k` of sample `uid` (independent of every other view and sample)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(str(uid).encode("utf-8")), int(k)]))


def random_resized_box(rng: np.random.Generator, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized crop of a width x height image, as
    torchvision's ``RandomResizedCrop.get_params`` draws it (with this generator)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(rng.uniform(scale[0], scale[1]))
        aspect = math.exp(float(rng.uniform(log_ratio[0], log_ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # fallback: the centre of the whole image, clamped to the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def view_params(uid: str, width: int, height: int, spec: ViewSpec, pre: Preprocess) -> tuple[list, np.ndarray, np.ndarray]:
    """The K views of one image: ([None (view 0: the recipe's crop) or the pixel box of each
    view], boxes (K, 4) float32 fractions, flips (K,) bool)."""
    pixel_boxes: list = [None]
    boxes = np.zeros((spec.k, 4), np.float32)
    flips = np.zeros(spec.k, bool)
    boxes[0] = pre.centre_box(width, height)
    for k in range(1, spec.k):
        rng = view_rng(spec.seed, uid, k)
        top, left, h, w = random_resized_box(rng, width, height, spec.scale, spec.ratio)
        flips[k] = bool(rng.random() < spec.flip)
        pixel_boxes.append((top, left, h, w))
        boxes[k] = (top / height, left / width, h / height, w / width)
    return pixel_boxes, boxes, flips


def view_box_pixels(box, width: int, height: int) -> tuple[int, int, int, int]:
    """A stored (y0, x0, h, w) box of a width x height image back to its pixel box (top, left,
    height, width): exact, float32 holds these fractions to far better than half a pixel."""
    y0, x0, h, w = (float(v) for v in box)
    return int(np.rint(y0 * height)), int(np.rint(x0 * width)), int(np.rint(h * height)), int(np.rint(w * width))


def make_views(img, uid: str, pre: Preprocess, spec: ViewSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An RGB PIL image's K views: (pixels (K, 3, crop, crop) uint8, boxes (K, 4), flips (K,))."""
    pixel_boxes, boxes, flips = view_params(uid, img.size[0], img.size[1], spec, pre)
    crops = [pre(img)] + [pre.resized_crop(img, box, flip) for box, flip in zip(pixel_boxes[1:], flips[1:])]
    return np.stack(crops), boxes, flips


def decode_views(items: list, uids: list, pre: Preprocess, spec: ViewSpec):
    """Decode a batch of raw image bytes (or BadSample from the source) into their views.

    Returns (pixels (k, K, 3, H, W), boxes (k, K, 4), flips (k, K)) for the good ones and, per
    item, None or (reason, detail).  Module level: picklable for decode processes."""
    crops, boxes, flips, errors = [], [], [], []
    for item, uid in zip(items, uids):
        try:
            if isinstance(item, BadSample):
                raise item
            c, b, f = make_views(decode_image(item), uid, pre, spec)
            crops.append(c)
            boxes.append(b)
            flips.append(f)
            errors.append(None)
        except BadSample as e:
            errors.append((e.reason, e.detail))
        except Exception as e:  # a decoder bug on one file must not stop the job
            errors.append(("decode-error", f"{type(e).__name__}: {e}"))
    if not crops:
        return (np.zeros((0, spec.k, 3, pre.crop, pre.crop), np.uint8), np.zeros((0, spec.k, 4), np.float32),
                np.zeros((0, spec.k), bool)), errors
    return (np.stack(crops), np.stack(boxes), np.stack(flips)), errors
