"""ShareLock: small heads over frozen image features and frozen LLM caption features.

    language head  x_text (D_t) → [Linear → BatchNorm1d → ReLU → Dropout] × (num_layers-1) → Linear → E → L2
    vision head    x_image (D_v) → identity (E = D_v), or an MLP of the same form   → E → L2

Trained with symmetric InfoNCE (`contrastive.info_nce`).  `ShareLock.load(dir)` gives the trained
heads back for use: on stored features (`encode_image_features`) or, through the backbones recorded
in the checkpoint, on raw images and strings (`encode_image`, `encode_text`).  A checkpoint
(trainers/checkpoint.py's files, format FORMAT) rebuilds the heads with `ShareLockModel.from_state`;
`load_checkpoint` reads one.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from featstore.errors import ConfigError

from featstore.trainers import checkpoint
from featstore.trainers.sharelock.config import Config
from featstore.trainers.loop import count_parameters  # noqa: F401 - re-exported (the ShareLock API names it here)

FORMAT = "featstore-sharelock-checkpoint"
VERSION = 1


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, dropout: float) -> nn.Sequential:
    """`num_layers - 1` blocks of Linear → BatchNorm1d → ReLU → Dropout at `hidden_dim`, then a Linear."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = hidden_dim
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers)


class ShareLockModel(nn.Module):
    """The two heads and the logit scale; `forward` gives the training loss's inputs."""

    def __init__(self, image_dim: int, text_dim: int, cfg: Config):
        super().__init__()
        self.image_dim, self.text_dim = int(image_dim), int(text_dim)
        embed = cfg.embed_dim or self.image_dim
        if cfg.vision_head == "identity":
            if embed != self.image_dim:
                raise ConfigError(
                    f"embed_dim {embed} differs from the image feature width {self.image_dim}: "
                    "with vision_head=identity the shared space is the vision width (set vision_head=mlp)"
                )
            self.image_head: nn.Module = nn.Identity()
        else:
            self.image_head = mlp(self.image_dim, cfg.vision_hidden_dim, embed, cfg.vision_num_layers, cfg.dropout)
        self.text_head = mlp(self.text_dim, cfg.hidden_dim, embed, cfg.num_layers, cfg.dropout)
        self.embed_dim = embed
        log_scale = torch.tensor(math.log(cfg.logit_scale), dtype=torch.float32)
        if cfg.learnable_logit_scale:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=100.0)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(x), dim=-1)

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(x), dim=-1)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(image), self.encode_text(text)

    @classmethod
    def from_state(cls, state: dict, weights: dict | None = None, where: str = "checkpoint") -> "ShareLockModel":
        """The heads a checkpoint's state describes (its config and both feature sets' widths),
        with `weights` (a state_dict) loaded when given; `.config` is the config."""
        config = Config.from_dict(state["config"], where=where)
        fsets = state["feature_sets"]
        model = cls(fsets["image"]["dim"], fsets["text"]["dim"], config)
        if weights is not None:
            model.load_state_dict(weights)
        model.config = config
        return model


def load_checkpoint(path, which: str = "best", optimizer: bool = False, verify: bool = True) -> checkpoint.Checkpoint:
    """A ShareLock checkpoint (a run directory's `best`/`last`, or one checkpoint directory): its
    state, config, heads (eval mode, on CPU) and, with `optimizer`, the optimizer/RNG tensors."""
    ckpt = checkpoint.read(path, which, format=FORMAT, version=VERSION, kind="ShareLock", optimizer=optimizer,
                           verify=verify)
    ckpt.model = ShareLockModel.from_state(ckpt.state, ckpt.weights, where=os.path.join(ckpt.path, checkpoint.STATE_FILE))
    ckpt.config = ckpt.model.config
    ckpt.model.eval()
    return ckpt


def _as_tensor(x, device) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim == 1:
        t = t[None]
    return t.to(device=device, dtype=torch.float32)


class ShareLock:
    """A trained ShareLock, ready to embed features, images or text into the shared space.

        sl = ShareLock.load("runs/demo")                    # the best checkpoint of a run
        img = sl.encode_image([Image.open("7.png")])        # (1, E), L2-normalized
        txt = sl.encode_text(["a handwritten seven"])       # (1, E)
        (img @ txt.T)

    Backbones are loaded lazily, once, from the identities the checkpoint recorded.
    """

    def __init__(self, model: ShareLockModel, config: Config, state: dict, path: str, device="cpu"):
        self.model = model.eval().to(device)
        self.config, self.state, self.path, self.device = config, state, path, torch.device(device)
        self._backbones: dict[str, object] = {}

    @classmethod
    def load(cls, path, which: str = "best", device="cpu") -> "ShareLock":
        """`path`: a run directory (its `best`, or `last`, checkpoint) or one checkpoint directory."""
        ckpt = load_checkpoint(path, which=which, optimizer=False)
        return cls(ckpt.model, ckpt.config, ckpt.state, ckpt.path, device)

    @property
    def feature_sets(self) -> dict:
        """{"image": {name, identity, dim}, "text": {...}} as recorded at training time."""
        return self.state["feature_sets"]

    @torch.no_grad()
    def encode_image_features(self, x, batch_size: int = 4096) -> torch.Tensor:
        x = _as_tensor(x, self.device)
        return torch.cat([self.model.encode_image(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).cpu()

    @torch.no_grad()
    def encode_text_features(self, x, batch_size: int = 4096) -> torch.Tensor:
        x = _as_tensor(x, self.device)
        return torch.cat([self.model.encode_text(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).cpu()

    def backbone(self, modality: str):
        """The frozen backbone that made the `modality` ("image" or "text") features, loaded once."""
        if modality not in self._backbones:
            from featstore.trainers.backbone_link import backbone_for

            self._backbones[modality] = backbone_for(self.feature_sets[modality], device=str(self.device))
        return self._backbones[modality]

    @torch.no_grad()
    def encode_image(self, images, batch_size: int = 64) -> torch.Tensor:
        """Images (one or a list) → (N, E): decode → preprocess → image backbone → vision head,
        exactly as extraction made the stored features.  An image is a file path, encoded bytes,
        a PIL image, or a uint8 array (H, W, 3) RGB or (H, W) grey (a float array in [0, 1] too)."""
        if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)) or _is_one_image(images):
            images = [images]
        images = list(images)
        bb = self.backbone("image")
        out = []
        for i in range(0, len(images), batch_size):
            chunk = [_as_pil(im) for im in images[i : i + batch_size]]
            pixels = torch.from_numpy(np.stack([np.asarray(bb.preprocess(im)) for im in chunk]))
            out.append(self.encode_image_features(self._as_stored("image", bb.encode_images(pixels)["pooled"])))
        return torch.cat(out)

    @torch.no_grad()
    def encode_text(self, texts, batch_size: int = 256) -> torch.Tensor:
        """Strings → (N, E): text backbone → language head."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        bb = self.backbone("text")
        out = [self.encode_text_features(self._as_stored("text", bb.encode_texts(texts[i : i + batch_size])["pooled"]))
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out)

    def _as_stored(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Backbone outputs rounded as the store kept them (float16 by default): what the heads saw."""
        dtype = getattr(torch, self.feature_sets[modality].get("dtype") or "float16")
        return x.float().to(dtype).float()


def _is_one_image(x) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image) or (isinstance(x, np.ndarray) and x.ndim in (2, 3) and x.dtype != object
                                           and not (x.ndim == 3 and x.shape[-1] not in (1, 3, 4)))


def _as_pil(image):
    """One image as an RGB PIL image, decoded like extraction decodes it."""
    from PIL import Image

    from featstore.pipelines.preprocess import decode_image, to_rgb

    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                return decode_image(f.read())
        except OSError as e:
            raise ConfigError(f"cannot read image {image}: {e.strerror or e}") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image))
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        a = image
        if a.dtype.kind == "f":
            a = np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
        if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3, 4)):
            raise ConfigError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4), uint8 or float in [0, 1]; "
                              f"got {a.shape} {image.dtype}")
        return to_rgb(Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a))
    raise ConfigError(f"cannot encode a {type(image).__name__} as an image: pass a path, bytes, a PIL image or an array")
