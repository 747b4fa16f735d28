"""featstore.pipelines.preprocess: decoding every odd kind of image, and the resize/crop/normalize recipe."""

import io
import json
import pickle
import struct
import time
import zlib

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from featstore.errors import BadSample, ConfigError
from featstore.pipelines.preprocess import (
    MAX_PIXELS,
    Preprocess,
    center_crop,
    decode_image,
    load_and_preprocess,
    to_rgb,
)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def reason_of(data: bytes) -> str:
    with pytest.raises(BadSample) as info:
        decode_image(data)
    return info.value.reason


@pytest.fixture(scope="module")
def astronaut_jpeg() -> bytes:
    return encode(Image.fromarray(skimage.data.astronaut()), "JPEG", quality=90)


# ---------------------------------------------------------------------------- bad samples


def test_empty_file():
    assert reason_of(b"") == "empty-file"


def test_not_an_image():
    assert reason_of(b"<html>definitely not an image</html>" * 10) == "not-an-image"


def test_truncated_jpeg(astronaut_jpeg):
    assert reason_of(astronaut_jpeg[: len(astronaut_jpeg) // 2]) == "truncated-image"
    assert reason_of(astronaut_jpeg[:-10]) == "truncated-image"


def test_truncated_png():
    png = encode(Image.fromarray(skimage.data.coffee()), "PNG")
    assert reason_of(png[: len(png) // 2]) in {"truncated-image", "corrupt-image"}


def test_corrupt_bytes_in_middle_of_jpeg(astronaut_jpeg):
    # a stray start-of-image marker inside the entropy-coded data: libjpeg gives up
    bad = bytearray(astronaut_jpeg)
    mid = len(bad) // 2
    bad[mid : mid + 2] = b"\xff\xd8"
    assert reason_of(bytes(bad)) == "corrupt-image"
    # a garbled Huffman table
    bad = bytearray(astronaut_jpeg)
    dht = astronaut_jpeg.index(b"\xff\xc4")
    bad[dht + 4 : dht + 21] = b"\xff" * 17
    assert reason_of(bytes(bad)) == "corrupt-image"


def test_random_garbage_in_entropy_data_never_escapes_as_another_error(astronaut_jpeg):
    # libjpeg often recovers from garbage in the scan data (a glitched but valid image);
    # either way the result is an RGB image or a BadSample, nothing else
    rng = np.random.default_rng(0)
    for _ in range(10):
        bad = bytearray(astronaut_jpeg)
        at = int(rng.integers(1000, len(bad) - 300))
        bad[at : at + 200] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
        try:
            img = decode_image(bytes(bad))
        except BadSample as e:
            assert e.reason in {"corrupt-image", "truncated-image"}
        else:
            assert img.mode == "RGB" and img.size == (512, 512)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bilevel_png(width: int, height: int, full: bool) -> bytes:
    """A 1-bit PNG; `full` streams a complete all-black image (tiny compressed, never in memory)."""
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    comp = zlib.compressobj(9)
    if full:
        row = b"\x00" * (1 + (width + 7) // 8)
        block = row * 256
        parts = [comp.compress(block) for _ in range(height // 256)]
        parts.append(comp.compress(row * (height % 256)))
    else:
        parts = [comp.compress(b"\x00" * 100)]
    parts.append(comp.flush())
    idat = _png_chunk(b"IDAT", b"".join(parts))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idat + _png_chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "width,height,full",
    [
        (10_000, 10_000, True),  # 100M pixels: over PIL's warning threshold, a real complete file
        (20_000, 20_000, False),  # 400M pixels: PIL's DecompressionBombError
        (200_000, 200_000, False),  # header-only claim of 40G pixels
    ],
)
def test_decompression_bomb_is_refused_before_decoding(width, height, full):
    data = _bilevel_png(width, height, full)
    assert len(data) < 200_000
    assert width * height > MAX_PIXELS
    t0 = time.perf_counter()
    with pytest.raises(BadSample) as info:
        decode_image(data)
    assert info.value.reason == "too-large"
    assert time.perf_counter() - t0 < 0.5  # decoding 100M+ pixels would take far longer


def test_large_but_allowed_image_decodes():
    img = decode_image(_bilevel_png(3000, 2000, True))
    assert img.mode == "RGB" and img.size == (3000, 2000)
    assert np.asarray(img)[::500, ::500].max() == 0


# ---------------------------------------------------------------------------- modes


def test_one_by_one_is_valid():
    img = decode_image(encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"))
    assert img.size == (1, 1) and img.getpixel((0, 0)) == (10, 200, 30)
    x = Preprocess(resize=32, crop=16)(img)
    assert x.shape == (3, 16, 16) and x.dtype == np.uint8
    assert (x[:, 0, 0] == [10, 200, 30]).all() and (x == x[:, :1, :1]).all()


def test_grey_L():
    a = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    img = decode_image(encode(Image.fromarray(a, "L"), "PNG"))
    assert img.mode == "RGB"
    out = np.asarray(img)
    assert (out == a[..., None]).all()


def test_bilevel_1bit():
    a = np.zeros((4, 6), bool)
    a[:, 3:] = True
    img = decode_image(encode(Image.fromarray(a), "PNG"))
    out = np.asarray(img)
    assert out.shape == (4, 6, 3)
    assert (out[:, :3] == 0).all() and (out[:, 3:] == 255).all()


def test_rgba_composited_on_white():
    a = np.zeros((2, 2, 4), np.uint8)
    a[0, 0] = (255, 0, 0, 255)  # opaque red
    a[0, 1] = (255, 0, 0, 0)  # fully transparent -> white
    a[1, 0] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    a[1, 1] = (0, 0, 255, 255)
    out = np.asarray(decode_image(encode(Image.fromarray(a, "RGBA"), "PNG"))).astype(int)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert np.abs(out[1, 0] - 127).max() <= 1
    assert out[1, 1].tolist() == [0, 0, 255]


def test_LA_composited_on_white():
    a = np.array([[[0, 255], [0, 0]]], np.uint8)  # black opaque, black transparent
    out = np.asarray(decode_image(encode(Image.fromarray(a, "LA"), "PNG")))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]


def test_palette_with_transparency():
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (3 * 254))
    img.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    img.info["transparency"] = 1  # index 1 (green) is transparent
    for fmt in ("PNG", "GIF"):
        data = encode(img, fmt, transparency=1)
        reopened = Image.open(io.BytesIO(data))
        assert reopened.mode == "P" and "transparency" in reopened.info
        out = np.asarray(decode_image(data))
        assert out[0, 0].tolist() == [255, 0, 0]
        assert out[0, 1].tolist() == [255, 255, 255]


def test_palette_without_transparency():
    img = Image.fromarray(skimage.data.chelsea()).convert("P", palette=Image.Palette.ADAPTIVE)
    out = decode_image(encode(img, "PNG"))
    assert out.mode == "RGB" and np.asarray(out).std() > 10


def test_cmyk_jpeg():
    rgb = skimage.data.coffee()
    data = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = np.asarray(decode_image(data)).astype(int)
    assert out.shape == rgb.shape
    assert np.abs(out - rgb).mean() < 6  # same picture, JPEG loss only


@pytest.mark.parametrize("value,expected", [(0, 0), (32768, 128), (65535, 255), (257 * 100, 100), (1000, 4)])
def test_16bit_png_scaled_not_clipped(value, expected):
    a = np.full((3, 5), value, np.uint16)
    data = encode(Image.fromarray(a), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(decode_image(data))
    assert out.shape == (3, 5, 3) and (out == expected).all()


def test_16bit_gradient_keeps_its_range():
    a = np.linspace(0, 65535, 256 * 4).astype(np.uint16).reshape(4, 256)
    out = np.asarray(decode_image(encode(Image.fromarray(a), "PNG")))[..., 0]
    assert out.min() == 0 and out.max() == 255
    assert np.abs(out.astype(int) - np.rint(a / 257.0)).max() == 0


def test_32bit_I_and_float_F_modes():
    i_img = Image.fromarray(np.array([[0, 32768, 65535, 70000]], np.int32), "I")
    assert np.asarray(to_rgb(i_img))[0, :, 0].tolist() == [0, 128, 255, 255]
    f_img = Image.fromarray(np.array([[-3.0, 12.4, 300.0]], np.float32), "F")
    assert np.asarray(to_rgb(f_img))[0, :, 0].tolist() == [0, 12, 255]


def test_exif_orientation_applied():
    a = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 tall
    a[:, :20] = (255, 0, 0)  # left half red
    a[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.fromarray(a), "JPEG", exif=exif.tobytes(), quality=95)
    assert Image.open(io.BytesIO(data)).size == (40, 20)
    img = decode_image(data)
    assert img.size == (20, 40)  # now 20 wide, 40 tall
    out = np.asarray(img).astype(int)
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # top is the old left: red
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60  # bottom is the old right: blue


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_real_images_png_roundtrip_and_crop(name):
    arr = getattr(skimage.data, name)()
    img = decode_image(encode(Image.fromarray(arr), "PNG"))
    assert img.mode == "RGB" and (np.asarray(img) == arr).all()
    pre = Preprocess(resize=256, crop=224)
    x = load_and_preprocess(encode(Image.fromarray(arr), "PNG"), pre)
    assert x.shape == (3, 224, 224) and x.dtype == np.uint8 and x.flags.c_contiguous
    assert 30 < x.mean() < 220 and x.std() > 20


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_real_images_jpeg_deterministic(name):
    data = encode(Image.fromarray(getattr(skimage.data, name)()), "JPEG", quality=85)
    pre = Preprocess(resize=64, crop=56, interpolation="bilinear")
    a, b = load_and_preprocess(data, pre), load_and_preprocess(data, pre)
    assert a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------- resize / crop


def test_resize_and_center_crop_match_hand_computation():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)  # 300 wide, 200 tall
    img = Image.fromarray(arr)
    pre = Preprocess(resize=100, crop=64, interpolation="nearest")
    assert pre.resized_size(300, 200) == (150, 100)
    resized = np.asarray(img.resize((150, 100), Image.Resampling.NEAREST))
    top, left = round((100 - 64) / 2), round((150 - 64) / 2)  # 18, 43
    expected = resized[top : top + 64, left : left + 64].transpose(2, 0, 1)
    assert (pre(img) == expected).all()


def test_resize_truncates_long_side_like_torchvision():
    pre = Preprocess(resize=224, crop=224)
    assert pre.resized_size(451, 300) == (int(224 * 451 / 300), 224) == (336, 224)
    assert pre.resized_size(300, 451) == (224, 336)
    assert pre.resized_size(333, 333) == (224, 224)
    assert Preprocess(resize=224, crop=224, resize_mode="squash").resized_size(451, 300) == (224, 224)


def test_center_crop_rounding_and_padding():
    a = np.arange(11 * 10).reshape(11, 10, 1)
    # (11-4)/2 = 3.5 -> 4 ; (10-4)/2 = 3
    assert (center_crop(a, 4) == a[4:8, 3:7]).all()
    b = np.arange(10 * 15).reshape(10, 15, 1)
    # round(2.5) == 2 and round(5.0) == 5 (Python / torchvision rounding)
    assert (center_crop(b, 5) == b[2:7, 5:10]).all()
    small = np.ones((3, 2, 3), np.uint8)
    out = center_crop(small, 6)
    assert out.shape == (6, 6, 3)
    # torchvision pads left/top with the smaller half: rows 1..3, cols 2..3
    assert out[1:4, 2:4].sum() == 3 * 2 * 3 and out.sum() == 3 * 2 * 3


def test_preprocess_accepts_non_rgb_image():
    out = Preprocess(resize=8, crop=8)(Image.new("L", (16, 8), 77))
    assert out.shape == (3, 8, 8) and (out == 77).all()


def test_normalize_matches_formula():
    pre = Preprocess(resize=8, crop=4, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    y = pre.normalize(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    ref = (x.double() / 255 - torch.tensor([0.1, 0.2, 0.3]).double().view(1, 3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 2.0]
    ).double().view(1, 3, 1, 1)
    assert torch.allclose(y.double(), ref, atol=1e-6)


# ---------------------------------------------------------------------------- identity & config


def test_identity_round_trips_through_json():
    pre = Preprocess(resize=256, crop=224, mean=[0.5, 0.5, 0.5], std=np.array([0.5, 0.5, 0.5]))
    ident = pre.identity()
    assert ident["name"] == "featstore-pil-v1"
    assert set(ident) == {"name", "resize", "crop", "mean", "std", "interpolation", "resize_mode"}
    again = json.loads(json.dumps(ident))
    assert again == ident
    assert Preprocess.from_identity(again) == pre
    assert hash(Preprocess.from_identity(again)) == hash(pre)


def test_picklable_for_worker_processes():
    pre = Preprocess(resize=32, crop=32)
    fn, pre2 = pickle.loads(pickle.dumps((load_and_preprocess, pre)))
    data = encode(Image.fromarray(skimage.data.chelsea()), "PNG")
    assert (fn(data, pre2) == load_and_preprocess(data, pre)).all()


def test_bad_config_values():
    with pytest.raises(ConfigError):
        Preprocess(resize=0, crop=224)
    with pytest.raises(ConfigError, match="interpolation"):
        Preprocess(resize=256, crop=224, interpolation="cubic-ish")
    with pytest.raises(ConfigError):
        Preprocess(resize=256, crop=224, mean=(0.5, 0.5))


def test_from_hf_dicts():
    dino = {
        "size": {"shortest_edge": 256},
        "crop_size": {"height": 224, "width": 224},
        "do_center_crop": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "resample": 3,
    }
    assert Preprocess.from_hf(dino) == Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic")
    clip_old = {"size": 224, "crop_size": 224, "do_center_crop": True, "resample": 3,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
    assert Preprocess.from_hf(clip_old) == Preprocess(224, 224, clip_old["image_mean"], clip_old["image_std"])
    siglip = {"size": {"height": 224, "width": 224}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 2}
    pre = Preprocess.from_hf(siglip)
    assert (pre.resize, pre.crop, pre.resize_mode, pre.interpolation) == (224, 224, "squash", "bilinear")
    with pytest.raises(ConfigError, match="square"):
        Preprocess.from_hf({"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 200}})


def test_from_hf_processor_object_and_path(tmp_path):
    from transformers import BitImageProcessorPil

    proc = BitImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    pre = Preprocess.from_hf(proc)
    assert (pre.resize, pre.crop, pre.interpolation) == (40, 32, "bicubic")
    proc.save_pretrained(tmp_path)
    assert Preprocess.from_hf(tmp_path) == pre
    assert Preprocess.from_hf(str(tmp_path / "preprocessor_config.json")) == pre


# ---------------------------------------------------------------------------- ShareLock's DINOv2 recipe
# An independent reference for torchvision's documented `Resize(256) -> CenterCrop(224) -> ToTensor
# -> Normalize(ImageNet)` on PIL images (ShareLock's official feature extraction; torchvision itself
# cannot be imported here): the shorter side becomes 256 and the longer int(256 * long / short);
# the resize is PIL's antialiased resampling with the default *bilinear* filter, i.e. a separable
# triangle filter stretched by the downscale factor, computed here in float64 with numpy (PIL works
# in fixed point with a rounded intermediate, hence the 1-level tolerance); the crop starts at
# int(round((size - 224) / 2)); ToTensor divides by 255; Normalize subtracts the mean and divides by the std.


def _filter_matrix(n_in: int, n_out: int, kernel, support: float) -> np.ndarray:
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support * stretch + 0.5), 0), min(int(centre + support * stretch + 0.5), n_in)
        taps = kernel((np.arange(lo, hi) - centre + 0.5) / stretch)
        weights[i, lo:hi] = taps / taps.sum()
    return weights


def _torchvision_reference(img: Image.Image, size=256, crop=224) -> np.ndarray:
    """uint8-valued float (3, crop, crop) of Resize(size, bilinear) + CenterCrop(crop)."""
    triangle = lambda x: np.clip(1.0 - np.abs(x), 0.0, None)  # noqa: E731
    a = np.asarray(img, dtype=np.float64)
    h, w = a.shape[:2]
    out_w, out_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    out = (_filter_matrix(h, out_h, triangle, 1.0) @ a.reshape(h, -1)).reshape(out_h, w, 3)  # vertical
    out = (out.transpose(0, 2, 1) @ _filter_matrix(w, out_w, triangle, 1.0).T).transpose(0, 2, 1)  # horizontal
    out = np.clip(np.rint(out), 0, 255)
    top, left = int(round((out_h - crop) / 2.0)), int(round((out_w - crop) / 2.0))
    return out[top : top + crop, left : left + crop].transpose(2, 0, 1)


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"])
def test_sharelock_dinov2_recipe_matches_torchvision_semantics(name):
    from featstore.pipelines.backbones.dinov2 import SHARELOCK_PREPROCESS as recipe

    assert recipe.identity() == {"name": "featstore-pil-v1", "resize": 256, "crop": 224, "interpolation": "bilinear",
                                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize_mode": "shortest"}
    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    ours = recipe(img).astype(np.float64)
    ref = _torchvision_reference(img)
    diff = np.abs(ours - ref)
    # measured on these five images: max 1 level, mean 0.10-0.19 levels
    assert diff.max() <= 1 and diff.mean() < 0.25, (diff.max(), diff.mean())
    # the tolerance separates the filters: bicubic (featstore's dinov2-base recipe) is far off
    bicubic = Preprocess(256, 224, interpolation="bicubic")(img).astype(np.float64)
    assert np.abs(bicubic - ref).max() > 10 and np.abs(bicubic - ref).mean() > 0.4
    # and the normalized input the backbone sees
    mean, std = np.array(recipe.mean)[:, None, None], np.array(recipe.std)[:, None, None]
    x = recipe.normalize(torch.from_numpy(recipe(img))[None]).numpy()[0]
    assert np.abs(x - (ref / 255.0 - mean) / std).max() <= 1 / 255 / min(recipe.std) + 1e-5
