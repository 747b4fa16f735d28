"""Turning a `featstore query` into vectors of a feature set's space (used by pipelines/search.py).

* image (`--image PATH`): the bytes are decoded exactly as extract decodes them
  (`preprocess.decode_image`) and cropped with the preprocessing recorded in the feature set's
  identity (`Preprocess.from_identity(identity["preprocess"])`, checked equal to the re-loaded
  backbone's), then encoded by the backbone that made the set, re-loaded from its identity and
  checked against it (`same_backbone_diff`).  Only for image feature sets.
* text on a caption set: the set's own text backbone (`search.text_backbone`).
* text on an image set: the paired text tower of the two-tower checkpoint the image features came
  from (CLIP, EVA-CLIP: `load_backbone(identity["model"], modality="text")`, the mechanism UTA's
  zero-shot uses, `trainers/uta/teacher.text_tower`; the command hands that function in as
  `text_tower`, which also reaches SigLIP's text tower).  Its weights hash must equal the image
  features'.  An image set without a paired tower (DINOv2, EfficientNet, ...) is refused in one
  line: use `--checkpoint RUN` or a caption feature set.
* `head` (a trained ShareLock, `featstore.trainers.sharelock.ShareLock`, loaded by the command:
  pipelines/ never imports trainers/): text through the run's recorded caption backbone and the
  language head; an image or a uid through the image features (rounded to the stored dtype, as
  the head saw them) and the vision head.
"""

from __future__ import annotations

import os

import numpy as np

from featstore.core import format as fmt
from featstore.core.identity import identity_diff, lines, rebuild_options, same_backbone_diff
from featstore.errors import BackboneError, BadSample, ConfigError, IdentityMismatch

NO_TOWER = ("--text on an image feature set needs --checkpoint RUN (a trained ShareLock head) or a feature set "
            "computed from captions (`featstore extract --field caption`)")
PAIRED_RECIPES = ("clip-vision", "siglip-vision", "eva-clip-vision")  # one tower of a two-tower checkpoint


def recorded_backbone(fs, device: str = "cpu", what: str = "encode the query with"):
    """The backbone that made feature set `fs`, re-loaded from its identity and checked against it."""
    from featstore.pipelines.backbones import load_backbone

    recorded = fs.identity
    name, kwargs = rebuild_options(recorded)
    if not name:
        raise BackboneError(f"feature set '{fs.name}' records no backbone (no alias or model) to {what}")
    bb = load_backbone(name, device=device, **kwargs)
    diff = same_backbone_diff(recorded, bb.identity)
    if diff:
        raise IdentityMismatch(f"backbone {name} loaded now differs from the one that made feature set "
                               f"'{fs.name}' (install the same weights/version):{lines(diff)}")
    return bb


def read_image(image) -> bytes:
    """The encoded bytes of `image` (a path or bytes)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    try:
        with open(os.fspath(image), "rb") as f:
            return f.read()
    except OSError as e:
        raise ConfigError(f"cannot read image {image}: {e.strerror or e}") from None


def image_pixels(fs, image, preprocess) -> np.ndarray:
    """uint8 (1, 3, S, S): `image` decoded as extract decodes and cropped by `preprocess`."""
    from featstore.pipelines.preprocess import decode_image

    data = read_image(image)
    where = "the query image" if isinstance(image, (bytes, bytearray, memoryview)) else f"image {image}"
    try:
        img = decode_image(data)
    except BadSample as e:
        raise ConfigError(f"cannot decode {where}: {e}") from None
    return preprocess(img)[None]


def encode_image(fs, image, device: str = "cpu") -> np.ndarray:
    """(1, dim) float32: `image` (path or bytes) through the recorded preprocessing and backbone."""
    from featstore.pipelines.preprocess import Preprocess

    if fs.field == fmt.CAPTION or fs.identity.get("modality") == "text":
        raise ConfigError(f"feature set '{fs.name}' was computed from captions: --image queries need a feature set "
                          "computed from images")
    recorded = fs.identity.get("preprocess")
    if not isinstance(recorded, dict):
        raise BackboneError(f"feature set '{fs.name}' records no image preprocessing: cannot encode a query image")
    pre = Preprocess.from_identity(recorded)
    bb = recorded_backbone(fs, device, "encode an image with")
    if bb.preprocess.identity() != pre.identity():  # same_backbone_diff compares it too; never encode otherwise
        raise IdentityMismatch(f"backbone of '{fs.name}' preprocesses differently now than at extract time")
    pixels = image_pixels(fs, image, pre)
    return np.asarray(bb.encode_images(pixels)["pooled"], dtype=np.float32)


def check_text_side(fs) -> None:
    """Refuse (one line, before any index or backbone is loaded) a text query on an image set whose
    backbone has no paired text tower, or whose stored vectors are not the joint embedding."""
    if fs.field == fmt.CAPTION:
        return
    identity = fs.identity
    model = identity.get("model")
    if identity.get("recipe") not in PAIRED_RECIPES or not model:
        raise ConfigError(f"feature set '{fs.name}' was computed from images by "
                          f"{identity.get('alias') or model or 'a backbone'}, which has no paired text tower: {NO_TOWER}")
    if identity.get("pooling") not in (None, "pooler") or identity.get("layer") is not None:
        raise ConfigError(f"feature set '{fs.name}' stores {identity.get('pooled') or 'raw hidden states'}, not the "
                          f"joint image-text embedding (pooling=pooler): {NO_TOWER}")


def paired_text_tower(fs, device: str = "cpu", text_tower=None):
    """The text tower paired with image feature set `fs`'s backbone (same checkpoint, same weights)."""
    check_text_side(fs)
    identity = fs.identity
    model = identity.get("model")
    refused = (f"feature set '{fs.name}' was computed from images by {identity.get('alias') or model}, whose "
               f"checkpoint has no text tower featstore can load: {NO_TOWER}")
    if text_tower is not None:  # the command's: trainers/uta/teacher.text_tower (CLIP, EVA-CLIP, SigLIP)
        try:
            return text_tower({"name": fs.name, "identity": identity}, device)
        except (BackboneError, ConfigError):
            raise ConfigError(refused) from None
    from featstore.pipelines.backbones import load_backbone

    try:
        tower = load_backbone(str(model), modality="text", device=device)
    except (BackboneError, ConfigError):
        raise ConfigError(refused) from None
    a, b = identity.get("weights_hash"), tower.identity.get("weights_hash")
    if a and b and a != b and identity.get("weights_hash_method") == tower.identity.get("weights_hash_method"):
        raise IdentityMismatch(f"the checkpoint {model} is not the one feature set '{fs.name}' was extracted with "
                               f"(weights hash {b} now, {a} then): its text tower would not match the stored features")
    return tower


def encode_text(fs, texts: list[str], device: str = "cpu", text_tower=None) -> np.ndarray:
    """(n, dim) float32: texts in the space of `fs` (a caption set's own backbone, else the paired tower)."""
    if fs.field == fmt.CAPTION:
        bb = recorded_backbone(fs, device, "encode a text with")
    else:
        bb = paired_text_tower(fs, device, text_tower)
    out = np.asarray(bb.encode_texts(list(texts))["pooled"], dtype=np.float32)
    if out.shape[1] != int(fs.attrs["dim"]):
        raise BackboneError(f"the text tower gives {out.shape[1]}-d vectors but '{fs.name}' is {fs.attrs['dim']}-d")
    return out


# ---- a trained ShareLock head ------------------------------------------------------------------
def check_head(fs, head) -> None:
    """Refuse a head not trained on feature set `fs`'s features (same identity)."""
    trained = head.feature_sets["image"]
    diff = identity_diff(trained.get("identity") or {}, fs.identity, then="at training", now="in the store")
    if diff:
        raise IdentityMismatch(f"feature set '{fs.name}' is not the '{trained.get('name')}' the checkpoint was "
                               f"trained on (query the image feature set it was trained on):{lines(diff)}")


def as_stored(fs, x: np.ndarray) -> np.ndarray:
    """Vectors rounded to the dtype the store keeps `fs`'s pooled features in (what the head saw)."""
    return np.asarray(x, dtype=np.float32).astype(fs.array("pooled").dtype).astype(np.float32)


def head_image(head, x: np.ndarray) -> np.ndarray:
    return np.asarray(head.encode_image_features(np.asarray(x, dtype=np.float32)), dtype=np.float32)


def head_text(head, text: str) -> np.ndarray:
    return np.asarray(head.encode_text([text]), dtype=np.float32)
