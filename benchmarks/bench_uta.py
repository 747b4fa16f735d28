"""UTA's data path: teacher token targets streamed from the store, and a student trained from it.

Three measurements, each side by side in one process (contenders alternate over rounds; figures are
medians, ratios medians of ours / theirs measured back to back in the same round):

1. Token streaming, MB/s of stored token bytes.  Teacher tokens shaped like CLIP ViT-B/16's joint-space
   patch tokens (196 x 512), shuffled batches of 256, in the two layouts extraction writes:
     float16        `tokens` (row, token, dim) float16
     int8           token x channel int8 (`featstore.tokens.encode_tokens`): `tokens` int8 +
                    `tokens_scale` (row, token) + `tokens_channel_scale` (row, dim) float16, served
                    raw with both scales, as train-uta reads them (trainers/uta/batch.py `loader_columns`:
                    token x channel int8 is always dequantized by the trainer, on its device)
   contenders:
     featstore  featstore.Loader(store, columns, 256, shuffle=True, seed=0), its other defaults
     memmap     the limit: the same arrays as .npy files through np.memmap, in the Loader's own
                order (`Loader.batch_rows()`), each batch gathered straight from the mapping with
                one np.take per array (one copy), in the consuming thread
   warm (files read just before) and cold (dropped with posix_fadvise(DONTNEED))
   -> featstore_vs_memmap, featstore_vs_memmap_cold, featstore_vs_memmap_int8, featstore_vs_memmap_int8_cold,
      featstore_int8_vs_fp16_rows (int8 rows/s over float16 rows/s, both featstore, warm)
2. Student steps/s: `featstore.trainers.train_uta.train_step` (the EVA-02-like student, masks,
   reversed masking, token + CLS alignment (cls_weight 1: the teacher's pooled column is served),
   AdamW) fed by the trainer's own training loader (`trainers.loading.train_loader` over the
   columns `trainers.uta.loader_columns` picks) streaming pixels + teacher tokens + pooled from
   the store, vs fed from the same columns preloaded as in-RAM tensors (a random permutation,
   gathered per batch) -> store_vs_preloaded (a ViT-Ti student), store_vs_preloaded_small (2
   layers, 64 wide: ~10x less compute per byte, a harder test of the data path),
   store_vs_preloaded_small_int8 (the same with int8 token x channel teacher tokens, dequantized
   in the step as train-uta does)
3. int8 fidelity on real tokens: EfficientNet-Lite0's final 7x7x1280 feature map on real images
   (scikit-image photos and scikit-learn's digit scans), extracted twice (token_dtype float16 and
   int8, the token x channel layout extraction writes) and read back through the Loader (int8 raw
   + both scales, dequantized with `featstore.tokens.dequantize_int8`): mean, worst-case and
   0.1th-percentile token cosine; and per-token scaling of the same tokens for comparison.

    .venv/bin/python benchmarks/bench_uta.py [--quick] [--rounds K] [--keep] [--data-dir D]

Writes benchmarks/results/uta.json (--quick: uta.quick.json) and prints the tables.
"""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import sys
import time

import numpy as np
import torch

from common import (bench_parser, data_dir, device_string, drop_cache, print_table, resident_fraction, timed,
                    warm_cache, write_results)

from featstore.loader import Loader
from featstore.store import Store
from featstore.tokens import dequantize_int8, encode_tokens
from featstore.core.writes import write_block
from uta_student import D, PREPROCESS, SEED, T, block_tokens, real_token_fidelity, student_steps, student_store

BATCH = 256
PRESETS = {
    # token rows, rows per shard; student rows, pixel size, patch, batch, timed steps per round
    "quick": dict(rows=1024, rows_per_shard=128, student_rows=512, image=64, patch=16, student_batch=32, steps=4,
                  real_images=16, warm_rounds=1, cold_rounds=1),
    "full": dict(rows=8192, rows_per_shard=256, student_rows=2048, image=112, patch=16, student_batch=32, steps=8,
                 real_images=64, warm_rounds=5, cold_rounds=3),
}
# ---- 1. token streaming ------------------------------------------------------------------------
LAYOUTS = {  # name: (feature set, the arrays a batch reads: loader alias -> array, .npy file per alias)
    "t16": {"t": "tokens"},
    "t8": {"t": "tokens", "t_scale": "tokens_scale", "t_channel_scale": "tokens_channel_scale"},
}
ROW_BYTES = {"t16": T * D * 2, "t8": T * D + 2 * T + 2 * D}


def generate_tokens(root, n: int, r: int) -> dict:
    """The same tokens as a featstore store (a float16 and a token x channel int8 feature set) and
    as .npy files (one per array, named by loader alias)."""
    paths = {"store": root / "tokens.zarr", "npy": root / "npy"}
    store = Store.create(paths["store"], rows_per_shard=r)
    store.register([f"s{i:08d}" for i in range(n)])
    store.create_feature_set("t16", {"model": "synthetic-t16", "preprocess": PREPROCESS}, D, tokens=(T, D))
    store.create_feature_set("t8", {"model": "synthetic-t8", "preprocess": PREPROCESS}, D, tokens=(T, D),
                             token_dtype="int8", token_scaling="token_channel")
    paths["npy"].mkdir()
    mm = {}
    for name, arrays in LAYOUTS.items():
        fs = store.feature_set(name).arrays()
        for alias, arr in arrays.items():
            a = fs[f"features/{name}/{arr}"]
            mm[(name, alias)] = np.lib.format.open_memmap(paths["npy"] / f"{name}.{alias}.npy", "w+", a.dtype, a.shape)
    for b in range(store.n_blocks):
        start, stop = store.block_range(b)
        x = block_tokens(b, stop - start)
        ok = np.ones(stop - start, bool)
        cols8, fidelity = encode_tokens(x, "token_channel")
        write_block(store, "t16", b, {"pooled": x.mean(1), "tokens": x}, ok)
        write_block(store, "t8", b, {"pooled": x.mean(1), **cols8}, ok, int8_fidelity=fidelity)
        for alias, arr in LAYOUTS["t8"].items():
            mm[("t8", alias)][start:stop] = cols8[arr]
        mm[("t16", "t")][start:stop] = x.astype(np.float16)
    for m in mm.values():
        m.flush()
    del mm
    return paths


def token_loader(paths, name: str) -> Loader:
    """The Loader over one layout's arrays (int8 raw with its scales, as train-uta serves it)."""
    columns = {alias: f"features/{name}/{arr}" for alias, arr in LAYOUTS[name].items()}
    return Loader(Store.open(paths["store"]), columns, BATCH, shuffle=True, seed=SEED, dequantize=name != "t8")


def open_featstore(paths, name: str):
    loader = token_loader(paths, name)

    def epoch():
        n = 0
        for batch in loader:
            assert batch["t"].dtype == (torch.int8 if name == "t8" else torch.float16)
            n += len(batch["row"])
        return n

    return epoch


def open_memmap(paths, name: str):
    """The limit: np.memmap in the Loader's own order (`batch_rows()`), each batch gathered straight
    from the mapping into a fresh array with one np.take per array, in the consuming thread."""
    order = token_loader(paths, name).batch_rows()
    mms = {alias: np.load(paths["npy"] / f"{name}.{alias}.npy", mmap_mode="r") for alias in LAYOUTS[name]}

    def gather(rows, m):
        out = np.empty((len(rows),) + m.shape[1:], dtype=m.dtype)
        np.take(m, rows, axis=0, out=out, mode="clip")
        return out

    def epoch():
        served = 0
        for rows in order:
            batch = {alias: torch.from_numpy(gather(rows, m)) for alias, m in mms.items()}
            assert batch["t"].dtype == (torch.int8 if name == "t8" else torch.float16)
            served += len(batch["t"])
        return served

    return epoch


def check_tokens(paths) -> None:
    """Untimed: featstore's first batch holds the memmap's rows, in `batch_rows()`'s order, and
    the int8 arrays read back (both scales) to the tokens they encode."""
    for name in LAYOUTS:
        loader = token_loader(paths, name)
        first = next(iter(loader))
        rows = loader.batch_rows()[0]
        assert np.array_equal(first["row"].numpy(), rows), "orders differ"
        for alias in LAYOUTS[name]:
            want = np.load(paths["npy"] / f"{name}.{alias}.npy", mmap_mode="r")[rows]
            assert np.array_equal(first[alias].numpy(), want), f"{name}/{alias}: wrong bytes"
        if name == "t8":
            x = dequantize_int8(first["t"].numpy(), first["t_scale"].numpy(), np.float32,
                                channel_scale=first["t_channel_scale"].numpy())
            ref = np.load(paths["npy"] / "t16.t.npy", mmap_mode="r")[rows].astype(np.float32)
            cos = (x * ref).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(ref, axis=-1))
            assert cos.min() > 0.99, f"int8 token x channel reads back with a worst cosine of {cos.min():.4f}"


def measure(open_fn, files, cold: bool, row_bytes: int) -> dict:
    gc.collect()
    if cold:
        drop_cache(*files)
        left = resident_fraction(*files)
    else:
        warm_cache(*files)
        left = None
    epoch = open_fn()
    secs, n = timed(epoch)
    del epoch
    gc.collect()
    out = {"mb_per_s": n * row_bytes / secs / 1e6, "rows_per_s": n / secs, "rows": n, "seconds": round(secs, 4)}
    if left is not None:
        out["resident_after_drop"] = round(left, 4)
    return out


def streaming(paths, warm_rounds: int, cold_rounds: int) -> dict:
    store_files = {name: [paths["store"] / "features" / name] for name in LAYOUTS}
    npy_files = {name: [paths["npy"] / f"{name}.{alias}.npy" for alias in LAYOUTS[name]] for name in LAYOUTS}
    runs: dict[str, list[dict]] = {}
    for cold, rounds in ((False, warm_rounds), (True, cold_rounds)):
        for rnd in range(rounds):
            for name, sfx in (("t16", ""), ("t8", "_int8")):
                for who, fn, files in (("featstore", lambda: open_featstore(paths, name), store_files[name]),
                                       ("memmap", lambda: open_memmap(paths, name), npy_files[name])):
                    key = who + sfx + ("_cold" if cold else "")
                    res = {"round": rnd, **measure(fn, files, cold, ROW_BYTES[name])}
                    runs.setdefault(key, []).append(res)
                    print(f"  {key:<24} round {rnd}: {res['mb_per_s']:>10,.1f} MB/s", flush=True)
    return runs


# ---- the run ------------------------------------------------------------------------------------------
def main():
    ap = bench_parser(__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help="warm rounds for streaming and rounds for the student")
    args = ap.parse_args()
    quick = args.quick
    p = dict(PRESETS["quick" if quick else "full"])
    warm_rounds = args.rounds or p["warm_rounds"]
    cold_rounds = p["cold_rounds"]
    student_rounds = args.rounds or (1 if quick else 3)
    torch.set_num_threads(1)  # the student on one thread (train-uta's cpu_threads=1); the loader gets the other core
    root = data_dir(args, "uta")
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    print(f"generating {p['rows']} token rows ({T}x{D}, fp16 + int8) under {root} ...", flush=True)
    gen_s, paths = timed(generate_tokens, root, p["rows"], p["rows_per_shard"])
    print(f"  done in {gen_s:.0f}s", flush=True)
    check_tokens(paths)
    window_rows = token_loader(paths, "t16").window
    runs = streaming(paths, warm_rounds, cold_rounds)
    if not args.keep:
        shutil.rmtree(paths["npy"], ignore_errors=True)
        shutil.rmtree(paths["store"], ignore_errors=True)

    print(f"student steps/s ({p['student_rows']} rows of {p['image']}px pixels + teacher tokens) ...", flush=True)
    store, pre = student_store(root, p)
    students = student_steps(store, pre, p, student_rounds)

    print(f"int8 vs float16 on EfficientNet-Lite0 tokens of {p['real_images']} real images ...", flush=True)
    fidelity = real_token_fidelity(root, p["real_images"])
    print(f"  mean cos {fidelity['cos_mean']:.6f}, worst {fidelity['cos_min']:.6f}", flush=True)
    load_end = os.getloadavg()

    def paired(ours: str, theirs: str, key: str = "mb_per_s") -> float:
        mine = {x["round"]: x[key] for x in runs[ours]}
        return statistics.median(mine[x["round"]] / x[key] for x in runs[theirs])

    def student_ratio(label: str) -> float:
        r = students[label]["rates"]
        return statistics.median(a / b for a, b in zip(r["store"], r["preloaded"]))

    figures = {f"{k}_mb_per_s": round(statistics.median(x["mb_per_s"] for x in v), 1) for k, v in runs.items()}
    for label, s in students.items():
        sfx = "" if label == "vit-ti" else f"_{label}"
        figures[f"store_steps_per_s{sfx}"] = round(statistics.median(s["rates"]["store"]), 3)
        figures[f"preloaded_steps_per_s{sfx}"] = round(statistics.median(s["rates"]["preloaded"]), 3)
    figures.update({f"int8_{k}": v for k, v in fidelity.items() if k.startswith(("cos_", "rel_"))})
    ratios = {
        "featstore_vs_memmap": paired("featstore", "memmap"),
        "featstore_vs_memmap_cold": paired("featstore_cold", "memmap_cold"),
        "featstore_vs_memmap_int8": paired("featstore_int8", "memmap_int8"),
        "featstore_vs_memmap_int8_cold": paired("featstore_int8_cold", "memmap_int8_cold"),
        # rows/s of int8 (raw + both scales) over rows/s of float16, both featstore, warm, same round
        "featstore_int8_vs_fp16_rows": paired("featstore_int8", "featstore", "rows_per_s"),
        **{"store_vs_preloaded" + ("" if label == "vit-ti" else f"_{label}"): student_ratio(label) for label in students},
    }
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    device = device_string()
    params = {
        "token_rows": p["rows"], "token_shape": [T, D], "batch_size": BATCH, "rows_per_shard": p["rows_per_shard"],
        "seed": SEED, "warm_rounds": warm_rounds, "cold_rounds": cold_rounds,
        "row_bytes": {"float16": ROW_BYTES["t16"], "int8_token_channel": ROW_BYTES["t8"]},
        "layouts": {"float16": "tokens float16", "int8": "token x channel int8: tokens int8 + tokens_scale (row, token) + "
                    "tokens_channel_scale (row, dim) float16, served raw (Loader(dequantize=False)) as train-uta reads them"},
        "loader": {"settings": "Loader(store, columns, 256, shuffle=True, seed=0), other arguments default",
                   "window_rows": window_rows},
        "students": {k: {"params": v["params"], "width": v["arch"]["width"], "depth": v["arch"]["depth"],
                         "mlp": v["arch"]["mlp"], "rope": v["arch"]["rope"], "cls_weight": v["cls_weight"],
                         "teacher_tokens": v["teacher_tokens"], "columns": sorted(v["columns"]),
                         "image": p["image"], "patch": p["patch"], "grid": v["arch"]["grid"], "batch": v["batch"],
                         "steps_per_round": v["steps_per_round"], "mask_ratio": 0.5, "reversed_masking": True,
                         "loader_window_rows": v["loader_window_rows"]}
                     for k, v in students.items()},
        "student_loader": "featstore.trainers.loading.train_loader (train-uta's) over trainers.uta.loader_columns (CPU)",
        "student_rows": p["student_rows"], "student_rounds": student_rounds, "torch_threads": torch.get_num_threads(),
        "int8_fidelity": {k: v for k, v in fidelity.items() if not k.startswith(("cos_", "rel_"))},
        "statistic": "figures: median over rounds; ratios: median over rounds of ours / theirs measured back to back",
        "warm": "files read just before the timed epoch", "cold": "files dropped with posix_fadvise(DONTNEED) just before",
        "memmap": "np.load(mmap_mode='r') of one .npy per array, the Loader's batch_rows(), one np.take per array per batch",
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__, "torch": torch.__version__},
        "loadavg_1_5_15_at_start": [round(x, 2) for x in load_start],
        "loadavg_1_5_15_at_end": [round(x, 2) for x in load_end],
        "setup_s": round(gen_s, 1), "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    path = write_results("uta", params, figures, ratios, quick=quick, device=device, runs=runs,
                         student_runs={k: v["rates"] for k, v in students.items()})

    rows = []
    for dtype, sfx in (("float16", ""), ("int8 token x channel, raw + both scales (as train-uta reads it)", "_int8")):
        rows.append({
            "teacher tokens": dtype,
            "featstore MB/s warm": f"{figures['featstore' + sfx + '_mb_per_s']:,.0f}",
            "memmap MB/s warm": f"{figures['memmap' + sfx + '_mb_per_s']:,.0f}",
            "ratio warm": f"{ratios['featstore_vs_memmap' + sfx]:.2f}",
            "featstore MB/s cold": f"{figures['featstore' + sfx + '_cold_mb_per_s']:,.0f}",
            "memmap MB/s cold": f"{figures['memmap' + sfx + '_cold_mb_per_s']:,.0f}",
            "ratio cold": f"{ratios['featstore_vs_memmap' + sfx + '_cold']:.2f}",
        })
    title = f"bench_uta ({'quick, ' if quick else ''}{p['rows']} rows of {T}x{D} tokens, batch {BATCH}) — {device}"
    print_table(rows, title=title)
    srows = []
    for label, s in students.items():
        sfx = "" if label == "vit-ti" else f"_{label}"
        a = s["arch"]
        srows.append({"student": f"{label} ({a['width']}x{a['depth']}, {s['params'] / 1e6:.2f}M params)",
                      "input": f"{p['image']}px /{p['patch']}, batch {s['batch']} (x2 reversed)",
                      "store steps/s": f"{figures['store_steps_per_s' + sfx]:.2f}",
                      "preloaded steps/s": f"{figures['preloaded_steps_per_s' + sfx]:.2f}",
                      "store ÷ preloaded": f"{ratios['store_vs_preloaded' + sfx]:.2f}"})
    print_table(srows, title="student training steps/s: streaming from the store vs preloaded tensors")
    print_table([{"tokens": f"EfficientNet-Lite0 {fidelity['token_shape'][0]}x{fidelity['token_shape'][1]}, "
                            f"{fidelity['images']} real images ({fidelity['tokens']:,} tokens)",
                  "mean cos": f"{fidelity['cos_mean']:.6f}", "worst cos": f"{fidelity['cos_min']:.6f}",
                  "0.1% cos": f"{fidelity['cos_p001']:.6f}", "mean rel. L2 error": f"{fidelity['rel_l2_mean']:.4f}",
                  "bytes/token": f"{fidelity['bytes_per_token_int8']} vs {fidelity['bytes_per_token_fp16']}",
                  "per-token scaling: mean / worst cos": f"{fidelity['per_token_cos_mean']:.6f} / {fidelity['per_token_cos_min']:.6f}"}],
                title="int8 vs float16 teacher tokens (real backbone tokens)")
    print()
    for k, v in ratios.items():
        print(f"  {k:<32} {v:,.3f}")
    print(f"\nwrote {path}  ({time.perf_counter() - t_start:.0f}s)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
