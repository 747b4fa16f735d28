"""How the loader reads: where each array's rows come from, windows of runs, gathering batches.

Each array a batch needs (an int8 token column also needs its scales) is a `StoredArray`:

- **ram** (`cache="ram"`): the whole array in memory; a batch is one `np.take` by store row.
- **mapped** (local store, default layout: `featstore.read.mapping`): the shard files mapped side by
  side; a batch is one `np.take` from the page cache into the batch tensor, the one copy a numpy
  memmap gather makes.  Read-ahead asks the kernel for the next window's runs (madvise).
- **buffered**: everything else.  The runs of the next `read_ahead` windows are read into
  page-aligned window buffers by `read_threads` threads (local shard files with preadv, remote
  shard objects with concurrent ranged GETs, or zarr's `array[a:b]` for any other layout; never
  per-row indexing), and batches are gathered from them.  Buffers are reused from window to
  window; batch tensors never alias them (their own memory, `featstore.read.buffers.BatchMemory`,
  is recycled only once nothing references a batch), so a consumer may keep any part of one.

A window is `k` consecutive batches of this rank (see `featstore.read.order`); its runs are the row
ranges covering their rows, gaps inside a block included while they add at most as many rows as
the window needs (so a window's buffer holds at most 2x its rows).

Stored views (`featstore.read.views`): a column that serves one of its K views per row reads *view
rows*, `row * K + view` (`ShardLayout.split_views`): one view of a row is one contiguous range of
the row's bytes, so runs, buffers and ranged reads cover just the views served; a mapping or RAM
cache is indexed the same way.  Every such column of a batch serves the same view of a row.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from featstore.core import format as fmt
from featstore.read.buffers import STR_ROW_BYTES, BatchMemory, Buffers
from featstore.errors import ConfigError, UnknownArray, UnreadableRows
from featstore.read.mapping import MappedArray
from featstore.read.remote import RemoteShards
from featstore.core.shardfile import LocalShards
from featstore.tokens import dequantize_int8
from featstore.read.views import view_count

TORCH_DTYPES = {np.dtype(t) for t in ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")}


@dataclass
class StoredArray:
    """One array a batch entry reads, and the way it is read."""

    key: str
    array: object  # the zarr array
    ram: np.ndarray | None = None
    mapped: object = None  # featstore.read.mapping.MappedArray
    local: object = None  # featstore.core.shardfile.LocalShards
    remote: object = None  # featstore.read.remote.RemoteShards
    views: int = 1  # K > 1: one view of each row is served (the array's view axis is split off)
    cached: object = None  # featstore.read.cache.CachedShards (cache="disk"; with `mapped` or `local` set)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype) if self.ram is None else self.ram.dtype

    @property
    def tail(self) -> tuple:
        """The shape of what one row serves (one view's, for a split view axis)."""
        return tuple(self.array.shape[1 + (self.views > 1):])

    @property
    def row_bytes(self) -> int:
        cells = int(np.prod(self.tail, dtype=np.int64))
        return cells * (self.dtype.itemsize if self.dtype.kind in "biufc" else STR_ROW_BYTES)

    @property
    def by_row(self) -> np.ndarray | None:
        """An array indexed by store row (RAM cache or mapping), or None when read into buffers;
        with a split view axis indexed by `row * K + view` (the same memory, reshaped)."""
        data = self.ram if self.ram is not None else self.mapped.view if self.mapped is not None else None
        if data is None or self.views == 1:
            return data
        return data.reshape((-1,) + self.tail)

    @property
    def kind(self) -> str:
        if self.ram is not None:
            return "ram"
        if self.cached is not None:
            return "cached"
        if self.mapped is not None:
            return "mapped"
        return "local" if self.local is not None else "remote" if self.remote is not None else "zarr"


@dataclass
class Column:
    """One entry of a batch: its source, and the scales of int8 tokens served dequantized."""

    alias: str
    path: str
    source: StoredArray
    scale: StoredArray | None = None  # int8 tokens: tokens_scale (row, token)
    feature_set: str | None = None
    channel: StoredArray | None = None  # int8 token x channel: tokens_channel_scale (row, token_dim)

    def sources(self):
        yield self.source
        if self.scale is not None:
            yield self.scale
        if self.channel is not None:
            yield self.channel

    @property
    def views(self) -> int:
        """K when this column serves one of its K stored views per row, else 1."""
        return self.source.views


def make_column(store, alias: str, path: str, dequantize: bool, ram: dict | None = None, view=None) -> Column:
    """The column at `path` (features/<name>/<array>, pixels/<name> or samples/<field>); int8
    tokens served dequantized also read their scales: `tokens_scale`, and `tokens_channel_scale`
    where the feature set's scaling is token x channel (`featstore.tokens`; never the token scale
    alone there).  `ram`: RAM-cached arrays to keep.  `view` (`featstore.read.views`): how an array
    with a view axis is served ("all": as stored; a view number or "epoch": one view per row);
    None refuses such an array."""
    parts = path.split("/")
    fs_name = None
    if parts[0] == fmt.FEATURES and len(parts) == 3:
        fs_name = parts[1]
        store.feature_set(fs_name)  # a clear error for an unknown name
    elif parts[0] == fmt.PIXELS and len(parts) == 2:
        fs_name = store.pixels(parts[1]).attrs.get("feature_set")
    elif parts[0] != fmt.SAMPLES:
        raise UnknownArray(f"'{path}' is not a column (features/<name>/<array>, pixels/<name> or samples/<field>)")
    array = store.array(path)
    k = view_count(array)
    if k > 1 and view is None:
        raise ConfigError(f"{path} holds {k} stored views per row (extract --views {k}): say which to serve, "
                          "Loader(view=0) for the centre crop, view='epoch' for one view per row per epoch, "
                          "or view='all' for every view")
    split = k if k > 1 and view != "all" else 1
    ram = ram or {}
    scale = channel = None
    if fs_name and parts[-1] == "tokens" and array.dtype == np.int8 and dequantize:
        key = alias + "#scale"
        scale = StoredArray(key, store.array(f"{fmt.FEATURES}/{fs_name}/tokens_scale"), ram=ram.get(key), views=split)
        if store.feature_set(fs_name).token_scaling == "token_channel":
            key = alias + "#channel"
            channel = StoredArray(key, store.array(f"{fmt.FEATURES}/{fs_name}/tokens_channel_scale"), ram=ram.get(key),
                             views=split)
    return Column(alias, path, StoredArray(alias, array, ram=ram.get(alias), views=split), scale, fs_name, channel)


def attach_sources(columns: list[Column], store, blocks: np.ndarray, *, cache: str | None, direct: bool,
                   disk=None) -> None:
    """Decide how each source is read: RAM cache, mapped shards, shard reads (local, remote), zarr;
    with cache="disk", the shard objects of a remote store fetched into `disk` (`featstore.read.cache`).
    `blocks`: the blocks holding served rows."""
    r, n = store.rows_per_shard, store.n_rows
    if cache == "disk":
        from featstore.read.cache import attach

        attach([s for c in columns for s in c.sources()], store, blocks, disk)
    for c in columns:
        for s in c.sources():
            if cache == "ram":
                if s.ram is None:
                    s.ram = np.ascontiguousarray(s.array[:n])
                continue
            if not direct or s.cached is not None:
                continue
            s.mapped = MappedArray.of(s.array, r, n, blocks)
            if s.mapped is None:  # shard reads of one view per row where a view axis is split
                s.local = LocalShards.of(s.array, r, views=s.views)
                s.remote = RemoteShards.of(s.array, r, store.path, views=s.views) if s.local is None else None


# ---- windows -----------------------------------------------------------------------------------
def covering_runs(rows: np.ndarray, rows_per_shard: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) of the row ranges to read for `rows`: runs of needed rows, each inside one
    block, joined over the smallest gaps while the gaps add at most len(unique rows) rows."""
    u = np.sort(rows)  # np.unique hashes int64 (numpy >= 2.3): 5x slower than a sort here
    u = u[np.r_[True, u[1:] != u[:-1]]] if len(u) else u
    if len(u) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    gaps = np.diff(u) - 1
    same_block = (u[1:] // rows_per_shard) == (u[:-1] // rows_per_shard)
    join = same_block & (gaps == 0)
    cand = np.flatnonzero(same_block & (gaps > 0))
    if len(cand):
        by_size = cand[np.argsort(gaps[cand], kind="stable")]
        join[by_size[np.cumsum(gaps[by_size]) <= len(u)]] = True
    breaks = np.flatnonzero(~join) + 1
    return u[np.r_[0, breaks]], u[np.r_[breaks - 1, len(u) - 1]] + 1


@dataclass
class Runs:
    """The row runs a window reads of its sources in one row space: store rows, or for a split
    view axis of K views the "view rows" `row * K + view` (K view rows per store row, so a block
    holds R * K of them and one run is one contiguous range of views)."""

    starts: np.ndarray  # the runs to read: rows [start, stop)
    stops: np.ndarray
    offsets: np.ndarray  # each run's first row in the window buffers

    @classmethod
    def covering(cls, rows: np.ndarray, rows_per_shard: int) -> "Runs":
        starts, stops = covering_runs(rows, rows_per_shard)
        return cls(starts, stops, np.r_[0, np.cumsum(stops - starts)[:-1]].astype(np.int64))

    @property
    def total(self) -> int:
        return int((self.stops - self.starts).sum())

    def positions(self, rows: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.starts, rows, side="right") - 1
        return self.offsets[i] + (rows - self.starts[i])


@dataclass
class Window:
    batches: list | None  # this window's batches (arrays of store rows); None: `make` computes them
    runs: dict = field(default_factory=dict)  # K (1: store rows) -> the Runs read in that row space
    buffers: dict = field(default_factory=dict)  # source key -> window buffer
    futures: list = field(default_factory=list)
    prepared: object = None  # the future of its preparation (runs, buffers, reads submitted)
    make: object = None  # () -> batches, called when the window is prepared (a lazily computed epoch)

    def wait(self) -> None:
        if self.prepared is not None:
            self.prepared.result()
        for f in self.futures:
            f.result()
        self.futures = []


# ---- reading -----------------------------------------------------------------------------------
class Reader:
    """Reads windows of a set of columns and gathers batches from them (`featstore.read.stream`
    decides which thread does what when)."""

    def __init__(self, columns: list[Column], rows_per_shard: int, *, read_threads: int, read_ahead: int,
                 pin_memory: bool, buffers: Buffers, memory: BatchMemory, views_of=None):
        self.columns = columns
        self.memory = memory
        self.r = rows_per_shard
        self.read_threads, self.read_ahead, self.pin_memory = read_threads, read_ahead, pin_memory
        self.buffers = buffers
        self.views_of = views_of  # rows -> the view each serves (columns with a split view axis)
        self.k = max((c.views for c in columns), default=1)

    def view_rows(self, rows: np.ndarray, k: int) -> np.ndarray:
        """`rows` in the row space of a split view axis of `k` views (store rows for k = 1)."""
        return rows if k == 1 else rows * k + self.views_of(rows)

    def start(self, w: Window, pool: ThreadPoolExecutor) -> Window:
        """Prepare and read window `w` in the pool (off the thread that gathers batches)."""
        w.prepared = pool.submit(self._prepare, w, pool)
        return w

    def _prepare(self, w: Window, pool: ThreadPoolExecutor) -> None:
        """Work out the window's runs and buffers, start its reads (never waits on the pool)."""
        if w.batches is None:
            w.batches = w.make()
        rows = np.concatenate(w.batches)
        for c in self.columns:
            for s in c.sources():
                if s.ram is not None:
                    continue
                k = s.views
                if k not in w.runs:
                    w.runs[k] = Runs.covering(self.view_rows(rows, k), self.r * k)
                runs = w.runs[k]
                if s.cached is not None:  # its blocks fetched into the disk cache (and mapped) first
                    s.cached.wait(np.unique(runs.starts // (self.r * k)).tolist())
                if s.mapped is not None:
                    s.mapped.will_need(zip((runs.starts // k).tolist(), (-(-runs.stops // k)).tolist()))
                    continue
                buf = self.buffers.get(s.key, runs.total, s.tail, s.dtype)
                w.buffers[s.key] = buf
                for part in _split(len(runs.starts), self.read_threads if s.remote is None else 1):
                    w.futures.append(pool.submit(_read, s, self.r * k, runs.starts[part], runs.stops[part],
                                                 runs.offsets[part], buf))

    def release(self, w: Window) -> None:
        for key, buf in w.buffers.items():
            self.buffers.put(key, buf)
        w.buffers = {}

    def gather(self, w: Window, rows: np.ndarray) -> dict:
        """One batch: `rows` of every column, gathered from the mapping, RAM or window buffers
        (one view per row of a split view axis: the same view in every such column, as `view`)."""
        out = {}
        spaces: dict[int, np.ndarray] = {}  # K -> rows in that row space
        positions: dict[int, np.ndarray] = {}  # K -> positions in the window buffers

        def index(s: StoredArray) -> np.ndarray:
            k = s.views
            if k not in spaces:
                spaces[k] = self.view_rows(rows, k)
            if s.by_row is not None:
                return spaces[k]
            if k not in positions:
                positions[k] = w.runs[k].positions(spaces[k])
            return positions[k]

        for c in self.columns:
            data = _take(c.source, w, index(c.source), len(rows), self.memory, self.pin_memory and c.scale is None)
            if c.scale is not None:
                scale = _take(c.scale, w, index(c.scale), len(rows), self.memory, False)
                channel = (_take(c.channel, w, index(c.channel), len(rows), self.memory, False).numpy()
                           if c.channel is not None else None)
                if self.pin_memory:  # dequantized straight into the batch tensor (one pass, cache-sized chunks)
                    dst = torch.empty(tuple(data.shape), dtype=torch.float16, pin_memory=True)
                    dequantize_int8(data.numpy(), scale.numpy(), channel_scale=channel, out=dst.numpy())
                    data = dst
                else:
                    dst = self.memory.empty(tuple(data.shape), np.float16)
                    data = torch.from_numpy(dequantize_int8(data.numpy(), scale.numpy(), channel_scale=channel, out=dst))
            out[c.alias] = data
        out["row"] = torch.from_numpy(np.array(rows, dtype=np.int64))
        if self.k > 1:
            out["view"] = torch.from_numpy(np.asarray(self.views_of(rows), dtype=np.int64))
        return out


def _split(n: int, parts: int) -> list[slice]:
    parts = max(1, min(parts, n))
    edges = np.linspace(0, n, parts + 1).astype(int)
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _read(s: StoredArray, r: int, starts, stops, offsets, buf: np.ndarray) -> None:
    """Runs [start, stop) of source `s` into `buf` at their offsets (each run inside one block of
    `r` rows; for a split view axis rows are view rows and `r` is rows_per_shard * K)."""
    runs = [(int(a) // r, int(a) - int(a) // r * r, int(b) - int(a) // r * r) for a, b in zip(starts, stops)]
    offsets = [int(o) for o in offsets]
    todo = list(zip(runs, offsets))
    if s.remote is not None:
        failed = s.remote.read_runs(runs, buf, offsets)
        todo = [((b, lo, hi), o) for b, lo, hi, o in failed]
    elif s.local is not None:
        todo = [((b, lo, hi), o) for (b, lo, hi), o in todo if not s.local.read(b, lo, hi, buf[o : o + hi - lo])]
    k = s.views
    for (b, lo, hi), o in todo:  # zarr's read path: any layout, and zarr's own checks
        a, z = (b * r + lo) // k, -(-(b * r + hi) // k)  # the store rows holding these (view) rows
        try:
            got = np.asarray(s.array[a:z])
        except Exception as e:
            raise UnreadableRows(f"cannot read rows {a}-{z} of {s.array.path} ({e}): "
                                 "run `featstore verify` on the store") from e
        first = b * r + lo - a * k
        buf[o : o + hi - lo] = got.reshape((-1,) + s.tail)[first : first + hi - lo] if k > 1 else got


def _take(s: StoredArray, w: Window, idx: np.ndarray, n: int, memory: BatchMemory, pin: bool):
    """`n` rows of one source as a fresh tensor (numpy for strings): one np.take from the mapping
    or RAM cache (`idx`: rows, or view rows) or window buffer (`idx`: positions) straight into it.

    np.take with `out` and mode="clip" (mode="raise" buffers `out`): one single-threaded copy per
    row that releases the GIL, so it overlaps the reads; torch's own multi-threaded index_select
    is faster on an idle machine but stalls badly when its threads compete with a training step.
    """
    data = s.by_row
    if data is None:
        data = w.buffers[s.key]
    if s.dtype not in TORCH_DTYPES:  # rare dtypes; strings stay numpy
        got = np.take(data, idx, axis=0)
        return torch.from_numpy(got) if got.dtype.kind in "biuf" else got
    shape = (n,) + s.tail
    if pin:  # torch's pinned allocator caches (and guards in-flight copies) by itself
        out = torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, s.dtype)).dtype, pin_memory=True)
        np.take(data, idx, axis=0, out=out.numpy(), mode="clip")
        return out
    dst = memory.empty(shape, s.dtype)
    np.take(data, idx, axis=0, out=dst, mode="clip")
    return torch.from_numpy(dst)
