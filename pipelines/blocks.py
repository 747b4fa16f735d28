"""The block stage of extraction: compute work items (rows of one row block) and write them.

    one item:  read the rows' image bytes from their source (a reader thread, one item ahead; or
               their captions from the store) -> decode+preprocess in a pool, running ahead of the forward pass -> backbone
               forward in batches (autocast) -> handed to the writer thread (`writes`), which
               quantizes int8 tokens and runs `featstore.core.writes.write_rows` (under the block's
               lock: done rows read back, the whole block written, then its marker) while the
               forward pass computes the next item

Where a sample's bytes become a feature row: `BlockRunner` below.  A bad sample never stops the
job: it becomes `valid=False` with its reason in the block's marker.  With stored views (`views`)
each row is decoded into K crops, a forward pass takes batch_size // K rows (batch_size images),
and every output gets a view axis.  Batches never span blocks,
and captions are length-sorted within each item, so an item's bytes depend only on its rows.
The same code runs in one process and in each Dask worker (`pipelines.distributed`).
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
import torch

from featstore.core import format as fmt
from featstore.errors import BadSample
from featstore.store import Store
from featstore.tokens import check_fidelity, encode_tokens
from featstore.core.writes import write_rows

from . import plan
from .backbones import Backbone, load_backbone
from .preprocess import Preprocess, load_and_preprocess
from .sources import open_source
from .crops import ViewSpec, decode_views
from .write_behind import WriteBehind


@dataclass
class ExtractSpec:
    """Everything a process needs to compute any work item of one extraction (picklable: Dask
    ships it to workers, which re-open the store and the backbone from it).  Paths are absolute."""

    store_path: str
    name: str
    source: dict | None  # Source.spec() of the source given to this run (None: recorded sources)
    backbone: str
    field: str = "image"  # image | caption
    pooling: str | None = None
    layer: int | None = None
    tokens: bool = False
    token_projection: bool = True  # False: CLIP/EVA-CLIP tokens in the trunk's width, not the joint space
    token_dtype: str = "float16"
    token_scaling: str | None = None  # int8 tokens: "token_channel" or "token" (the feature set's own)
    pixels: str | None = None
    batch_size: int = 64
    device: str = "cpu"
    precision: str = "fp32"
    num_workers: int = 0
    trust_remote_code: bool = False
    store_identity: tuple | None = None  # Store.identity when the job was planned
    source_id: int | None = None  # the given source's id in the store
    writes_in_flight: int = 1  # blocks written on writer threads meanwhile (0: on the forward thread); prepare picks it
    views: dict | None = None  # stored views (ViewSpec.identity(), K > 1 only): K crops per image, `pipelines.views`

    def load_backbone(self) -> Backbone:
        return load_backbone(self.backbone, pooling=self.pooling, layer=self.layer, tokens=self.tokens,
                             token_projection=self.token_projection,
                             device=self.device, precision=self.precision, trust_remote_code=self.trust_remote_code,
                             modality="image" if self.field == "image" else "text")


# ---- decoding (runs in worker processes or threads) ------------------------------------------
def decode_batch(items: list, pre: Preprocess) -> tuple[np.ndarray, list[tuple[str, str] | None]]:
    """Decode + preprocess a batch of raw image bytes (or BadSample from the source).

    Returns uint8 crops (k, 3, H, W) for the good ones and, per item, None or (reason, detail)."""
    crops, errors = [], []
    for item in items:
        try:
            if isinstance(item, BadSample):
                raise item
            crops.append(load_and_preprocess(item, pre))
            errors.append(None)
        except BadSample as e:
            errors.append((e.reason, e.detail))
        except Exception as e:  # a decoder bug on one file must not stop the job
            errors.append(("decode-error", f"{type(e).__name__}: {e}"))
    shape = (0, 3, pre.crop, pre.crop)
    return (np.stack(crops) if crops else np.zeros(shape, np.uint8)), errors


def make_pool(num_workers: int) -> Executor:
    """K decode processes; with 0, one background thread (PIL releases the GIL while decoding,
    so decode still overlaps the forward pass).  Inside a daemonic process (a Dask worker) no
    child process may start: K threads decode there instead.  The decode processes ignore
    SIGINT: Ctrl-C reaches the whole process group, and only the parent acts on it (it stops
    and shuts the pool down), so the user sees its one line, not a traceback per worker.  They
    are all started at once, with SIGINT ignored for the instant of their spawn: an ignored
    signal stays ignored through exec, so a Ctrl-C while a worker is still importing is silent too."""
    if num_workers > 0 and not multiprocessing.current_process().daemon:
        pool = ProcessPoolExecutor(num_workers, mp_context=get_context("spawn"), initializer=_ignore_sigint)
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            for _ in range(num_workers):  # each submit while no worker is idle spawns one
                pool.submit(os.getpid)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        return pool
    return ThreadPoolExecutor(max(1, num_workers))


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def caption_reason(text: str | None) -> tuple[str, str] | None:
    if text is None or not str(text).strip():
        return ("empty-caption", "no caption text")
    if "\ufffd" in text:
        return ("non-utf8-caption", "caption bytes were not valid UTF-8")
    return None


class BlockRunner:
    """Computes and writes work items of one feature set; holds the opened store, sources,
    backbone and the decode pool so consecutive items reuse them (decode runs ahead across items)."""

    def __init__(self, spec: ExtractSpec, backbone: Backbone | None = None, store: Store | None = None):
        self.spec = spec
        self.store = store or Store.open(spec.store_path, mode="r+")
        self.backbone = backbone or spec.load_backbone()
        self.pool: Executor | None = None
        self.lookahead = max(2, 2 * spec.num_workers)
        self._sources: dict[str, object] = {}
        self.views = ViewSpec.from_identity(spec.views) if spec.views else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def source(self, spec: dict):
        key = repr(sorted(spec.items()))
        if key not in self._sources:
            self._sources[key] = open_source(**spec)
        return self._sources[key]

    def run(self, items: list, on_rows=None) -> list[dict]:
        """Compute and write `items` (WorkItems, their dicts, or whole block numbers read from the
        spec's source) in order; returns the markers once every block is written.  Writes run
        on a writer thread behind the forward pass (`writes`).  `on_rows(n)` reports progress."""
        items = self._as_items(items)
        writes = WriteBehind(self.spec.writes_in_flight, f"features/{self.spec.name}")
        try:
            if self.spec.field == "image":
                self.pool = self.pool or make_pool(self.spec.num_workers)
                batches = self._decoded_batches(items)
                for item in items:
                    writes.submit(item.block, self._image_item(item, batches, on_rows, writes.check))
            else:
                for item in items:
                    writes.submit(item.block, self._caption_item(item, on_rows, writes.check))
            return writes.finish()
        except BaseException:
            writes.abort()
            raise
        finally:
            writes.close()

    def _as_items(self, items) -> list[plan.WorkItem]:
        out = [plan.WorkItem(**it) if isinstance(it, dict) else it for it in items]
        blocks = [b for b in out if isinstance(b, (int, np.integer))]
        if blocks:
            fs = self.store.fresh().feature_set(self.spec.name)
            source = open_source(**self.spec.source) if self.spec.source else None
            out = plan.for_blocks(self.store.fresh(), fs, source, self.spec.source_id, [int(b) for b in blocks])
        return out

    @property
    def rows_per_batch(self) -> int:
        """Rows per forward pass: `batch_size` images, so with K views batch_size // K rows."""
        return max(1, self.spec.batch_size // (self.views.k if self.views else 1))

    def _image_batches(self, items):
        """(item index, rows, raw items, uids) for every batch of every item, in order.  The next
        item's image bytes are read on a reader thread while this item's batches go by (a remote
        source's ranged reads never stall the forward pass for long); one item's bytes are read
        ahead.  uids only with stored views (each view's crop is drawn from its uid)."""
        b = self.rows_per_batch

        def read(item) -> tuple[list, list | None]:
            raw = list(self.source(item.source).read_images(item.refs, item.spans))
            uids = None
            if self.views:
                store = self.store.fresh()
                start, stop = store.block_range(item.block)
                block_uids = store.samples(fmt.UID, start, stop).astype(object)
                uids = [str(u) for u in block_uids[np.asarray(item.rows, dtype=np.int64) - start]]
            return raw, uids

        with ThreadPoolExecutor(1, thread_name_prefix="featstore-read") as reader:
            ahead = reader.submit(read, items[0]) if items else None
            for k, item in enumerate(items):
                raw, uids = ahead.result()
                ahead = reader.submit(read, items[k + 1]) if k + 1 < len(items) else None
                rows = np.asarray(item.rows, dtype=np.int64)
                for i in range(0, len(rows), b):
                    yield k, rows[i : i + b], raw[i : i + b], None if uids is None else uids[i : i + b]

    def _decoded_batches(self, items):
        """Decoded batches in order, with up to `lookahead` batches decoding ahead."""
        pending: collections.deque[tuple[int, np.ndarray, Future]] = collections.deque()
        pre = self.backbone.preprocess
        for k, rows, raw, uids in self._image_batches(items):
            job = (self.pool.submit(decode_views, raw, uids, pre, self.views) if self.views
                   else self.pool.submit(decode_batch, raw, pre))
            pending.append((k, rows, job))
            if len(pending) >= self.lookahead:
                kk, r, fut = pending.popleft()
                yield kk, r, fut.result()
        while pending:
            kk, r, fut = pending.popleft()
            yield kk, r, fut.result()

    def _image_item(self, item: plan.WorkItem, batches, on_rows, check=None):
        """Compute one item's rows; returns the job that writes them (`writes`)."""
        rows_all = np.asarray(item.rows, dtype=np.int64)
        n = len(rows_all)
        t0 = time.perf_counter()
        bb, spec = self.backbone, self.spec
        k = self.views.k if self.views else 1
        per = (k,) if k > 1 else ()  # the view axis of every per-view array
        crop = bb.preprocess.crop
        pooled = np.zeros((n,) + per + (bb.dim,), np.float32)
        # float16 tokens are staged as stored (the same rounding the writer would do, half the memory)
        staged = np.float32 if spec.token_dtype == "int8" else np.float16
        tokens = np.zeros((n,) + per + tuple(bb.token_shape), staged) if spec.tokens else None
        pixels = np.zeros((n,) + per + (3, crop, crop), np.uint8) if spec.pixels else None
        boxes = np.zeros((n, k, 4), np.float32) if k > 1 else None
        flips = np.zeros((n, k), bool) if k > 1 else None
        valid = np.zeros(n, bool)
        failures = []
        forward_s = 0.0
        done = 0
        while done < n:
            _, rows, (decoded, errors) = next(batches)
            crops = decoded[0] if k > 1 else decoded
            ok = np.array([e is None for e in errors], bool)
            local = np.arange(done, done + len(rows))
            for r, e in zip(rows, errors):
                if e is not None:
                    failures.append({"row": int(r), "reason": e[0], "detail": e[1][:200]})
            if ok.any():
                tf = time.perf_counter()
                out = bb.encode_images(torch.from_numpy(crops.reshape((-1, 3, crop, crop))))  # K views per row
                forward_s += time.perf_counter() - tf
                out = {key: v.reshape((len(crops),) + per + tuple(v.shape[1:])) for key, v in out.items()}
                idx = local[ok]
                pooled[idx] = out["pooled"].numpy()
                if tokens is not None:
                    tokens[idx] = out["tokens"].numpy()
                if pixels is not None:
                    pixels[idx] = crops
                if k > 1:
                    boxes[idx], flips[idx] = decoded[1], decoded[2]
                valid[idx] = _finite(out, failures, rows[ok])
            done += len(rows)
            if on_rows:
                on_rows(len(rows))
            if check:
                check()  # a failed write stops the forward pass at the next batch
        stats = {"seconds": round(time.perf_counter() - t0, 3), "forward_seconds": round(forward_s, 3),
                 "worker": f"pid-{os.getpid()}"}

        def write() -> dict:  # on the writer thread
            columns = {"pooled": pooled}
            fidelity = None
            if tokens is not None:
                token_columns, fidelity = self.token_columns(tokens, valid, item.block)
                columns.update(token_columns)
            if pixels is not None:
                columns["pixels"] = pixels
            if boxes is not None:
                columns.update(view_crops=boxes, view_flips=flips)
            return write_rows(self.store, spec.name, item.block, rows_all, columns, valid, failures, stats,
                              source=item.source_id, int8_fidelity=fidelity)

        return write

    def token_columns(self, tokens: np.ndarray, valid: np.ndarray, block: int) -> tuple[dict, dict | None]:
        """The stored token columns of one block and, for int8, their fidelity (refused below
        `featstore.tokens.MIN_COSINE`: the block is not written)."""
        if self.spec.token_dtype != "int8":
            return {"tokens": tokens}, None
        n, per = len(tokens), tokens.shape[1:-2]  # per: (K,) with stored views, each view quantized on its own
        flat = tokens.reshape((-1,) + tokens.shape[-2:])
        columns, fidelity = encode_tokens(flat, self.spec.token_scaling or "token", np.repeat(valid, flat.shape[0] // max(n, 1)))
        check_fidelity(fidelity, f"block {block} of features/{self.spec.name}")
        return {key: v.reshape((n,) + per + v.shape[1:]) for key, v in columns.items()}, fidelity

    def _caption_item(self, item: plan.WorkItem, on_rows, check=None):
        """Compute one item's caption rows; returns the job that writes them (`writes`)."""
        rows = np.asarray(item.rows, dtype=np.int64)
        n = len(rows)
        t0 = time.perf_counter()
        bb = self.backbone
        store = self.store.fresh()  # captions as registered now (a later run may have filled them)
        start, stop = store.block_range(item.block)
        if fmt.CAPTION in store.sample_fields():
            captions = store.samples(fmt.CAPTION, start, stop).astype(object)[rows - start].tolist()
        else:
            captions = [None] * n
        pooled = np.zeros((n, bb.dim), np.float32)
        valid = np.zeros(n, bool)
        failures, good = [], []
        for i, text in enumerate(captions):
            reason = caption_reason(text)
            if reason:
                failures.append({"row": int(rows[i]), "reason": reason[0], "detail": reason[1]})
            else:
                good.append(i)
        # length-sorted batches (longest first), ties by row: deterministic for the item's rows
        lengths = bb.text_lengths([captions[i] for i in good]) if good else []
        order = [good[j] for j in sorted(range(len(good)), key=lambda j: (-lengths[j], good[j]))]
        forward_s = 0.0
        batches = [np.array(order[k : k + self.spec.batch_size]) for k in range(0, len(order), self.spec.batch_size)]
        for idx, out_of in zip(batches, _tokenized_ahead(bb, [[captions[i] for i in b] for b in batches])):
            tf = time.perf_counter()
            out = out_of()
            forward_s += time.perf_counter() - tf
            pooled[idx] = out["pooled"].numpy()
            valid[idx] = _finite(out, failures, rows[idx])
            if on_rows:
                on_rows(len(idx))
            if check:
                check()
        if on_rows:
            on_rows(n - len(order))
        stats = {"seconds": round(time.perf_counter() - t0, 3), "forward_seconds": round(forward_s, 3),
                 "worker": f"pid-{os.getpid()}"}
        return lambda: write_rows(self.store, self.spec.name, item.block, rows, {"pooled": pooled}, valid, failures, stats)


def _tokenized_ahead(bb, batches: list[list[str]]):
    """For each batch of texts, a function running its forward pass.  A backbone that tokenizes
    on its own (`tokenize` / `encode_tokenized`) gets its next batch tokenized on a worker thread
    while the current one runs (the tokenizer releases the GIL; only that thread uses it here)."""
    if not batches or not hasattr(bb, "tokenize"):
        for texts in batches:
            yield lambda texts=texts: bb.encode_texts(texts)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="featstore-tokenize") as pool:
        ahead = pool.submit(bb.tokenize, batches[0])
        for k in range(len(batches)):
            enc = ahead.result()
            if k + 1 < len(batches):
                ahead = pool.submit(bb.tokenize, batches[k + 1])
            yield lambda enc=enc: bb.encode_tokenized(enc)


def _finite(out: dict, failures: list, rows: np.ndarray) -> np.ndarray:
    """True per row unless the backbone produced NaN/inf for it (recorded as a failure)."""
    ok = np.isfinite(out["pooled"].numpy()).reshape(len(rows), -1).all(axis=1)
    if "tokens" in out:
        ok &= np.isfinite(out["tokens"].numpy()).reshape(len(ok), -1).all(axis=1)
    for r in np.asarray(rows)[~ok]:
        failures.append({"row": int(r), "reason": "non-finite-output", "detail": "the backbone produced NaN/inf"})
    return ok
