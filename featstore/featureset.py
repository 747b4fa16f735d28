"""A feature set: one backbone's outputs over the store's rows, `features/<name>/`.

    pooled (row, dim) · tokens (row, token, token_dim) [+ tokens_scale (row, token)] · valid (row)
    pixels/<name> (row, channel, height, width), when the feature set stores its crops

Which rows are done comes from the block markers (`featstore.progress`); `usable_rows()` is
done & valid, which every reader (the loader, export, eval) serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import zarr

from . import format as fmt
from .errors import ConfigError, IdentityMismatch, UnknownFeatureSet
from .files import now
from .identity import identity_diff, jsonable, lines
from .progress import Progress, done_ranges, mask_of

if TYPE_CHECKING:
    from .store import Store


def check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith((".", "_")) or name.strip() != name:
        raise ConfigError(f"bad feature set name {name!r}: no '/' or '\\', not starting with '.' or '_'")


@dataclass
class FeatureSet:
    """One backbone's outputs over the store's rows: `features/<name>/`."""

    store: "Store"
    name: str
    group: zarr.Group = field(repr=False)

    @property
    def identity(self) -> dict:
        return dict(self.group.attrs.get("identity", {}))

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def pixels_name(self) -> str | None:
        return self.group.attrs.get("pixels")

    @property
    def field(self) -> str:
        """What the rows were computed from: "image" or "caption" (samples/caption)."""
        return self.identity.get("field", "image")

    @property
    def progress(self) -> Progress:
        return Progress(self.store.files, self.name)

    def arrays(self) -> dict[str, zarr.Array]:
        """The arrays a writer fills for this feature set, keyed by store path."""
        out = {f"{fmt.FEATURES}/{self.name}/{k}": v for k, v in sorted(self.group.arrays())}
        if self.pixels_name:
            out[f"{fmt.PIXELS}/{self.pixels_name}"] = self.store.root[f"{fmt.PIXELS}/{self.pixels_name}"]
        return out

    def array(self, key: str) -> zarr.Array:
        try:
            return self.group[key]
        except KeyError:
            raise UnknownFeatureSet(f"feature set '{self.name}' has no '{key}' array") from None

    # ---- progress --------------------------------------------------------------------------
    def marker(self, block: int) -> dict | None:
        return self.progress.latest(block)

    def markers(self) -> dict[int, dict]:
        return self.progress.markers()

    def done_mask(self, markers: dict[int, dict] | None = None) -> np.ndarray:
        """Boolean (n_rows,): rows a marker names as done."""
        markers = self.markers() if markers is None else markers
        n = self.store.n_rows
        mask = np.zeros(n, dtype=bool)
        for b, m in markers.items():
            start, stop = self.store.block_range(b)
            if start < n:
                mask[start:stop] = mask_of(done_ranges(m), start, stop)
        return mask

    def done_blocks(self, markers: dict[int, dict] | None = None) -> list[int]:
        """Blocks whose every current row is done."""
        done = self.done_mask(markers)
        return [b for b in range(self.store.n_blocks) if done[slice(*self.store.block_range(b))].all()]

    def missing_blocks(self, markers: dict[int, dict] | None = None) -> list[int]:
        """Blocks with at least one row still to do."""
        full = set(self.done_blocks(markers))
        return [b for b in range(self.store.n_blocks) if b not in full]

    def complete_rows(self) -> np.ndarray:
        """Boolean mask (n_rows,): rows that are done (valid or with a recorded failure)."""
        return self.done_mask()

    def usable_rows(self) -> np.ndarray:
        """Boolean mask (n_rows,): rows that are done and `valid`."""
        mask = self.done_mask()
        if mask.any():
            mask &= np.asarray(self.group["valid"][: self.store.n_rows])
        return mask


def create(store: "Store", name: str, identity: dict, dim: int, *, tokens=None, token_dtype="float16",
           dtype="float16", pixels=None, pixels_shape=None, pixels_identity=None, compressors=None) -> FeatureSet:
    """Create `features/<name>` on the store's row grid (the caller holds the store lock and has
    checked that it does not exist)."""
    n, r = store.n_rows, store.rows_per_shard
    group = store.root.require_group(f"{fmt.FEATURES}/{name}")

    def make(parent, key, shape_tail, dt, dims, max_rows=None, fill=0, attributes=None):
        row_bytes = int(np.prod(shape_tail, dtype=np.int64)) * np.dtype(dt).itemsize
        c = fmt.chunk_rows(row_bytes, r, max_rows)
        parent.create_array(
            key, shape=(n,) + tuple(shape_tail), dtype=dt, chunks=(c,) + tuple(shape_tail),
            shards=(r,) + tuple(shape_tail), compressors=compressors, fill_value=fill,
            dimension_names=dims, attributes=attributes,
        )

    make(group, "pooled", (int(dim),), dtype, fmt.DIMS["pooled"])
    make(group, "valid", (), "bool", fmt.DIMS["valid"], fill=False)
    if tokens is not None:
        t, d = (int(x) for x in tokens)
        if token_dtype == "int8":
            make(group, "tokens", (t, d), "int8", fmt.DIMS["tokens"], max_rows=16)
            make(group, "tokens_scale", (t,), "float16", fmt.DIMS["tokens_scale"])
        elif token_dtype == "float16":
            make(group, "tokens", (t, d), "float16", fmt.DIMS["tokens"], max_rows=16)
        else:
            raise ConfigError(f"token dtype must be float16 or int8, not {token_dtype!r}")
    if pixels:
        pg = store.root.require_group(fmt.PIXELS)
        make(pg, pixels, tuple(int(x) for x in pixels_shape), "uint8", fmt.DIMS["pixels"], max_rows=64,
             attributes={"identity": jsonable(pixels_identity or {}), "feature_set": name})
    group.attrs.update({
        "identity": identity,
        "dim": int(dim),
        "tokens": list(tokens) if tokens is not None else None,
        "token_dtype": token_dtype if tokens is not None else None,
        "pixels": pixels,
        "created": now(),
    })
    return FeatureSet(store, name, group)


def check_same(fs: FeatureSet, identity: dict, *, dim=None, tokens=None, token_dtype="float16", pixels=None) -> None:
    """Refuse writing to `fs` with another identity or another layout (a flag that cannot take effect)."""
    diff = identity_diff(fs.identity, identity)
    if diff:
        raise IdentityMismatch(f"feature set '{fs.name}' in {fs.store.path} was made with a different identity "
                               f"(pick another --name, or --overwrite to recompute):{lines(diff)}")
    have = {"tokens": fs.attrs.get("tokens"), "token_dtype": fs.attrs.get("token_dtype"), "pixels": fs.pixels_name}
    want = {"tokens": list(tokens) if tokens is not None else None,
            "token_dtype": token_dtype if tokens is not None else None, "pixels": pixels}
    layout = identity_diff(have, want, keys=list(have))
    if layout:
        raise IdentityMismatch(f"feature set '{fs.name}' in {fs.store.path} has another layout (pass the same "
                               f"--tokens/--token-dtype/--pixels as when it was made, another --name, or --overwrite):"
                               f"{lines(layout)}")
