"""The `featstore` command: each subcommand parses, calls one library function, prints.

Errors a user can cause end in one line on stderr and exit code 2 (1 for `verify` finding
problems; a line per differing key follows where two identities or settings differ); `--debug`
shows the full traceback instead.  Ctrl-C ends with one line saying how to continue, exit 130.

Only click and the light `choices` module are imported at start-up (`featstore --help` stays
fast); each command imports its library function when it runs.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from featstore.errors import FeatstoreError, Interrupted

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# what a bare Ctrl-C (one the command did not turn into its own Interrupted line) leaves behind
INTERRUPTED = {
    "extract": "finished blocks are kept; re-run the same command to continue",
    "download": "finished shards are kept; re-run the same command to resume",
    "train-head": "before training started: nothing was saved; re-run the same command",
    "train-uta": "before training started: nothing was saved; re-run the same command",
}


def _friendly(fn):
    """Turn FeatstoreError into one line (its first line, then any lines of detail it carries)
    unless --debug; Ctrl-C into one line saying how to continue."""

    @click.option("--debug", is_flag=True, help="Show full tracebacks.")
    @functools.wraps(fn)
    def wrapper(*args, debug=False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            if debug:
                raise
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops: rank 0 says so
                click.echo(f"interrupted: {e}", err=True)
            sys.exit(130)
        except FeatstoreError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            if debug:
                raise
            command = click.get_current_context().info_name
            click.echo(f"interrupted: {INTERRUPTED.get(command, 'nothing was changed')}", err=True)
            sys.exit(130)

    return wrapper


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=1, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="featstore")
def main():
    """featstore: run frozen backbones once, keep their features in a zarr store keyed by sample
    uid, and train heads on them at memory speed.

    \b
    Typical use:
      featstore download urls.parquet --out shards/
      featstore extract --store s.zarr --source shards/ --backbone dinov2-small
      featstore extract --store s.zarr --source shards/ --backbone minilm --field caption
      featstore train-head --store s.zarr --image dinov2-small --text minilm --out run/
      featstore eval --checkpoint run/ --store s.zarr
    """


STORE = click.option("--store", "store_path", required=True, help="Path (or fsspec URL) of the zarr store.")


@main.command()
@click.argument("urls", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the webdataset shards.")
@click.option("--url-col", default="url", show_default=True, help="Column of URLS holding the image url.")
@click.option("--caption-col", default="caption", show_default=True, help="Column holding the caption.")
@click.option("--uid-col", default=None, help="Column holding a stable uid (default: a hash of the url).")
@click.option("--image-size", default=256, show_default=True, help="Resize so the image fits this size, keeping aspect.")
@click.option("--processes", default=1, show_default=True, help="Download processes.")
@click.option("--threads", default=16, show_default=True, help="Download threads per process.")
@click.option("--samples-per-shard", default=10000, show_default=True, help="Samples per tar shard.")
@click.option("--keep-col", "keep_cols", multiple=True, help="Also keep this column in each sample's json (repeatable), e.g. a label.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_friendly
def download(urls, out, url_col, caption_col, uid_col, image_size, processes, threads, samples_per_shard, keep_cols, as_json):
    """Download a parquet/CSV/TSV of image urls + captions into webdataset shards (img2dataset),
    with a stable `uid` in each sample's json.  Re-running resumes (finished shards are kept)."""
    from featstore.pipelines.download import download as run_download

    s = run_download(urls, out, url_col=url_col, caption_col=caption_col, uid_col=uid_col, image_size=image_size,
                     processes=processes, threads=threads, samples_per_shard=samples_per_shard, stdout_to_stderr=as_json,
                     extra_img2dataset_kwargs={"save_additional_columns": list(keep_cols)} if keep_cols else None)
    if as_json:
        _echo_json(s)
        return
    click.echo(f"downloaded {s['successes']:,} images into {s.get('shards', '?')} shards in {s['out_dir']}"
               f" ({s['failed']:,} failed, {s.get('duration_s', 0):.1f}s)")
    for reason, count in list(s.get("failures_by_reason", {}).items())[:10]:
        click.echo(f"  {count:>7,} {reason}")


def _float_pair(ctx, param, value):
    """MIN,MAX -> (min, max) floats (None stays None)."""
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not MIN,MAX (two numbers)") from None
    return lo, hi


def _extract_choices():
    from featstore.pipelines.choices import FIELDS, POOLED_DTYPES, POOLINGS, PRECISIONS, SOURCE_TYPES, TOKEN_DTYPES

    return FIELDS, POOLINGS, PRECISIONS, SOURCE_TYPES, TOKEN_DTYPES, POOLED_DTYPES


_FIELDS, _POOLINGS, _PRECISIONS, _SOURCE_TYPES, _TOKEN_DTYPES, _POOLED_DTYPES = _extract_choices()


@main.command()
@STORE
@click.option("--source", "source_path", help="Webdataset shard dir (or an s3://... / fsspec URL of .tar shards), HF "
              "dataset dir, parquet, or image folder (omit it to complete the feature set from each row's recorded source).")
@click.option("--source-type", type=click.Choice(_SOURCE_TYPES), default="auto", show_default=True)
@click.option("--captions", help="Image folder: JSON of uid -> caption.")
@click.option("--labels", metavar="FILE|subdirs", help="Image folder: JSON of uid -> class name (or class index), or `subdirs`: each image's class is its top-level folder (ImageFolder layout).")
@click.option("--uid-field", help="Webdataset json field / HF column holding the uid (default: json 'uid' if present).")
@click.option("--image-column", help="HF dataset: image column.")
@click.option("--text-column", help="HF dataset: caption column.")
@click.option("--label-column", help="HF dataset column / webdataset json field holding a class label.")
@click.option("--update-metadata", is_flag=True, help="Replace stored captions/labels that differ from the source's (refused otherwise).")
@click.option("--rows-per-shard", type=int, help="Rows per shard when creating the store (default 4096); an existing store keeps its own.")
@click.option("--backbone", required=True, help="Alias (dinov2 = ShareLock's, dinov2-small, clip-vit-b16, llama3-8b, minilm, ...; see `featstore backbones`), a hub id or a local model path.")
@click.option("--name", help="Feature set name (default: the alias, or the path's base name).")
@click.option("--field", type=click.Choice(_FIELDS), default="image", show_default=True, help="What to encode.")
@click.option("--pooling", type=click.Choice(_POOLINGS), help="Pooling for generic models.")
@click.option("--layer", type=int, help="Take features from this hidden layer.")
@click.option("--tokens", is_flag=True, help="Also store patch tokens (N, T, D).")
@click.option("--token-dtype", type=click.Choice(_TOKEN_DTYPES), default="float16", show_default=True)
@click.option("--dtype", type=click.Choice(_POOLED_DTYPES), default="float16", show_default=True, help="Storage dtype of the pooled features (float32: e.g. LLM features with large activations).")
@click.option("--pixels", help="Also store the exact preprocessed crops as uint8 under pixels/NAME.")
@click.option("--views", type=int, default=1, show_default=True, help="Stored views per image: view 0 the recipe's centre crop, the others random-resized crops + flips (EVA-02's), each with its own outputs (and pixels); a view axis after row.")
@click.option("--view-seed", type=int, help="Seed of the views' crops (default 0); each view is drawn from (seed, uid, view).")
@click.option("--view-scale", callback=_float_pair, help="Area fraction range of the random crops, MIN,MAX (default 0.2,1).")
@click.option("--view-ratio", callback=_float_pair, help="Aspect ratio range of the random crops, MIN,MAX (default 0.75,1.3333).")
@click.option("--view-flip", type=float, help="Probability that a random view is mirrored (default 0.5).")
@click.option("--batch-size", default=64, show_default=True, help="Images per forward pass (with --views K: batch-size // K rows).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:K.")
@click.option("--precision", type=click.Choice(_PRECISIONS), default="fp32", show_default=True, help="Autocast precision of the forward pass.")
@click.option("--num-workers", default=0, show_default=True, help="Decode processes (0: one decode thread; threads inside Dask workers).")
@click.option("--workers", type=int, help="Run on a local Dask cluster of N workers (one per GPU with cuda).")
@click.option("--scheduler", help="Run on an existing Dask cluster at this address (tcp://HOST:PORT).")
@click.option("--overwrite", is_flag=True, help="Recompute the feature set from scratch.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model's repository.")
@click.option("--json", "as_json", is_flag=True, help="Print the end summary as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_friendly
def extract(store_path, source_path, as_json, no_progress, **options):
    """Run one backbone over a source and store its features, one row block at a time.

    Resumable: a re-run computes only rows still to do.  A second source grows the store (new
    uids) and fills rows it holds, matched by uid.  Bad samples are recorded and skipped; a run
    in which every row failed exits with an error after printing its summary."""
    from featstore.errors import ExtractFailed
    from featstore.pipelines.extract import extract as run_extract, format_summary

    log = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    try:
        s = run_extract(store_path, source_path, options.pop("backbone"), progress=not no_progress, log=log, **options)
    except ExtractFailed as e:
        if e.summary:
            click.echo(json.dumps(e.summary, indent=1) if as_json else format_summary(e.summary))
        raise
    click.echo(json.dumps(s, indent=1) if as_json else format_summary(s))


@main.command()
@STORE
@_friendly
def upgrade(store_path):
    """Convert a format-1 store to format 2 in place (sources, dimension names, row-level markers)."""
    from featstore.upgrade import upgrade as run_upgrade

    r = run_upgrade(store_path)
    click.echo(f"{store_path}: format {r['from']} -> {r['to']}; {r['sources']} sources recorded, "
               f"{r['markers']} markers converted, {r['arrays']} arrays given dimension names")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
@_friendly
def backbones(as_json):
    """List the backbone registry: alias, modality, pooled width, weights source, recipe and its
    image preprocessing.  Any hub id or local model directory works too (its config picks the recipe)."""
    from featstore.pipelines.backbones import describe_registry, format_registry

    rows = describe_registry()
    if as_json:
        _echo_json(rows)
    else:
        click.echo(format_registry(rows))


CONFIG = [
    click.option("--config", "config_file", metavar="NAME|FILE", help="A built-in config (sharelock, uta, demo) or a YAML file."),
    click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override one config key (repeatable); unknown keys are refused."),
    click.option("--steps", type=int, help="Optimizer steps (overrides the config)."),
    click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:K."),
    click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True),
    click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint."),
    click.option("--json", "as_json", is_flag=True, help="Print the end summary as JSON."),
    click.option("--no-progress", is_flag=True, help="No progress bar (into a log file it is redrawn at most every 30 s)."),
]


def _with(options):
    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return deco


def _print_train_summary(s: dict, as_json: bool) -> None:
    if s.get("rank"):  # under torchrun only rank 0 reports
        return
    if as_json:
        _echo_json(s)
        return
    best = s.get("best") or {}
    final = s.get("final") or {}
    click.echo(f"trained {s['step']}/{s['steps']} steps in {s['seconds']:.1f}s ({s['steps_per_s']:.2f} steps/s)"
               + (" - stopped early" if s.get("stopped_early") else ""))
    click.echo(f"  train rows {s['train_rows']:,}, val rows {s['val_rows']:,}, {s['params']:,} trainable parameters"
               + (f", {s['world_size']} processes (DDP)" if s.get("world_size", 1) > 1 else ""))
    if best:
        click.echo(f"  best val_loss {best['val_loss']:.4f} at step {best['step']}")
    shown = {k: v for k, v in final.items() if isinstance(v, (int, float)) and k != "step"}
    if shown:
        click.echo("  final: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
    for label, path in (s.get("files") or {}).items():
        click.echo(f"  {label:<8} {path}")
    for note in s.get("notes", []):
        click.echo(f"  note: {note}")


@main.command("train-head")
@STORE
@click.option("--image", required=True, help="Image feature set name.")
@click.option("--text", required=True, help="Text feature set name, or several comma-separated (e.g. caption sets of one LLM): each row draws one per step.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoints, metrics, curves).")
@_with(CONFIG)
@_friendly
def train_head(store_path, image, text, out, config_file, overrides, steps, device, precision, resume, as_json,
               no_progress):
    """Train a ShareLock head (MLP on frozen text features, contrastive against frozen image
    features) streaming both from the store; no image decoding, no backbone in the step.
    Ctrl-C saves a checkpoint at the step in progress: continue with the same command and --resume."""
    from featstore.trainers.train_head import train_head as run

    s = run(store_path, image, text, out, config_file=config_file, overrides=list(overrides), steps=steps,
            device=device, precision=precision, resume=resume, progress=not (as_json or no_progress))
    _print_train_summary(s, as_json)


@main.command("train-uta")
@STORE
@click.option("--teacher", required=True, help="Teacher feature set (extracted with --tokens).")
@click.option("--pixels", default=None, help="Crops stored with the teacher (extract --pixels); not needed with --student-input.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoints, metrics, curves).")
@click.option("--student", type=click.Choice(["tiny", "small", "base"]), default=None, help="Student size (default: config, tiny).")
@click.option("--student-input", default=None, help="Light mode: this feature set's tokens instead of pixels (same crop).")
@click.option("--mask-ratio", type=float, default=None, help="Fraction of positions masked (default: config, 0.5).")
@_with(CONFIG)
@_friendly
def train_uta(store_path, teacher, pixels, out, student, student_input, mask_ratio, config_file, overrides, steps,
              device, precision, resume, as_json, no_progress):
    """Train a UTA student: a ViT whose unmasked tokens match the stored teacher tokens at the same
    positions (reversed masking by default), reading stored crops: no decoding, no teacher in the step."""
    from featstore.trainers.train_uta import train_uta as run

    s = run(store_path, teacher, pixels, out, student=student, student_input=student_input, mask_ratio=mask_ratio,
            steps=steps, config_file=config_file, overrides=list(overrides), device=device, precision=precision,
            resume=resume, progress=not (as_json or no_progress))
    _print_train_summary(s, as_json)
    if not as_json and not s.get("rank"):
        st = s["student"]
        click.echo(f"  student {st['preset']} {st['width']}x{st['depth']} ({st['heads']} heads, {st['mlp']} MLP"
                   f"{', sub-LN' if st['sub_ln'] else ''}{', RoPE' if st['rope'] else ''}, drop path {st['drop_path']:g}),"
                   f" {st['input']} input, grid {st['grid']}x{st['grid']} (patch {st['patch_size']}), teacher grid "
                   f"{st['teacher_grid'][0]}x{st['teacher_grid'][1]}"
                   + (f" resized {st['grid_interpolation']}" if st["grid_interpolation"] else ""))


@main.command("eval")
@click.option("--checkpoint", "checkpoint_dir", required=True, type=click.Path(exists=True, file_okay=False), help="A train-head or train-uta run directory, or an imported ShareLock checkpoint.")
@STORE
@click.option("--classes", help="Class names: a built-in curated list (imagenet1k, cifar10, cifar100) or a file, one name per line (default: the store's label names).")
@click.option("--label-field", default=None, help="Sample field with class indices, names in its attrs (default: label, when the store has one).")
@click.option("--templates", default=None, help="Prompt templates: imagenet1k/openai (80), cifar10, cifar100, sharelock, simple, or a file (default: the class list's CLIP_benchmark templates, else the 80 OpenAI ones).")
@click.option("--split", is_flag=True, help="Evaluate only the rows the training run held out (default: every row, as CLIP_benchmark).")
@click.option("--all", "all_rows", is_flag=True, help="Every row of the store (the default; kept for old scripts).")
@click.option("--text", default=None, help="Text feature set(s) holding the captions for retrieval, comma-separated (default: the ones trained on).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--confusion", "plot_path", type=click.Path(dir_okay=False), help="Write a confusion-matrix PNG (up to 50 classes).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_friendly
def eval_(checkpoint_dir, store_path, classes, label_field, templates, split, all_rows, text, device, plot_path, as_json):
    """CLIP_benchmark's protocol: zero-shot classification (acc1, acc5, mean per-class recall; prompts
    through the checkpoint's text backbone, cached in the store, or in $XDG_CACHE_HOME/featstore
    when the store cannot be written) and image<->text retrieval
    (recall@1/5/10, several captions per image), on every row of the store.  A train-uta run:
    alignment and zero-shot of the student's CLS beside the teacher's (prompts by the teacher's
    text tower)."""
    from featstore.trainers.uta import is_uta_checkpoint

    if is_uta_checkpoint(checkpoint_dir):
        from featstore.trainers.evaluate_uta import evaluate_uta, format_result

        r = evaluate_uta(checkpoint_dir, store_path, classes_file=classes, label_field=label_field, text=text,
                         templates=templates, all_rows=not split, device=device, plot_path=plot_path)
        click.echo(json.dumps(r, indent=1, default=str) if as_json else format_result(r))
        return
    from featstore.trainers.evaluate import evaluate

    r = evaluate(checkpoint_dir, store_path, classes=classes, label_field=label_field, templates=templates,
                 split=split, all_rows=all_rows or None, text=text, device=device, plot_path=plot_path)
    if as_json:
        _echo_json(r)
        return
    click.echo(f"checkpoint {r['checkpoint']} (step {r['step']}) on {r['store']} [{r['split']} rows]")
    zs = r.get("zero_shot")
    if zs:
        click.echo(f"  zero-shot over {zs['classes']} classes ({zs['class_names']}) on {zs['rows']:,} images, "
                   f"{zs['n_templates']} templates ({zs['templates']}): acc1 {100 * zs['acc1']:.2f}%  "
                   f"acc5 {100 * zs['acc5']:.2f}%  mean per-class recall {100 * zs['mean_per_class_recall']:.2f}%  "
                   f"(chance {100 * zs['chance']:.2f}%)")
        if zs.get("confusion_png"):
            click.echo(f"  confusion matrix: {zs['confusion_png']}")
    rt = r.get("retrieval")
    if rt:
        def recalls(kind):
            return "/".join(f"{100 * rt[kind + '_retrieval_recall@' + str(k)]:.1f}" for k in (1, 5, 10))

        click.echo(f"  retrieval on {rt['images']:,} images / {rt['texts']:,} captions: image_retrieval (text->image) "
                   f"R@1/5/10 {recalls('image')}%  text_retrieval (image->text) {recalls('text')}%")
    for note in r.get("notes", []):
        click.echo(f"  note: {note}")


@main.command("import-sharelock")
@click.argument("ckpt", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the featstore checkpoint.")
@click.option("--store", "store_path", help="A store whose feature sets the heads will read (records their identities).")
@click.option("--image", help="Image feature set of --store (extracted with --backbone dinov2 for the official checkpoints).")
@click.option("--text", help="Text feature set of --store, or a text backbone (llama3-8b, or a path) when the store has no captions.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@_friendly
def import_sharelock(ckpt, out, store_path, image, text, as_json):
    """Convert an official ShareLock Lightning checkpoint (ShareLock-CC3M.ckpt, ShareLock-CC12M.ckpt)
    into a featstore checkpoint for `featstore eval` and ShareLock.load; loaded with
    torch.load(weights_only=True) and an explicit allow-list (omegaconf is not needed)."""
    from featstore.trainers.import_sharelock import import_sharelock as run

    s = run(ckpt, out, store=store_path, image=image, text=text)
    if as_json:
        _echo_json(s)
        return
    click.echo(f"imported {ckpt} (step {s['step']}, {s['params']:,} parameters) -> {s['out_dir']}")
    official = s["backbones"]
    click.echo(f"  official backbones: vision {official.get('vision')}, language {official.get('language')}")
    for role in ("image", "text"):
        fs = s[role]
        if fs["identity"] is None:
            click.echo(f"  {role}: {fs['dim']}-d features, no identity recorded (pass --store S --image NAME --text NAME for eval)")
        else:
            click.echo(f"  {role}: '{fs['name']}' ({fs['identity'].get('model')}, {fs['dim']}-d)")


@main.command()
@STORE
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG of norm histograms and coverage.")
@_friendly
def inspect(store_path, as_json, plot_path):
    """Show rows, blocks, feature sets, coverage, failures by reason, bytes and identities."""
    from featstore import inspect as insp
    from featstore.store import Store

    store = Store.open(store_path)
    summary = insp.summarize(store)
    if plot_path:
        summary["plot"] = insp.plot(store, plot_path)
    if as_json:
        _echo_json(summary)
    else:
        click.echo(insp.format_summary(summary))
        if plot_path:
            click.echo(f"plot    {plot_path}")


@main.command()
@STORE
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_friendly
def verify(store_path, as_json):
    """Check markers against data (checksums), uid uniqueness, NaN/inf and attrs; exit 1 on problems."""
    from featstore.store import Store
    from featstore.verify import verify as run_verify

    result = run_verify(Store.open(store_path))
    if as_json:
        _echo_json(result)
    else:
        for note in result["notes"]:
            click.echo(f"note: {note}")
        for p in result["problems"]:
            click.echo(f"PROBLEM: {p}")
        click.echo(("ok" if result["ok"] else f"{len(result['problems'])} problem(s)") + f" ({result['checked_blocks']} blocks checked)")
    sys.exit(0 if result["ok"] else 1)


@main.command()
@STORE
@click.option("--name", required=True, help="The feature set to remove (with its pixels, markers and cached prompts).")
@_friendly
def rm(store_path, name):
    """Remove a feature set, its pixels, its block markers and its cached prompt features (prompts/NAME)."""
    from featstore.store import Store

    Store.open(store_path, mode="r+").remove_feature_set(name)
    click.echo(f"removed features/{name} from {store_path}")


@main.command()
@STORE
@click.option("--name", required=True, help="The feature set to export.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file: .npy (+ .uids.txt) or .parquet.")
@click.option("--array", default="pooled", show_default=True, help="Which array of the feature set (int8 tokens are written dequantized, float32).")
@click.option("--view", type=int, default=None, help="A feature set with stored views: export view K only (default: every view, a view axis after row).")
@_friendly
def export(store_path, name, out, array, view):
    """Export a feature set's valid rows with their uids, as npy or parquet."""
    from featstore.export import export as run_export
    from featstore.store import Store

    result = run_export(Store.open(store_path), name, out, array, view=view)
    click.echo(f"exported {result['rows']:,} rows {tuple(result['shape'])} -> {', '.join(result['files'])}")


if __name__ == "__main__":
    main()
