"""The `featstore` command: each subcommand parses, calls one library function, prints.

Errors a user can cause end in one line on stderr and exit code 2 (1 for `verify` finding
problems); `--debug` shows the full traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

from featstore.errors import FeatstoreError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _friendly(fn):
    """Turn FeatstoreError (and a few built-ins users cause) into one line unless --debug."""

    @click.option("--debug", is_flag=True, help="Show full tracebacks.")
    @functools.wraps(fn)
    def wrapper(*args, debug=False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (FeatstoreError, PermissionError) as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: finished blocks are kept; re-run the same command to continue", err=True)
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
                     processes=processes, threads=threads, samples_per_shard=samples_per_shard,
                     extra_img2dataset_kwargs={"save_additional_columns": list(keep_cols)} if keep_cols else None)
    if as_json:
        _echo_json(s)
        return
    click.echo(f"downloaded {s['successes']:,} images into {s.get('shards', '?')} shards in {s['out_dir']}"
               f" ({s['failed']:,} failed, {s.get('duration_s', 0):.1f}s)")
    for reason, count in list(s.get("failures_by_reason", {}).items())[:10]:
        click.echo(f"  {count:>7,} {reason}")


@main.command()
@STORE
@click.option("--source", "source_path", required=True, help="Webdataset shard dir, HF dataset dir, parquet, or image folder.")
@click.option("--source-type", type=click.Choice(["auto", "webdataset", "hf", "folder"]), default="auto", show_default=True)
@click.option("--captions", type=click.Path(exists=True, dir_okay=False), help="Image folder: JSON of uid -> caption.")
@click.option("--uid-field", help="Webdataset json field / HF column holding the uid (default: json 'uid' if present).")
@click.option("--image-column", help="HF dataset: image column.")
@click.option("--text-column", help="HF dataset: caption column.")
@click.option("--label-column", help="HF dataset column / webdataset json field holding a class label.")
@click.option("--rows-per-shard", type=int, help=f"Rows per shard when creating the store (default {4096}); an existing store keeps its own.")
@click.option("--backbone", required=True, help="Alias (dinov2-small, clip-vit-b16, efficientnet-lite0, minilm, ...) or a local model path.")
@click.option("--name", help="Feature set name (default: the alias, or the path's base name).")
@click.option("--field", type=click.Choice(["image", "caption"]), default="image", show_default=True, help="What to encode.")
@click.option("--pooling", type=click.Choice(["cls", "mean", "last"]), help="Pooling for generic models.")
@click.option("--layer", type=int, help="Take features from this hidden layer.")
@click.option("--tokens", is_flag=True, help="Also store patch tokens (N, T, D).")
@click.option("--token-dtype", type=click.Choice(["float16", "int8"]), default="float16", show_default=True)
@click.option("--pixels", help="Also store the exact preprocessed crops as uint8 under pixels/NAME.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:K.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True, help="Autocast precision of the forward pass.")
@click.option("--num-workers", default=0, show_default=True, help="Decode processes (0: one decode thread).")
@click.option("--workers", type=int, help="Run on a local Dask cluster of N workers (one per GPU with cuda).")
@click.option("--scheduler", help="Run on an existing Dask cluster at this address (tcp://HOST:PORT).")
@click.option("--overwrite", is_flag=True, help="Recompute the feature set from scratch.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model's repository.")
@click.option("--json", "as_json", is_flag=True, help="Print the end summary as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@_friendly
def extract(store_path, source_path, as_json, no_progress, **options):
    """Run one backbone over a source and store its features, one row block at a time.

    Resumable: a re-run skips finished blocks.  Bad samples are recorded and skipped."""
    from featstore.pipelines.extract import extract as run_extract, format_summary

    log = (lambda msg: click.echo(msg, err=True)) if as_json else click.echo
    s = run_extract(store_path, source_path, options.pop("backbone"), progress=not no_progress, log=log, **options)
    click.echo(json.dumps(s, indent=1) if as_json else format_summary(s))


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
@click.option("--name", required=True, help="The feature set to remove (with its pixels and markers).")
@_friendly
def rm(store_path, name):
    """Remove a feature set."""
    from featstore.store import Store

    Store.open(store_path, mode="r+").remove_feature_set(name)
    click.echo(f"removed features/{name} from {store_path}")


@main.command()
@STORE
@click.option("--name", required=True, help="The feature set to export.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output file: .npy (+ .uids.txt) or .parquet.")
@click.option("--array", default="pooled", show_default=True, help="Which array of the feature set.")
@_friendly
def export(store_path, name, out, array):
    """Export a feature set's valid rows with their uids, as npy or parquet."""
    from featstore.export import export as run_export
    from featstore.store import Store

    result = run_export(Store.open(store_path), name, out, array)
    click.echo(f"exported {result['rows']:,} rows {tuple(result['shape'])} -> {', '.join(result['files'])}")


if __name__ == "__main__":
    main()
