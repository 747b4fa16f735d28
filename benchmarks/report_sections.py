"""One function per results file: the markdown report.py writes for it (`render_<bench>`), and the
goal sentences (met or not, and why) worked out from the figures."""

from __future__ import annotations

from report_format import esc, num, span, table


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
    extra += limits_goal(r)
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


def limits_goal(r: dict) -> list[str]:
    """Issue 21's read-path goals against the fair limits (contenders/limits.py), met or not."""
    goals = [("featstore_vs_memmap_threads", 0.9, "the threaded memmap gather (warm)"),
             ("featstore_vs_disk_seq_cold", 0.8, "the disk's sequential read rate (cold)")]
    out = []
    for key, goal, what in goals:
        if key in r:
            out.append(f"Issue 21 goal, featstore ≥ {goal} of {what}: `{key}` **{num(r[key])}**, "
                       f"{'met' if r[key] >= goal else 'not met'}.")
    if "featstore_vs_memcpy" in r:
        out.append(f"`featstore_vs_memcpy` (the same bytes copied in order in RAM by as many threads): "
                   f"**{num(r['featstore_vs_memcpy'])}** warm; `featstore_vs_disk_seq` {num(r.get('featstore_vs_disk_seq'))} warm "
                   "(the page cache read front to back).")
    return out


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
    hows = {"one_caption": "one caption per forward pass (ShareLock's script)",
            "batched": f"featstore's length-sorted batches of {p['caption_batch']} through the extract job",
            "matmul_bound": "a bound, not a contender: captions/s if the encoder's linear layers ran at this machine's "
                            "rate for one batch's matmul"
                            + (f" ({' x '.join(map(str, p['caption_bound']['shape']))}, {p['caption_bound']['dtype']})"
                               if p.get("caption_bound") else "") + ", attention left out"}
    for name, key in (("one_caption", "one_caption_per_s"), ("batched", "batched_captions_per_s"),
                      ("matmul_bound", "matmul_bound_captions_per_s")):
        if key in f:
            rows.append([name, hows[name], num(f.get(key)) + span(spread.get(name, {}))])
    for k in ("dask_1_workers_images_per_s", "dask_2_workers_images_per_s"):
        if k in f:
            rows.append([k.removesuffix("_images_per_s"), esc(p["dask"]), num(f[k])])
    out.append(table(["contender", "how", "images or captions /s"], rows))
    out.append(table(["ratio", "value"], [[f"`{k}`", v] for k, v in r.items()]))
    if "caption_tokenize" in p:
        out.append(caption_goal(p, r, f))
    return "\n\n".join(out)


def caption_goal(p: dict, r: dict, f: dict) -> str:
    """Issue 21's caption goal, met or not, from the figures (and why, where it is not)."""
    ratio = r["batched_vs_one_caption"]
    line = (f"Issue 21 goal, batched captions ≥ 5x one per forward on CPU: measured {num(ratio)}, "
            f"{'met' if ratio >= 5.0 else 'not met'}. Batches: {esc(p['caption_tokenize'])}.")
    bound = r.get("matmul_bound_vs_one_caption")
    if ratio < 5.0 and bound is not None:
        line += (f" Why not: the batches run at {num(r['batched_vs_matmul_bound'])} of `matmul_bound` (the encoder's "
                 f"linear layers at this machine's matrix-multiply rate), and that bound is itself "
                 f"{num(bound)}x one caption per forward"
                 + (": 5x would need a batched forward faster than this CPU multiplies the matrices it is made of."
                    if bound < 5.0 else ": the gap to it is what the bound leaves out (attention, layer norms, "
                    "activations, the other matmul shapes); closing it is not done."))
    elif ratio < 5.0:
        line += (" Why not: both contenders run the same MiniLM forward, and on this 2-core CPU a batch's "
                 "forward is almost all of the job's time (profiled: tokenizing, sorting and writing are the "
                 "rest), each batch padded only to its own longest caption; what is left is how much better "
                 "a 2-core CPU runs one (B x L) matmul than B small ones, which other jobs on a shared "
                 "machine's cores eat into first (the batched forward is compute-bound, one caption mostly "
                 "overhead-bound).")
    probe = {k: d for k in ("fp32", "bf16") if (d := f.get(f"probe_minilm_{k}_captions_per_s")) is not None}
    if p.get("caption_precision") == "fp32" and len(probe) == 2:
        line += (f" This run's precision probe picked fp32 ({num(probe['fp32'])} vs bf16 {num(probe['bf16'])} "
                 "captions/s on one batch), so the bf16 cast-once change is not in these figures.")
    return line


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
    if "featstore_int8_vs_fp16_rows" in r:
        out.append(uta_int8_goal(p, r))
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


def uta_int8_goal(p: dict, r: dict) -> str:
    """Issue 21's int8 goal, met or not, from the figures (and why, where memmap still wins)."""
    ratio, rows = r["featstore_vs_memmap_int8"], r["featstore_int8_vs_fp16_rows"]
    line = (f"Issue 21 goal, int8 warm ≥ 1.0 (int8 moves half the bytes). Against float16: featstore serves "
            f"int8 rows at {num(rows)}x its float16 rows/s, {'met' if rows >= 1.0 else 'not met'}. Against "
            f"memmap's int8 (`featstore_vs_memmap_int8`, as float16 is against memmap's float16): {num(ratio)}, "
            f"{'met' if ratio >= 1.0 else 'not met'}.")
    if ratio < 1.0:
        line += (f" Where memmap still wins, why: with {p['rows_per_shard']} rows per shard a block of int8 tokens "
                 f"is {p['rows_per_shard'] * p['token_shape'][0] * p['token_shape'][1] / 2**20:.1f} MiB, not a "
                 "multiple of 2 MiB, so most shards map at addresses where the page cache's large folios (ext4) "
                 "cannot be mapped as 2 MiB pages, while memmap's single .npy file maps them wherever they are: "
                 "more page faults and TLB misses per byte for the Loader, and int8's smaller rows make that the "
                 "larger share of its cost. The Loader's mapping now starts on a 2 MiB boundary, so at the default "
                 "4096 rows per shard (a multiple of 2 MiB per block from 512-byte rows up) every block can.")
    return line


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


def render_search(d: dict) -> str:
    p, f, r, spread = d["params"], d["figures"], d["ratios"], d.get("spread", {})
    b = p["builds"]["ivf"]
    out = [f"{p['rows']:,} rows of {p['dim']}-d {p['dtype']} pooled vectors in a featstore store, from a "
           f"{esc(p['generator'])} (`benchmarks/bench_search.py`'s docstring has the generator); {p['queries']:,} "
           f"held-out queries, recall@{p['k']} against numpy's exact top-{p['k']} (ties within 1e-5 count). Indexes "
           f"built by `featstore index` (`build_index`); ivf: {b['factory']}, trained on {b['train_rows']:,} rows. "
           f"{p['rounds']} interleaved rounds of {p['single_queries_per_round']} single queries (faiss on "
           f"{p['single_query_threads']} thread) and one batch of all queries ({p['faiss_threads']} threads); "
           f"median (min–max) over rounds; speed-up = flat's p50 ÷ the contender's, per round; faiss {p['faiss']}; "
           f"whole run {num(p.get('wall_seconds'))} s."]
    rows = []
    for name, how in p["contenders"].items():
        c, s = f[name], spread.get(name, {})
        rows.append([name, esc(how), num(c["build_rows_per_s"]), num(c["p50_ms"]) + span(s.get("p50_ms", {})),
                     num(c["p99_ms"]), num(c["batch_queries_per_s"]),
                     num(r[f"{name}_speedup_vs_flat"]) + span(s.get("speedup", {})), num(c["recall_at_10"])])
    out.append(table(["kind", "how", "build rows/s", "p50 ms", "p99 ms", "batch queries/s", "speed-up vs flat (p50)",
                      f"recall@{p['k']}"], rows))
    g = d["goal"]
    out.append(f"Recall against speed-up over nprobe on the same ivf index ({b['nlist']:,} lists; single-query p50, "
               f"flat's p50 {num(d['sweep_flat_p50_ms'])} ms measured just before; one pass, not interleaved):")
    at_build = dict((n_, rec) for n_, rec in b.get("calibration", {}).get("sweep", []))
    out.append(table(["nprobe", "rows scanned", f"recall@{p['k']}", "recall measured by build_index (stored rows)",
                      "p50 ms", "speed-up vs flat"],
                     [[s_["nprobe"], f"{100 * s_['nprobe'] / b['nlist']:.2g}%", num(s_["recall_at_10"]),
                       num(at_build[s_["nprobe"]]) if s_["nprobe"] in at_build else "",
                       num(s_["p50_ms"]), num(s_["speedup_vs_flat"])] for s_ in d["sweep"]]))
    meets = [s_ for s_ in d["sweep"] if s_["nprobe"] in g["sweep_settings_meeting_it"]]
    out.append(f"Issue 22's goal, recall@{p['k']} ≥ {num(g['recall_at_10'])} at ≥ {num(g['speedup'])}× brute force: "
               + ("**met**" if g["met_by_default"] else "**not met**")
               + f" by ivf at the nprobe build_index measured, {f['ivf']['nprobe']} (recall {num(f['ivf']['recall_at_10'])}, "
                 f"{num(r['ivf_speedup_vs_flat'])}×)"
               + ("; in the one-pass sweep only " + ", ".join(f"nprobe {s_['nprobe']} (recall {num(s_['recall_at_10'])}, "
                                                             f"{num(s_['speedup_vs_flat'])}×)" for s_ in meets)
                  + (" meets it." if len(meets) == 1 else " meet it.") if meets else "; no nprobe of the sweep meets it on this machine."))
    out.append("![recall@10 vs speed-up over nprobe](benchmarks/results/search.png)")
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


def render_write_behind(d: dict) -> str:
    p, f, r, spread = d["params"], d["figures"], d["ratios"], d.get("spread", {})
    out = [f"The block runner over {p['images']:,} JPEGs (one webdataset tar), batch {p['batch']}, rows_per_shard "
           f"{p['rows_per_shard']}, storing {esc(p['stored'])}; backbone: {esc(p['backbone'])}, {p['torch_threads']} "
           f"torch threads; S3: {esc(p['s3'])}. {p['rounds']} interleaved rounds, medians (min–max of the per-round "
           f"ratios); whole run {num(p.get('wall_seconds'))} s."]
    out.append(table(["contender", "how", "images/s"],
                     [[c, esc(how), num(f[f"{c}_images_per_s"])] for c, how in p["contenders"].items()]))
    out.append(table(["ratio", "value"], [[f"`{k}`", num(v) + span(spread.get(k, {}))] for k, v in r.items()]))
    return "\n\n".join(out)
