"""UTA's data path: teacher token targets streamed from the store, and a student trained from it.

Three measurements, each side by side in one process (contenders alternate over rounds; figures are
medians, ratios medians of ours / theirs measured back to back in the same round):

1. Token streaming, MB/s of stored token bytes.  Teacher tokens shaped like CLIP ViT-B/16's joint-space
   patch tokens (196 x 512), as float16 and as int8 + a float16 scale per token, shuffled batches of 256:
     featstore  featstore.Loader(store, {"t": "features/<fs>/tokens"}, 256, shuffle=True, seed=0)
                (int8 comes back dequantized to float16)
     memmap     the limit: the same tokens as .npy files through np.memmap, the Loader's own order,
                each batch gathered straight from the mapping with one np.take per column (one
                copy; int8: the same dequantization), in the consuming thread
   int8 twice: dequantized to fp16 while batching (the Loader's default; train-uta on CPU), and raw
   int8 + scale (train-uta on a GPU, which dequantizes on the device).
   warm (files read just before) and cold (dropped with posix_fadvise(DONTNEED))
   -> featstore_vs_memmap, featstore_vs_memmap_cold, featstore_vs_memmap_int8, featstore_vs_memmap_int8_cold,
      featstore_vs_memmap_int8_raw, featstore_vs_memmap_int8_raw_cold
2. Student steps/s: `featstore.trainers.train_uta.train_step` (masks, reversed masking, 1 - cosine,
   AdamW) fed by the Loader streaming pixels + teacher tokens from the store, vs fed from the same
   columns preloaded as in-RAM tensors (a random permutation, gathered per batch)
   -> store_vs_preloaded (a ViT-Ti student), store_vs_preloaded_small (a 2-layer, 64-wide student:
   ~10x less compute per byte, a harder test of the data path)
3. int8 fidelity on real tokens: EfficientNet-Lite0's final 7x7x1280 feature map on real images
   (scikit-image photos and scikit-learn's digit scans), extracted twice (token_dtype float16 and
   int8) and read back through the Loader: mean, worst-case and 0.1th-percentile token cosine.

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
from featstore.tokens import dequantize_int8, quantize_int8
from featstore.writer import write_block
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
def generate_tokens(root, n: int, r: int) -> dict:
    """The same tokens as a featstore store (fp16 and int8 feature sets) and as .npy files."""
    paths = {"store": root / "tokens.zarr", "npy": root / "npy"}
    store = Store.create(paths["store"], rows_per_shard=r)
    store.register([f"s{i:08d}" for i in range(n)])
    for name, dt in (("t16", "float16"), ("t8", "int8")):
        store.create_feature_set(name, {"model": f"synthetic-{name}", "preprocess": PREPROCESS}, D, tokens=(T, D),
                                 token_dtype=dt)
    paths["npy"].mkdir()
    mm = {"t16": np.lib.format.open_memmap(paths["npy"] / "t16.npy", "w+", np.float16, (n, T, D)),
          "t8": np.lib.format.open_memmap(paths["npy"] / "t8.npy", "w+", np.int8, (n, T, D)),
          "t8_scale": np.lib.format.open_memmap(paths["npy"] / "t8_scale.npy", "w+", np.float16, (n, T))}
    for b in range(store.n_blocks):
        start, stop = store.block_range(b)
        x = block_tokens(b, stop - start)
        pooled = x.mean(1)
        q, s = quantize_int8(x)
        ok = np.ones(stop - start, bool)
        write_block(store, "t16", b, {"pooled": pooled, "tokens": x}, ok)
        write_block(store, "t8", b, {"pooled": pooled, "tokens": q, "tokens_scale": s}, ok)
        mm["t16"][start:stop], mm["t8"][start:stop], mm["t8_scale"][start:stop] = x.astype(np.float16), q, s
    for m in mm.values():
        m.flush()
    del mm
    return paths


def _order(paths, name: str) -> list[np.ndarray]:
    """The rows of each batch of the Loader's epoch, in serving order (untimed; memmap replays it)."""
    loader = Loader(Store.open(paths["store"]), {"t": f"features/{name}/tokens"}, BATCH, shuffle=True, seed=SEED)
    return [batch["row"].numpy().copy() for batch in loader]


def open_featstore(paths, name: str, raw: bool = False):
    """The Loader as train-uta uses it: int8 dequantized to fp16 (CPU), or `raw` int8 + scale (GPU)."""
    columns = {"t": f"features/{name}/tokens"}
    if raw:
        columns["t_scale"] = f"features/{name}/tokens_scale"
    loader = Loader(Store.open(paths["store"]), columns, BATCH, shuffle=True, seed=SEED, dequantize=not raw)

    def epoch():
        n = 0
        for batch in loader:
            assert batch["t"].dtype == (torch.int8 if raw else torch.float16)
            n += len(batch["row"])
        return n

    return epoch


def open_memmap(paths, name: str, r: int, raw: bool = False):
    """The limit: np.memmap in the Loader's own order, each batch gathered straight from the mapping
    into a fresh array with one np.take per column (int8: dequantized as the Loader does, or with
    `raw` int8 + scale gathered as they are), in the consuming thread."""
    order = _order(paths, name)
    keys = ["t8", "t8_scale"] if name == "t8" else ["t16"]
    mms = {k: np.load(paths["npy"] / f"{k}.npy", mmap_mode="r") for k in keys}

    def gather(rows, k):
        out = np.empty((len(rows),) + mms[k].shape[1:], dtype=mms[k].dtype)
        np.take(mms[k], rows, axis=0, out=out, mode="clip")
        return out

    def epoch():
        served = 0
        for rows in order:
            if name == "t8" and raw:
                batch = (torch.from_numpy(gather(rows, "t8")), torch.from_numpy(gather(rows, "t8_scale")))
            elif name == "t8":
                batch = (torch.from_numpy(dequantize_int8(gather(rows, "t8"), gather(rows, "t8_scale"))),)
            else:
                batch = (torch.from_numpy(gather(rows, "t16")),)
            assert batch[0].dtype == (torch.int8 if raw else torch.float16)
            served += len(batch[0])
        return served

    return epoch


def check_tokens(paths) -> None:
    """Untimed: featstore's first batch holds the memmap's rows, in the memmap's order."""
    for name, npy in (("t16", "t16"), ("t8", "t8")):
        first = next(iter(Loader(Store.open(paths["store"]), {"t": f"features/{name}/tokens"}, BATCH, shuffle=True, seed=SEED)))
        rows = _order(paths, name)[0]
        assert np.array_equal(first["row"].numpy(), rows), "orders differ"
        want = np.load(paths["npy"] / f"{npy}.npy", mmap_mode="r")[rows]
        if name == "t8":
            want = dequantize_int8(want, np.load(paths["npy"] / "t8_scale.npy", mmap_mode="r")[rows])
        assert np.array_equal(first["t"].numpy(), want), f"{name}: wrong bytes"


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
    out = {"mb_per_s": n * row_bytes / secs / 1e6, "rows": n, "seconds": round(secs, 4)}
    if left is not None:
        out["resident_after_drop"] = round(left, 4)
    return out


def streaming(paths, r: int, warm_rounds: int, cold_rounds: int) -> dict:
    row_bytes = {"t16": T * D * 2, "t8": T * D + T * 2}
    store_files = {name: [paths["store"] / "features" / name] for name in row_bytes}
    npy_files = {"t16": [paths["npy"] / "t16.npy"], "t8": [paths["npy"] / "t8.npy", paths["npy"] / "t8_scale.npy"]}
    runs: dict[str, list[dict]] = {}
    for cold, rounds in ((False, warm_rounds), (True, cold_rounds)):
        for rnd in range(rounds):
            for name, sfx, raw in (("t16", "", False), ("t8", "_int8", False), ("t8", "_int8_raw", True)):
                for who, fn, files in (("featstore", lambda: open_featstore(paths, name, raw), store_files[name]),
                                       ("memmap", lambda: open_memmap(paths, name, r, raw), npy_files[name])):
                    key = who + sfx + ("_cold" if cold else "")
                    res = {"round": rnd, **measure(fn, files, cold, row_bytes[name])}
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
    runs = streaming(paths, p["rows_per_shard"], warm_rounds, cold_rounds)
    if not args.keep:
        shutil.rmtree(paths["npy"], ignore_errors=True)
        shutil.rmtree(paths["store"], ignore_errors=True)

    print(f"student steps/s ({p['student_rows']} rows of {p['image']}px pixels + teacher tokens) ...", flush=True)
    store, ram, pre = student_store(root, p)
    students = student_steps(store, ram, pre, p, student_rounds)
    del ram

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
        "featstore_vs_memmap_int8_raw": paired("featstore_int8_raw", "memmap_int8_raw"),
        "featstore_vs_memmap_int8_raw_cold": paired("featstore_int8_raw_cold", "memmap_int8_raw_cold"),
        "store_vs_preloaded": student_ratio("vit-ti"),
        "store_vs_preloaded_small": student_ratio("small"),
    }
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    device = device_string()
    params = {
        "token_rows": p["rows"], "token_shape": [T, D], "batch_size": BATCH, "rows_per_shard": p["rows_per_shard"],
        "window_blocks": 4, "seed": SEED, "warm_rounds": warm_rounds, "cold_rounds": cold_rounds,
        "row_bytes": {"float16": T * D * 2, "int8": T * D + 2 * T},
        "students": {k: {"params": v["params"], "width": v["arch"]["width"], "depth": v["arch"]["depth"],
                         "image": p["image"], "patch": p["patch"], "grid": v["arch"]["grid"], "batch": v["batch"],
                         "steps_per_round": v["steps_per_round"], "mask_ratio": 0.5, "reversed_masking": True}
                     for k, v in students.items()},
        "student_rows": p["student_rows"], "student_rounds": student_rounds, "torch_threads": torch.get_num_threads(),
        "int8_fidelity": {k: v for k, v in fidelity.items() if not k.startswith(("cos_", "rel_"))},
        "statistic": "figures: median over rounds; ratios: median over rounds of ours / theirs measured back to back",
        "warm": "files read just before the timed epoch", "cold": "files dropped with posix_fadvise(DONTNEED) just before",
        "threads": {"featstore": "1 producer (gather + int8 dequantize) + 4 readers + consumer",
                    "memmap": "1 read-ahead + consumer (gather + int8 dequantize)"},
        "int8_raw": "int8 tokens + fp16 scales served as stored (Loader(dequantize=False)), as train-uta reads them on a GPU",
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__, "torch": torch.__version__},
        "loadavg_1_5_15_at_start": [round(x, 2) for x in load_start],
        "loadavg_1_5_15_at_end": [round(x, 2) for x in load_end],
        "setup_s": round(gen_s, 1),
    }
    path = write_results("uta", params, figures, ratios, quick=quick, device=device, runs=runs,
                         student_runs={k: v["rates"] for k, v in students.items()})

    rows = []
    for dtype, sfx in (("float16", ""), ("int8 → fp16 in the loader (CPU training)", "_int8"),
                       ("int8 + scale raw (GPU training: dequantized on the device)", "_int8_raw")):
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
                  "bytes/token": f"{fidelity['bytes_per_token_int8']} vs {fidelity['bytes_per_token_fp16']}"}],
                title="int8 vs float16 teacher tokens (real backbone tokens)")
    print()
    for k, v in ratios.items():
        print(f"  {k:<32} {v:,.3f}")
    print(f"\nwrote {path}  ({time.perf_counter() - t_start:.0f}s)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
