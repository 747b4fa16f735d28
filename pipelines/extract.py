"""`featstore extract`: the coordinator of one extraction run.

    validate every option, open the source and read its manifest, load the backbone
      (nothing is written before all of this has passed)
    -> create the store if needed -> register the source's new uids and its metadata (store lock)
    -> create or check the feature set -> plan the rows to compute (`plan`: joined by uid to the
       given source, or each row's recorded source) -> run them (`blocks`, or Dask)
    -> compact the progress index -> summary; exit != 0 when nothing useful was written

Resumable and idempotent: a re-run computes only rows that are still to do.
"""

from __future__ import annotations

import os
import time


from featstore.core import format as fmt
from featstore.device import resolve_device
from featstore.errors import ConfigError, ExtractFailed, SourceError
from featstore.core.featureset import check_name, check_same, jsonable
from featstore.core.progress import Progress
from featstore.store import Store, store_exists

from . import plan
from .backbones import load_backbone
from .blocks import BlockRunner, ExtractSpec
from .choices import FIELDS, POOLED_DTYPES, POOLINGS, PRECISIONS, SOURCE_TYPES, TOKEN_DTYPES
from .sources import open_source
from .summary import format_summary, progress_bar, summarize_run
from .write_behind import default_in_flight
from .crops import ViewSpec

SOURCE_OPTIONS = ("captions", "labels", "uid_field", "image_column", "text_column", "label_column")

__all__ = ["extract", "prepare", "format_summary", "BlockRunner", "ExtractSpec", "FIELDS", "POOLINGS",
           "TOKEN_DTYPES", "PRECISIONS", "SOURCE_TYPES"]


def storage_dtype(bb, have) -> str:
    """The pooled features' storage dtype when --dtype is not given: the existing feature set's (growth
    keeps what is stored), else the alias's recipe (llama3-8b: float32, as ShareLock's code keeps its
    LLM features), else float16."""
    from .backbones.registry import REGISTRY

    if have is not None:
        return str(have.array("pooled").dtype)
    entry = REGISTRY.get(bb.identity.get("alias") or "")
    return (entry.pooled_dtype if entry is not None else None) or "float16"


def _check_options(field, token_dtype, dtype, precision, batch_size, pixels, tokens, device, rows_per_shard, pooling,
                   num_workers, source_path, source_options, update_metadata, store_path):
    if field not in FIELDS:
        raise ConfigError(f"--field must be one of {', '.join(FIELDS)}, not {field!r}")
    if token_dtype not in TOKEN_DTYPES:
        raise ConfigError(f"--token-dtype must be one of {', '.join(TOKEN_DTYPES)}, not {token_dtype!r}")
    if dtype is not None and dtype not in POOLED_DTYPES:
        raise ConfigError(f"--dtype (of the pooled features) must be one of {', '.join(POOLED_DTYPES)}, not {dtype!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if pooling is not None and pooling not in POOLINGS:
        raise ConfigError(f"--pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    if batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if num_workers < 0:
        raise ConfigError("--num-workers must be >= 0")
    if rows_per_shard is not None and rows_per_shard < 1:
        raise ConfigError(f"--rows-per-shard must be >= 1, not {rows_per_shard}")
    if (pixels or tokens) and field != "image":
        raise ConfigError("--pixels and --tokens only apply to --field image")
    resolve_device(device)
    if source_path is None:
        given = [k for k, v in source_options.items() if v is not None]
        if given or update_metadata:
            flags = ", ".join("--" + k.replace("_", "-") for k in given + (["update_metadata"] if update_metadata else []))
            raise ConfigError(f"{flags} describe a source: give it with --source")
        if not _store_exists(store_path):
            raise ConfigError(f"no store at {store_path} yet: give --source to create it")


def _store_exists(path) -> bool:
    return store_exists(path)


def prepare(store_path, source_path=None, backbone=None, *, name=None, field="image", source_type="auto",
            captions=None, labels=None, uid_field=None, image_column=None, text_column=None, label_column=None,
            rows_per_shard=None, pooling=None, layer=None, tokens=False, token_projection=True, token_dtype="float16",
            dtype=None, pixels=None, batch_size=64, device="cpu", precision="fp32", num_workers=0, overwrite=False, update_metadata=False,
            trust_remote_code=False, token_scaling=None, writes_in_flight=None, views=1, view_seed=None,
            view_scale=None, view_ratio=None, view_flip=None, log=print):
    """Validate, register the source, load the backbone once and create the feature set.

    int8 tokens of a new feature set get token x channel scaling (`featstore.tokens`); an
    existing one keeps its own (per-token sets made before it read and resume unchanged).
    `token_scaling="token"` makes a new per-token set (the old layout, for comparison);
    `writes_in_flight` is how many computed blocks may be written on writer threads meanwhile (0:
    write on the forward thread; None: `write_behind.default_in_flight`, by where the store is).

    `views` K > 1 stores K views per image (`pipelines.views`: view 0 the recipe's centre crop,
    the others random-resized crops + flips drawn from (view_seed, uid, k); scale, ratio and flip
    default to EVA-02's); K = 1 is the plain layout, and the view options are refused with it.

    Returns (spec, store, backbone, registration result); the result's "records" holds the
    source's manifest (for planning).  Nothing is written before every check has passed."""
    if backbone is None:
        raise ConfigError("--backbone is required")
    source_options = {"captions": captions, "labels": labels, "uid_field": uid_field, "image_column": image_column,
                      "text_column": text_column, "label_column": label_column}
    store_path = str(store_path) if "://" in str(store_path) else os.path.abspath(os.path.expanduser(str(store_path)))
    _check_options(field, token_dtype, dtype, precision, batch_size, pixels, tokens, device, rows_per_shard, pooling,
                   num_workers, source_path, source_options, update_metadata, store_path)
    if token_scaling is not None and token_scaling not in fmt.TOKEN_SCALINGS:
        raise ConfigError(f"token scaling must be one of {', '.join(fmt.TOKEN_SCALINGS)}, not {token_scaling!r}")
    if token_scaling is not None and not (tokens and token_dtype == "int8"):
        raise ConfigError("a token scaling only applies to --tokens --token-dtype int8")
    if writes_in_flight is not None and writes_in_flight < 0:
        raise ConfigError(f"writes_in_flight must be >= 0, not {writes_in_flight}")
    if name is not None:
        check_name(name)
    view_spec = _view_spec(views, field, view_seed=view_seed, view_scale=view_scale, view_ratio=view_ratio,
                           view_flip=view_flip)
    # writable and of the current format, or a clear refusal now; this one object serves the job
    existing = Store.open(store_path, mode="r+") if _store_exists(store_path) else None
    if existing is not None:
        if rows_per_shard is not None and rows_per_shard != existing.rows_per_shard:
            raise ConfigError(f"{store_path} has rows_per_shard {existing.rows_per_shard}; --rows-per-shard "
                              f"{rows_per_shard} cannot take effect on an existing store: omit it")
    source = open_source(source_path, source_type, **source_options) if source_path is not None else None
    if not token_projection and not tokens:
        raise ConfigError("--no-token-projection keeps the trunk's raw tokens: it needs --tokens")
    want = "image" if field == "image" else "text"  # a two-tower checkpoint (a full CLIP) gives that tower
    bb = load_backbone(backbone, pooling=pooling, layer=layer, tokens=tokens, token_projection=token_projection,
                       device=device, precision=precision, trust_remote_code=trust_remote_code, modality=want)
    if bb.modality != want:
        raise ConfigError(f"{backbone} is a {bb.modality} backbone but --field {field} needs a {want} backbone")
    name = name or bb.name
    check_name(name)
    have = existing.feature_set(name) if existing is not None and name in existing.feature_set_names() else None
    if tokens and token_dtype == "int8" and token_scaling is None:
        keep = have is not None and not overwrite and have.token_scaling is not None
        token_scaling = have.token_scaling if keep else fmt.TOKEN_SCALINGS[0]
    dtype = dtype or storage_dtype(bb, None if overwrite else have)
    identity = dict(bb.identity, field=field, precision=precision)
    if tokens:
        identity["token_dtype"] = token_dtype
    if dtype != "float16":  # another storage dtype is another feature set (float16 identities stay as they were)
        identity["pooled_dtype"] = dtype
    if token_scaling == "token_channel":  # per-token sets keep the identity they were made with
        identity["token_scaling"] = token_scaling
    if view_spec is not None:  # one view per image (the plain layout) keeps the identity it always had
        identity["views"] = view_spec.identity()
    identity = jsonable(identity)
    layout = dict(tokens=bb.token_shape if tokens else None, token_dtype=token_dtype, pixels=pixels,
                  token_scaling=token_scaling, views=view_spec.k if view_spec else 1)
    if have is not None and not overwrite:
        check_same(have, identity, **layout)
    records = []
    if source is not None:
        records = list(source.records())
        for w in source.warnings:  # sources find most of their warnings while reading records
            log(f"warning: {w}")
        if not records:
            raise SourceError(f"the source {source_path} has no samples")
        if label_column and not any(r.label is not None for r in records):
            raise ConfigError(f"--label-column {label_column}: no sample of {source_path} has an integer label there")

    store = existing or Store.create(store_path, rows_per_shard=rows_per_shard or fmt.DEFAULT_ROWS_PER_SHARD)
    registered = {"registered": 0, "duplicates": [], "records": records}
    if source is not None:
        labels_ = [r.label for r in records]
        has_labels = any(x is not None for x in labels_)
        registered.update(store.register(
            [r.uid for r in records],
            captions=[r.caption for r in records] if any(r.caption is not None for r in records) else None,
            labels=labels_ if has_labels else None,
            source_refs=[r.source_ref for r in records],
            label_names=source.label_names,
            source=source.provenance(),
            update_metadata=update_metadata,
        ))
        if registered["fingerprint_changed"]:
            log(f"warning: source #{registered['source_id']} ({source.path}) changed since it was registered; "
                "its rows are matched by uid to what it holds now")
        if registered["duplicates"]:
            log(f"warning: {len(registered['duplicates'])} duplicate uids in the source kept no row of their own "
                f"(first: {registered['duplicates'][0]['uid']}); see `featstore inspect`")
    if overwrite and name in store.feature_set_names():
        store.remove_feature_set(name)
    pixels_identity = None
    if pixels:
        pixels_identity = dict(bb.preprocess.identity(), **({"views": view_spec.identity()} if view_spec else {}))
    store.create_feature_set(
        name, identity, bb.dim, dtype=dtype,
        tokens=bb.token_shape if tokens else None, token_dtype=token_dtype,
        pixels=pixels, pixels_shape=(3, bb.preprocess.crop, bb.preprocess.crop) if pixels else None,
        pixels_identity=pixels_identity, token_scaling=token_scaling or "token",
        views=view_spec.k if view_spec else 1,
    )
    backbone_arg = os.path.abspath(os.path.expanduser(backbone)) if os.path.exists(os.path.expanduser(backbone)) else backbone
    spec = ExtractSpec(
        store_path=store.path, name=name, source=source.spec() if source else None, backbone=backbone_arg,
        field=field, pooling=pooling, layer=layer, tokens=tokens, token_projection=token_projection,
        token_dtype=token_dtype,
        token_scaling=token_scaling, pixels=pixels,
        writes_in_flight=default_in_flight(store.path) if writes_in_flight is None else int(writes_in_flight),
        batch_size=batch_size, device=device, precision=precision, num_workers=num_workers,
        trust_remote_code=trust_remote_code, store_identity=store.fresh().identity,
        source_id=registered.get("source_id"), views=view_spec.identity() if view_spec else None,
    )
    registered["source"] = source
    return spec, store, bb, registered


def _view_spec(views, field, **options):
    """The ViewSpec of `--views K` (None for K = 1: the plain layout); view options without views
    are refused (they could not take effect)."""
    given = {k: v for k, v in options.items() if v is not None}
    if views is None or int(views) == 1:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ConfigError(f"{flags} only apply with --views K (K > 1 stored views per image)")
        return None
    if int(views) < 1:
        raise ConfigError(f"--views must be >= 1, not {views}")
    if field != "image":
        raise ConfigError("--views only applies to --field image (views are crops of the image)")
    names = {"view_seed": "seed", "view_scale": "scale", "view_ratio": "ratio", "view_flip": "flip"}
    return ViewSpec(int(views), **{names[k]: v for k, v in given.items()})


def extract(store_path, source_path=None, backbone=None, *, workers: int | None = None, scheduler: str | None = None,
            progress: bool = True, log=print, **options) -> dict:
    """Run (or resume) one extraction; returns the end summary.  Options as in `prepare`.

    Raises ExtractFailed (with the summary) when every row it tried failed or one reason made
    all of them fail, and SourceError when a recorded source is gone, after writing what it could."""
    t0 = time.perf_counter()
    if workers is not None and workers < 1:
        raise ConfigError("--workers must be >= 1")
    if workers and scheduler:
        raise ConfigError("give --workers (a local cluster) or --scheduler (an existing one), not both")
    spec, store, bb, registered = prepare(store_path, source_path, backbone, log=log, **options)
    cur = store.fresh()
    fs = cur.feature_set(spec.name)
    source = registered.pop("source")
    if source is not None:
        work = plan.from_source(cur, fs, source, registered["source_id"], registered.pop("records"))
    else:
        work = plan.from_recorded(cur, fs, log=log)
    items = work["items"]
    rows_todo = sum(len(it.rows) for it in items)
    done_now = work["rows_done"]
    log(f"{spec.name}: {rows_todo:,} rows to compute in {len(items)} blocks"
        + (f"; {done_now:,} of {cur.n_rows:,} rows already done" if done_now else ""))
    per_worker = None
    if items and (workers or scheduler):
        from .dask_cluster import run_items

        markers, per_worker = run_items(spec, items, workers=workers, scheduler=scheduler, progress=progress, log=log)
    elif items:
        runner = BlockRunner(spec, backbone=bb, store=store)
        try:
            with progress_bar(rows_todo, f"extract {spec.name}", progress) as bar:
                markers = runner.run(items, on_rows=bar.update)
        finally:
            runner.close()
    else:
        markers = []
    with store.lock():
        Progress(store.files, spec.name).compact()
    summary = summarize_run(store, spec, markers, registered, time.perf_counter() - t0, per_worker, work)
    _raise_if_useless(summary, work)
    return summary


def _raise_if_useless(s: dict, work: dict) -> None:
    """A run that wrote nothing useful must not look like a success."""
    if s["rows_written"] and not s["valid"]:
        reasons = ", ".join(f"{r} ({c:,})" for r, c in s["invalid_by_reason"].items())
        hint = {"empty-caption": "; give captions (e.g. --captions FILE for a folder, --text-column for a dataset)",
                "bad-ref": "; the source does not hold what its rows point at",
                "missing-image": "; check --image-column / the source's images"}
        top = next(iter(s["invalid_by_reason"]), "")
        raise ExtractFailed(f"all {s['rows_written']:,} rows this run computed failed: {reasons}{hint.get(top, '')}", s)
    if work.get("gone"):
        raise SourceError(work["gone"][0] + (f" (and {len(work['gone']) - 1} more sources)" if len(work["gone"]) > 1 else ""))
    if not s["rows_written"] and s["rows_to_do"] and work.get("items") == [] and not s["rows_usable"]:
        raise ExtractFailed(f"nothing could be computed: {s['rows_to_do']:,} rows of features/{s['feature_set']} "
                            "are to do and no source given or recorded holds them", s)
