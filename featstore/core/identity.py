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
