"""The search commands: `featstore index`, `dedup`, `query` and `serve`.

cli.py (the `featstore` command) adds them to its group with its own helpers; pipelines/ may not
import trainers/, so the two things a query may need from there come in as functions:
`text_tower` (UTA's: the paired text tower of a CLIP-like image backbone) and `load_head`
(a trained ShareLock head, `--checkpoint RUN`).  Only click is imported at start-up.

    add_commands(main, friendly=_friendly, store=STORE, echo_json=_echo_json, text_tower=..., load_head=...)
"""

from __future__ import annotations

import os
import sys

import click


def add_commands(main: click.Group, *, friendly, store, echo_json, text_tower, load_head) -> None:
    """Define the search commands on `main`."""

    @main.command()
    @store
    @click.option("--features", "name", required=True, help="The feature set to index (its pooled features).")
    @click.option("--kind", type=click.Choice(["auto", "flat", "ivf", "ivfpq"]), default="auto", show_default=True,
                  help="flat: exact (auto below 200,000 rows); ivf / ivfpq: FAISS inverted lists (+ product quantization).")
    @click.option("--memory-mb", type=float, help="Memory the index may take (auto picks ivfpq when ivf would not fit; default 4096).")
    @click.option("--target-recall", type=click.FloatRange(0, 1), default=0.95, show_default=True,
                  help="ivf/ivfpq: probe the fewest lists measured (on 256 of the store's rows) to reach this recall@10.")
    @click.option("--rebuild", is_flag=True, help="Build afresh instead of extending the existing index (needed after the feature set was recomputed).")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @click.option("--no-progress", is_flag=True, help="No progress bar.")
    @friendly
    def index(store_path, name, kind, memory_mb, target_recall, rebuild, as_json, no_progress):
        """Build a nearest-neighbour index (FAISS, cosine) over a feature set's done, valid rows, kept
        in the store under indexes/NAME/ (a feature set with stored views: view 0).  Run it again after
        the store grows: only the new rows are added (an ivf/ivfpq that outgrew its training 4x, or
        --rebuild, builds afresh)."""
        from featstore.pipelines.search import build_index, format_built

        meta = build_index(store_path, name, kind=kind, memory_mb=memory_mb, progress=not no_progress and not as_json,
                           extend=not rebuild, target_recall=target_recall)
        if as_json:
            echo_json(meta)
            return
        for note in meta.get("notes", []):
            click.echo(f"note: {note}")
        view = f"; view 0 of {meta.get('views', 'its')} stored views" if meta.get("view") is not None else ""
        if meta.get("mode") == "extended":
            click.echo(f"extended the {meta['kind']} index of '{name}' by {meta['rows_added']:,} rows ({meta['blocks_read']} "
                       f"blocks read) to {meta['rows_indexed']:,} rows{view} in {meta['seconds']:.1f}s -> {meta['path']}")
        elif meta.get("mode") == "unchanged":
            click.echo(format_built(meta) + "; up to date, nothing added" + view)
        else:
            click.echo(format_built(meta) + view)


    @main.command()
    @store
    @click.option("--features", "name", help="Also find near duplicates: cosine of this feature set's pooled features "
                  "(uses its `featstore index` when current, else a flat index; the record is dedup/NAME/).")
    @click.option("--threshold", type=float, default=0.95, show_default=True, help="Cosine at or above which two rows are near duplicates.")
    @click.option("--exact/--no-exact", default=True, show_default=True, help="Group rows whose source bytes are identical "
                  "(blake2b of each row's raw bytes, read from its recorded source) first.")
    @click.option("--memory-mb", type=float, help="Memory for sorting the content hashes (default 1024).")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @click.option("--no-progress", is_flag=True, help="No progress bar.")
    @friendly
    def dedup(store_path, name, threshold, exact, memory_mb, as_json, no_progress):
        """Find exact and near duplicates across sources and record them per row under dedup/NAME/ (NAME: the
        feature set, or `exact`); train without them via `Loader(..., rows=keep_rows(store, NAME))`.  Re-run after growth."""
        from featstore.pipelines.dedup import format_result, run_dedup

        r = run_dedup(store_path, name, threshold=threshold, exact=exact, memory_mb=memory_mb,
                      progress=not no_progress and not as_json)
        if as_json:
            echo_json(r)
            return
        click.echo(format_result(r))


    @main.command()
    @store
    @click.option("--features", "name", required=True, help="The indexed feature set.")
    @click.option("--uid", help="Query with this sample's own stored vector.")
    @click.option("--text", help="Query with this text: encoded by a caption set's backbone, or by the paired text tower "
                                 "of an image set's CLIP/SigLIP/EVA-CLIP checkpoint (or the --checkpoint head's).")
    @click.option("--image", "image", type=click.Path(dir_okay=False),
                  help="Query with this image file: preprocessed and encoded exactly as extract did for the feature set.")
    @click.option("--checkpoint", "checkpoint", type=click.Path(file_okay=False),
                  help="A trained ShareLock run (train-head): search in its head's space (exact, block by block, no index).")
    @click.option("-k", "k", type=int, default=10, show_default=True, help="Neighbours to return.")
    @click.option("--nprobe", type=int, help="ivf/ivfpq: inverted lists to probe (default: the index's).")
    @click.option("--device", default="cpu", show_default=True, help="Device of the backbone encoding --text / --image.")
    @click.option("--json", "as_json", is_flag=True, help="Print the hits as JSON.")
    @friendly
    def query(store_path, name, uid, text, image, checkpoint, k, nprobe, device, as_json):
        """The K nearest rows of a feature set to a stored sample (--uid), a text (--text) or an image
        (--image), from its index (`featstore index`), or with --checkpoint RUN in a ShareLock head's
        space: rank, cosine score, row, uid and caption."""
        from featstore.errors import ConfigError
        from featstore.pipelines.search import format_hits, query as run_query
        if sum(x is not None for x in (uid, text, image)) != 1:
            raise ConfigError("give exactly one of --uid, --text or --image")
        head = None
        if checkpoint is not None:
            head = load_head(checkpoint, device)
        hits = run_query(store_path, name, uid=uid, text=text, image=image, k=k, nprobe=nprobe, device=device, head=head,
                         text_tower=text_tower)
        if as_json:
            echo_json(hits)
        else:
            click.echo(format_hits(hits))
            click.echo(f"{len(hits)} hit(s) for the {'uid' if uid is not None else 'text' if text is not None else 'image'}"
                       f" query in '{name}'" + (f" (ShareLock head {checkpoint})" if head is not None else ""))


    @main.command()
    @store
    @click.option("--features", "name", help="The feature set queried by default (default: the first indexed one).")
    @click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (anything but loopback is reachable by others: a warning says so).")
    @click.option("--port", type=int, default=0, show_default=True, help="Port to listen on (0: a free one, printed).")
    @friendly
    def serve(store_path, name, host, port):
        """A small local, read-only web page over the store: type a query (text, or uid:UID) or drop an
        image, see the nearest rows with thumbnails, captions and uids; browse a feature set's summary
        plots (PNGs under STORE/plots/NAME/).  Serves until Ctrl-C."""
        from featstore.pipelines.serve import is_loopback, make_server

        import faulthandler
        import signal

        faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack: a hang diagnosed
        server = make_server(store_path, name, host=host, port=port, text_tower=text_tower)
        if not is_loopback(host):
            click.echo(f"warning: bound to {host}, not loopback: anyone who can reach this machine can read the store's "
                       "features, captions and images", err=True)
        click.echo(f"serving {server.url} (read-only; Ctrl-C to stop)")
        sys.stdout.flush()
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            server.server_close()
            click.echo("stopped serving (nothing was changed)", err=True)
            sys.stdout.flush()
            sys.stderr.flush()
            # read-only, nothing to save: do not wait on a handler thread still blocked in a browser's
            # keep-alive read or a backbone load (a fresh-clone CI run once hung here for 120 s)
            os._exit(0)
        server.server_close()
