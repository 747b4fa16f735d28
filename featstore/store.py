"""Open, create and describe a featstore store: a zarr v3 group on one row grid.

    store.zarr/  samples/{uid,caption,label,source_ref}  features/<name>/{pooled,tokens,tokens_scale,valid}
                 pixels/<name>  prompts/<name>/...  _progress/<name>/<block>.json

Rows are registered by one coordinator, appended in order; `attrs.featstore.n_rows` is the
commit point of a registration (arrays may be longer after a crash mid-registration; the next
registration overwrites the tail).  Feature rows are written one whole row block at a time by
`featstore.writer`; a block counts as done only when its marker covers the block's current rows.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import posixpath
from dataclasses import dataclass, field

import numpy as np
import zarr

from . import format as fmt
from .errors import FormatTooNew, IdentityMismatch, NotAStore, StoreNotFound, UnknownFeatureSet

STR_FIELDS = (fmt.UID, fmt.CAPTION, fmt.SOURCE_REF)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _is_url(path: str) -> bool:
    return "://" in str(path)


class _Files:
    """Plain (non-zarr) files inside the store directory: markers and the manifest record.

    Local paths are written atomically (temp file + rename) so a kill never leaves half a
    marker; other fsspec URLs go through fsspec.
    """

    def __init__(self, root: str):
        self.root = str(root)
        if _is_url(self.root):
            import fsspec

            self.fs, self.base = fsspec.core.url_to_fs(self.root)
        else:
            self.fs, self.base = None, os.path.abspath(self.root)

    def _path(self, key: str) -> str:
        return posixpath.join(self.base, key)

    def write_json(self, key: str, obj) -> None:
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        path = self._path(key)
        if self.fs is not None:
            self.fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def read_json(self, key: str):
        path = self._path(key)
        try:
            if self.fs is not None:
                return json.loads(self.fs.cat_file(path))
            with open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def list(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        try:
            if self.fs is not None:
                return sorted(posixpath.basename(p) for p in self.fs.ls(path, detail=False))
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []

    def remove_tree(self, prefix: str) -> None:
        path = self._path(prefix)
        if self.fs is not None:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
            return
        import shutil

        shutil.rmtree(path, ignore_errors=True)


def identity_diff(stored: dict, given: dict) -> list[str]:
    """Human-readable differences between two identities, one item per differing key."""
    out = []
    for key in sorted(set(stored) | set(given)):
        a, b = stored.get(key, "<absent>"), given.get(key, "<absent>")
        if _jsonable(a) != _jsonable(b):
            out.append(f"{key}: {a!r} in the store vs {b!r} now")
    return out


def _jsonable(x):
    return json.loads(json.dumps(x, sort_keys=True, default=str))


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

    def marker(self, block: int) -> dict | None:
        return self.store.files.read_json(f"{fmt.PROGRESS}/{self.name}/{block}.json")

    def markers(self) -> dict[int, dict]:
        out = {}
        for fname in self.store.files.list(f"{fmt.PROGRESS}/{self.name}"):
            if fname.endswith(".json") and fname[:-5].isdigit():
                m = self.store.files.read_json(f"{fmt.PROGRESS}/{self.name}/{fname}")
                if m is not None:
                    out[int(fname[:-5])] = m
        return out

    def done_blocks(self, markers: dict[int, dict] | None = None) -> list[int]:
        """Blocks whose marker covers the block's current rows (a block that grew is not done)."""
        markers = self.markers() if markers is None else markers
        n, r = self.store.n_rows, self.store.rows_per_shard
        return sorted(
            b for b, m in markers.items() if b < self.store.n_blocks and list(m["rows"]) == list(fmt.block_range(b, r, n))
        )

    def missing_blocks(self) -> list[int]:
        done = set(self.done_blocks())
        return [b for b in range(self.store.n_blocks) if b not in done]

    def complete_rows(self) -> np.ndarray:
        """Boolean mask (n_rows,): rows in a finished block."""
        mask = np.zeros(self.store.n_rows, dtype=bool)
        for b in self.done_blocks():
            start, stop = self.store.block_range(b)
            mask[start:stop] = True
        return mask

    def usable_rows(self) -> np.ndarray:
        """Boolean mask (n_rows,): rows in a finished block whose `valid` is true."""
        mask = self.complete_rows()
        if mask.any():
            mask &= self.group["valid"][: self.store.n_rows]
        return mask


class Store:
    """A featstore store.  Use `Store.create` or `Store.open`; both validate the format."""

    def __init__(self, path: str, root: zarr.Group, mode: str):
        self.path = str(path)
        self.root = root
        self.mode = mode
        self.files = _Files(self.path)
        self._uid_index: tuple[np.ndarray, np.ndarray] | None = None

    # ---- open / create -------------------------------------------------------------------
    @classmethod
    def create(cls, path, rows_per_shard: int = fmt.DEFAULT_ROWS_PER_SHARD) -> "Store":
        """Create a new store at `path`, or open it if it is already a store (keeping its
        own rows_per_shard)."""
        path = str(path)
        if _exists(path):
            try:
                return cls.open(path, mode="r+")
            except NotAStore:
                if not _is_url(path) and os.path.isdir(path) and not os.listdir(path):
                    pass  # an empty directory may become a store
                else:
                    raise
        if int(rows_per_shard) < 1:
            raise ValueError("rows_per_shard must be >= 1")
        root = zarr.open_group(path, mode="w", zarr_format=3)
        root.attrs["featstore"] = {
            "format": fmt.FORMAT_VERSION,
            "rows_per_shard": int(rows_per_shard),
            "n_rows": 0,
            "created": _now(),
        }
        root.require_group(fmt.SAMPLES)
        root.require_group(fmt.FEATURES)
        return cls(path, root, "r+")

    @classmethod
    def open(cls, path, mode: str = "r") -> "Store":
        path = str(path)
        if not _exists(path):
            raise StoreNotFound(f"no store at {path}: check the path, or create one with `featstore extract`")
        try:
            root = zarr.open_group(path, mode=mode, zarr_format=3)
        except Exception:
            raise NotAStore(f"{path} is not a featstore store (not a zarr v3 group)") from None
        meta = root.attrs.get("featstore")
        if not isinstance(meta, dict) or "format" not in meta:
            raise NotAStore(f"{path} is a zarr group but not a featstore store (no attrs.featstore)")
        if int(meta["format"]) > fmt.FORMAT_VERSION:
            raise FormatTooNew(
                f"{path} has store format {meta['format']}, newer than this featstore understands "
                f"({fmt.FORMAT_VERSION}): upgrade featstore"
            )
        return cls(path, root, mode)

    # ---- the row grid --------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return dict(self.root.attrs["featstore"])

    @property
    def rows_per_shard(self) -> int:
        return int(self.meta["rows_per_shard"])

    @property
    def n_rows(self) -> int:
        return int(self.meta["n_rows"])

    @property
    def n_blocks(self) -> int:
        return fmt.n_blocks(self.n_rows, self.rows_per_shard)

    def block_range(self, block: int) -> tuple[int, int]:
        return fmt.block_range(block, self.rows_per_shard, self.n_rows)

    # ---- samples -------------------------------------------------------------------------
    def sample_fields(self) -> list[str]:
        return sorted(k for k, _ in self.root[fmt.SAMPLES].arrays())

    def samples(self, field_name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Values of a per-sample field for rows [start, stop)."""
        try:
            arr = self.root[f"{fmt.SAMPLES}/{field_name}"]
        except KeyError:
            raise UnknownFeatureSet(f"the store has no sample field '{field_name}'") from None
        stop = self.n_rows if stop is None else min(stop, self.n_rows)
        if stop <= start:
            return np.asarray(arr[0:0])
        return np.asarray(arr[start:stop])

    def uids(self) -> np.ndarray:
        if self.n_rows == 0:
            return np.array([], dtype=str)
        return self.samples(fmt.UID)

    def _index(self) -> tuple[np.ndarray, np.ndarray]:
        if self._uid_index is None or len(self._uid_index[0]) != self.n_rows:
            uids = self.uids().astype(object).astype(str)  # fixed-width: fast sort + searchsorted
            order = np.argsort(uids, kind="stable")
            self._uid_index = (uids[order], order)
        return self._uid_index

    def rows_of(self, uids) -> np.ndarray:
        """Row index of each uid (vectorized); -1 where the store has no such uid."""
        query = np.asarray(uids).astype(object).astype(str)
        if self.n_rows == 0 or query.size == 0:
            return np.full(query.shape, -1, dtype=np.int64)
        sorted_uids, order = self._index()
        pos = np.searchsorted(sorted_uids, query)
        pos_c = np.minimum(pos, len(sorted_uids) - 1)
        found = sorted_uids[pos_c] == query
        return np.where(found, order[pos_c], -1).astype(np.int64)

    def register(self, uids, captions=None, labels=None, source_refs=None, label_names=None) -> dict:
        """Append new uids (with their fields) as rows.  The first occurrence of a uid keeps its
        row; uids already in the store are left as they are; later duplicates within `uids` are
        returned (and recorded by the caller in the manifest record).  Returns counts."""
        self._require_writable()
        uids = np.asarray(uids).astype(object).astype(str)
        n_in = len(uids)
        captions = _col(captions, n_in, "")
        source_refs = _col(source_refs, n_in, "")
        labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        _, first = np.unique(uids, return_index=True)
        keep_first = np.zeros(n_in, dtype=bool)
        keep_first[first] = True
        duplicates = [
            {"uid": str(uids[i]), "source_ref": str(source_refs[i])} for i in np.flatnonzero(~keep_first)
        ]
        existing = self.rows_of(uids) >= 0
        new = np.flatnonzero(keep_first & ~existing)  # in source order
        start, add = self.n_rows, len(new)
        if add:
            values = {
                fmt.UID: uids[new],
                fmt.CAPTION: captions[new],
                fmt.SOURCE_REF: source_refs[new],
            }
            if labels is not None:
                values[fmt.LABEL] = labels[new]
            self._append_samples(start, values, label_names)
            self._resize_features(start + add)
            meta = self.meta
            meta["n_rows"] = start + add
            self.root.attrs["featstore"] = meta  # the commit point
            self._uid_index = None
        return {"registered": int(add), "already_present": int(existing[keep_first].sum()),
                "duplicates": duplicates, "n_rows": self.n_rows}

    def _append_samples(self, start: int, values: dict, label_names) -> None:
        group = self.root[fmt.SAMPLES]
        stop = start + len(values[fmt.UID])
        r = self.rows_per_shard
        for name, data in values.items():
            if name in group:
                arr = group[name]
            else:
                is_str = name in STR_FIELDS
                arr = group.create_array(
                    name,
                    shape=(start,),
                    dtype=str if is_str else "int64",
                    chunks=(fmt.chunk_rows(64 if is_str else 8, r),),
                    shards=(r,),
                    fill_value="" if is_str else -1,
                )
            arr.resize((stop,))
            arr[start:stop] = data
        for name in list(group.array_keys()):
            if name not in values:  # a field this registration did not bring: keep arrays aligned
                group[name].resize((stop,))
        if label_names is not None and fmt.LABEL in group:
            group[fmt.LABEL].attrs["names"] = [str(x) for x in label_names]

    def _resize_features(self, n: int) -> None:
        for fs_name in self.feature_set_names():
            for _, arr in self.root[f"{fmt.FEATURES}/{fs_name}"].arrays():
                arr.resize((n,) + arr.shape[1:])
        if fmt.PIXELS in self.root:
            for _, arr in self.root[fmt.PIXELS].arrays():
                arr.resize((n,) + arr.shape[1:])

    def manifest_record(self) -> dict:
        return self.files.read_json(fmt.MANIFEST_MARKER) or {"duplicates": [], "registrations": []}

    def record_manifest(self, source: str, result: dict) -> None:
        """Keep the duplicate uids a registration rejected, and what it registered."""
        rec = self.manifest_record()
        seen = {(d["uid"], d["source_ref"]) for d in rec["duplicates"]}
        rec["duplicates"] += [d for d in result["duplicates"] if (d["uid"], d["source_ref"]) not in seen]
        rec["registrations"].append(
            {"source": source, "registered": result["registered"], "already_present": result["already_present"],
             "duplicates": len(result["duplicates"]), "at": _now()}
        )
        self.files.write_json(fmt.MANIFEST_MARKER, rec)

    # ---- feature sets --------------------------------------------------------------------
    def feature_set_names(self) -> list[str]:
        if fmt.FEATURES not in self.root:
            return []
        return sorted(k for k, _ in self.root[fmt.FEATURES].groups())

    def feature_set(self, name: str) -> FeatureSet:
        key = f"{fmt.FEATURES}/{name}"
        if name not in self.feature_set_names():
            have = ", ".join(self.feature_set_names()) or "none"
            raise UnknownFeatureSet(f"the store has no feature set '{name}' (it has: {have})")
        return FeatureSet(self, name, self.root[key])

    def create_feature_set(
        self,
        name: str,
        identity: dict,
        dim: int,
        *,
        tokens: tuple[int, int] | None = None,
        token_dtype: str = "float16",
        dtype: str = "float16",
        pixels: str | None = None,
        pixels_shape: tuple[int, int, int] | None = None,
        pixels_identity: dict | None = None,
        compressors=None,
    ) -> FeatureSet:
        """Create `features/<name>` (or return it when its identity matches `identity`).

        A feature set of the same name made with a different identity is refused, showing the
        difference.  Arrays are sharded on the store's row grid, chunks sized by row width.
        """
        self._require_writable()
        if not name or "/" in name or name.startswith((".", "_")):
            raise ValueError(f"bad feature set name {name!r}")
        identity = _jsonable(identity)
        if name in self.feature_set_names():
            fs = self.feature_set(name)
            diff = identity_diff(fs.identity, identity)
            if diff:
                raise IdentityMismatch(
                    f"feature set '{name}' in {self.path} was made with a different identity "
                    f"({'; '.join(diff)}): pick another --name, or --overwrite to recompute"
                )
            return fs
        if pixels and pixels in self.pixels_names():
            raise IdentityMismatch(f"pixels '{pixels}' already exist in {self.path}: pick another pixels name")
        n, r = self.n_rows, self.rows_per_shard
        group = self.root.require_group(f"{fmt.FEATURES}/{name}")

        def make(key, shape_tail, dt, max_rows=None, fill=0):
            row_bytes = int(np.prod(shape_tail, dtype=np.int64)) * np.dtype(dt).itemsize
            c = fmt.chunk_rows(row_bytes, r, max_rows)
            group.create_array(
                key, shape=(n,) + tuple(shape_tail), dtype=dt, chunks=(c,) + tuple(shape_tail),
                shards=(r,) + tuple(shape_tail), compressors=compressors, fill_value=fill,
            )

        make("pooled", (int(dim),), dtype)
        make("valid", (), "bool", fill=False)
        if tokens is not None:
            t, d = (int(x) for x in tokens)
            if token_dtype == "int8":
                make("tokens", (t, d), "int8", max_rows=16)
                make("tokens_scale", (t,), "float16")
            elif token_dtype in ("float16", "float32", "bfloat16"):
                make("tokens", (t, d), "float16" if token_dtype == "bfloat16" else token_dtype, max_rows=16)
            else:
                raise ValueError(f"token dtype must be float16 or int8, not {token_dtype!r}")
        if pixels:
            c, h, w = (int(x) for x in pixels_shape)
            pg = self.root.require_group(fmt.PIXELS)
            row_bytes = c * h * w
            pg.create_array(
                pixels, shape=(n, c, h, w), dtype="uint8", chunks=(fmt.chunk_rows(row_bytes, r, 64), c, h, w),
                shards=(r, c, h, w), compressors=None, fill_value=0,
                attributes={"identity": _jsonable(pixels_identity or {}), "feature_set": name},
            )
        group.attrs.update(
            {
                "identity": identity,
                "dim": int(dim),
                "tokens": list(tokens) if tokens is not None else None,
                "token_dtype": token_dtype if tokens is not None else None,
                "pixels": pixels,
                "created": _now(),
            }
        )
        return FeatureSet(self, name, group)

    def pixels_names(self) -> list[str]:
        if fmt.PIXELS not in self.root:
            return []
        return sorted(k for k, _ in self.root[fmt.PIXELS].arrays())

    def pixels(self, name: str) -> zarr.Array:
        if name not in self.pixels_names():
            have = ", ".join(self.pixels_names()) or "none"
            raise UnknownFeatureSet(f"the store has no pixels '{name}' (it has: {have})")
        return self.root[f"{fmt.PIXELS}/{name}"]

    def remove_feature_set(self, name: str) -> None:
        """Delete a feature set, the pixels written with it, and its markers."""
        self._require_writable()
        fs = self.feature_set(name)
        pixels = fs.pixels_name
        self.files.remove_tree(f"{fmt.PROGRESS}/{name}")  # markers first: never a marker without data
        if pixels and pixels in self.pixels_names():
            del self.root[fmt.PIXELS][pixels]
        del self.root[fmt.FEATURES][name]

    def array(self, path: str) -> zarr.Array:
        """Any array by its path in the store, e.g. `features/dino/pooled`."""
        try:
            node = self.root[path]
        except KeyError:
            node = None
        if not isinstance(node, zarr.Array):
            raise UnknownFeatureSet(f"the store has no array '{path}'")
        return node

    def _require_writable(self) -> None:
        if self.mode == "r":
            raise PermissionError(f"{self.path} was opened read-only")

    def __repr__(self) -> str:
        return f"Store({self.path!r}, rows={self.n_rows}, rows_per_shard={self.rows_per_shard}, features={self.feature_set_names()})"


def _col(values, n: int, fill: str) -> np.ndarray:
    if values is None:
        return np.full(n, fill, dtype=object).astype(str)
    out = np.array(["" if v is None else str(v) for v in values], dtype=object).astype(str)
    if len(out) != n:
        raise ValueError(f"expected {n} values, got {len(out)}")
    return out


def _exists(path: str) -> bool:
    if _is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return fs.exists(p)
    return os.path.exists(path)
