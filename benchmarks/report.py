"""The README's "Measured" section, made from benchmarks/results/*.json, so README and results agree.

    python benchmarks/report.py            print the section
    python benchmarks/report.py --write    replace README.md's "## Measured" section with it
    python benchmarks/report.py --check    exit 1 when README.md's section differs (tests/test_benchmarks.py)

Every table names the device its results file was measured on, and every contender row says how
that contender was used (the settings its bench recorded).  Quick runs (*.quick.json) are never
reported.  Only the standard library is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
HEADING = "## Measured"
ORDER = ["store", "extract", "train", "uta", "scale", "gpu", "store.gpu", "train.gpu"]
INTRO = """\
Every benchmark runs its contenders side by side in one process and reports ratios, ours ÷ theirs
(higher is better for featstore); rounds are interleaved and figures are medians, because these
machines are shared and noisy: absolute rates drift, ratios measured together hold.

- `make bench` first installs bench_store's peers (`benchmarks/install_peers.py`: Lance and the S3
  server from the `bench` extra under constraints that hold every installed package at its version,
  litdata and mosaic streaming with `--no-deps`, since mosaic streaming pins numpy<2.2 and
  transformers<5 and both want torchvision; it fails if numpy, transformers, torch or featstore
  moved), then runs every `benchmarks/bench_*.py --quick`. `make test` needs none of the peers.
- `python benchmarks/bench_<name>.py` runs the full size and writes `benchmarks/results/<name>.json`
  (`--quick` writes `<name>.quick.json`, never reported).
- `benchmarks/gpu.sh` runs the GPU set on a machine with CUDA (`benchmarks/gpu_wheels.sh` fetches the
  wheels that machine lacks, to carry along); `gpu.sh --quick` checks it on CPU. Besides extraction, the
  read path and training, it times UTA's step with fresh crops (`bench_fresh_crops.py`: stored crop,
  resampled targets, and an EVA02-CLIP-B/16-shaped teacher run in the step) and, where open_clip and timm
  import, compares the EVA-CLIP port with open_clip. No GPU has run these yet.
- `python benchmarks/report.py --write` regenerates this section from the results files; each table
  names its device and how each contender was used."""

def num(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    out = f"{v:.3g}"
    return f"{v:.6g}" if out in ("1", "-1") else out  # 0.99997 stays 0.99997


def span(s: dict) -> str:
    """" (min–max)" of a figure's spread over rounds."""
    return f" ({num(s.get('min'))}–{num(s.get('max'))})"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(num(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(lines)


def esc(text: str) -> str:
    return text.replace("|", "\\|")


# ---- store ---------------------------------------------------------------------------------------
REMOTE = ("featstore_local", "featstore_remote", "s3_whole_objects", "litdata_remote", "mosaic_remote")


def render_store(d: dict) -> str:
    p, f, r, spread = d["params"], d["figures"], d["ratios"], d.get("spread", {})
    dims = " + ".join(f"{v}-d" for v in p["dims"].values())
    out = [f"{p['rows']:,} rows of {dims} {p['dtype']} features, batch {p['batch_size']}, rows sorted by "
           f"{p['classes']:,} classes; {p['warm_rounds']} warm / {p['cold_rounds']} cold rounds interleaved "
           f"(warm: files read just before; cold: dropped with posix_fadvise, checked with mincore); iteration "
           f"timed, DataLoader start-up included; median (min–max) samples/s; whole run {num(p.get('wall_seconds'))} s."]
    rows = []
    for name, c in p["contenders"].items():
        if name in REMOTE:
            continue
        warm, cold = f.get(f"{name}_samples_per_s"), f.get(f"{name}_cold_samples_per_s")
        s = spread.get(name)
        rng = span(s) if s and s["rounds"] > 1 else ""
        ours = name.startswith("featstore")
        rows.append([f"**{name}**" if ours else name, esc(c["settings"]), (num(warm) + rng) if warm else "–", num(cold),
                     "–" if ours else num(r.get(f"featstore_vs_{name}")),
                     "–" if ours else num(r.get(f"featstore_vs_{name}_cold"))])
    out.append(table(["contender", "how it is used", "warm samples/s", "cold samples/s", "featstore ÷ it, warm",
                      "featstore ÷ it, cold"], rows))
    extra = []
    if "featstore_reused_vs_memmap" in r:
        extra.append(f"`featstore_reused_vs_memmap` (later epochs of one Loader against the one-copy memmap): "
                     f"**{num(r['featstore_reused_vs_memmap'])}** warm, {num(r.get('featstore_reused_vs_memmap_cold'))} cold.")
    if "featstore_vs_memmap_steady" in r:
        extra.append(f"`featstore_vs_memmap` leaving out each epoch's first batch (steady state): "
                     f"**{num(r['featstore_vs_memmap_steady'])}**.")
    if "shuffle_quality" in r:
        eff = p["contenders"].get("featstore", {}).get("effective", {})
        at = f"window {num(eff['window_rows'])} rows, " if "window_rows" in eff else ""
        extra.append(f"`shuffle_quality` **{num(r['shuffle_quality'])}** (`Loader.shuffle_quality()`: per-batch label "
                     f"entropy over a full permutation's) at the Loader's default ({at}the featstore row: "
                     f"{num(f.get('shuffle_rate_samples_per_s'))} samples/s, `featstore_vs_memmap` "
                     f"{num(r.get('featstore_vs_memmap'))}); {num(f.get('shuffle_loader_classes_per_batch'))} classes per "
                     f"batch vs {num(f.get('shuffle_full_permutation_classes_per_batch'))} for a full permutation.")
    for name, why in p.get("unavailable", {}).items():
        extra.append(f"`{name}` could not run here: {why}.")
    if extra:
        out.append("\n".join(f"- {e}" for e in extra))
    remote = [n for n in REMOTE if f"{n}_samples_per_s" in f]
    if remote:
        later = any(f"{n}_later_samples_per_s" in f for n in remote)
        rows = [[n, esc(p["contenders"][n]["settings"]), num(f[f"{n}_samples_per_s"])]
                + ([num(f.get(f"{n}_later_samples_per_s"))] if later else []) for n in remote]
        out.append(f"Over S3 (moto's server on 127.0.0.1), {p['remote_rows']:,} rows, {p['remote_rounds']} rounds"
                   + ("; each contender's first epoch (fresh loader, local caches emptied: everything over S3) and a "
                      "later epoch (the same loader again, its cache as the first epoch left it)" if later else "") + ":")
        out.append(table(["contender", "how it is used", "first epoch samples/s"] + (["later epoch samples/s"] if later else []),
                         rows))
        keys = [k for k in r if k.startswith(("remote_vs_local", "featstore_remote_vs", "s3_whole_objects_vs"))]
        out.append("\n".join(f"- `{k}` **{num(r[k])}**" for k in keys))
    return "\n\n".join(out)


# ---- the others    return "\n\n".join(out)


# ---- the others ----------------------------------------------------------------------------------
def render_extract(d: dict) -> str:
    p, f, r, spread = d["params"], d["figures"], d["ratios"], d.get("spread", {})
    if "contenders" not in p:  # a results file from before the contenders were recorded
        return render_generic(d)
    out = [f"{p['model']}, {p['images']} JPEGs (320–640 px) in a webdataset tar, batch {p['batch']}, {p['precision']} "
           f"(the faster precision here, probed), {p['torch_threads']} torch threads; {p['captions']:,} captions "
           f"through {p['text_model']} ({p['caption_precision']}); {p['rounds']} interleaved rounds, median (min–max); "
           f"whole run {num(p.get('wall_seconds'))} s."]
    rows = []
    for name, how in p["contenders"].items():
        s = spread.get(name, {})
        rows.append([name, esc(how), num(f.get(f"{name}_images_per_s")) + span(s)])
    for name, key in (("one_caption", "one_caption_per_s"), ("batched", "batched_captions_per_s")):
        s = spread.get(name, {})
        how = ("one caption per forward pass (ShareLock's script)" if name == "one_caption"
               else f"featstore's length-sorted batches of {p['caption_batch']} through the extract job")
        rows.append([name, how, num(f.get(key)) + span(s)])
    for k in ("dask_1_workers_images_per_s", "dask_2_workers_images_per_s"):
        if k in f:
            rows.append([k.removesuffix("_images_per_s"), esc(p["dask"]), num(f[k])])
    out.append(table(["contender", "how", "images or captions /s"], rows))
    out.append(table(["ratio", "value"], [[f"`{k}`", v] for k, v in r.items()]))
    return "\n\n".join(out)


def render_train(d: dict) -> str:
    p, f, r, spread = d["params"], d["figures"], d["ratios"], d.get("spread", {})
    if "contenders" not in p:  # a results file from before the contenders were recorded
        return render_generic(d)
    out = [f"{p['rows']:,} rows of {p['image_dim']}-d + {p['text_dim']}-d float16 features, a ShareLock head of "
           f"{p['head_params'] / 1e6:.1f}M parameters ({p['hidden_dim']} hidden), batch {p['batch_size']}, "
           f"{p['torch_threads']} torch thread(s); {p['rounds']} alternating rounds, median (min–max); whole run "
           f"{num(p.get('wall_seconds'))} s."]
    keys = {"store": "store_steps_per_s", "preloaded": "preloaded_steps_per_s", "featstore": "featstore_samples_per_s",
            "sharelock_staged": "sharelock_staged_samples_per_s"}
    rows = []
    for name, how in p["contenders"].items():
        s_ = spread.get(name, {})
        unit = "steps/s" if keys[name].endswith("steps_per_s") else "samples/s"
        rows.append([name, esc(how), f"{num(f.get(keys[name]))} {unit}" + span(s_)])
    out.append(table(["contender", "how", "rate"], rows))
    out.append(table(["ratio", "value"], [[f"`{k}`", v] for k, v in r.items()]))
    return "\n\n".join(out)


def render_uta(d: dict) -> str:
    p, f, r = d["params"], d["figures"], d["ratios"]
    if "layouts" not in p:  # a results file from before the layouts were recorded
        return render_generic(d)
    t, dim = p["token_shape"]
    out = [f"Teacher tokens {t} x {dim} (CLIP ViT-B/16's joint-space patch tokens), {p['token_rows']:,} rows, "
           f"{p['rows_per_shard']} rows per shard, batch {p['batch_size']}, {esc(p['loader']['settings'])} (window "
           f"{num(p['loader']['window_rows'])} rows); memmap: {esc(p['memmap'])}; {p['warm_rounds']} warm / "
           f"{p['cold_rounds']} cold rounds interleaved; whole run {num(p.get('wall_seconds'))} s. MB/s of stored bytes:"]
    rows = []
    for label, sfx in (("float16", ""), ("int8", "_int8")):
        rows.append([label, esc(p["layouts"][label]), num(f.get(f"featstore{sfx}_mb_per_s")), num(f.get(f"memmap{sfx}_mb_per_s")),
                     num(r.get(f"featstore_vs_memmap{sfx}")), num(f.get(f"featstore{sfx}_cold_mb_per_s")),
                     num(f.get(f"memmap{sfx}_cold_mb_per_s")), num(r.get(f"featstore_vs_memmap{sfx}_cold"))])
    out.append(table(["tokens", "layout", "featstore warm", "memmap warm", "ratio warm", "featstore cold", "memmap cold",
                      "ratio cold"], rows))
    rows = []
    for label, st in p["students"].items():
        sfx = "" if label == "vit-ti" else f"_{label}"
        rows.append([label, f"{st['width']} wide x {st['depth']} ({st['params'] / 1e6:.2f}M params, {st['mlp']}, rope "
                            f"{str(st['rope']).lower()}), cls_weight {num(st['cls_weight'])}, teacher tokens "
                            f"{st['teacher_tokens']}, {st['image']} px /{st['patch']}, batch {st['batch']}",
                     num(f.get(f"store_steps_per_s{sfx}")), num(f.get(f"preloaded_steps_per_s{sfx}")),
                     num(r.get(f"store_vs_preloaded{sfx}"))])
    out.append(f"Student steps/s: train-uta's step fed by {esc(p['student_loader'])} vs preloaded in-RAM tensors:")
    out.append(table(["student", "settings", "store steps/s", "preloaded steps/s", "store ÷ preloaded"], rows))
    fid = p["int8_fidelity"]
    out.append(f"int8 ({fid.get('scaling')} scaling, as extraction writes it) vs float16 on real tokens "
               f"(EfficientNet-Lite0 {fid['token_shape'][0]}x{fid['token_shape'][1]}, {fid['images']} real images): mean "
               f"cosine {num(f.get('int8_cos_mean'))}, worst {num(f.get('int8_cos_min'))}, 0.1th percentile "
               f"{num(f.get('int8_cos_p001'))}, mean relative L2 error {num(f.get('int8_rel_l2_mean'))}; per-token "
               f"scaling of the same tokens: mean {num(fid.get('per_token_cos_mean'))}, worst "
               f"{num(fid.get('per_token_cos_min'))}; {fid['bytes_per_token_int8']} bytes per token vs "
               f"{fid['bytes_per_token_fp16']}.")
    return "\n\n".join(out)


SCALE_TARGETS = {"add_1000": (1.0, 256), "lookup_1000": (1.0, None), "loader_first": (10.0, 1024)}  # issue 18


def render_scale(d: dict) -> str:
    p, pts = d["params"], d["sizes"]
    out = [f"One store grown through `Store.register` ({esc(p['uids'])}, {p['rows_per_shard']:,} rows per shard, a "
           f"{esc(p['feature'])}); at each size {p['rounds']} fresh processes measure each operation: median seconds "
           f"(min–max), and memory above the interpreter: the process's own (RssAnon, sampled every 2 ms) and its "
           f"peak RSS (VmHWM: with the file pages it maps, page cache the kernel can drop). The Loader is "
           f"{esc(p['loader'])}."]
    rows = []
    for pt in pts:
        row = [f"{pt['rows'] / 1e6:,.0f}M"]
        for what in ("add_1000", "lookup_1000", "loader_first"):
            f = pt[what]
            row += [f"{num(f['seconds'])} ({num(f['spread_s'][0])}–{num(f['spread_s'][1])})",
                    f"{num(f.get('anon_above_mib'))} / {num(f['rss_above_mib'])}"]
        row.append(", ".join(f"{k} {v:,}" for k, v in pt["files"].items()))
        rows.append(row)
    out.append(table(["rows", "add 1,000 uids (s)", "its MiB own / peak", "open + look up 1,000 (s)", "its MiB own / peak",
                      "Loader rank 0/8 first batch (s)", "its MiB own / peak", "files"], rows))
    rows = []
    for what, label in (("add_1000", "add 1,000 uids"), ("lookup_1000", "open + look up 1,000 uids"),
                        ("loader_first", "Loader setup + first batch")):
        fit = d["fit"][what]
        ts, tm = SCALE_TARGETS[what]
        for key, unit, target in (("seconds", "s", f"≤ {num(ts)}"), ("anon_above_mib", "MiB own", f"≤ {tm}" if tm else "—"),
                                  ("rss_above_mib", "MiB peak", "—")):
            f = fit.get(key)
            if f is None:
                continue
            rows.append([label, unit, f"{f['per_million_rows'] * 1000:+.3g} per 1,000M" if unit != "s" else
                         f"{f['per_million_rows'] * 1000:+.3g} s per 1,000M", num(f["at_1_28B"]),
                         f"{num(f.get('per_doubling'))} per doubling", num(f.get("at_1_28B_log")), target])
    out.append(f"Each figure's least-squares line through the sizes measured, against rows and against log2(rows), "
               f"each extrapolated to {p['target_rows']:,} rows (DataComp-1B); the targets are issue 18's. The "
               "log line is the model of these structures (below); the line in rows is what a cost that follows "
               "the store's size would do, and overshoots any curve that flattens:")
    out.append(table(["operation", "figure", "slope in rows", "at 1.28B", "slope in log2(rows)", "at 1.28B (log)",
                      "target"], rows))
    g, c = d["registration"], d.get("concurrent")
    per = ", ".join(f"{x['to'] / 1e6:,.0f}M: {num(x['rows_per_s'])}" for x in d["growth"])
    line = (f"Registration while growing: {num(g['rows_per_s'])} rows/s over {sum(x['rows'] for x in d['growth']):,} "
            f"rows (rows/s of the growth reaching {per}).")
    blocks = [x for x in d["growth"] if x.get("feature_blocks")]
    if blocks:
        line += (" A block write with its marker, pointer and summary (extract's per-block bookkeeping), ms per "
                 "block written while reaching " + ", ".join(f"{x['to'] / 1e6:,.0f}M: "
                                                            f"{num(1000 * x['feature_seconds'] / x['feature_blocks'])}"
                                                            for x in blocks) + ".")
    if c:
        line += (f" {c['writers']} concurrent writer processes on a {c['store_rows_before'] / 1e6:,.0f}M-row store, "
                 f"{c['rows_each']:,} uids each ({c['rows_registered']:,} distinct, some brought by every writer): "
                 f"{num(c['rows_per_s'])} rows/s together, nothing lost or registered twice.")
    out.append(line)
    out.append("![store operations vs store size](benchmarks/results/scale.png)")
    return "\n\n".join(out)


def render_generic(d: dict) -> str:
    p = d["params"]
    shown = {k: v for k, v in p.items() if isinstance(v, (int, float, str)) and k not in ("quick",) and len(str(v)) < 80}
    out = ["Parameters: " + ", ".join(f"{k} {num(v) if not isinstance(v, str) else v}" for k, v in shown.items()) + "."]
    out.append(table(["figure", "value"], [[f"`{k}`", v] for k, v in d["figures"].items()]))
    out.append(table(["ratio", "value"], [[f"`{k}`", v] for k, v in d["ratios"].items()]))
    return "\n\n".join(out)


def render_gpu(d: dict) -> str:
    proj, p = d.get("projection", {}), d["params"]
    out = []
    sh = p.get("shapes", {})
    if "vit" in sh and "llm" in sh:
        v, m = sh["vit"], sh["llm"]
        out.append(f"Images: a DINOv2-style ViT ({v['hidden_size']} hidden, {v['num_hidden_layers']} layers, "
                   f"{v['num_attention_heads']} heads, patch 14, 224 px), random weights, batch {sh['img_batch']}, "
                   f"{sh['images']:,} synthetic JPEGs decoded by {p.get('decode_workers')} processes; captions: a "
                   f"Llama-shaped decoder ({m['hidden_size']} hidden, {m['num_hidden_layers']} layers, "
                   f"{m['num_attention_heads']}/{m['num_key_value_heads']} heads, vocab {m['vocab_size']:,}), random "
                   f"weights, batch {sh['cap_batch']} vs one caption per forward; {p.get('precision')}.")
    out.append(render_generic(d))
    out.append(table(["CC3M projection", "value"], [[f"`{k}`", v] for k, v in proj.items()]))
    return "\n\n".join(out)


TITLES = {"store": "Store read path — `bench_store.py`", "extract": "Extraction — `bench_extract.py`",
          "train": "Training data path — `bench_train.py`", "uta": "UTA token targets — `bench_uta.py`",
          "gpu": "GPU extraction and the CC3M projection — `bench_gpu.py` (gpu.sh)",
          "scale": "Store operations vs store size — `bench_scale.py`",
          "store.gpu": "Store read path on the GPU machine — `gpu.sh`", "train.gpu": "Training on the GPU machine — `gpu.sh`"}
RENDER = {"store": render_store, "extract": render_extract, "train": render_train, "uta": render_uta, "scale": render_scale,
          "gpu": render_gpu}
NOTES = {  # what to keep in mind reading each table (no figures here: those come from the files)
    "store": "`memmap` is one copy per byte straight from the mapping, in the Loader's own order, gathered by "
             "the consuming thread alone; featstore gathers the same way on a helper thread while the consumer "
             "takes the previous batch, so with two cores it can pass the single-threaded memmap. `ram` uses "
             "torch's row gather, which for float16 rows is several times slower than numpy's. ShareLock's rate "
             "is per sample over its first rows (a file per sample and feature). Cold rounds drop the files "
             "from the page cache first (a live mapping would pin them, so the reused Loader is released and has "
             "no cold figure; a round whose files stay resident is refused); they depend on this VM's shared "
             "disk and vary the most. Where `hf_iterable` passes featstore cold, it is its order: shards read one "
             "after the other through a 1,000-row shuffle buffer (rows of a class-sorted shard stay together), so "
             "a cold epoch is a sequential read of the disk, while featstore's batches mix runs from across the "
             "whole store (the shuffle figure above); a larger `window` gives longer runs. litdata's later epoch "
             "over S3 was far slower than its first in every round and we have not found why (litdata 0.2.76 "
             "with moto): read that ratio as unexplained, not as a margin.",
    "extract": "`extract_vs_forward` is how much of the bare forward rate the whole job keeps (decode, forward "
               "and block writes together). `write_behind_vs_sync` is the writer thread against writes on the "
               "forward thread: on this CPU the forward pass already keeps both cores busy, so there is little "
               "to hide writes behind; the thread is for a GPU forward, where the CPU waits. `hf_map` is "
               "the script a user would write with transformers and datasets, end to end like `extract_e2e`.",
    "train": "The same ShareLock training step fed from the store and from in-RAM tensors; the data path alone "
             "against ShareLock's staged per-sample .pt files read through a DataLoader with workers.",
    "uta": "int8 token x channel tokens are served raw with both scales and dequantized in the training step "
           "(trainers/uta/batch.py), as train-uta reads them.",
    "scale": "Why the curve is not flat, and why it stops growing: a lookup of k uids reads, per query, one "
             "small range of one index file per level (levels grow as log10 of the rows: a level holds 10x the "
             "one above it) and of each level-0 run, then its candidate's uid from its own samples/uid shard: so "
             "until the store has more shards than the query has uids it touches more distinct files as it grows, "
             "then only the levels add. Adding 1,000 uids is that lookup, one level-0 run, and when the tree asks "
             "for it one compaction step of bounded size (a file and the files of the next level it overlaps, "
             "~1.5M entries; more only while the registration has rewritten under COMPACT_FACTOR x its rows); "
             "right after bulk registrations that step may merge their level-0 runs. The Loader reads "
             "`blocks.npy` (40 bytes a block: 0.8 MB at 1.28B rows) and one window of at most 2^20 rows a rank; "
             "its peak RSS adds the mapped pages of the runs that window reads, page cache rather than memory "
             "the process owns.",
    "gpu": "Projection = 3.3M images at the measured end-to-end extract rate + 3.3M captions at the batched "
           "rate, on one GPU; the FLOP bound counts 2 x matmul parameters x tokens (+ attention) per item.",
}


def section(results: Path = RESULTS) -> str:
    parts = [HEADING, INTRO]
    for name in ORDER:
        path = results / f"{name}.json"
        if not path.is_file():
            continue
        d = json.loads(path.read_text())
        render = RENDER.get(d["bench"], render_generic)
        note = NOTES.get(name.split(".")[0])
        parts.append(f"### {TITLES.get(name, name)}\n\nDevice: **{d['device']}** (`benchmarks/results/{path.name}`).\n\n"
                     + render(d) + (f"\n\n{note}" if note else ""))
    return "\n\n".join(parts) + "\n"


def replace(readme: str, new: str) -> str:
    lines = readme.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.startswith(HEADING)), None)
    if start is None:
        raise SystemExit(f"README.md has no '{HEADING}' section")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[:start]) + new + ("\n" if end < len(lines) else "") + "".join(lines[end:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the results directory (default benchmarks/results)")
    args = ap.parse_args()
    new = section(args.results)
    if not (args.write or args.check):
        print(new)
        return 0
    readme = README.read_text()
    updated = replace(readme, new)
    if args.check:
        if updated != readme:
            print("README.md's Measured section differs from benchmarks/results/*.json: "
                  "run python benchmarks/report.py --write", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated)
    print(f"wrote the Measured section of {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
