"""The trainers' commands: `featstore train-head`, `train-uta`, `eval` and `import-sharelock`.

cli.py (the `featstore` command) adds them to its group with its own helpers, so this module needs
only click at import time (`featstore --help` stays light) and never imports the command:

    add_commands(main, friendly=_friendly, store=STORE, echo_json=_echo_json)
"""

from __future__ import annotations

import json

import click


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
    """Apply a list of click options (shared by train-head and train-uta)."""
    def deco(fn):
        for opt in reversed(options):
            fn = opt(fn)
        return fn

    return deco


def _print_train_summary(s: dict, as_json: bool) -> None:
    if s.get("rank"):  # under torchrun only rank 0 reports
        return
    if as_json:
        click.echo(json.dumps(s, indent=1, default=str))
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


def add_commands(main: click.Group, *, friendly, store, echo_json) -> None:
    """Add the trainers' commands to `main`; `friendly` turns featstore errors into one line,
    `store` is the --store option, `echo_json` prints a summary as JSON."""
    @main.command("train-head")
    @store
    @click.option("--image", required=True, help="Image feature set name.")
    @click.option("--text", required=True, help="Text feature set name, or several comma-separated (e.g. caption sets of one LLM): each row draws one per step.")
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoints, metrics, curves).")
    @_with(CONFIG)
    @friendly
    def train_head(store_path, image, text, out, config_file, overrides, steps, device, precision, resume, as_json,
                   no_progress):
        """Train a ShareLock head (MLP on frozen text features, contrastive against frozen image
        features) streaming both from the store; no image decoding, no backbone in the step.
        Ctrl-C saves a checkpoint at the step in progress: continue with the same command and --resume."""
        from featstore.trainers.sharelock.train import train_head as run

        s = run(store_path, image, text, out, config_file=config_file, overrides=list(overrides), steps=steps,
                device=device, precision=precision, resume=resume, progress=not (as_json or no_progress))
        _print_train_summary(s, as_json)

    @main.command("train-uta")
    @store
    @click.option("--teacher", required=True, help="Teacher feature set (extracted with --tokens).")
    @click.option("--pixels", default=None, help="Crops stored with the teacher (extract --pixels); not needed with --student-input.")
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoints, metrics, curves).")
    @click.option("--student", type=click.Choice(["tiny", "small", "base"]), default=None, help="Student size (default: config, tiny).")
    @click.option("--student-input", default=None, help="Light mode: this feature set's tokens instead of pixels (same crop).")
    @click.option("--mask-ratio", type=float, default=None, help="Fraction of positions masked (default: config, 0.5).")
    @_with(CONFIG)
    @friendly
    def train_uta(store_path, teacher, pixels, out, student, student_input, mask_ratio, config_file, overrides, steps,
                  device, precision, resume, as_json, no_progress):
        """Train a UTA student: a ViT whose unmasked tokens match the stored teacher tokens at the same
        positions (reversed masking by default), reading stored crops: no decoding, no teacher in the step."""
        from featstore.trainers.uta.train import train_uta as run

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
    @store
    @click.option("--classes", help="Class names: a built-in curated list (imagenet1k, cifar10, cifar100) or a file, one name per line (default: the store's label names).")
    @click.option("--label-field", default=None, help="Sample field with class indices, names in its attrs (default: label, when the store has one).")
    @click.option("--templates", default=None, help="Prompt templates: imagenet1k/openai (80), cifar10, cifar100, sharelock, simple, or a file (default: the class list's CLIP_benchmark templates, else the 80 OpenAI ones).")
    @click.option("--split", is_flag=True, help="Evaluate only the rows the training run held out (default: every row, as CLIP_benchmark).")
    @click.option("--all", "all_rows", is_flag=True, help="Every row of the store (the default; kept for old scripts).")
    @click.option("--text", default=None, help="Text feature set(s) holding the captions for retrieval, comma-separated (default: the ones trained on).")
    @click.option("--device", default="cpu", show_default=True)
    @click.option("--confusion", "plot_path", type=click.Path(dir_okay=False), help="Write a confusion-matrix PNG (up to 50 classes).")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @friendly
    def eval_(checkpoint_dir, store_path, classes, label_field, templates, split, all_rows, text, device, plot_path, as_json):
        """CLIP_benchmark's protocol: zero-shot classification (acc1, acc5, mean per-class recall; prompts
        through the checkpoint's text backbone, cached in the store, or in $XDG_CACHE_HOME/featstore
        when the store cannot be written) and image<->text retrieval
        (recall@1/5/10, several captions per image), on every row of the store.  A train-uta run:
        alignment and zero-shot of the student's CLS beside the teacher's (prompts by the teacher's
        text tower)."""
        from featstore.trainers.uta.checkpoint_format import is_uta_checkpoint

        if is_uta_checkpoint(checkpoint_dir):
            from featstore.trainers.uta.evaluate import evaluate_uta, format_result

            r = evaluate_uta(checkpoint_dir, store_path, classes_file=classes, label_field=label_field, text=text,
                             templates=templates, all_rows=not split, device=device, plot_path=plot_path)
            click.echo(json.dumps(r, indent=1, default=str) if as_json else format_result(r))
            return
        from featstore.trainers.sharelock.evaluate import evaluate

        r = evaluate(checkpoint_dir, store_path, classes=classes, label_field=label_field, templates=templates,
                     split=split, all_rows=all_rows or None, text=text, device=device, plot_path=plot_path)
        if as_json:
            echo_json(r)
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

    @main.command("eval-retrieval")
    @store
    @click.option("--image", required=True, help="Image feature set of a CLIP-like model (its image_embeds).")
    @click.option("--text", required=True, help="Caption feature set(s) of the same model, comma-separated: one caption per image each.")
    @click.option("--batch-size", default=4096, show_default=True, help="Rows read at a time.")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @friendly
    def eval_retrieval(store_path, image, text, batch_size, as_json):
        """CLIP_benchmark's retrieval on stored features, no head: image->text and text->image
        recall@1/5/10 (several captions per image = several caption sets) for feature sets of one
        model's two towers (refused otherwise)."""
        from featstore.trainers.retrieval import format_result, stored_retrieval

        r = stored_retrieval(store_path, image, text, batch_size=batch_size)
        if as_json:
            echo_json(r)
            return
        for note in r.get("notes", []):
            click.echo(f"note: {note}")
        click.echo(format_result(r))

    @main.command("import-sharelock")
    @click.argument("ckpt", type=click.Path(exists=True, dir_okay=False))
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for the featstore checkpoint.")
    @click.option("--store", "store_path", help="A store whose feature sets the heads will read (records their identities).")
    @click.option("--image", help="Image feature set of --store (extracted with --backbone dinov2 for the official checkpoints).")
    @click.option("--text", help="Text feature set of --store, or a text backbone (llama3-8b, or a path) when the store has no captions.")
    @click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
    @friendly
    def import_sharelock(ckpt, out, store_path, image, text, as_json):
        """Convert an official ShareLock Lightning checkpoint (ShareLock-CC3M.ckpt, ShareLock-CC12M.ckpt)
        into a featstore checkpoint for `featstore eval` and ShareLock.load; loaded with
        torch.load(weights_only=True) and an explicit allow-list (omegaconf is not needed)."""
        from featstore.trainers.sharelock.import_official import import_sharelock as run

        s = run(ckpt, out, store=store_path, image=image, text=text)
        if as_json:
            echo_json(s)
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
