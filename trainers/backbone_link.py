"""Re-load the frozen backbone that made a feature set, from the identity the store recorded.

Used only outside training: by eval to encode class prompts, and by `ShareLock.encode_image` /
`encode_text` on raw inputs.  The re-loaded backbone must have the same identity as the recorded
one (same weights hash, pooling, layer, tokenizer, ...), or the heads would see other features.
"""

from __future__ import annotations

import json

from featstore.errors import CheckpointError, IdentityMismatch
from featstore.core.identity import identity_diff, lines

# Keys of a stored identity that say how it was stored or what else was kept, not what the pooled
# features are: a backbone loaded only to encode pooled features may differ in them.
NOT_POOLED = ("tokens", "token_shape", "token_dtype", "field", "pooled_dtype")


def load_options(identity: dict) -> tuple[str, dict]:
    """(name_or_path, keyword arguments) for `pipelines.backbones.load_backbone` that rebuild the
    backbone of a stored identity."""
    name = identity.get("alias") or identity.get("model")
    if not name:
        raise CheckpointError(f"the recorded identity names no backbone (no alias or model): {json.dumps(identity)[:200]}")
    kwargs = {
        "pooling": identity.get("pooling"),
        "layer": identity.get("layer"),
        "precision": identity.get("precision") or "fp32",
        "modality": identity.get("modality"),
        "prefix": identity.get("prefix") or "",
    }
    if identity.get("max_length"):
        kwargs["max_length"] = int(identity["max_length"])
    return str(name), kwargs


def backbone_for(feature_set: dict, device: str = "cpu", tokens: bool = False):
    """The backbone of `feature_set` ({"name", "identity", ...} as a checkpoint records it), loaded
    on `device` and checked against the recorded identity."""
    from featstore.pipelines.backbones import load_backbone

    recorded = feature_set["identity"]
    name, kwargs = load_options(recorded)
    bb = load_backbone(name, device=device, tokens=tokens, **kwargs)
    diff = identity_diff(recorded, bb.identity, then="recorded", now="loaded", ignore=NOT_POOLED)
    if diff:
        raise IdentityMismatch(f"backbone {name} loaded now differs from the one that made feature set "
                               f"'{feature_set.get('name')}' (install the same weights/version):{lines(diff)}")
    return bb
