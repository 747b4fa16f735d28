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
