"""Re-load the frozen backbone that made a feature set, from the identity the store recorded.

Used only outside training: by eval to encode class prompts, and by `ShareLock.encode_image` /
`encode_text` on raw inputs.  The re-loaded backbone must have the same identity as the recorded
one (same weights hash, pooling, layer, tokenizer, ...), or the heads would see other features.
"""

from __future__ import annotations

import json

from featstore.core.identity import NOT_POOLED, lines, rebuild_options, same_backbone_diff  # noqa: F401 (NOT_POOLED: the trainers' name)
from featstore.errors import CheckpointError, IdentityMismatch


def load_options(identity: dict) -> tuple[str, dict]:
    """(name_or_path, keyword arguments) for `pipelines.backbones.load_backbone` that rebuild the
    backbone of a stored identity."""
    name, kwargs = rebuild_options(identity)
    if not name:
        raise CheckpointError(f"the recorded identity names no backbone (no alias or model): {json.dumps(identity)[:200]}")
    return name, kwargs


def backbone_for(feature_set: dict, device: str = "cpu", tokens: bool = False):
    """The backbone of `feature_set` ({"name", "identity", ...} as a checkpoint records it), loaded
    on `device` and checked against the recorded identity."""
    from featstore.pipelines.backbones import load_backbone

    recorded = feature_set["identity"]
    name, kwargs = load_options(recorded)
    bb = load_backbone(name, device=device, tokens=tokens, **kwargs)
    diff = same_backbone_diff(recorded, bb.identity)
    if diff:
        raise IdentityMismatch(f"backbone {name} loaded now differs from the one that made feature set "
                               f"'{feature_set.get('name')}' (install the same weights/version):{lines(diff)}")
    return bb
