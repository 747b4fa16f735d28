"""Real images for tests (scikit-image's sample photos, plus generated ones) and webdataset
shards written the way img2dataset lays them out: `<key>.jpg|png`, `<key>.txt`, `<key>.json`."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image

SKIMAGE_NAMES = ["astronaut", "coffee", "chelsea", "camera", "rocket", "hubble_deep_field", "immunohistochemistry", "cat"]


def real_images(n: int = 16) -> list[tuple[str, Image.Image]]:
    """n images: the skimage photos (RGB), then deterministic generated ones."""
    import skimage.data

    out = []
    for name in SKIMAGE_NAMES:
        arr = getattr(skimage.data, name)()
        img = Image.fromarray(arr)
        out.append((name, img.convert("RGB")))
    rng = np.random.default_rng(0)
    i = 0
    while len(out) < n:
        h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        base = rng.integers(0, 255, (1, 1, 3))
        grad = np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 255, (1, 1, 3))
        arr = np.clip(base + grad + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        out.append((f"generated-{i:03d}", Image.fromarray(arr)))
        i += 1
    return out[:n]


def encode(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bomb(width: int = 40000, height: int = 40000) -> bytes:
    """A tiny PNG whose header claims a huge 1-bit image (never allocate it: only the header matters)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    idat = zlib.compress(row * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_shard(path, samples: list[dict]) -> None:
    """samples: dicts with `key`, optional `image` (bytes) + `ext`, `caption` (str or bytes), `json`."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            members = []
            if s.get("image") is not None:
                members.append((f"{s['key']}.{s.get('ext', 'jpg')}", s["image"]))
            if s.get("caption") is not None:
                c = s["caption"]
                members.append((f"{s['key']}.txt", c if isinstance(c, bytes) else c.encode()))
            members.append((f"{s['key']}.json", json.dumps(s.get("json", {})).encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def bad_input_samples() -> tuple[list[dict], dict[str, str | None], dict[str, str | None]]:
    """Every kind of odd input; returns (samples, expected image reason per uid, expected caption
    reason per uid).  None = must be valid; "*" = must not crash, either outcome recorded."""
    photo = real_images(1)[0][1]
    jpeg = encode(photo, quality=90)
    rng = np.random.default_rng(1)
    corrupt = bytearray(jpeg)
    corrupt[2:600] = rng.integers(0, 255, 598, dtype=np.uint8).tobytes()
    exif = photo.resize((64, 32)).getexif()
    exif[0x0112] = 6  # rotate 90° when shown
    gray16 = Image.fromarray(np.full((20, 30), 32768, np.uint16))
    p = photo.resize((32, 32)).convert("P", palette=Image.ADAPTIVE)
    p.info["transparency"] = 0
    kinds = [
        ("good", jpeg, "jpg", None),
        ("truncated", jpeg[: len(jpeg) // 2], "jpg", "*"),
        ("corrupt", bytes(corrupt), "jpg", "*"),
        ("zero-byte", b"", "jpg", "empty-file"),
        ("not-image", b"this is a text file, not an image\n" * 5, "jpg", "not-an-image"),
        ("cmyk", encode(photo.resize((40, 30)).convert("CMYK")), "jpg", None),
        ("l", encode(photo.resize((40, 30)).convert("L"), "PNG"), "png", None),
        ("la", encode(photo.resize((40, 30)).convert("LA"), "PNG"), "png", None),
        ("rgba", encode(photo.resize((40, 30)).convert("RGBA"), "PNG"), "png", None),
        ("p", encode(p, "PNG"), "png", None),
        ("gray16", encode(gray16, "PNG"), "png", None),
        ("exif-rotated", encode(photo.resize((64, 32)), exif=exif), "jpg", None),
        ("one-pixel", encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "png", None),
        ("bomb", png_bomb(), "png", "too-large"),
        ("no-image", None, "jpg", "missing-image"),
    ]
    samples, img_reason, cap_reason = [], {}, {}
    for i, (uid, data, ext, reason) in enumerate(kinds):
        samples.append({"key": f"{i:09d}", "image": data, "ext": ext, "caption": f"a picture of kind {uid}", "json": {"uid": uid}})
        img_reason[uid], cap_reason[uid] = reason, None
    n = len(samples)
    for j, (uid, caption, reason) in enumerate([
        ("no-caption", None, "empty-caption"),
        ("empty-caption", "   ", "empty-caption"),
        ("non-utf8-caption", b"caf\xe9 \xff\xfe", "non-utf8-caption"),
    ]):
        samples.append({"key": f"{n + j:09d}", "image": jpeg, "caption": caption, "json": {"uid": uid}})
        img_reason[uid], cap_reason[uid] = None, reason
    # a duplicate uid: the first keeps its row, this one is recorded in the manifest
    samples.append({"key": f"{len(samples):09d}", "image": jpeg, "caption": "the duplicate", "json": {"uid": "good"}})
    return samples, img_reason, cap_reason
