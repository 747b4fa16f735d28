"""Stream row-aligned columns of a store as torch batches.

How an epoch is ordered (a pure function of seed, epoch and the served rows, so resuming is
"recompute and skip", as in mosaic streaming):

1. The served rows are those in finished blocks, `valid` in every asked feature set, and in
   `rows` (e.g. the train split).
2. With `shuffle`, the row blocks are put in a random order, then rows are shuffled inside
   windows of `window_blocks` consecutive blocks (the in-memory shuffle buffer).  Reads are
   therefore whole contiguous blocks, never per-row fancy indexing (which is ~1000x slower).
3. Ranks take contiguous slices of that global order: without `drop_last` their sizes differ
   by at most one row; with it every rank gets the same number of full batches.

State is `{"seed", "epoch", "offset"}` (offset = rows this rank has already been served this
epoch); `load_state_dict` then iterating continues the same order.

How it reads (see "the read path" below): a producer thread keeps `read_ahead` windows being
read by `read_threads` threads, each block of each column straight from its shard file into a
reused page-aligned buffer, and gathers every batch from the current window with one copy.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from . import format as fmt
from .errors import UnknownFeatureSet
from .store import Store
from .shardfile import DirectShards
from .tokens import dequantize_int8



@dataclass
class _Column:
    alias: str
    path: str
    array: object  # zarr array, or numpy when cached in RAM
    scale: object = None  # int8 tokens: their per-token scale array
    feature_set: str | None = None
    reader: "DirectShards | None" = None  # set when its shards can be read directly
    scale_reader: "DirectShards | None" = None

    def sources(self):
        """(buffer key, array, direct reader) of each array this column reads."""
        yield self.alias, self.array, self.reader
        if self.scale is not None:
            yield self.alias + "#scale", self.scale, self.scale_reader


class Loader:
    """Batches of several row-aligned store columns, e.g.::

        Loader(store, {"image": "features/dino/pooled", "text": "features/minilm/pooled"}, 1024,
               shuffle=True, seed=0, rows=train_rows)

    Each batch is a dict of torch tensors keyed by alias, plus `row` (int64 store rows) and,
    with `with_uids`, `uid` (a list of str); string columns stay numpy.  int8 token columns
    come back dequantized to float16 unless `dequantize=False`.

    Reading: `read_threads` threads read whole blocks, `read_ahead` windows ahead of the one
    being cut into batches (so ~(read_ahead + 2) windows of buffers, kept across epochs for
    reuse).  `direct=False` reads every block through zarr instead of straight from the shard
    files (the two give identical bytes; direct is ~5-10x faster for the default layout).
    """

    def __init__(
        self,
        store: Store,
        columns: dict[str, str] | list[str],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        rows=None,
        drop_last: bool = False,
        prefetch: int = 4,
        cache: str | None = None,
        window_blocks: int = 4,
        with_uids: bool = False,
        dequantize: bool = True,
        pin_memory: bool = False,
        read_threads: int = 4,
        read_ahead: int = 1,
        direct: bool = True,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if cache not in (None, "ram"):
            raise ValueError("cache must be None or 'ram'")
        self.store = store
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.epoch, self.offset = shuffle, int(seed), int(epoch), 0
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), drop_last
        self.prefetch, self.window_blocks = max(1, prefetch), max(1, window_blocks)
        self.with_uids, self.dequantize, self.pin_memory = with_uids, dequantize, pin_memory
        self.read_threads, self.read_ahead, self.direct = max(1, int(read_threads)), max(0, int(read_ahead)), direct
        self._free: dict[str, list[np.ndarray]] = {}  # window buffers kept for reuse, by column
        self._free_lock = threading.Lock()
        if isinstance(columns, (list, tuple)):
            columns = {p: p for p in columns}
        self.columns = [self._column(alias, path) for alias, path in columns.items()]
        self.served = self._served_rows(rows)
        if cache == "ram":
            self._cache_in_ram()

    # ---- which rows ----------------------------------------------------------------------
    def _column(self, alias: str, path: str) -> _Column:
        parts = path.split("/")
        fs_name = None
        if parts[0] == fmt.FEATURES and len(parts) == 3:
            fs_name = parts[1]
            self.store.feature_set(fs_name)  # a clear error for an unknown name
        elif parts[0] == fmt.PIXELS and len(parts) == 2:
            fs_name = self.store.pixels(parts[1]).attrs.get("feature_set")
        elif parts[0] != fmt.SAMPLES:
            raise UnknownFeatureSet(f"'{path}' is not a column (features/<name>/<array>, pixels/<name> or samples/<field>)")
        array = self.store.array(path)
        scale = None
        if fs_name and parts[-1] == "tokens" and array.dtype == np.int8 and self.dequantize:
            scale = self.store.array(f"{fmt.FEATURES}/{fs_name}/tokens_scale")
        r = self.store.rows_per_shard
        reader = DirectShards.of(array, r) if self.direct else None
        scale_reader = DirectShards.of(scale, r) if self.direct and scale is not None else None
        return _Column(alias, path, array, scale, fs_name, reader, scale_reader)

    def _served_rows(self, rows) -> np.ndarray:
        n = self.store.n_rows
        mask = np.ones(n, dtype=bool)
        for name in sorted({c.feature_set for c in self.columns if c.feature_set}):
            mask &= self.store.feature_set(name).usable_rows()
        if rows is not None:
            rows = np.asarray(rows)
            subset = np.zeros(n, dtype=bool)
            if rows.dtype == bool:
                subset[: len(rows)] = rows[:n]
            else:
                subset[rows[(rows >= 0) & (rows < n)]] = True
            mask &= subset
        return np.flatnonzero(mask)

    def _cache_in_ram(self) -> None:
        n = self.store.n_rows
        for c in self.columns:
            c.array = np.ascontiguousarray(c.array[:n])
            if c.scale is not None:
                c.scale = np.ascontiguousarray(c.scale[:n])

    # ---- the order -----------------------------------------------------------------------
    def _windows(self) -> list[np.ndarray]:
        """The epoch's global order as a list of windows (arrays of rows, in serving order)."""
        r = self.store.rows_per_shard
        blocks = np.unique(self.served // r)
        by_block = np.split(self.served, np.searchsorted(self.served, blocks[1:] * r))
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        order = rng.permutation(len(blocks)) if rng is not None else np.arange(len(blocks))
        windows = []
        for i in range(0, len(order), self.window_blocks):
            rows = np.concatenate([by_block[j] for j in order[i : i + self.window_blocks]])
            windows.append(rng.permutation(rows) if rng is not None else rows)
        return windows

    def _rank_span(self, n: int) -> tuple[int, int]:
        w, b = self.world_size, self.batch_size
        if self.drop_last:
            per = (n // (w * b)) * b
            return self.rank * per, (self.rank + 1) * per
        return self.rank * n // w, (self.rank + 1) * n // w

    def __len__(self) -> int:
        lo, hi = self._rank_span(len(self.served))
        return -(-(hi - lo) // self.batch_size)

    @property
    def num_rows(self) -> int:
        """Rows this rank is served per epoch."""
        lo, hi = self._rank_span(len(self.served))
        return hi - lo

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.offset = int(state["seed"]), int(state["epoch"]), int(state["offset"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.offset = int(epoch), 0

    # ---- reading -------------------------------------------------------------------------
    def _alloc(self, key: str, rows: int, tail: tuple, dtype) -> np.ndarray:
        """A window buffer of at least `rows` rows: one handed back by a used-up window (no page
        faults), else a new page-aligned one sized for a full window."""
        with self._free_lock:
            free = self._free.setdefault(key, [])
            for i, buf in enumerate(free):
                if len(buf) >= rows:
                    return free.pop(i)
        cap = max(rows, min(self.window_blocks * self.store.rows_per_shard, self.store.n_rows))
        return _aligned_empty((cap,) + tail, dtype)

    def _start_window(self, rows: np.ndarray, pool: ThreadPoolExecutor) -> "_Window":
        """Submit the reads of the blocks holding `rows` (whole blocks, contiguous) to `pool`."""
        r = self.store.rows_per_shard
        blocks = np.unique(rows // r)
        ranges = [self.store.block_range(int(b)) for b in blocks]
        lengths = np.array([stop - start for start, stop in ranges])
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        local = _local_index(rows, blocks * r, lengths) if len(rows) else np.zeros(0, np.int64)
        w = _Window(rows.astype(np.int64), local.astype(np.int64))
        total = int(lengths.sum())
        for c in self.columns:
            for key, arr, reader in c.sources():
                if isinstance(arr, np.ndarray):  # cached in RAM: gather straight from it
                    w.data[key] = arr
                    w.cached.add(key)
                    continue
                buf = self._alloc(key, total, tuple(arr.shape[1:]), arr.dtype)
                w.owned.append((key, buf))
                view = buf[:total]
                w.data[key] = view
                for (start, stop), off, n in zip(ranges, offsets, lengths):
                    out = view[int(off) : int(off) + int(n)]
                    w.futures.append(pool.submit(_read_rows, arr, reader, start, stop, out))
        return w

    def _release(self, w: "_Window") -> None:
        """Hand a used-up window's buffers back for reuse (every batch gathered from it is a copy)."""
        with self._free_lock:
            for key, buf in w.owned:
                self._free.setdefault(key, []).append(buf)
        w.owned = []

    def _gather(self, parts: list[tuple["_Window", int, int]]) -> dict:
        """One batch: rows [a, b) of each window in `parts`, gathered from the window buffers."""
        n = sum(b - a for _, a, b in parts)
        out = {}
        for c in self.columns:
            data = _gather_column(c.alias, parts, n)
            if c.scale is not None:
                scale = _gather_column(c.alias + "#scale", parts, n)
                data = torch.from_numpy(dequantize_int8(_np(data), _np(scale)))
            out[c.alias] = data
        out["row"] = torch.from_numpy(np.concatenate([w.rows[a:b] for w, a, b in parts]))
        if self.pin_memory:
            out = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        return out

    def __iter__(self):
        windows = self._windows()
        lo, hi = self._rank_span(sum(len(w) for w in windows))
        skip = lo + self.offset  # the first global position this iterator serves
        pieces, pos = [], 0
        for w in windows:
            a, b = max(pos, skip), min(pos + len(w), hi)
            if a < b:
                pieces.append(w[a - pos : b - pos])
            pos += len(w)
        if not pieces:
            if self.offset and len(self.served):  # resumed exactly at the end of an epoch: start the next
                self.set_epoch(self.epoch + 1)
                yield from self.__iter__()
            return
        uids = self.store.uids() if self.with_uids else None
        results: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        producer = threading.Thread(target=self._produce, args=(pieces, results, stop), daemon=True)
        producer.start()
        try:
            while True:
                item = results.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                batch = item
                if uids is not None:
                    batch["uid"] = [str(u) for u in uids[batch["row"].numpy()]]
                self.offset += len(batch["row"])
                yield batch
            self.offset = 0
            self.epoch += 1
        finally:
            stop.set()
            while producer.is_alive():
                try:
                    results.get_nowait()
                except queue.Empty:
                    producer.join(0.05)

    def _produce(self, pieces: list[np.ndarray], results: queue.Queue, stop: threading.Event) -> None:
        """Background thread: keep `read_ahead` windows reading while it cuts the current one into
        batches (gathered straight from the window buffers), and queue them."""
        try:
            with ThreadPoolExecutor(max_workers=self.read_threads, thread_name_prefix="featstore-read") as pool:
                ahead: deque = deque()
                nxt = 0
                parts: list = []
                have = 0
                while nxt < len(pieces) or ahead:
                    while nxt < len(pieces) and len(ahead) <= self.read_ahead:
                        ahead.append(self._start_window(pieces[nxt], pool))
                        nxt += 1
                    w = ahead.popleft()
                    w.wait()
                    a, n = 0, len(w.rows)
                    while a < n:
                        k = min(self.batch_size - have, n - a)
                        parts.append((w, a, a + k))
                        have, a = have + k, a + k
                        if have == self.batch_size:
                            batch = self._gather(parts)
                            for pw, _, _ in parts[:-1]:
                                self._release(pw)  # earlier windows are used up
                            parts, have = [], 0
                            if not self._put(results, batch, stop):
                                return
                    if not parts:
                        self._release(w)
                if parts:
                    batch = self._gather(parts)
                    for pw, _, _ in parts:
                        self._release(pw)
                    if not self._put(results, batch, stop):
                        return
            self._put(results, None, stop)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(results, e, stop)

    @staticmethod
    def _put(results: queue.Queue, item, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


def _local_index(rows, starts, lengths) -> np.ndarray:
    """Positions of `rows` in the concatenation of the given blocks' row ranges."""
    block_pos = np.searchsorted(starts, rows, side="right") - 1
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return offsets[block_pos] + (rows - starts[block_pos])


# ---- the read path ---------------------------------------------------------------------------
# Rows are read a whole row block at a time into page-aligned window buffers that are reused
# from window to window, then each batch is gathered from them with one np.take per column into
# a fresh torch tensor.  For the store's default layout a block is read straight from its shard
# file (`featstore.shardfile`, ~10x faster than zarr's codec pipeline here); anything else goes
# through zarr.

_TORCH_DTYPES = {np.dtype(t) for t in ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")}


@dataclass
class _Window:
    rows: np.ndarray  # the served rows, in serving order
    local: np.ndarray  # each row's position in the window buffers
    data: dict = field(default_factory=dict)  # buffer key -> window buffer (or the RAM cache)
    cached: set = field(default_factory=set)  # keys whose data is the whole RAM-cached array
    futures: list = field(default_factory=list)
    owned: list = field(default_factory=list)  # (key, buffer) to hand back when used up

    def wait(self) -> None:
        for f in self.futures:
            f.result()
        self.futures = []


def _aligned_empty(shape: tuple, dtype, align: int = 4096) -> np.ndarray:
    """np.empty, page-aligned: the kernel copies into an unaligned buffer ~3x slower on some CPUs."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":  # strings and the like: no alignment to gain
        return np.empty(shape, dtype=dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes].view(dtype).reshape(shape)


def _read_rows(array, reader: "DirectShards | None", start: int, stop: int, out: np.ndarray) -> None:
    """Rows [start, stop) (one row block) of `array` into `out`."""
    if reader is not None and reader.read(start, stop, out):
        return
    out[...] = np.asarray(array[start:stop])


def _np(x):
    return x.numpy() if isinstance(x, torch.Tensor) else x


def _gather_column(key: str, parts: list, n: int):
    """Gather one column's rows of a batch from the window buffers in `parts`.

    np.take with `out` and mode="clip" (mode="raise" buffers `out`): one single-threaded copy per
    row that releases the GIL, so it overlaps the reads; torch's own multi-threaded index_select
    is faster on an idle machine but stalls badly when its threads compete with a training step.
    """
    first = parts[0][0].data[key]
    if first.dtype not in _TORCH_DTYPES:  # rare dtypes; strings stay numpy
        data = np.concatenate([np.take(w.data[key], _positions(w, key, a, b), axis=0) for w, a, b in parts])
        return torch.from_numpy(data) if data.dtype.kind in "biuf" else data
    out = torch.empty((n,) + first.shape[1:], dtype=torch.from_numpy(first[:0]).dtype)
    dst, pos = out.numpy(), 0
    for w, a, b in parts:
        np.take(w.data[key], _positions(w, key, a, b), axis=0, out=dst[pos : pos + b - a], mode="clip")
        pos += b - a
    return out


def _positions(w: _Window, key: str, a: int, b: int) -> np.ndarray:
    """Where rows [a, b) of the window are in the buffer of `key` (the RAM cache holds every row)."""
    return w.rows[a:b] if key in w.cached else w.local[a:b]
