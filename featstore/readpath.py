"""How the loader reads: where each array's rows come from, and the thread that makes batches.

Each array a batch needs (an int8 token column also needs its scales) is a `Source`:

- **ram** (`cache="ram"`): the whole array in memory; a batch is one `np.take` by store row.
- **mapped** (local store, default layout: `featstore.mapping`): the shard files mapped side by
  side; a batch is one `np.take` from the page cache into the batch tensor, the one copy a numpy
  memmap gather makes.  Read-ahead asks the kernel for the next window's runs (madvise).
- **buffered**: everything else.  The runs of the next `read_ahead` windows are read into
  page-aligned window buffers by `read_threads` threads (local shard files with preadv, remote
  shard objects with concurrent ranged GETs, or zarr's `array[a:b]` for any other layout; never
  per-row indexing), and batches are gathered from them.  Buffers are reused from window to
  window; every batch is a fresh tensor, so a consumer may keep any part of it.

A window is `k` consecutive batches of this rank (see `featstore.order`); its runs are the row
ranges covering their rows, gaps inside a block included while they add at most as many rows as
the window needs (so a window's buffer holds at most 2x its rows).
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field

import numpy as np
import torch

from .tokens import dequantize_int8

TORCH_DTYPES = {np.dtype(t) for t in ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")}
STR_ROW_BYTES = 64  # what a string cell is counted as when sizing windows


def aligned_empty(shape: tuple, dtype, align: int = 4096) -> np.ndarray:
    """np.empty, page-aligned: the kernel copies into an unaligned buffer ~3x slower on some CPUs."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":  # strings and the like: no alignment to gain
        return np.empty(shape, dtype=dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes].view(dtype).reshape(shape)


@dataclass
class Source:
    """One array a batch entry reads, and the way it is read."""

    key: str
    array: object  # the zarr array
    ram: np.ndarray | None = None
    mapped: object = None  # featstore.mapping.MappedArray
    local: object = None  # featstore.shardfile.LocalShards
    remote: object = None  # featstore.remote.RemoteShards

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype) if self.ram is None else self.ram.dtype

    @property
    def tail(self) -> tuple:
        return tuple(self.array.shape[1:])

    @property
    def row_bytes(self) -> int:
        cells = int(np.prod(self.tail, dtype=np.int64))
        return cells * (self.dtype.itemsize if self.dtype.kind in "biufc" else STR_ROW_BYTES)

    @property
    def by_row(self) -> np.ndarray | None:
        """An array indexed by store row (RAM cache or mapping), or None when read into buffers."""
        if self.ram is not None:
            return self.ram
        return self.mapped.view if self.mapped is not None else None

    @property
    def kind(self) -> str:
        if self.ram is not None:
            return "ram"
        if self.mapped is not None:
            return "mapped"
        return "local" if self.local is not None else "remote" if self.remote is not None else "zarr"


@dataclass
class Column:
    """One entry of a batch: its source, and the scales of int8 tokens served dequantized."""

    alias: str
    path: str
    source: Source
    scale: Source | None = None
    feature_set: str | None = None

    def sources(self):
        yield self.source
        if self.scale is not None:
            yield self.scale


# ---- windows -----------------------------------------------------------------------------------
def covering_runs(rows: np.ndarray, rows_per_shard: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, stops) of the row ranges to read for `rows`: runs of needed rows, each inside one
    block, joined over the smallest gaps while the gaps add at most len(unique rows) rows."""
    u = np.unique(rows)
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
class Window:
    batches: list  # this window's batches (arrays of store rows)
    starts: np.ndarray = None  # the runs to read: store rows [start, stop)
    stops: np.ndarray = None
    offsets: np.ndarray = None  # each run's first row in the window buffers
    buffers: dict = field(default_factory=dict)  # source key -> window buffer
    futures: list = field(default_factory=list)

    def positions(self, rows: np.ndarray) -> np.ndarray:
        i = np.searchsorted(self.starts, rows, side="right") - 1
        return self.offsets[i] + (rows - self.starts[i])

    def wait(self) -> None:
        for f in self.futures:
            f.result()
        self.futures = []


class Buffers:
    """Window buffers kept for reuse, and how many bytes they hold (`held`, `peak`)."""

    def __init__(self):
        self._free: dict[str, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self.held = 0
        self.peak = 0

    def get(self, key: str, rows: int, tail: tuple, dtype) -> np.ndarray:
        with self._lock:
            free = self._free.setdefault(key, [])
            fits = [b for b in free if len(b) >= rows]
            if fits:
                buf = min(fits, key=len)
                free.remove(buf)
                return buf
            if free:  # too small for this window: give its memory back before taking more
                self.held -= _nbytes(free.pop(0))
            buf = aligned_empty((rows,) + tail, dtype)
            self.held += _nbytes(buf)
            self.peak = max(self.peak, self.held)
            return buf

    def put(self, key: str, buf: np.ndarray) -> None:
        with self._lock:
            self._free.setdefault(key, []).append(buf)


class BatchMemory:
    """Memory for batch tensors, recycled once nothing references a batch any more.

    A batch tensor is `torch.from_numpy` of a fresh ndarray view of a pooled buffer; torch keeps
    that view alive for as long as the tensor's storage lives (views, autograd, anything), and
    the buffer returns to the pool only when the view is gone.  So a batch is never overwritten
    while anyone holds any part of it, and the next batches reuse pages already faulted in,
    instead of fresh allocations from the producer thread's malloc arena, which fault every page
    in again (a consumer that kept `batch["row"]` used to halve the rate that way).
    """

    def __init__(self, keep: int = 8):
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self.keep = keep
        self.reused = 0

    def empty(self, shape: tuple, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        key = (tuple(shape), dtype.str)
        with self._lock:
            free = self._free.get(key)
            raw = free.pop() if free else None
            self.reused += raw is not None
        if raw is None:
            raw = aligned_empty(shape, dtype)
        view = raw.view()
        weakref.finalize(view, self._put, key, raw).atexit = False
        return view

    def _put(self, key: tuple, raw: np.ndarray) -> None:
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) < self.keep:
                free.append(raw)


def _nbytes(buf: np.ndarray) -> int:
    return buf.nbytes if buf.dtype.kind in "biuf" else len(buf) * STR_ROW_BYTES


# ---- reading -----------------------------------------------------------------------------------
class Reader:
    """Reads windows for a set of columns and cuts them into batches (in a producer thread)."""

    def __init__(self, columns: list[Column], rows_per_shard: int, *, read_threads: int, read_ahead: int,
                 pin_memory: bool, buffers: Buffers, memory: BatchMemory):
        self.columns = columns
        self.memory = memory
        self.r = rows_per_shard
        self.read_threads, self.read_ahead, self.pin_memory = read_threads, read_ahead, pin_memory
        self.buffers = buffers

    def _start(self, w: Window, pool: ThreadPoolExecutor) -> Window:
        rows = np.concatenate(w.batches)
        w.starts, w.stops = covering_runs(rows, self.r)
        lengths = w.stops - w.starts
        w.offsets = np.r_[0, np.cumsum(lengths)[:-1]].astype(np.int64)
        total = int(lengths.sum())
        for c in self.columns:
            for s in c.sources():
                if s.ram is not None:
                    continue
                if s.mapped is not None:
                    w.futures.append(pool.submit(s.mapped.will_need, zip(w.starts.tolist(), w.stops.tolist())))
                    continue
                buf = self.buffers.get(s.key, total, s.tail, s.dtype)
                w.buffers[s.key] = buf
                for part in _split(len(w.starts), self.read_threads if s.remote is None else 1):
                    w.futures.append(pool.submit(_read, s, self.r, w.starts[part], w.stops[part], w.offsets[part], buf))
        return w

    def _release(self, w: Window) -> None:
        for key, buf in w.buffers.items():
            self.buffers.put(key, buf)
        w.buffers = {}

    def gather(self, w: Window, rows: np.ndarray) -> dict:
        """One batch: `rows` of every column, gathered from the mapping, RAM or window buffers."""
        out = {}
        pos = None
        for c in self.columns:
            for s in c.sources():
                if s.by_row is None and pos is None:
                    pos = w.positions(rows)
            data = _take(c.source, w, rows, pos, self.memory, self.pin_memory and c.scale is None)
            if c.scale is not None:
                scale = _take(c.scale, w, rows, pos, self.memory, False)
                data = torch.from_numpy(dequantize_int8(data.numpy(), scale.numpy()))
                if self.pin_memory:
                    data = data.pin_memory()
            out[c.alias] = data
        out["row"] = torch.from_numpy(np.array(rows, dtype=np.int64))
        return out

    def produce(self, windows: list[list[np.ndarray]], results: queue.Queue, stop: threading.Event) -> None:
        """Producer thread: keep `read_ahead` windows reading while the current one is cut into
        batches; queue each batch, then None (or the exception raised)."""
        try:
            with ThreadPoolExecutor(max_workers=self.read_threads, thread_name_prefix="featstore-read") as pool:
                ahead: deque = deque()
                nxt = 0
                while nxt < len(windows) or ahead:
                    while nxt < len(windows) and len(ahead) <= self.read_ahead:
                        ahead.append(self._start(Window(windows[nxt]), pool))
                        nxt += 1
                    w = ahead.popleft()
                    try:
                        w.wait()
                        for rows in w.batches:
                            if not _put(results, self.gather(w, rows), stop):
                                return
                    finally:
                        futures_wait(w.futures)  # never hand back a buffer a read still writes into
                        self._release(w)
            _put(results, None, stop)
        except BaseException as e:  # handed to the consumer, raised there
            _put(results, e, stop)


def _split(n: int, parts: int) -> list[slice]:
    parts = max(1, min(parts, n))
    edges = np.linspace(0, n, parts + 1).astype(int)
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _read(s: Source, r: int, starts, stops, offsets, buf: np.ndarray) -> None:
    """Runs [start, stop) of source `s` into `buf` at their offsets (each run inside one block)."""
    runs = [(int(a) // r, int(a) - int(a) // r * r, int(b) - int(a) // r * r) for a, b in zip(starts, stops)]
    offsets = [int(o) for o in offsets]
    todo = list(zip(runs, offsets))
    if s.remote is not None:
        failed = s.remote.read_runs(runs, buf, offsets)
        todo = [((b, lo, hi), o) for b, lo, hi, o in failed]
    elif s.local is not None:
        todo = [((b, lo, hi), o) for (b, lo, hi), o in todo if not s.local.read(b, lo, hi, buf[o : o + hi - lo])]
    for (b, lo, hi), o in todo:  # zarr's read path: any layout, and zarr's own errors
        buf[o : o + hi - lo] = np.asarray(s.array[b * r + lo : b * r + hi])


def _take(s: Source, w: Window, rows: np.ndarray, pos, memory: BatchMemory, pin: bool):
    """`rows` of one source as a fresh tensor (numpy for strings): one np.take from the mapping,
    RAM cache or window buffer straight into it.

    np.take with `out` and mode="clip" (mode="raise" buffers `out`): one single-threaded copy per
    row that releases the GIL, so it overlaps the reads; torch's own multi-threaded index_select
    is faster on an idle machine but stalls badly when its threads compete with a training step.
    """
    data = s.by_row
    idx = rows
    if data is None:
        data, idx = w.buffers[s.key], pos
    if s.dtype not in TORCH_DTYPES:  # rare dtypes; strings stay numpy
        got = np.take(data, idx, axis=0)
        return torch.from_numpy(got) if got.dtype.kind in "biuf" else got
    shape = (len(rows),) + s.tail
    if pin:  # torch's pinned allocator caches (and guards in-flight copies) by itself
        out = torch.empty(shape, dtype=torch.from_numpy(np.zeros(0, s.dtype)).dtype, pin_memory=True)
        np.take(data, idx, axis=0, out=out.numpy(), mode="clip")
        return out
    dst = memory.empty(shape, s.dtype)
    np.take(data, idx, axis=0, out=dst, mode="clip")
    return torch.from_numpy(dst)


def _put(results: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            results.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
