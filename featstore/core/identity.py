"""Comparing identities: the one way featstore says how two recorded identities differ.

An identity is a JSON-able dict (a feature set's `attrs["identity"]`, a checkpoint's record of
it, a backbone loaded now).  Two values are the same when their canonical JSON is (so a tuple
equals the list it was stored as).  A difference is shown one key per line:

    feature set 'img' in s.zarr was made with a different identity (pick another --name, or --overwrite):
      model: 'facebook/dinov2-small' in the store vs 'facebook/dinov2-base' now
      dim: 384 in the store vs 768 now
"""

from __future__ import annotations

import json


def canonical(x) -> str:
    """The JSON text two equal identities (or values) share."""
    return json.dumps(x, sort_keys=True, default=str)


def jsonable(x):
    """`x` as it reads back from JSON (tuples become lists, keys sorted, objects their str)."""
    return json.loads(canonical(x))


def identity_diff(a: dict, b: dict, *, then: str = "in the store", now: str = "now", keys=None,
                  ignore=()) -> list[str]:
    """One line per key whose value differs between `a` and `b` (`keys`: only these; `ignore`:
    not these), e.g. ``"dim: 384 in the store vs 768 now"``; a key one side lacks shows
    ``<absent>``."""
    a, b = a or {}, b or {}
    names = list(keys) if keys is not None else sorted(set(a) | set(b))
    out = []
    for key in names:
        if key in ignore:
            continue
        x, y = a.get(key, "<absent>"), b.get(key, "<absent>")
        if canonical(x) != canonical(y):
            out.append(f"{key}: {x!r} {then} vs {y!r} {now}")
    return out


def lines(diff: list[str]) -> str:
    """A difference as the indented lines that follow an error's first line."""
    return "".join(f"\n  {d}" for d in diff)


# Keys of a stored identity that say how it was stored or what else was kept, not what the pooled
# features are: a backbone re-loaded only to encode pooled features may differ in them.
NOT_POOLED = ("tokens", "token_shape", "token_dtype", "field", "pooled_dtype")


def rebuild_options(identity: dict) -> tuple[str | None, dict]:
    """(name_or_path or None when the identity names none, keyword arguments) for
    `pipelines.backbones.load_backbone` that rebuild the backbone of a stored identity."""
    name = identity.get("alias") or identity.get("model")
    kwargs = {
        "pooling": identity.get("pooling"),
        "layer": identity.get("layer"),
        "precision": identity.get("precision") or "fp32",
        "modality": identity.get("modality"),
        "prefix": identity.get("prefix") or "",
    }
    if identity.get("token_projection") is False:
        kwargs["token_projection"] = False
    if identity.get("max_length"):
        kwargs["max_length"] = int(identity["max_length"])
    return (str(name) if name else None), kwargs


def same_backbone_diff(recorded: dict, loaded: dict) -> list[str]:
    """What differs between a recorded identity and a re-loaded backbone's, storage keys aside."""
    return identity_diff(recorded, loaded, then="recorded", now="loaded", ignore=NOT_POOLED)
