"""Decode image bytes and turn them into a backbone's input crop, with PIL only.

featstore does its own preprocessing so that the pixels (and so the features) are the same
whether or not torchvision is installed. `Preprocess` reproduces torchvision's
``Resize(shorter side) -> CenterCrop -> ToTensor -> Normalize`` exactly:

* resize: the shorter side becomes ``resize`` and the longer one ``int(resize * long / short)``
  (truncated, as torchvision computes it), with PIL's antialiased ``Image.resize``;
* center crop: offsets ``int(round((size - crop) / 2.0))`` (Python's round, as torchvision),
  zero padding first when the image is smaller than the crop;
* normalize: ``(x / 255 - mean) / std`` in float32, as the same two tensor ops.

The uint8 crop (3, crop, crop) is what extraction batches and what the store keeps as
``pixels/<name>``; normalization runs later on the backbone's device.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featstore.errors import BadSample, ConfigError, one_line

PREPROCESS_NAME = "featstore-pil-v1"

#: Images with more pixels than this are refused as ``too-large`` before their pixels are
#: decoded. It is PIL's own warning threshold (``Image.MAX_IMAGE_PIXELS``, ~89.5M pixels).
MAX_PIXELS = 89_478_485

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_PIL_CODE_TO_NAME = {int(v): k for k, v in _INTERPOLATIONS.items()}
_RESIZE_MODES = ("shortest", "squash")
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_INT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


# --------------------------------------------------------------------------------------------
# decoding


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes into an 8-bit RGB PIL image, or raise `BadSample`.

    * EXIF orientation is applied (``ImageOps.exif_transpose``); unreadable EXIF is ignored.
    * Every mode becomes RGB. Transparency (an alpha band, or a palette/``tRNS`` transparent
      colour) is composited on a **white** background. 16-bit grey (``I;16``/``I``, e.g. 16-bit
      PNG) is scaled by 255/65535 (rounded), not clipped; float (``F``) is clipped to 0..255.
      CMYK uses PIL's conversion (no ICC colour management). Animated images give frame 0.
    * Reasons (``BadSample.reason``): ``empty-file``, ``not-an-image``, ``too-large`` (more than
      `MAX_PIXELS`; checked from the header, before any pixel is decoded), ``truncated-image``,
      ``corrupt-image``.
    """
    if not data:
        raise BadSample("empty-file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("too-large", one_line(e)) from None
    except UnidentifiedImageError:
        raise BadSample("not-an-image", f"{len(data)} bytes that PIL cannot identify") from None
    except EOFError as e:
        raise BadSample("truncated-image", one_line(e) if str(e).strip() else "unexpected end of file") from None
    except Exception as e:  # a header PIL recognises but cannot parse
        raise BadSample("corrupt-image", one_line(e)) from None

    width, height = img.size
    if width * height > MAX_PIXELS:  # also catches a lowered/disabled Image.MAX_IMAGE_PIXELS
        raise BadSample("too-large", f"{width}x{height} pixels is over the {MAX_PIXELS} limit")
    if width < 1 or height < 1:
        raise BadSample("corrupt-image", f"image size {width}x{height}")

    try:
        img.load()
    except EOFError as e:
        raise BadSample("truncated-image", one_line(e) if str(e).strip() else "unexpected end of file") from None
    except OSError as e:
        reason = "truncated-image" if "truncat" in str(e).lower() else "corrupt-image"
        raise BadSample(reason, one_line(e)) from None
    except Exception as e:  # SyntaxError, ValueError, zlib.error, ... from plugin decoders
        raise BadSample("corrupt-image", one_line(e)) from None

    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF must not cost the sample; keep the stored orientation
        pass
    try:
        return to_rgb(img)
    except Exception as e:
        raise BadSample("corrupt-image", f"cannot convert mode {img.mode}: {one_line(e)}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (alpha composited on white; 16-bit scaled, not clipped)."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _INT_MODES:
        arr = np.asarray(img).astype(np.float64)  # I;16* -> uint16; I -> int32
        grey = np.rint(np.clip(arr, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode == "F":
        grey = np.rint(np.clip(np.asarray(img, dtype=np.float64), 0, 255)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")



# --------------------------------------------------------------------------------------------
# resize + crop + normalize


@dataclass(frozen=True)
class Preprocess:
    """A backbone's input recipe: resize, center crop, then normalize on the device.

    ``resize_mode="shortest"`` (default) resizes the shorter side to ``resize`` keeping the
    aspect ratio; ``"squash"`` resizes straight to ``resize x resize`` (SigLIP's processor).
    """

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self):
        # normalise types so equal recipes compare and hash equal (lists -> tuples, numpy -> float)
        object.__setattr__(self, "resize", int(self.resize))
        object.__setattr__(self, "crop", int(self.crop))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.resize < 1 or self.crop < 1:
            raise ConfigError(f"preprocess resize and crop must be >= 1, got {self.resize}, {self.crop}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError(f"preprocess mean and std need 3 values each, got {self.mean}, {self.std}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"preprocess std must be > 0, got {self.std}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ConfigError(
                f"unknown interpolation {self.interpolation!r}; use one of {', '.join(_INTERPOLATIONS)}"
            )
        if self.resize_mode not in _RESIZE_MODES:
            raise ConfigError(f"unknown resize_mode {self.resize_mode!r}; use one of {', '.join(_RESIZE_MODES)}")

    # -- identity -----------------------------------------------------------------------------

    def identity(self) -> dict:
        """Plain JSON-able dict naming this recipe completely (stored in the feature set's attrs)."""
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return {"name": PREPROCESS_NAME, **d}

    @classmethod
    def from_identity(cls, identity: Mapping[str, Any]) -> "Preprocess":
        """Inverse of `identity()` (refuses a recipe written by another preprocessing version)."""
        if identity.get("name") != PREPROCESS_NAME:
            raise ConfigError(f"preprocessing {identity.get('name')!r} is not {PREPROCESS_NAME!r}")
        fields = {k: v for k, v in identity.items() if k != "name"}
        try:
            return cls(**fields)
        except TypeError as e:
            raise ConfigError(f"bad preprocessing identity {json.dumps(dict(identity))}: {e}") from None

    @classmethod
    def from_hf(cls, config: Any) -> "Preprocess":
        """Read a transformers image processor (object, its ``to_dict()``, the
        ``preprocessor_config.json`` path or the directory holding it) into a `Preprocess`.

        Uses ``size`` (``shortest_edge``, ``height``/``width`` or an int), ``crop_size``,
        ``do_center_crop``, ``image_mean``/``image_std`` (``do_normalize=False`` -> 0/1) and
        ``resample``. ``size={"height": h, "width": w}`` without a center crop means a squash resize.
        """
        cfg = _processor_dict(config)
        size = cfg.get("size")
        crop_size = cfg.get("crop_size")
        do_crop = cfg.get("do_center_crop", crop_size is not None)
        shortest = None
        squash = None
        if isinstance(size, (int, float)):
            shortest = int(size)
        elif isinstance(size, Mapping):
            if size.get("shortest_edge"):
                shortest = int(size["shortest_edge"])
            elif size.get("height") and size.get("width"):
                squash = _square(size, "size")
        if shortest is None and squash is None:
            raise ConfigError(f"image processor size {size!r} is not shortest_edge, height/width or an int")
        crop = None
        if do_crop and crop_size is not None:
            crop = int(crop_size) if isinstance(crop_size, (int, float)) else _square(crop_size, "crop_size")
        if squash is not None:
            resize, crop, mode = squash, (crop or squash), "squash"
        else:
            resize, crop, mode = shortest, (crop or shortest), "shortest"
        if cfg.get("do_normalize", True):
            mean = tuple(cfg.get("image_mean") or IMAGENET_MEAN)
            std = tuple(cfg.get("image_std") or IMAGENET_STD)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if len(mean) == 1:
            mean = mean * 3
        if len(std) == 1:
            std = std * 3
        resample = cfg.get("resample", Image.Resampling.BICUBIC)
        interpolation = _interpolation_name(resample)
        return cls(resize=resize, crop=crop, mean=mean, std=std, interpolation=interpolation, resize_mode=mode)

    # -- the transform ------------------------------------------------------------------------

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step (torchvision's arithmetic)."""
        if self.resize_mode == "squash":
            return self.resize, self.resize
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def __call__(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 array (3, crop, crop), C-contiguous."""
        if img.mode != "RGB":
            img = to_rgb(img)
        size = self.resized_size(*img.size)
        if size != img.size:
            img = img.resize(size, resample=_INTERPOLATIONS[self.interpolation])
        arr = center_crop(np.asarray(img), self.crop)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def centre_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Where `__call__`'s centre crop lies in a width x height image: (y0, x0, h, w) as
        fractions of its height and width (outside [0, 1] where the crop is padded)."""
        rw, rh = self.resized_size(width, height)
        top, left = int(round((rh - self.crop) / 2.0)), int(round((rw - self.crop) / 2.0))
        return top / rh, left / rw, self.crop / rh, self.crop / rw

    def resized_crop(self, img: Image.Image, box: tuple[int, int, int, int], flip: bool = False) -> np.ndarray:
        """RGB PIL image -> uint8 (3, crop, crop): the pixel box (top, left, height, width) of the
        original resized to crop x crop with this recipe's interpolation, mirrored left-right
        with `flip` (torchvision's ``resized_crop`` then ``hflip`` on a PIL image: crop, then
        resize).  The stored views' crops (`pipelines.views`); `__call__` is unchanged."""
        if img.mode != "RGB":
            img = to_rgb(img)
        top, left, h, w = (int(v) for v in box)
        part = img.crop((left, top, left + w, top + h))
        if part.size != (self.crop, self.crop):
            part = part.resize((self.crop, self.crop), resample=_INTERPOLATIONS[self.interpolation])
        arr = np.asarray(part)
        if flip:
            arr = arr[:, ::-1]
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def normalize(self, x):
        """uint8 tensor (B, 3, H, W) on any device -> float32 ``(x / 255 - mean) / std``."""
        import torch

        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return x.to(torch.float32).div(255.0).sub(mean).div(std)


def center_crop(arr: np.ndarray, crop: int) -> np.ndarray:
    """Center-crop an (H, W, C) array to (crop, crop, C) as torchvision's CenterCrop does:
    zero-pad (left/top gets the smaller half) when too small, then crop at
    ``int(round((size - crop) / 2.0))``."""
    h, w = arr.shape[:2]
    if h < crop or w < crop:
        pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
        arr = np.pad(arr, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        h, w = arr.shape[:2]
    top = int(round((h - crop) / 2.0))
    left = int(round((w - crop) / 2.0))
    return arr[top : top + crop, left : left + crop]


def load_and_preprocess(data: bytes, pre: Preprocess) -> np.ndarray:
    """Decode bytes and return the uint8 (3, crop, crop) crop; raises `BadSample`.
    Module level (picklable) so extraction can run it in worker processes."""
    return pre(decode_image(data))


# --------------------------------------------------------------------------------------------
# helpers


def _processor_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "preprocessor_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read image processor config {path}: {one_line(e)}") from None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ConfigError(f"cannot read an image processor config from {type(config).__name__}")


def _square(size: Any, what: str) -> int:
    if isinstance(size, (int, float)):
        return int(size)
    h, w = int(size["height"]), int(size["width"])
    if h != w:
        raise ConfigError(f"image processor {what} {h}x{w} is not square; featstore crops square inputs")
    return h


def _interpolation_name(resample: Any) -> str:
    if isinstance(resample, str):
        name = resample.lower()
        if name in _INTERPOLATIONS:
            return name
        raise ConfigError(f"unknown resample {resample!r}")
    code = int(resample)
    if code not in _PIL_CODE_TO_NAME:
        raise ConfigError(f"unknown PIL resample code {resample!r}")
    return _PIL_CODE_TO_NAME[code]
