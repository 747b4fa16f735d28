"""Open, create and describe a featstore store: a zarr v3 group on one row grid.

    store.zarr/  samples/{uid,source,source_ref,caption,label}
                 features/<name>/{pooled,tokens,tokens_scale,tokens_channel_scale,valid[,view_crops,view_flips]}
                 pixels/<name>  prompts/<name>/...  _progress/<name>/<block>-<version>.json

`attrs.featstore` holds the format, the row grid, `n_rows` (the commit point of a registration:
arrays may be longer after a crash mid-registration; the next registration overwrites the tail),
the store's identity (`store_id`, `created`, `generation`, bumped by every registration and feature-set removal) and
`sources`, every source rows were registered from (`featstore.core.registration`).  Registration,
feature-set creation and manifest updates hold the store lock (`Store.lock`); feature rows are
written one whole row block at a time by `featstore.core.writes` under that block's lock.

Every open reads the metadata fresh, never through consolidated metadata; a store that carries
consolidated metadata has it rewritten after every change, so plain-zarr readers that use it
(`zarr.open_consolidated`, xarray) see the store as it is.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import zarr

from featstore.core import featureset as fsets
from featstore.core import format as fmt
from featstore.errors import (ConfigError, FormatTooNew, FormatTooOld, NotAStore, ReadOnlyStore, StoreNotFound,
                              UnknownArray, UnknownFeatureSet)
from featstore.core.featureset import FeatureSet
from featstore.core.identity import jsonable
from featstore.core.files import StoreFiles, is_url, now
from featstore.core.strings import strings_at
from featstore.core.uidindex import UidIndex, equal_pairs

STR_FIELDS = fmt.STR_FIELDS


class Store:
    """A featstore store.  Use `Store.create` or `Store.open`; both validate the format."""

    def __init__(self, path: str, root: zarr.Group, mode: str):
        self.path = str(path)
        self.root = root
        self.mode = mode
        self.files = StoreFiles(self.path)
        # whether the store carries consolidated metadata, seen before this view writes anything
        # (zarr drops it from zarr.json when the root's attrs are rewritten)
        self._consolidated = mode != "r" and self.has_consolidated()

    # ---- open / create -------------------------------------------------------------------
    @classmethod
    def create(cls, path, rows_per_shard: int = fmt.DEFAULT_ROWS_PER_SHARD, *, uid_hash_bits: int = 64) -> "Store":
        """Create a new store at `path`, or open it if it is already a store (keeping its own
        rows_per_shard).  Two processes creating the same store at once get one store.
        `uid_hash_bits` < 64 makes the uid index's hash tiny (tests force collisions with it)."""
        path = _normpath(path)
        if int(rows_per_shard) < 1:
            raise ConfigError(f"rows_per_shard must be >= 1, not {rows_per_shard}")
        if _is_store(path):
            return cls.open(path, mode="r+")
        if _exists(path) and not _may_become_store(path):
            raise NotAStore(f"{path} exists and is not a featstore store (not a zarr v3 group): "
                            "give a new path or an empty folder")
        files = StoreFiles(path)
        with files.lock("store", "the store"):
            if _is_store(path):  # another process created it while we waited
                return cls.open(path, mode="r+")
            attrs = {"featstore": {
                "format": fmt.FORMAT_VERSION,
                "rows_per_shard": int(rows_per_shard),
                "n_rows": 0,
                "created": now(),
                "store_id": uuid.uuid4().hex,
                "generation": 0,
                "sources": [],
            }}
            root = zarr.create_group(path, zarr_format=3, overwrite=False, attributes=attrs)
            root.require_group(fmt.SAMPLES)
            root.require_group(fmt.FEATURES)
            UidIndex.create(files, hash_bits=uid_hash_bits)
        return cls.open(path, mode="r+")

    @classmethod
    def open(cls, path, mode: str = "r", *, allow_old: bool = False) -> "Store":
        """Open a store.  A format-1 store opens read-only (`featstore upgrade` converts it);
        `mode="r+"` checks that this process may write it."""
        path = _normpath(path)
        if not _exists(path):
            raise StoreNotFound(f"no store at {path}: check the path, or create one with `featstore extract`")
        try:
            root = zarr.open_group(path, mode="r", zarr_format=3, use_consolidated=False)
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
        if mode != "r":
            if int(meta["format"]) < fmt.FORMAT_VERSION and not allow_old:
                raise FormatTooOld(
                    f"{path} has store format {meta['format']}: it can be read, but not written by this featstore; "
                    f"convert it once with `featstore upgrade --store {path}`"
                )
            if not is_url(path) and not os.access(path, os.W_OK):
                raise ReadOnlyStore(f"{path} is not writable here (check its permissions), so nothing can be added to it")
            root = zarr.open_group(path, mode="r+", zarr_format=3, use_consolidated=False)
        return cls(path, root, mode)

    def fresh(self) -> "Store":
        """The same store re-opened: metadata as it is now (other writers may have grown it)."""
        return Store.open(self.path, mode=self.mode, allow_old=self.format < fmt.FORMAT_VERSION)

    def lock(self):
        """The store lock: registration, feature-set creation and manifest updates hold it."""
        self.require_writable()
        return self.files.lock("store", "the store")

    def block_lock(self, name: str, block: int):
        """The lock of one row block of one feature set (the read-back -> write -> marker cycle)."""
        self.require_writable()
        return self.files.lock(f"{name}.{block}", f"block {block} of features/{name}")

    # ---- the row grid --------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return dict(self.root.attrs["featstore"])

    @property
    def format(self) -> int:
        return int(self.meta["format"])

    @property
    def rows_per_shard(self) -> int:
        return int(self.meta["rows_per_shard"])

    @property
    def n_rows(self) -> int:
        return int(self.meta["n_rows"])

    @property
    def n_blocks(self) -> int:
        return fmt.n_blocks(self.n_rows, self.rows_per_shard)

    @property
    def identity(self) -> tuple:
        """What a cached view of this store must match to still be current: path, creation,
        and the generation (every registration and every feature-set removal bumps it)."""
        return _identity(self.path, self.meta)

    def committed_identity(self) -> tuple:
        """`identity` as the store's zarr.json says now (other writers may have changed it): one
        read, without re-opening the store."""
        meta = ((self.files.read_json("zarr.json") or {}).get("attributes") or {}).get("featstore") or {}
        return _identity(self.path, meta)

    def block_range(self, block: int) -> tuple[int, int]:
        return fmt.block_range(block, self.rows_per_shard, self.n_rows)

    def block_sizes(self) -> np.ndarray:
        """Rows of every block now (int64; the last may be short)."""
        r = self.rows_per_shard
        return np.minimum(r, self.n_rows - np.arange(self.n_blocks, dtype=np.int64) * r)

    @property
    def sources(self) -> list[dict]:
        """Every source rows were registered from (`samples/source` indexes this list)."""
        return [dict(s) for s in self.meta.get("sources", [])]

    # ---- samples -------------------------------------------------------------------------
    def sample_fields(self) -> list[str]:
        return sorted(k for k, _ in self.root[fmt.SAMPLES].arrays())

    def samples(self, field_name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Values of a per-sample field for rows [start, stop)."""
        try:
            arr = self.root[f"{fmt.SAMPLES}/{field_name}"]
        except KeyError:
            raise UnknownArray(f"the store has no sample field '{field_name}'") from None
        stop = self.n_rows if stop is None else min(stop, self.n_rows)
        if stop <= start:
            return np.asarray(arr[0:0])
        return np.asarray(arr[start:stop])

    def samples_at(self, field_name: str, rows) -> np.ndarray:
        """Values of a per-sample field at `rows` (any order): reads only the chunks they fall in
        (string fields straight from their shard files, `featstore.core.strings`)."""
        rows = np.asarray(rows, dtype=np.int64)
        arr = self.root[f"{fmt.SAMPLES}/{field_name}"]
        if np.dtype(arr.dtype).kind == "T":
            return strings_at(arr, rows)
        return np.asarray(arr.get_coordinate_selection(rows)) if len(rows) else np.asarray(arr[:0])

    def uids(self) -> np.ndarray:
        if self.n_rows == 0:
            return np.array([], dtype=str)
        return self.samples(fmt.UID)

    def uid_index(self) -> UidIndex | None:
        """The store's uid index as committed now (`featstore.core.uidindex`); None before format 3."""
        return UidIndex.open(self.files)

    def rows_of(self, uids) -> np.ndarray:
        """Row index of each uid (vectorized); -1 where the store has no such uid.  Reads only
        the index files that hold the queries' hashes and the uids of the candidate rows."""
        return self.lookup_rows(uids, self.uid_index(), self.n_rows)

    def lookup_rows(self, uids, index: UidIndex | None, limit: int, hashes: np.ndarray | None = None) -> np.ndarray:
        """`rows_of` through a given index (a registration's, with its uncommitted runs), for
        rows < `limit`; rows the index does not cover yet are hashed from samples/uid.  `hashes`:
        the queries' index hashes when the caller has them already."""
        query = _strings(uids)
        out = np.full(query.shape, -1, dtype=np.int64)
        if limit == 0 or query.size == 0:
            return out
        if index is None:  # a store from before the uid index: one sorted copy, in memory
            return self._rows_of_unindexed(query, limit)
        h = index.hash(query) if hashes is None else np.asarray(hashes, np.uint64)
        qpos, rows = index.candidates(h)
        covered = index.covered
        if covered < limit:  # registered but not indexed (an old store's tail): hash those uids now
            th = index.hash(self.samples(fmt.UID, covered, limit))
            order = np.argsort(th, kind="stable")
            tq, tpos = equal_pairs(th[order], h)
            qpos, rows = np.r_[qpos, tq], np.r_[rows, covered + order[tpos]]
        keep = rows < limit
        qpos, rows = qpos[keep], rows[keep]
        if not len(rows):
            return out
        wanted, inverse = np.unique(rows, return_inverse=True)
        stored = self.samples_at(fmt.UID, wanted)
        match = np.asarray(stored)[inverse] == query[qpos]
        qpos, rows = qpos[match], rows[match]
        out[qpos[::-1]] = rows[::-1]  # uids are unique: at most one match each (first wins if not)
        return out

    def _rows_of_unindexed(self, query: np.ndarray, limit: int) -> np.ndarray:
        uids = self.samples(fmt.UID, 0, limit)
        order = np.argsort(uids, kind="stable")
        pos = np.minimum(np.searchsorted(uids[order], query), len(order) - 1)
        found = uids[order][pos] == query
        return np.where(found, order[pos], -1).astype(np.int64)

    def register(self, uids, captions=None, labels=None, source_refs=None, label_names=None, *,
                 source: dict | None = None, update_metadata: bool = False, **batching) -> dict:
        """Append the new uids as rows and fill metadata of the known ones (`featstore.core.registration`)."""
        from featstore.core.registration import register

        return register(self, uids, captions=captions, labels=labels, source_refs=source_refs,
                        label_names=label_names, source=source, update_metadata=update_metadata, **batching)

    def manifest_record(self) -> dict:
        """Every registration's record and the duplicate uids they rejected (tools read all of
        them: one small file per registration, plus the single record of older stores)."""
        rec = self.files.read_json(fmt.MANIFEST_MARKER) or {"duplicates": [], "registrations": []}
        names = [n for n in self.files.list(fmt.REGISTRATIONS) if n.endswith(".json")]
        for name in sorted(names, key=lambda n: int(n.split(".")[0]) if n.split(".")[0].isdigit() else -1):
            one = self.files.read_json(f"{fmt.REGISTRATIONS}/{name}") or {}
            rec["duplicates"] += one.pop("duplicate_uids", [])
            rec["registrations"].append(one)
        seen: set = set()  # a re-run of the same manifest rejects the same duplicates again: count them once
        rec["duplicates"] = [d for d in rec["duplicates"]
                             if (d["uid"], d["source_ref"]) not in seen and not seen.add((d["uid"], d["source_ref"]))]
        return rec

    def record_manifest(self, source: str, result: dict, generation: int) -> None:
        """Keep what one registration did and the duplicate uids it rejected, in a file of its
        own (`_progress/registrations/<generation>.json`): O(this registration), store lock held."""
        self.files.write_json(f"{fmt.REGISTRATIONS}/{int(generation)}.json", {
            "source": source, "source_id": result.get("source_id"), "registered": result["registered"],
            "already_present": result["already_present"], "duplicates": len(result["duplicates"]), "at": now(),
            "duplicate_uids": [{**d, "source": result.get("source_id")} for d in result["duplicates"]]})

    # ---- feature sets --------------------------------------------------------------------
    def feature_set_names(self) -> list[str]:
        if fmt.FEATURES not in self.root:
            return []
        return sorted(k for k, _ in self.root[fmt.FEATURES].groups())

    def feature_set(self, name: str) -> FeatureSet:
        if name not in self.feature_set_names():
            have = ", ".join(self.feature_set_names()) or "none"
            raise UnknownFeatureSet(f"the store has no feature set '{name}' (it has: {have})")
        return FeatureSet(self, name, self.root[f"{fmt.FEATURES}/{name}"])

    def create_feature_set(self, name: str, identity: dict, dim: int, *, tokens: tuple[int, int] | None = None,
                           token_dtype: str = "float16", dtype: str = "float16", pixels: str | None = None,
                           pixels_shape: tuple[int, int, int] | None = None, pixels_identity: dict | None = None,
                           compressors=None, token_scaling: str = "token", views: int = 1) -> FeatureSet:
        """Create `features/<name>` (or return it when its identity and layout match).

        int8 tokens get `token_scaling` (`featstore.tokens`): "token" (one scale per token, the
        default here so existing callers keep their layout) or "token_channel" (what extraction
        gives new feature sets).  `views` K > 1 stores K views per row on a `view` axis after
        `row` (with view_crops and view_flips; `featstore.core.featureset`); 1 is the plain layout.

        A feature set of the same name made with a different identity is refused, showing the
        difference.  Arrays are sharded on the store's row grid, chunks sized by row width.
        Runs under the store lock, so two processes creating the same name get one feature set.
        """
        self.require_writable()
        fsets.check_name(name)
        identity = jsonable(identity)
        with self.lock():
            cur = self.fresh()
            if name in cur.feature_set_names():
                fs = cur.feature_set(name)
                fsets.check_same(fs, identity, tokens=tokens, token_dtype=token_dtype, pixels=pixels,
                                 token_scaling=token_scaling, views=views)
                self.root = cur.root
                return FeatureSet(self, name, fs.group)
            if pixels and pixels in cur.pixels_names():
                from featstore.errors import IdentityMismatch

                raise IdentityMismatch(f"pixels '{pixels}' already exist in {self.path}: pick another pixels name")
            fs = fsets.create(cur, name, identity, dim, tokens=tokens, token_dtype=token_dtype, dtype=dtype,
                              pixels=pixels, pixels_shape=pixels_shape, pixels_identity=pixels_identity,
                              compressors=compressors, token_scaling=token_scaling, views=views)
            cur.keep_consolidated()
        self.root = cur.root
        return FeatureSet(self, name, fs.group)

    def pixels_names(self) -> list[str]:
        if fmt.PIXELS not in self.root:
            return []
        return sorted(k for k, _ in self.root[fmt.PIXELS].arrays())

    def pixels(self, name: str) -> zarr.Array:
        if name not in self.pixels_names():
            have = ", ".join(self.pixels_names()) or "none"
            raise UnknownArray(f"the store has no pixels '{name}' (it has: {have})")
        return self.root[f"{fmt.PIXELS}/{name}"]

    def remove_feature_set(self, name: str) -> None:
        """Delete a feature set, the pixels written with it, its markers, and the prompt features
        eval cached for it (`prompts/<name>`)."""
        self.require_writable()
        with self.lock():
            cur = self.fresh()
            fs = cur.feature_set(name)
            pixels = fs.pixels_name
            cur.files.remove_tree(f"{fmt.PROGRESS}/{name}")  # markers first: never a marker without data
            if pixels and pixels in cur.pixels_names():
                del cur.root[fmt.PIXELS][pixels]
            del cur.root[fmt.FEATURES][name]
            if fmt.PROMPTS in cur.root and name in cur.root[fmt.PROMPTS]:
                del cur.root[fmt.PROMPTS][name]
            meta = cur.meta  # a new generation: writers holding a view of the old feature set re-open
            cur.root.attrs["featstore"] = {**meta, "generation": int(meta.get("generation", 0)) + 1}
            cur.keep_consolidated()
        self.root = cur.root

    def array(self, path: str) -> zarr.Array:
        """Any array by its path in the store, e.g. `features/dino/pooled`."""
        try:
            node = self.root[path]
        except KeyError:
            node = None
        if not isinstance(node, zarr.Array):
            raise UnknownArray(f"the store has no array '{path}'")
        return node

    # ---- consolidated metadata -----------------------------------------------------------
    def has_consolidated(self) -> bool:
        doc = self.files.read_json("zarr.json") or {}
        return bool(doc.get("consolidated_metadata"))

    def keep_consolidated(self) -> None:
        """After a metadata change: if the store carries consolidated metadata, rewrite it so
        readers that use it see the change (the store lock is held)."""
        if self._consolidated or self.has_consolidated():
            zarr.consolidate_metadata(self.path, zarr_format=3)
            self._consolidated = True

    def require_writable(self) -> None:
        if self.mode == "r":
            raise ReadOnlyStore(f"{self.path} was opened read-only: open it with mode='r+' to write")

    def __repr__(self) -> str:
        return f"Store({self.path!r}, rows={self.n_rows}, rows_per_shard={self.rows_per_shard}, features={self.feature_set_names()})"


def _strings(values) -> np.ndarray:
    """Uids as a numpy string array (StringDType), without a Python object per element where
    they already are numpy strings."""
    arr = np.asarray(values)
    if arr.dtype.kind in "TU":
        return arr.astype(np.dtypes.StringDType()) if arr.dtype.kind == "U" else arr
    return np.array([str(v) for v in arr.reshape(-1).tolist()], dtype=np.dtypes.StringDType()).reshape(arr.shape)


def _normpath(path) -> str:
    path = str(path)
    return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def _exists(path: str) -> bool:
    if is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return fs.exists(p)
    return os.path.exists(path)


def store_exists(path) -> bool:
    """Whether `path` (local or URL) holds a zarr group (a store, or something open() judges)."""
    return _is_store(_normpath(path))


def _is_store(path: str) -> bool:
    """A zarr group with attrs.featstore (or anything else with a zarr.json: open() judges it)."""
    if is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return fs.exists(f"{p.rstrip('/')}/zarr.json")
    return os.path.isfile(os.path.join(path, "zarr.json"))


def _may_become_store(path: str) -> bool:
    """An empty folder, or one holding only the lock folder of a store being created."""
    if is_url(path):
        return True
    return os.path.isdir(path) and set(os.listdir(path)) <= {fmt.PROGRESS}


def _identity(path: str, meta: dict) -> tuple:
    return (path, meta.get("store_id") or meta.get("created"), int(meta.get("generation", 0)), int(meta.get("n_rows", -1)))
