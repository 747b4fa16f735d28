"""The one train/validation split every trainer uses: by a hash of the uid.

A sample's side depends only on its uid (and the salt), never on row order or on which other
samples exist, so it stays on the same side when the store grows or is rebuilt from another
source type.
"""

from __future__ import annotations

import hashlib

import numpy as np

from featstore.errors import ConfigError


def uid_fraction(uids, salt: str = "featstore-split") -> np.ndarray:
    """A number in [0, 1) per uid, uniform and stable across machines and runs."""
    out = np.empty(len(uids), dtype=np.float64)
    for i, uid in enumerate(uids):
        digest = hashlib.blake2b(f"{salt}:{uid}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0**64
    return out


def split_by_uid(uids, val_fraction: float = 0.1, salt: str = "featstore-split") -> tuple[np.ndarray, np.ndarray]:
    """Two boolean masks `(train, val)`, each of len(uids) and aligned with it (masks, not row
    numbers: `np.flatnonzero(val)` gives those), with train == ~val; a uid is in val when its hash
    falls below `val_fraction`.  Over `store.uids()` they are masks of store rows, which the
    Loader takes as `rows=`."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    val = uid_fraction(uids, salt) < val_fraction
    return ~val, val
