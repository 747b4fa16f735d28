"""The `featstore` command: each subcommand parses, calls one library function, prints.

Errors a user can cause end in one line on stderr and exit code 2 (1 for `verify` finding
problems; a line per differing key follows where two identities or settings differ); `--debug`
shows the full traceback instead.  Ctrl-C ends with one line saying how to continue, exit 130.

Only click and the light `choices` module are imported at start-up (`featstore --help` stays
fast); each command imports its library function when it runs.  The trainers' commands are
defined in trainers/commands.py and added to the group here.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from featstore.errors import FeatstoreError, Interrupted
from featstore.pipelines.search_commands import add_commands as add_search_commands
from featstore.trainers.commands import add_commands

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
@click.option("--no-token-projection", "token_projection", flag_value=False, default=True, help="CLIP / EVA-CLIP with --tokens: keep the trunk's raw patch tokens (1024-d for ViT-L/14, UTA-B's targets) instead of projecting them into the joint space.")
@click.option("--token-dtype", type=click.Choice(_TOKEN_DTYPES), default="float16", show_default=True)
@click.option("--dtype", type=click.Choice(_POOLED_DTYPES), default=None, help="Storage dtype of the pooled features [default: the stored feature set's; else float32 for llama3-8b (ShareLock keeps its LLM features in fp32), float16 otherwise].")
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
    """Convert a store of an older format in place: format 1 -> 2 (sources, dimension names,
    row-level markers), 2 -> 3 (samples re-sharded, the on-disk uid index built).  Rows and
    features are unchanged."""
    from featstore.tools.upgrade import upgrade as run_upgrade

    r = run_upgrade(store_path)
    click.echo(f"{store_path}: format {r['from']} -> {r['to']}; {r['sources']} sources recorded, "
               f"{r['markers']} markers converted, {r['arrays']} arrays given dimension names, "
               f"{r.get('resharded', 0)} sample arrays re-sharded, {r.get('indexed', 0):,} uids indexed")


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


# the trainers' commands (train-head, train-uta, eval, import-sharelock) live with the trainers
add_commands(main, friendly=_friendly, store=STORE, echo_json=_echo_json)


@main.command()
@STORE
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG of norm histograms and coverage.")
@click.option("--plots", "set_plots", is_flag=True,
              help="Write each feature set's summary plots (norms, PCA, per-dimension statistics of a 5,000-row "
                   "sample) to <store>/plots/<set>/, where `featstore serve` shows them.")
@_friendly
def inspect(store_path, as_json, plot_path, set_plots):
    """Show rows, blocks, feature sets, coverage, failures by reason, bytes and identities."""
    from featstore.core.files import is_url
    from featstore.tools import inspect as insp
    from featstore.store import Store

    store = Store.open(store_path)
    if set_plots and (is_url(store.path) or not os.access(store.path, os.W_OK)):
        raise click.UsageError(f"--plots writes into {store.path}/plots/, which is not a writable local folder here")
    summary = insp.summarize(store)
    if plot_path:
        summary["plot"] = insp.plot(store, plot_path)
    if set_plots:
        from featstore.tools.plots import write_plots

        summary["plots"] = {name: write_plots(store, name) for name in store.feature_set_names()}
    if as_json:
        _echo_json(summary)
    else:
        click.echo(insp.format_summary(summary))
        if plot_path:
            click.echo(f"plot    {plot_path}")
        for name, p in summary.get("plots", {}).items():
            click.echo(f"plots   {name}: " + (", ".join(p["files"]) + f" ({p['rows']:,} rows sampled)" if p["files"]
                                              else "no usable rows, no plots"))


@main.command()
@STORE
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_friendly
def verify(store_path, as_json):
    """Check markers against data (checksums), uid uniqueness, NaN/inf and attrs; exit 1 on problems."""
    from featstore.store import Store
    from featstore.tools.verify import verify as run_verify

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
@click.option("--name", required=True, help="The feature set to remove (with its pixels, markers, cached prompts and index).")
@_friendly
def rm(store_path, name):
    """Remove a feature set, its pixels, its block markers, its cached prompt features (prompts/NAME)
    and its nearest-neighbour index (indexes/NAME)."""
    import shutil

    from featstore.core import format as fmt
    from featstore.core.files import is_url
    from featstore.store import Store

    store = Store.open(store_path, mode="r+")
    store.remove_feature_set(name)
    folder = None if is_url(store.path) else os.path.join(store.path, fmt.INDEXES, name)
    if folder and os.path.isdir(folder):
        if os.path.exists(os.path.join(folder, "meta.json")):
            os.remove(os.path.join(folder, "meta.json"))
        shutil.rmtree(folder)  # the commit (meta.json) first: a folder without it holds no index
        click.echo(f"removed features/{name} and its index {fmt.INDEXES}/{name} from {store_path}")
    else:
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
    from featstore.tools.export import export as run_export
    from featstore.store import Store

    result = run_export(Store.open(store_path), name, out, array, view=view)
    click.echo(f"exported {result['rows']:,} rows {tuple(result['shape'])} -> {', '.join(result['files'])}")


def _text_tower(*args, **kwargs):
    """UTA's text tower of a CLIP-like image backbone (imported only when a query needs it)."""
    from featstore.trainers.uta.teacher import text_tower

    return text_tower(*args, **kwargs)


def _load_head(run_dir, device):
    """A trained ShareLock head (`featstore query --checkpoint RUN`)."""
    from featstore.trainers.sharelock.model import ShareLock

    return ShareLock.load(run_dir, device=device)


add_search_commands(main, friendly=_friendly, store=STORE, echo_json=_echo_json, text_tower=_text_tower,
                    load_head=_load_head)


if __name__ == "__main__":
    main()
