"""`featstore extract`: source → decode+preprocess → backbone → writer, one row block at a time.

    coordinator:  open source → register its manifest (all rows, first) → create the feature set
                  (identity checked) → list the blocks not yet done → run them → summary
    one block:    read the block's image bytes (or captions) → decode+preprocess in a pool,
                  running ahead of the forward pass → backbone forward in batches (autocast) →
                  `featstore.writer.write_block` (whole shards, then the marker)

Where a sample's bytes become a feature row: `BlockRunner.run` below.  A bad sample never
stops the job: it becomes `valid=False` with its reason in the block's marker.  Batches never
span blocks, and captions are length-sorted within each block, so a block's bytes depend only
on the block (the same in one process or on a Dask cluster).
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context

import numpy as np
import torch

from featstore import format as fmt
from featstore.errors import BadSample, ConfigError
from featstore.store import Store
from featstore.tokens import quantize_int8
from featstore.writer import write_block

from .backbones import Backbone, load_backbone
from .preprocess import Preprocess, load_and_preprocess
from .sources import open_source


@dataclass
class ExtractSpec:
    """Everything a process needs to compute any block of one extraction (picklable: Dask
    ships it to workers, which re-open the store, the source and the backbone from it)."""

    store_path: str
    name: str
    source: dict  # Source.spec()
    backbone: str
    field: str = "image"  # image | caption
    pooling: str | None = None
    layer: int | None = None
    tokens: bool = False
    token_dtype: str = "float16"
    pixels: str | None = None
    batch_size: int = 64
    device: str = "cpu"
    precision: str = "fp32"
    num_workers: int = 0
    trust_remote_code: bool = False

    def load_backbone(self) -> Backbone:
        return load_backbone(self.backbone, pooling=self.pooling, layer=self.layer, tokens=self.tokens,
                             device=self.device, precision=self.precision, trust_remote_code=self.trust_remote_code)


# ---- decoding (runs in worker processes or a thread) -----------------------------------------
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


def _make_pool(num_workers: int) -> Executor:
    """K decode processes; with 0, one background thread (PIL releases the GIL while decoding,
    so decode still overlaps the forward pass)."""
    if num_workers > 0:
        return ProcessPoolExecutor(num_workers, mp_context=get_context("spawn"))
    return ThreadPoolExecutor(1)


def caption_reason(text: str | None) -> tuple[str, str] | None:
    if text is None or not str(text).strip():
        return ("empty-caption", "no caption text")
    if "\ufffd" in text:
        return ("non-utf8-caption", "caption bytes were not valid UTF-8")
    return None


# ---- one block --------------------------------------------------------------------------------
class BlockRunner:
    """Computes and writes blocks of one feature set; holds the opened store, source, backbone
    and the decode pool so consecutive blocks reuse them (and decode runs ahead across blocks)."""

    def __init__(self, spec: ExtractSpec, backbone: Backbone | None = None, store: Store | None = None):
        self.spec = spec
        self.store = store or Store.open(spec.store_path, mode="r+")
        self.source = open_source(**spec.source)
        self.backbone = backbone or spec.load_backbone()
        self.pool: Executor | None = None
        self.lookahead = max(2, 2 * spec.num_workers)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None

    def run(self, blocks: list[int], on_rows=None) -> list[dict]:
        """Compute and write `blocks` in order; returns their markers.  `on_rows(n)` reports progress."""
        markers = []
        if self.spec.field == "image":
            self.pool = self.pool or _make_pool(self.spec.num_workers)
            batches = self._decoded_batches(blocks)
            for block in blocks:
                markers.append(self._image_block(block, batches, on_rows))
        else:
            for block in blocks:
                markers.append(self._caption_block(block, on_rows))
        return markers

    def _image_batches(self, blocks):
        """(block, rows, raw items) for every batch of every block, in order."""
        b = self.spec.batch_size
        for block in blocks:
            start, stop = self.store.block_range(block)
            refs = self.store.samples(fmt.SOURCE_REF, start, stop).tolist()
            items = list(self.source.read_images(refs))
            for i in range(0, stop - start, b):
                yield block, np.arange(start + i, min(start + i + b, stop)), items[i : i + b]

    def _decoded_batches(self, blocks):
        """Decoded batches in order, with up to `lookahead` batches decoding ahead."""
        pending: collections.deque[tuple[int, np.ndarray, Future]] = collections.deque()
        source = self._image_batches(blocks)
        pre = self.backbone.preprocess
        for block, rows, items in source:
            pending.append((block, rows, self.pool.submit(decode_batch, items, pre)))
            if len(pending) >= self.lookahead:
                blk, r, fut = pending.popleft()
                yield blk, r, fut.result()
        while pending:
            blk, r, fut = pending.popleft()
            yield blk, r, fut.result()

    def _image_block(self, block: int, batches, on_rows) -> dict:
        start, stop = self.store.block_range(block)
        n = stop - start
        t0 = time.perf_counter()
        bb, spec = self.backbone, self.spec
        pooled = np.zeros((n, bb.dim), np.float32)
        tokens = np.zeros((n,) + tuple(bb.token_shape), np.float32) if spec.tokens else None
        pixels = np.zeros((n, 3, bb.preprocess.crop, bb.preprocess.crop), np.uint8) if spec.pixels else None
        valid = np.zeros(n, bool)
        failures = []
        forward_s = 0.0
        done = 0
        while done < n:
            blk, rows, (crops, errors) = next(batches)
            assert blk == block, "batches arrive in block order"
            ok = np.array([e is None for e in errors], bool)
            local = rows - start
            for r, e in zip(rows, errors):
                if e is not None:
                    failures.append({"row": int(r), "reason": e[0], "detail": e[1][:200]})
            if ok.any():
                tf = time.perf_counter()
                out = bb.encode_images(torch.from_numpy(crops))
                forward_s += time.perf_counter() - tf
                idx = local[ok]
                pooled[idx] = out["pooled"].numpy()
                if tokens is not None:
                    tokens[idx] = out["tokens"].numpy()
                if pixels is not None:
                    pixels[idx] = crops
                valid[idx] = _finite(out, failures, rows[ok])
            done += len(rows)
            if on_rows:
                on_rows(len(rows))
        columns = {"pooled": pooled}
        if tokens is not None:
            columns.update(self._token_columns(tokens))
        if pixels is not None:
            columns["pixels"] = pixels
        stats = {"seconds": round(time.perf_counter() - t0, 3), "forward_seconds": round(forward_s, 3)}
        return write_block(self.store, spec.name, block, columns, valid, failures, stats)

    def _token_columns(self, tokens: np.ndarray) -> dict:
        if self.spec.token_dtype == "int8":
            q, scale = quantize_int8(tokens)
            return {"tokens": q, "tokens_scale": scale}
        return {"tokens": tokens}

    def _caption_block(self, block: int, on_rows) -> dict:
        start, stop = self.store.block_range(block)
        n = stop - start
        t0 = time.perf_counter()
        bb = self.backbone
        captions = self.store.samples(fmt.CAPTION, start, stop).tolist() if fmt.CAPTION in self.store.sample_fields() else [None] * n
        pooled = np.zeros((n, bb.dim), np.float32)
        valid = np.zeros(n, bool)
        failures, good = [], []
        for i, text in enumerate(captions):
            reason = caption_reason(text)
            if reason:
                failures.append({"row": start + i, "reason": reason[0], "detail": reason[1]})
            else:
                good.append(i)
        # length-sorted batches (longest first), ties by row: deterministic within the block
        lengths = bb.text_lengths([captions[i] for i in good]) if good else []
        order = [good[j] for j in sorted(range(len(good)), key=lambda j: (-lengths[j], good[j]))]
        forward_s = 0.0
        for k in range(0, len(order), self.spec.batch_size):
            idx = np.array(order[k : k + self.spec.batch_size])
            tf = time.perf_counter()
            out = bb.encode_texts([captions[i] for i in idx])
            forward_s += time.perf_counter() - tf
            pooled[idx] = out["pooled"].numpy()
            valid[idx] = _finite(out, failures, start + idx)
            if on_rows:
                on_rows(len(idx))
        if on_rows:
            on_rows(n - len(order))
        stats = {"seconds": round(time.perf_counter() - t0, 3), "forward_seconds": round(forward_s, 3)}
        return write_block(self.store, self.spec.name, block, {"pooled": pooled}, valid, failures, stats)


def _finite(out: dict, failures: list, rows: np.ndarray) -> np.ndarray:
    """True per row unless the backbone produced NaN/inf for it (recorded as a failure)."""
    ok = np.isfinite(out["pooled"].numpy()).all(axis=1)
    if "tokens" in out:
        ok &= np.isfinite(out["tokens"].numpy()).reshape(len(ok), -1).all(axis=1)
    for r in np.asarray(rows)[~ok]:
        failures.append({"row": int(r), "reason": "non-finite-output", "detail": "the backbone produced NaN/inf"})
    return ok


# ---- the coordinator ---------------------------------------------------------------------------
def prepare(
    store_path: str,
    source_path: str,
    backbone: str,
    *,
    name: str | None = None,
    field: str = "image",
    source_type: str = "auto",
    captions: str | None = None,
    uid_field: str | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    rows_per_shard: int | None = None,
    pooling: str | None = None,
    layer: int | None = None,
    tokens: bool = False,
    token_dtype: str = "float16",
    pixels: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    precision: str = "fp32",
    num_workers: int = 0,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    dtype: str = "float16",
    log=print,
) -> tuple[ExtractSpec, Store, Backbone, dict]:
    """Validate, register the manifest, load the backbone once and create the feature set.

    Returns the spec, the store, the loaded backbone and a dict of what registration did."""
    if field not in ("image", "caption"):
        raise ConfigError(f"--field must be image or caption, not {field!r}")
    if token_dtype not in ("float16", "int8"):
        raise ConfigError(f"--token-dtype must be float16 or int8, not {token_dtype!r}")
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"--dtype (of the pooled features) must be float16 or float32, not {dtype!r}")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision must be fp32, bf16 or fp16, not {precision!r}")
    if batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if (pixels or tokens) and field != "image":
        raise ConfigError("--pixels and --tokens only apply to --field image")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for, but torch sees no CUDA device here")

    source = open_source(source_path, source_type, captions=captions, uid_field=uid_field,
                         image_column=image_column, text_column=text_column, label_column=label_column)
    store = Store.create(store_path, rows_per_shard=rows_per_shard or fmt.DEFAULT_ROWS_PER_SHARD)
    records = list(source.records())
    for w in source.warnings:  # sources find most of their warnings while reading records
        log(f"warning: {w}")
    if not records:
        raise ConfigError(f"the source {source_path} has no samples")
    labels = [r.label for r in records]
    has_labels = any(x is not None for x in labels)
    result = store.register(
        [r.uid for r in records],
        captions=[r.caption for r in records],
        labels=[(-1 if x is None else int(x)) for x in labels] if has_labels else None,
        source_refs=[r.source_ref for r in records],
        label_names=source.label_names,
    )
    store.record_manifest(str(source_path), result)
    if result["duplicates"]:
        log(f"warning: {len(result['duplicates'])} duplicate uids in the source kept no row of their own "
            f"(first: {result['duplicates'][0]['uid']}); see `featstore inspect`")

    bb = load_backbone(backbone, pooling=pooling, layer=layer, tokens=tokens, device=device,
                       precision=precision, trust_remote_code=trust_remote_code)
    want = "image" if field == "image" else "text"
    if bb.modality != want:
        raise ConfigError(f"{backbone} is a {bb.modality} backbone but --field {field} needs a {want} backbone")
    name = name or bb.name
    if overwrite and name in store.feature_set_names():
        store.remove_feature_set(name)
    identity = dict(bb.identity, field=field, precision=precision)
    if tokens:
        identity["token_dtype"] = token_dtype
    if dtype != "float16":  # another storage dtype is another feature set (float16 identities stay as they were)
        identity["pooled_dtype"] = dtype
    store.create_feature_set(
        name, identity, bb.dim, dtype=dtype,
        tokens=bb.token_shape if tokens else None, token_dtype=token_dtype,
        pixels=pixels, pixels_shape=(3, bb.preprocess.crop, bb.preprocess.crop) if pixels else None,
        pixels_identity=bb.preprocess.identity() if pixels else None,
    )
    spec = ExtractSpec(
        store_path=str(store_path), name=name, source=source.spec(), backbone=backbone, field=field,
        pooling=pooling, layer=layer, tokens=tokens, token_dtype=token_dtype, pixels=pixels,
        batch_size=batch_size, device=device, precision=precision, num_workers=num_workers,
        trust_remote_code=trust_remote_code,
    )
    return spec, store, bb, result


def extract(store_path, source_path, backbone, *, workers: int | None = None, scheduler: str | None = None,
            progress: bool = True, log=print, **options) -> dict:
    """Run (or resume) one extraction; returns the end summary.  Options as in `prepare`."""
    t0 = time.perf_counter()
    spec, store, bb, registered = prepare(store_path, source_path, backbone, log=log, **options)
    fs = store.feature_set(spec.name)
    todo = fs.missing_blocks()
    rows_todo = sum(stop - start for start, stop in map(store.block_range, todo))
    log(f"{spec.name}: {len(todo)} of {store.n_blocks} blocks to compute ({rows_todo:,} rows)"
        + (f", {store.n_blocks - len(todo)} already done" if len(todo) < store.n_blocks else ""))
    if todo and (workers or scheduler):
        from .distributed import run_blocks

        markers, per_worker = run_blocks(spec, todo, workers=workers, scheduler=scheduler, progress=progress, log=log)
    elif todo:
        per_worker = None
        runner = BlockRunner(spec, backbone=bb, store=store)
        try:
            with _progress(rows_todo, f"extract {spec.name}", progress) as bar:
                markers = runner.run(todo, on_rows=bar.update)
        finally:
            runner.close()
    else:
        markers, per_worker = [], None
    return summarize_run(store, spec, markers, registered, time.perf_counter() - t0, per_worker)


def summarize_run(store: Store, spec: ExtractSpec, markers: list[dict], registered: dict, seconds: float,
                  per_worker: dict | None = None) -> dict:
    reasons = collections.Counter(f["reason"] for m in markers for f in m["failures"])
    rows = sum(m["rows"][1] - m["rows"][0] for m in markers)
    fs = store.feature_set(spec.name)
    summary = {
        "store": spec.store_path,
        "feature_set": spec.name,
        "backbone": spec.backbone,
        "field": spec.field,
        "rows_registered": registered["registered"],
        "duplicates_rejected": len(registered["duplicates"]),
        "blocks_written": len(markers),
        "blocks_total": store.n_blocks,
        "blocks_missing": len(fs.missing_blocks()),
        "rows_written": rows,
        "valid": sum(m["n_valid"] for m in markers),
        "invalid": sum(m["n_invalid"] for m in markers),
        "invalid_by_reason": dict(reasons.most_common()),
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds, 2) if seconds > 0 else None,
        "forward_seconds": round(sum(m.get("forward_seconds", 0.0) for m in markers), 2),
    }
    if per_worker:
        summary["per_worker"] = per_worker
    return summary


def format_summary(s: dict) -> str:
    lines = [
        f"features/{s['feature_set']} ({s['field']}, {s['backbone']}) in {s['store']}",
        f"  wrote {s['rows_written']:,} rows in {s['blocks_written']} blocks "
        f"({s['blocks_total'] - s['blocks_missing']}/{s['blocks_total']} blocks done) "
        f"in {s['seconds']:.1f}s = {s['rows_per_s'] or 0:,.1f} rows/s",
        f"  valid {s['valid']:,}, invalid {s['invalid']:,}" + (f"; {s['rows_registered']:,} new rows registered" if s["rows_registered"] else ""),
    ]
    for reason, count in s["invalid_by_reason"].items():
        lines.append(f"    {count:>7,} {reason}")
    if s["duplicates_rejected"]:
        lines.append(f"  {s['duplicates_rejected']:,} duplicate uids rejected (see `featstore inspect`)")
    for worker, w in (s.get("per_worker") or {}).items():
        lines.append(f"  worker {worker}: {w['blocks']} blocks, {w['rows']:,} rows, {w['rows_per_s']:,.1f} rows/s")
    return "\n".join(lines)


class _progress:
    """A tqdm bar with rate and ETA (or a silent stand-in)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = total, desc, enabled

    def __enter__(self):
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="row", smoothing=0.1, dynamic_ncols=True)
        else:
            self.bar = None
        return self

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

