"""Stream row-aligned columns of a store as torch batches: the `Loader`.

    loader = Loader(store, {"image": "features/dino/pooled", "text": "features/minilm/pooled"}, 1024,
                    shuffle=True, seed=0, rows=train_rows, drop_last=True)
    for batch in loader:              # or torch.utils.data.DataLoader(loader, batch_size=None, ...)
        batch["image"], batch["text"], batch["row"]

- Which rows: those in finished blocks, `valid` in every asked feature set, and in `rows`.
- In what order: `featstore.read.order` (a pure function of seed, epoch, rank, world size, the served
  rows, batch size and window): rows of a batch come from runs scattered over the whole store;
  every rank gets the same number of batches.  `cache="ram"` holds the columns in memory and
  uses a full random permutation; `shuffle=False` serves store order.
- How it reads: `featstore.read.reader` (one copy from mapped shard files when local, ranged reads
  with read-ahead when remote, zarr otherwise; a remote store with `cache="disk"`: its shard
  objects fetched whole into a local cache, `featstore.read.cache`, and mapped from there);
  `featstore.read.stream`: a helper thread gathers up to `prefetch` batches ahead, and a consumer
  that runs out gathers the next one itself.
- Stored views (`featstore.read.views`): columns with a view axis (extract --views K) serve one view
  per row, `view=k` (0: the centre crop) or `view="epoch"` (a pure function of seed, epoch and
  row, the same in every column of the batch, served as `batch["view"]`), or all of them
  (`view="all"`); reads take just that view's bytes of each row.
- Resuming: the state is a small dict (mosaic streaming style): seed, epoch, offset (rows this
  rank has been served this epoch) and what they replay against; `load_state_dict` refuses a
  state that would replay another order, naming what changed.
- torch: a `torch.utils.data.IterableDataset`: picklable, and in DataLoader workers each worker
  serves every num_workers-th batch of its rank (the DataLoader yields the same sequence).
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch

from featstore.core import format as fmt
from featstore.read import state as loader_state
from featstore.read import order as order_
from featstore.read.buffers import BatchMemory, Buffers
from featstore.read import cache as disk_cache
from featstore.read.cache import DiskCache
from featstore.errors import CheckpointError, ConfigError
from featstore.core.files import is_url
from featstore.read.epoch import EpochOrder, RankEpoch, RankWindows
from featstore.read.reader import Column, Reader, attach_sources, make_column
from featstore.read.served import served_set
from featstore.store import Store
from featstore.read.stream import BatchStream
from featstore.read.torch_adapters import DataLoaderEpochs, rank_and_world
from featstore.read.views import check_mode, views_of

DEFAULT_WINDOW_BYTES = 256 << 20
DEFAULT_WINDOW_ROWS_MAX = 1 << 20  # a default window never holds more rows than this per rank


class Loader(torch.utils.data.IterableDataset):
    """Batches of several row-aligned store columns.

    Each batch is a dict of torch tensors keyed by alias, plus `row` (int64 store rows) and, with
    `with_uids`, `uid` (a list of str); string columns stay numpy.  int8 token columns come back
    dequantized to float16 unless `dequantize=False`.  A batch's memory is reused only once
    nothing references any part of it (keep what you like); with `pin_memory` (CUDA only) it is
    pinned, ready for non_blocking copies.

    The shuffle window is set per rank in rows (`window`) or bytes (`window_bytes`, default
    256 MiB of the asked columns, at most 2^20 rows): `k = window // batch_size` batches are mixed from runs of
    `min(k, rows_per_shard)` rows.  A bigger window only makes reads longer, not the mix better
    (that is a full permutation's already); buffers, where a column needs them, hold at most
    `buffer_bound` bytes.  `window_blocks` is the deprecated spelling of `window` in blocks.
    `rank`/`world_size` default to torch.distributed's when a process group is initialized.
    Every rank gets the same number of batches (so DDP never hangs): with `drop_last`, full
    batches only; without, every served row once, the last step's rows split between the ranks,
    and only if fewer rows than ranks are left, a rank repeats a row of the epoch's start (see
    `featstore.read.order`).
    `direct=False` reads everything through zarr (the same bytes; tests compare them).
    `cache="disk"` (a store on object storage): each shard object the columns need is fetched
    whole, once, into `cache_dir` (default `$FEATSTORE_CACHE_DIR`, else
    `$XDG_CACHE_HOME/featstore`), `download_threads` at a time in the epoch's read order, and
    read from there as a local store is; `cache_limit` bytes bound the directory (least recently
    used entries of other loaders are evicted; a loader that cannot fit is refused).  The first
    epoch runs at the server's speed, later epochs and loaders at local speed (`featstore.read.cache`).
    `view`: how columns with stored views are served (`featstore.read.views`): None refuses them,
    "all" gives (batch, K, ...), an int k view k of every row, "epoch" one view per row per epoch
    ((epoch + h(seed, row)) mod K, so every row sees each view once in K epochs); with one view
    per row the batch also holds `view` (int64).  Columns without a view axis are served as
    they are.
    `prefetch`: batches gathered ahead of the one the consumer holds.  One is double buffering
    (the next batch is copied while the consumer works on this one); I/O latency is hidden by
    reading `read_ahead` windows ahead, not by batches (examples/loader_ratios.py sweeps 1, 2
    and 4: no gain beyond 1-2 on a warm store).
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
        rank: int | None = None,
        world_size: int | None = None,
        rows=None,
        drop_last: bool = False,
        prefetch: int = 1,
        cache: str | None = None,
        cache_dir: str | None = None,
        cache_limit: int | None = None,
        download_threads: int = 8,
        window: int | None = None,
        window_bytes: int | None = None,
        window_blocks: int | None = None,
        with_uids: bool = False,
        dequantize: bool = True,
        pin_memory: bool = False,
        read_threads: int = 4,
        read_ahead: int = 1,
        direct: bool = True,
        view=None,
    ):
        rank, world_size = rank_and_world(rank, world_size)
        if batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, {world_size})")
        if cache not in (None, "ram", "disk"):
            raise ConfigError(f"cache must be None, 'ram' or 'disk', not {cache!r}")
        if cache != "disk" and (cache_dir is not None or cache_limit is not None):
            raise ConfigError("cache_dir and cache_limit are for cache='disk'")
        if cache == "disk" and not is_url(store.path):
            raise ConfigError(f"cache='disk' keeps the shards of a store on object storage on local disk; {store.path} "
                              "is local already: leave cache unset")
        if cache == "disk" and not direct:
            raise ConfigError("cache='disk' serves featstore's own shard reads; direct=False reads through zarr only")
        if window_blocks is not None:
            warnings.warn("Loader(window_blocks=) is deprecated: use window= (rows) or window_bytes=", DeprecationWarning,
                          stacklevel=2)
            if window is not None:
                raise ConfigError("give window or window_blocks, not both")
            window = int(window_blocks) * store.rows_per_shard
        if window is not None and window_bytes is not None:
            raise ConfigError("give window (rows) or window_bytes, not both")
        if (window is not None and window < 1) or (window_bytes is not None and window_bytes < 1):
            raise ConfigError("the shuffle window must be at least 1 row / byte")
        if cache == "ram" and shuffle and (window is not None or window_bytes is not None):
            raise ConfigError("cache='ram' shuffles with a full permutation: a shuffle window has no effect there")
        if pin_memory and not torch.cuda.is_available():
            raise ConfigError("pin_memory=True needs CUDA (pinned memory only speeds up copies to a GPU)")
        self.store = store
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.epoch, self.offset = shuffle, int(seed), int(epoch), 0
        self.rank, self.world_size, self.drop_last = int(rank), int(world_size), bool(drop_last)
        self.prefetch, self.cache = max(1, int(prefetch)), cache
        self.with_uids, self.dequantize, self.pin_memory = with_uids, dequantize, pin_memory
        self.read_threads, self.read_ahead, self.direct = max(1, int(read_threads)), max(0, int(read_ahead)), direct
        self.cache_dir, self.cache_limit, self.download_threads = cache_dir, cache_limit, max(1, int(download_threads))
        self.view = check_mode(view)
        if isinstance(columns, (list, tuple)):
            columns = {p: p for p in columns}
        self._spec = dict(columns)
        self._window_arg, self._window_bytes = window, window_bytes
        self.columns = self._columns()
        self.views = self._check_views()
        self.served = served_set(store, [c.feature_set for c in self.columns if c.feature_set], rows)
        self._usable, self._fingerprint = self.served.usable, self.served.fingerprint()
        self._attach()

    # ---- columns, served rows, sources -------------------------------------------------------------
    def _columns(self, ram: dict | None = None) -> list[Column]:
        return [make_column(self.store, alias, path, self.dequantize, ram, self.view) for alias, path in self._spec.items()]

    def _check_views(self) -> int:
        """K, the stored views per row this loader picks one of (1: none); columns that serve one
        view per row must share K and the views' recipe (else a batch would mix crops)."""
        split = [c for c in self.columns if c.views > 1]
        counts = sorted({c.views for c in split})
        if len(counts) > 1:
            raise ConfigError("columns hold different numbers of stored views ("
                              + ", ".join(f"{c.path}: {c.views}" for c in split) + "): one view per row needs one K")
        recipes = {json.dumps(self.store.feature_set(c.feature_set).identity.get("views"), sort_keys=True)
                   for c in split if c.feature_set}
        if len(recipes) > 1:
            raise ConfigError("columns come from feature sets whose stored views were made differently (another "
                              "seed, count or crop range): their view k is not the same crop; extract them with the "
                              "same --views options")
        k = counts[0] if counts else 1
        if isinstance(self.view, int) and self.view >= k:
            raise ConfigError(f"view {self.view} does not exist: the columns hold {k} view(s) per row (0..{k - 1})")
        return k

    def _attach(self) -> None:
        self._buffers = Buffers()
        self._memory = BatchMemory(keep=self.prefetch + 4)
        self._pid = os.getpid()
        disk = None
        if self.cache == "disk":
            disk = DiskCache(self.cache_dir, self.cache_limit, self.download_threads)
        attach_sources(self.columns, self.store, self.served.blocks(), cache=self.cache, direct=self.direct, disk=disk)

    def __getstate__(self) -> dict:
        d = self.__dict__.copy()
        d["store"], d["_buffers"], d["_memory"] = self.store.path, None, None
        d["columns"] = None  # zarr arrays, mappings and file systems are remade where unpickled
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self.store = Store.open(d["store"])
        self.served.rebind(self.store)
        self.columns = self._columns()
        self._attach()

    def _after_fork(self) -> None:
        """In a forked DataLoader worker: reopen what does not survive fork (zarr's and fsspec's
        event loops); the served set (and a RAM cache) stay as they were."""
        ram = {s.key: s.ram for c in self.columns for s in c.sources()}
        self.store = Store.open(self.store.path)
        self.served.rebind(self.store)
        self.columns = self._columns(ram)
        self._attach()

    # ---- the order ---------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """How an epoch is ordered: "window", "full" (RAM cache) or "sequential" (no shuffle)."""
        return ("full" if self.cache == "ram" else "window") if self.shuffle else "sequential"

    @property
    def window(self) -> int:
        """The shuffle window in rows per rank."""
        if self._window_arg is not None:
            return int(self._window_arg)
        row_bytes = sum(s.row_bytes for c in self.columns for s in c.sources())
        rows = (self._window_bytes or DEFAULT_WINDOW_BYTES) // max(1, row_bytes)
        if self._window_bytes is None:  # small rows: the window's row indices, not its bytes, bound memory
            rows = min(rows, DEFAULT_WINDOW_ROWS_MAX)
        return max(self.batch_size, rows)

    @property
    def batches_per_window(self) -> int:
        return order_.window_shape(self.window, self.batch_size, self.store.rows_per_shard)[0]

    @property
    def run_rows(self) -> int:
        """Rows per run (one contiguous read) in the shuffled order."""
        return order_.window_shape(self.window, self.batch_size, self.store.rows_per_shard)[1]

    def order(self) -> np.ndarray:
        """The global order of this epoch (every served row once), materialized: O(rows), for
        tools and tests (iterating computes only this rank's windows, `rank_epoch`)."""
        return order_.epoch_order(self.served.rows(), seed=self.seed, epoch=self.epoch, rows_per_shard=self.store.rows_per_shard,
                                  batch_size=self.batch_size, world_size=self.world_size, window_rows=self.window,
                                  mode=self.mode)

    def rank_epoch(self) -> RankEpoch:
        """This rank's batches of this epoch, each computable alone (`featstore.read.epoch`)."""
        order = EpochOrder(len(self.served), seed=self.seed, epoch=self.epoch, rows_per_shard=self.store.rows_per_shard,
                           batch_size=self.batch_size, world_size=self.world_size, window_rows=self.window,
                           mode=self.mode)
        return RankEpoch(order, rank=self.rank, drop_last=self.drop_last)

    def batch_rows(self) -> list[np.ndarray]:
        """This rank's batches of this epoch, as arrays of store rows (all of them: O(rows / ranks))."""
        mine = self.rank_epoch()
        return mine.rows(range(len(mine)), self.served.select)

    def shuffle_quality(self, labels=None) -> float:
        """Per-batch label entropy of this epoch's batches over a full permutation's (see
        `featstore.read.order.shuffle_quality`); labels default to the store's `label` field."""
        labels = self.store.samples(fmt.LABEL) if labels is None else np.asarray(labels)
        rows = np.concatenate([b for b in self.batch_rows() if len(b) == self.batch_size] or [np.zeros(0, np.int64)])
        return order_.shuffle_quality(labels[rows], self.batch_size, seed=self.seed)

    def __len__(self) -> int:
        return order_.batches_per_rank(len(self.served), world_size=self.world_size, batch_size=self.batch_size,
                                       drop_last=self.drop_last)

    @property
    def num_rows(self) -> int:
        """Rows this rank is served per epoch."""
        n, w, b = len(self.served), self.world_size, self.batch_size
        full, rest = divmod(n, w * b)
        if self.drop_last or not rest:
            return full * b
        return full * b + len(np.array_split(np.arange(max(rest, w)), w)[self.rank])

    @property
    def buffer_bound(self) -> int:
        """The most bytes of window buffers this loader holds (mapped and RAM columns need none)."""
        row_bytes = sum(s.row_bytes for c in self.columns for s in c.sources() if s.by_row is None)
        return (2 + self.read_ahead) * 2 * self.batches_per_window * self.batch_size * row_bytes

    @property
    def buffer_peak(self) -> int:
        """The most bytes of window buffers held at once so far."""
        return self._buffers.peak

    # ---- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "offset": self.offset, "rows": len(self.served),
                "fingerprint": self._fingerprint, "usable": self._usable, "store_rows": self.store.n_rows,
                "world_size": self.world_size, "batch_size": self.batch_size, "window": self.window,
                "order": self.mode, "drop_last": self.drop_last, **self._view_state()}

    def _view_state(self) -> dict:
        """What the served views depend on besides (seed, epoch); nothing without a split view axis."""
        return {} if self.views == 1 or self.view == "all" else {"view": {"view": self.view, "views": self.views}}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Continue from `state`.  A state that does not replay against what this loader serves
        (the store grew, blocks finished since, another row subset, world size, batch size,
        window or order) is refused, naming what changed; `strict=False` then starts the next
        epoch instead (with the state's seed)."""
        changes = loader_state.changes(state, self.state_dict())
        if changes and strict:
            raise CheckpointError(
                "cannot resume the loader from this state: " + "; ".join(changes)
                + ". Replaying it would skip or repeat rows: resume with what it was saved with, or "
                "load_state_dict(state, strict=False) to start the next epoch"
            )
        self.seed, self.epoch, self.offset = int(state["seed"]), int(state["epoch"]), int(state["offset"])
        if changes:
            self.epoch, self.offset = self.epoch + (1 if self.offset else 0), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.offset = int(epoch), 0

    # ---- iterating -----------------------------------------------------------------------------------
    def _remaining(self) -> tuple[RankEpoch, range] | None:
        """This rank's epoch and its batches from `offset` on; None when resumed exactly at an
        epoch's end."""
        mine = self.rank_epoch()
        at = mine.offset_batch(self.offset)
        if at is None:
            raise CheckpointError(f"loader offset {self.offset} is not at a batch boundary of this rank's epoch "
                                  f"({self.num_rows} rows in batches of {self.batch_size})")
        if at == len(mine) and self.offset:
            return None
        return mine, range(at, len(mine))

    def __iter__(self):
        if os.getpid() != self._pid:
            self._after_fork()
        todo = self._remaining()
        if todo is None:  # resumed exactly at the end of an epoch: start the next
            self.set_epoch(self.epoch + 1)
            yield from self.__iter__()
            return
        info = torch.utils.data.get_worker_info()
        if info is not None:
            if self.pin_memory:
                raise ConfigError("a Loader with pin_memory=True cannot pin inside DataLoader workers: "
                                  "use loader.dataloader(num_workers=...) or DataLoader(pin_memory=True)")
        mine, todo = todo
        if info is not None:
            todo = todo[info.id :: info.num_workers]
        windows = RankWindows(mine, todo, self.batches_per_window, self.served.select)
        sources = [s for c in self.columns for s in c.sources()]
        disk_cache.fetch_in_read_order(sources, windows, self.store.rows_per_shard)  # cache="disk" only
        views = None
        if self.views > 1 and self.view != "all":
            views = views_of(self.view, seed=self.seed, epoch=self.epoch, views=self.views)
        reader = Reader(self.columns, self.store.rows_per_shard, read_threads=self.read_threads,
                        read_ahead=self.read_ahead, pin_memory=self.pin_memory, buffers=self._buffers,
                        memory=self._memory, views_of=views)
        stream = iter(BatchStream(reader, windows, ahead=self.prefetch, read_ahead=self.read_ahead,
                                  read_threads=self.read_threads))
        try:
            for item in stream:
                if self.with_uids:
                    item["uid"] = self.store.samples_at(fmt.UID, item["row"].numpy()).tolist()
                self.offset += item["row"].shape[0]
                yield item
        finally:
            stream.close()
            disk_cache.cancel(sources)  # fetches an epoch ended early had not started yet
        self.offset = 0
        self.epoch += 1

    def dataloader(self, num_workers: int = 2, **kwargs) -> DataLoaderEpochs:
        """Iterate through a torch DataLoader with worker processes, keeping this loader's state
        (epoch, offset) as batches arrive, so `state_dict()` stays exact."""
        return DataLoaderEpochs(self, num_workers, kwargs)
