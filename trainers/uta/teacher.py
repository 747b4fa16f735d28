"""The teacher a UTA student learns from, and the teacher's text tower that scores it zero-shot.

A UTA teacher is any image backbone of the registry (`featstore.pipelines.backbones`) that gives,
from one forward over the stored crop,

    encode_images(uint8 (B, 3, S, S)) -> {"pooled": (B, D_pooled), "tokens": (B, T, D)}

with T a square grid of patch tokens, extracted once with `featstore extract --tokens --pixels`:
the tokens become the student's per-position targets, `pooled` the target of its CLS.  For
zero-shot the teacher must be one tower of a two-tower checkpoint whose other tower encodes text
into the same space as `pooled`; `text_tower(teacher)` loads that tower from the checkpoint the
teacher's identity names (the same weight files: the weights hash must match) and the prompts it
encodes are cached in the store under `prompts/<teacher>.text/`.

Supported here (transformers, tested on tiny saved checkpoints): CLIP (tokens =
visual_projection(post_layernorm(patches)), pooled = image_embeds, text = text_embeds) and
SigLIP (tokens = the post-LayerNorm patch tokens, pooled = the attention-pool head's output, text
= the text tower's pooler_output, prompts padded to max_length as SigLIP was trained).  SigLIP's
text tower is built here until the backbone registry has a `siglip-text` recipe; then
`text_tower` uses the registry for both.

EVA-CLIP (UTA's teacher) is the registry's `eva-clip-vision` / `eva-clip-text` recipes
(pipelines/backbones/eva_clip.py: featstore's own port, no timm/open_clip): pooled = the projected
image embedding head(norm(x)[:, 0]), tokens = head(norm(x)[:, 1:]) in the same joint space, from an
open_clip-layout directory or the `eva02-clip-*` aliases; `text_tower` reaches its text tower with
`load_backbone(identity["model"], modality="text")` like CLIP's (tests/test_eva_clip.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from featstore.errors import BackboneError, ConfigError, IdentityMismatch

WEIGHTS_HASH_METHOD = "sha256(name, size, first MiB, last MiB) per weight file"  # the registry's, see its identities


def text_side_name(teacher_name: str) -> str:
    """Where the prompts encoded by the teacher's own text tower are cached: `prompts/<this>/`."""
    return f"{teacher_name}.text"


def text_tower(teacher: dict, device: str = "cpu"):
    """The text tower of the two-tower checkpoint that made `teacher` ({"name", "identity"} as a
    UTA checkpoint records it): an object with `identity` and `encode_texts(list[str]) ->
    {"pooled": (B, D)}`.  Refused (one line) when the checkpoint has no text tower we can load or
    its weights are no longer the ones the teacher's features came from."""
    from featstore.pipelines.backbones import load_backbone

    identity = teacher.get("identity") or {}
    model = identity.get("model")
    name = teacher.get("name", "?")
    if not model:
        raise BackboneError(f"teacher '{name}' records no model: cannot find its text tower")
    try:
        tower = load_backbone(str(model), modality="text", device=device)
    except (BackboneError, ConfigError) as e:  # no such tower / "an image model, not text"
        if _model_type(model) != "siglip":
            raise BackboneError(f"teacher '{name}' ({model}) has no text tower featstore can load ({e}); zero-shot needs a "
                                "two-tower CLIP/SigLIP/EVA-CLIP checkpoint, or a text side in the store (zero_shot_text)") from None
        tower = SiglipTextTower(Path(model), identity, device)
    _same_weights(name, identity, tower.identity)
    return tower


def _model_type(model: str) -> str | None:
    try:
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(model, local_files_only=True), "model_type", None)
    except Exception:  # not a local transformers checkpoint: the registry's error stands
        return None


def _same_weights(name: str, teacher_identity: dict, text_identity: dict) -> None:
    a, b = teacher_identity.get("weights_hash"), text_identity.get("weights_hash")
    same_method = teacher_identity.get("weights_hash_method") == text_identity.get("weights_hash_method")
    if a and b and same_method and a != b:
        raise IdentityMismatch(f"the checkpoint {teacher_identity.get('model')} is not the one teacher '{name}' was "
                               f"extracted with (weights hash {b} now, {a} then): its text tower would not match "
                               "the stored image features; re-extract the teacher or restore those weights")


class SiglipTextTower:
    """SigLIP's text tower from a two-tower SigLIP checkpoint: transformers' SiglipTextModel,
    pooler_output (its last-token head), prompts padded to max_length (SigLIP's training setup)."""

    def __init__(self, path: Path, teacher_identity: dict, device: str = "cpu"):
        from transformers import AutoConfig, AutoTokenizer, SiglipTextModel
        from transformers.utils import logging as hf_logging

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the vision tower's weights are unused here, by design
        try:
            model, info = SiglipTextModel.from_pretrained(path, config=config.text_config, local_files_only=True,
                                                          output_loading_info=True)
        finally:
            hf_logging.set_verbosity(verbosity)
        if info.get("missing_keys") or info.get("mismatched_keys"):
            raise BackboneError(f"{path}: the checkpoint does not hold a complete SigLIP text tower "
                                f"({len(info.get('missing_keys') or [])} weights missing)")
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.max_length = int(config.text_config.max_position_embeddings)
        self.identity = {
            "recipe": "siglip-text", "architecture": "SiglipTextModel", "modality": "text",
            "model": teacher_identity.get("model"), "revision": teacher_identity.get("revision"),
            "weights_hash": _fingerprint(path), "weights_hash_method": WEIGHTS_HASH_METHOD,
            "pooling": "pooler", "pooled": "pooler_output", "tokenizer": type(self.tokenizer).__name__,
            "max_length": self.max_length, "padding": "max_length", "normalized": False, "dtype": "float32",
        }

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        out = self.model(input_ids=batch["input_ids"].to(self.device))
        return {"pooled": out.pooler_output.float().cpu()}


def _fingerprint(path: Path) -> str | None:
    """The registry's weights hash (WEIGHTS_HASH_METHOD) over the checkpoint's weight files (its
    own function, imported here: training imports this module and never the backbone code)."""
    from featstore.pipelines.backbones.common import fingerprint, weight_files

    return fingerprint(weight_files(Path(path)))
