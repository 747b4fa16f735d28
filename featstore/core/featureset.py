"""A feature set: one backbone's outputs over the store's rows, `features/<name>/`.

    pooled (row, dim) · valid (row)
    tokens (row, token, token_dim): float16, or int8 + tokens_scale (row, token)
        [+ tokens_channel_scale (row, token_dim): token x channel scaling, `featstore.tokens`]
    pixels/<name> (row, channel, height, width), when the feature set stores its crops

With K > 1 stored views per image (extract --views K) every per-view array has a `view` axis
after `row` (pooled (row, view, dim), tokens (row, view, token, token_dim), ...), and
view_crops (row, view, box) float32 / view_flips (row, view) bool record each view's crop;
`valid` stays per row (`featstore.core.format.dims`).

Which rows are done comes from the block markers (`featstore.core.progress`); `usable_rows()` is
done & valid, which every reader (the loader, export, eval) serves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import zarr

from featstore.core import format as fmt
from featstore.errors import ConfigError, IdentityMismatch, UnknownArray
from featstore.core.files import now
from featstore.core.identity import identity_diff, jsonable, lines
from featstore.core.progress import Progress, done_ranges, mask_of
from featstore.core.storeview import StoreView


def check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith((".", "_")) or name.strip() != name:
        raise ConfigError(f"bad feature set name {name!r}: no '/' or '\\', not starting with '.' or '_'")


@dataclass
class FeatureSet:
    """One backbone's outputs over the store's rows: `features/<name>/`."""

    store: StoreView
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
    def views(self) -> int:
        """Stored views per row: K > 1 for a feature set made with --views K (a `view` axis), else 1."""
        return int(self.attrs.get("views") or 1)

    @property
    def token_scaling(self) -> str | None:
        """How int8 tokens read back: "token_channel" or "token" (per-token, the layout made
        before token x channel scaling); None without int8 tokens."""
        return _scaling_of(self.attrs)

    @property
    def field(self) -> str:
        """What the rows were computed from: "image" or "caption" (samples/caption)."""
        return self.identity.get("field", "image")

    @functools.cached_property
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
            raise UnknownArray(f"feature set '{self.name}' has no '{key}' array") from None

    # ---- progress --------------------------------------------------------------------------
    def marker(self, block: int) -> dict | None:
        return self.progress.latest(block)

    def markers(self) -> dict[int, dict]:
        return self.progress.markers()

    def rows_done(self) -> int:
        """Rows of the feature set done now (valid or with a recorded failure), from the block
        summary: O(blocks)."""
        return int(np.sum(self.done_summary()[0]))

    def done_summary(self) -> tuple[np.ndarray, list[int]]:
        """(rows done per block, the blocks done only in part) from the block summary: O(blocks)."""
        nb, r = self.store.n_blocks, self.store.rows_per_shard
        rec = self.progress.summary(nb)
        size = self.store.block_sizes()
        current = (rec["version"] >= 0) & (rec["start"] == np.arange(nb) * r)
        done = np.where(current, np.minimum(rec["n_done"], size), 0)
        whole = current & (rec["stop"] - rec["start"] == size) & (done == size)
        return done, np.flatnonzero(current & ~whole & (done > 0)).tolist()

    def todo_rows(self) -> np.ndarray:
        """Rows not done yet, in order: O(blocks + the rows returned) (partial blocks' markers read)."""
        done, partial = self.done_summary()
        partial = set(partial)
        out = []
        for b in np.flatnonzero(done < self.store.block_sizes()).tolist():
            start, stop = self.store.block_range(b)
            if b in partial:
                m = self.progress.latest(b)
                out.append(start + np.flatnonzero(~mask_of(done_ranges(m), start, stop)))
            else:
                out.append(np.arange(start, stop))
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)

    def is_done(self, rows, summary: tuple | None = None) -> np.ndarray:
        """Whether each of `rows` is done: O(blocks + len(rows)) (partial blocks' markers read);
        `summary`: a `done_summary()` just read."""
        rows = np.asarray(rows, dtype=np.int64)
        done, partial = summary or self.done_summary()
        blk = rows // self.store.rows_per_shard
        out = (done == self.store.block_sizes())[blk] if len(rows) else np.zeros(0, bool)
        for b in set(partial) & set(np.unique(blk).tolist()):
            start, stop = self.store.block_range(b)
            sel = blk == b
            out[sel] = mask_of(done_ranges(self.progress.latest(b)), start, stop)[rows[sel] - start]
        return out

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


def _scaling_of(attrs: dict) -> str | None:
    if attrs.get("tokens") is None or attrs.get("token_dtype") != "int8":
        return None
    return attrs.get("token_scaling") or "token"


def create(store: StoreView, name: str, identity: dict, dim: int, *, tokens=None, token_dtype="float16",
           dtype="float16", pixels=None, pixels_shape=None, pixels_identity=None, compressors=None,
           token_scaling: str = "token", views: int = 1) -> FeatureSet:
    """Create `features/<name>` on the store's row grid (the caller holds the store lock and has
    checked that it does not exist).  `views` K > 1: every per-view array gets a view axis."""
    n, r = store.n_rows, store.rows_per_shard
    views = int(views)
    if views < 1:
        raise ConfigError(f"views must be >= 1, not {views}")
    group = store.root.require_group(f"{fmt.FEATURES}/{name}")

    def make(parent, key, shape_tail, dt, dims, max_rows=None, fill=0, attributes=None):
        if dims[1:2] == (fmt.VIEW,):  # one entry per stored view
            shape_tail = (views,) + tuple(shape_tail)
        row_bytes = int(np.prod(shape_tail, dtype=np.int64)) * np.dtype(dt).itemsize
        c = fmt.chunk_rows(row_bytes, r, max_rows)
        parent.create_array(
            key, shape=(n,) + tuple(shape_tail), dtype=dt, chunks=(c,) + tuple(shape_tail),
            shards=(r,) + tuple(shape_tail), compressors=compressors, fill_value=fill,
            dimension_names=dims, attributes=attributes,
        )

    def dims(key):
        return fmt.dims(key, views)

    make(group, "pooled", (int(dim),), dtype, dims("pooled"))
    make(group, "valid", (), "bool", dims("valid"), fill=False)
    if tokens is not None:
        t, d = (int(x) for x in tokens)
        if token_dtype == "int8":
            if token_scaling not in fmt.TOKEN_SCALINGS:
                raise ConfigError(f"token scaling must be one of {', '.join(fmt.TOKEN_SCALINGS)}, not {token_scaling!r}")
            make(group, "tokens", (t, d), "int8", dims("tokens"), max_rows=16,
                 attributes={"scaling": token_scaling, "dequantize": fmt.DEQUANTIZE[token_scaling]})
            make(group, "tokens_scale", (t,), "float16", dims("tokens_scale"))
            if token_scaling == "token_channel":
                make(group, "tokens_channel_scale", (d,), "float16", dims("tokens_channel_scale"))
        elif token_dtype == "float16":
            make(group, "tokens", (t, d), "float16", dims("tokens"), max_rows=16)
        else:
            raise ConfigError(f"token dtype must be float16 or int8, not {token_dtype!r}")
    if views > 1:
        make(group, "view_crops", (len(fmt.BOX),), "float32", fmt.DIMS["view_crops"],
             attributes={"box": list(fmt.BOX), "of": "the original image (after EXIF orientation), as fractions "
                         "of its height (y0, h) and width (x0, w); view 0 is the recipe's centre crop"})
        make(group, "view_flips", (), "bool", fmt.DIMS["view_flips"], fill=False)
    if pixels:
        pg = store.root.require_group(fmt.PIXELS)
        make(pg, pixels, tuple(int(x) for x in pixels_shape), "uint8", dims("pixels"), max_rows=64,
             attributes={"identity": jsonable(pixels_identity or {}), "feature_set": name})
    group.attrs.update({
        "identity": identity,
        "dim": int(dim),
        "tokens": list(tokens) if tokens is not None else None,
        "token_dtype": token_dtype if tokens is not None else None,
        "token_scaling": token_scaling if tokens is not None and token_dtype == "int8" else None,
        "pixels": pixels,
        "views": views if views > 1 else None,
        "created": now(),
    })
    Progress(store.files, name).start()  # its markers all get pointers: writes never list the folder
    return FeatureSet(store, name, group)


def check_same(fs: FeatureSet, identity: dict, *, dim=None, tokens=None, token_dtype="float16", pixels=None,
               token_scaling: str | None = None, views: int = 1) -> None:
    """Refuse writing to `fs` with another identity or another layout (a flag that cannot take effect)."""
    diff = identity_diff(fs.identity, identity)
    if diff:
        raise IdentityMismatch(f"feature set '{fs.name}' in {fs.store.path} was made with a different identity "
                               f"(pick another --name, or --overwrite to recompute):{lines(diff)}")
    have = {"tokens": fs.attrs.get("tokens"), "token_dtype": fs.attrs.get("token_dtype"), "pixels": fs.pixels_name,
            "views": fs.views}
    want = {"tokens": list(tokens) if tokens is not None else None,
            "token_dtype": token_dtype if tokens is not None else None, "pixels": pixels, "views": int(views)}
    if token_scaling is not None and fs.token_scaling is not None:
        have["token_scaling"], want["token_scaling"] = fs.token_scaling, token_scaling
    layout = identity_diff(have, want, keys=list(have))
    if layout:
        raise IdentityMismatch(f"feature set '{fs.name}' in {fs.store.path} has another layout (pass the same "
                               f"--tokens/--token-dtype/--pixels/--views as when it was made, another --name, or "
                               f"--overwrite):{lines(layout)}")
