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
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from . import format as fmt
from .errors import UnknownFeatureSet
from .store import Store
from .tokens import dequantize_int8


@dataclass
class _Column:
    alias: str
    path: str
    array: object  # zarr array, or numpy when cached in RAM
    scale: object = None  # int8 tokens: their per-token scale array
    feature_set: str | None = None


class Loader:
    """Batches of several row-aligned store columns, e.g.::

        Loader(store, {"image": "features/dino/pooled", "text": "features/minilm/pooled"}, 1024,
               shuffle=True, seed=0, rows=train_rows)

    Each batch is a dict of torch tensors keyed by alias, plus `row` (int64 store rows) and,
    with `with_uids`, `uid` (a list of str).  int8 token columns come back dequantized to
    float16 unless `dequantize=False`.
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
        return _Column(alias, path, array, scale, fs_name)

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
            c.array = np.asarray(c.array[:n])
            if c.scale is not None:
                c.scale = np.asarray(c.scale[:n])

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
    def _read_window(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Read the blocks holding `rows` contiguously, then gather `rows` in order."""
        r = self.store.rows_per_shard
        blocks = np.unique(rows // r)
        out = {}
        for c in self.columns:
            parts, scales, starts = [], [], []
            for b in blocks:
                start, stop = self.store.block_range(int(b))
                parts.append(np.asarray(c.array[start:stop]))
                if c.scale is not None:
                    scales.append(np.asarray(c.scale[start:stop]))
                starts.append(start)
            local = _local_index(rows, np.array(starts), np.array([len(p) for p in parts]))
            data = np.concatenate(parts)[local] if len(parts) > 1 else parts[0][local]
            if c.scale is not None:
                scale = (np.concatenate(scales) if len(scales) > 1 else scales[0])[local]
                data = dequantize_int8(data, scale)
            out[c.alias] = data
        out["row"] = rows.astype(np.int64)
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
        """Background thread: read windows (one ahead), cut them into batches, queue them."""
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = pool.submit(self._read_window, pieces[0])
                buf: list[dict[str, np.ndarray]] = []
                buffered = 0
                for i in range(len(pieces)):
                    window = pending.result()
                    if i + 1 < len(pieces):
                        pending = pool.submit(self._read_window, pieces[i + 1])
                    buf.append(window)
                    buffered += len(window["row"])
                    while buffered >= self.batch_size or (i == len(pieces) - 1 and buffered > 0):
                        batch, buf, buffered = _take(buf, self.batch_size)
                        if not self._put(results, self._to_torch(batch), stop):
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

    def _to_torch(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in batch.items():
            t = torch.from_numpy(np.ascontiguousarray(v))
            out[k] = t.pin_memory() if self.pin_memory else t
        return out


def _local_index(rows, starts, lengths) -> np.ndarray:
    """Positions of `rows` in the concatenation of the given blocks' row ranges."""
    block_pos = np.searchsorted(starts, rows, side="right") - 1
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return offsets[block_pos] + (rows - starts[block_pos])


def _take(buf: list[dict[str, np.ndarray]], n: int):
    """Split the first `n` rows off a list of column dicts."""
    taken, rest, got = [], [], 0
    for part in buf:
        m = len(part["row"])
        if got >= n:
            rest.append(part)
        elif got + m <= n:
            taken.append(part)
            got += m
        else:
            k = n - got
            taken.append({key: v[:k] for key, v in part.items()})
            rest.append({key: v[k:] for key, v in part.items()})
            got = n
    batch = taken[0] if len(taken) == 1 else {k: np.concatenate([p[k] for p in taken]) for k in taken[0]}
    return batch, rest, sum(len(p["row"]) for p in rest)
