"""How store operations grow with the store: a growth curve at several sizes (issue 18).

One store is grown through the normal registration path (random-order 32-hex-digit uids, as
DataComp's, streamed a batch at a time, never all in memory) to each size in turn; at each size
fresh processes measure, with their max RSS above the interpreter with featstore imported:

    add_1000       register 1,000 new uids (one registration, what a small source costs)
    lookup_1000    open the store + rows_of 1,000 uids (half present, half absent)
    loader_first   Loader(rank 0 of 8) setup + first batch, on a dim-4 feature set over every row

and the slope of each figure against rows is fitted (least squares on the sizes measured) and
extrapolated to 1.28B rows (DataComp-1B).  `--quick` stops at 1M rows.

    python benchmarks/bench_scale.py [--sizes 1e6,4e6,16e6,64e6] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
TARGET_ROWS = 1_280_000_000
BATCH = 1 << 20

CHILD = r"""
import json, sys, threading, time
import numpy as np
from featstore.store import Store
from featstore.loader import Loader  # imported before the baseline: torch's import is not the operation
what, path, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])

def status(key):  # kB, from the kernel's own accounting
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM): exec keeps the parent's
base, anon0 = status("VmRSS"), status("RssAnon")
anon_peak, running = [anon0], [True]

def sample():  # the kernel keeps no peak of the memory the process owns (RssAnon): sample it
    while running[0]:
        anon_peak[0] = max(anon_peak[0], status("RssAnon"))
        time.sleep(0.002)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
rng = np.random.default_rng(seed)
t = time.perf_counter()
if what == "add_1000":
    uids = np.array([f"{x:032x}" for x in rng.integers(0, 2**63, 1000) * 2 + 1])  # odd: never registered
    res = Store.open(path, mode="r+").register(uids, source_refs=uids)
    assert res["registered"] == 1000, res
elif what == "lookup_1000":
    st = Store.open(path)
    n = st.n_rows
    rows = rng.integers(0, n, 500)
    present = np.asarray(st.root["samples/uid"].get_coordinate_selection(np.sort(rows)))
    t = time.perf_counter()  # the sample itself is not the lookup
    st = Store.open(path)
    absent = np.array([f"absent-{x}" for x in rng.integers(0, 2**62, 500)])
    got = st.rows_of(np.concatenate([present, absent]))
    assert (got[:500] == np.sort(rows)).all() and (got[500:] == -1).all()
elif what == "loader_first":
    st = Store.open(path)
    loader = Loader(st, ["features/f/pooled"], 1024, rank=0, world_size=8, seed=seed)
    batch = next(iter(loader))
    assert batch["f"].shape[0] == 1024 if "f" in batch else True
seconds = time.perf_counter() - t
running[0] = False
sampler.join()
peak = status("VmHWM")
anon = max(anon_peak[0], status("RssAnon"))
print(json.dumps({"seconds": seconds, "rss_above_mib": (peak - base) / 1024, "max_rss_mib": peak / 1024,
                  "anon_above_mib": (anon - anon0) / 1024}))
"""


def uid_batches(start: int, stop: int, seed: int = 0):
    """Random-order even 128-bit-looking uids for rows [start, stop), a batch at a time."""
    for a in range(start, stop, BATCH):
        b = min(stop, a + BATCH)
        rng = np.random.default_rng([seed, a])
        x = rng.integers(0, 2**62, b - a, dtype=np.int64) * 2  # even: add_1000 uses odd ones
        yield np.char.mod("%032x", x).astype(np.dtypes.StringDType())


def grow(store, to: int) -> dict:
    """Register uids until the store has `to` rows; rows/s and the registration's seconds."""
    t = time.perf_counter()
    start = store.n_rows
    for uids in uid_batches(start, to):
        store.register(uids)
    seconds = time.perf_counter() - t
    return {"rows": to - start, "seconds": seconds, "rows_per_s": (to - start) / max(seconds, 1e-9)}


def child(what: str, path: str, seed: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, what, path, str(seed)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{what} at {path} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def fit(sizes, values) -> dict:
    """Two least-squares lines of value and their values at TARGET_ROWS: against rows (what a
    cost that grows with the store would follow) and against log2(rows) (what an index of
    levels follows: one more level per FANOUT x rows, a fixed cost per doubling)."""
    x, y = np.asarray(sizes, float), np.asarray(values, float)
    slope, icpt = np.polyfit(x, y, 1) if len(x) > 1 else (0.0, float(y[0]))
    lslope, licpt = np.polyfit(np.log2(x), y, 1) if len(x) > 1 else (0.0, float(y[0]))
    return {"per_million_rows": float(slope * 1e6), "intercept": float(icpt),
            "at_1_28B": float(icpt + slope * TARGET_ROWS), "per_doubling": float(lslope),
            "at_1_28B_log": float(licpt + lslope * np.log2(TARGET_ROWS))}


def fill_features(store, name: str = "f", dim: int = 4) -> int:
    """Feature set `name` (dim-4 fp16) over every block not yet written; returns blocks written."""
    from featstore.core.writes import write_block

    fs = store.create_feature_set(name, {"model": "bench-scale", "dim": dim}, dim)
    done, _ = fs.done_summary()
    written = 0
    for b in range(store.n_blocks):
        start, stop = store.block_range(b)
        if done[b] == stop - start:
            continue
        x = np.random.default_rng(b).standard_normal((stop - start, dim)).astype(np.float32)
        write_block(store, name, b, {"pooled": x}, np.ones(stop - start, bool))
        written += 1
    store.feature_set(name).progress.compact()  # what a job's end does: blocks.npy current
    return written


WRITER = r"""
import json, sys, time
import numpy as np
from featstore.store import Store
path, i, k, shared = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
own = np.char.mod("w%d-%%030x" % i, np.arange(k)).astype(np.dtypes.StringDType())
common = np.char.mod("common-%030x", np.arange(shared)).astype(np.dtypes.StringDType())
uids = np.concatenate([common, own])
t = time.perf_counter()
res = Store.open(path, mode="r+").register(uids, source_refs=uids)
print(json.dumps({"seconds": time.perf_counter() - t, "registered": res["registered"]}))
"""


def concurrent_writers(path: str, writers: int = 8, each: int = 100_000, shared: int = 10_000) -> dict:
    """`writers` processes registering at once: `each` uids of their own plus `shared` uids every
    writer also brings; nothing may be lost or registered twice."""
    from featstore.store import Store

    before = Store.open(path).n_rows
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, str(i), str(each), str(shared)],
                              stdout=subprocess.PIPE, text=True) for i in range(writers)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    seconds = time.perf_counter() - t
    if any(p.returncode for p in procs):
        raise RuntimeError("a concurrent writer failed")
    st = Store.open(path)
    want = writers * each + shared
    probe = np.concatenate([np.char.mod("w%d-%%030x" % i, np.arange(0, each, 997)) for i in range(writers)]
                           + [np.char.mod("common-%030x", np.arange(shared))]).astype(np.dtypes.StringDType())
    rows = st.rows_of(probe)
    ok = st.n_rows - before == want and sum(o["registered"] for o in outs) == want and (rows >= before).all() \
        and len(np.unique(rows)) == len(rows)
    if not ok:
        raise RuntimeError(f"concurrent registration lost or doubled rows: {st.n_rows - before} new, want {want}")
    return {"writers": writers, "rows_each": each + shared, "store_rows_before": before, "rows_registered": want,
            "seconds": seconds, "rows_per_s": want / seconds, "nothing_lost": True}


def measure(path: str, size: int, rounds: int) -> dict:
    out = {"rows": size}
    for what in ("add_1000", "lookup_1000", "loader_first"):
        # add_1000 leaves its 1,000 rows in the store: on millions of rows that changes nothing measured
        runs = [child(what, path, seed=size + i) for i in range(rounds)]
        med = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        out[what] = {"seconds": med["seconds"], "rss_above_mib": max(r["rss_above_mib"] for r in runs),
                     "anon_above_mib": max(r["anon_above_mib"] for r in runs),
                     "spread_s": [min(r["seconds"] for r in runs), max(r["seconds"] for r in runs)]}
    return out


def plot(results: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = results["sizes"]
    x = [p["rows"] / 1e6 for p in pts]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for what, label in (("add_1000", "add 1,000 uids"), ("lookup_1000", "open + look up 1,000"),
                        ("loader_first", "Loader rank 0/8 first batch")):
        axes[0].plot(x, [p[what]["seconds"] for p in pts], "o-", label=label)
        line, = axes[1].plot(x, [p[what]["anon_above_mib"] for p in pts], "o-", label=f"{label}: own (RssAnon)")
        axes[1].plot(x, [p[what]["rss_above_mib"] for p in pts], "o:", color=line.get_color(), alpha=0.6,
                     label=f"{label}: peak RSS (with mapped pages)")
    axes[0].set(xscale="log", xlabel="store rows (millions)", ylabel="seconds (median)", ylim=(0, None))
    axes[1].set(xscale="log", xlabel="store rows (millions)", ylabel="MiB above the interpreter", ylim=(0, None))
    axes[0].legend()
    axes[1].legend(fontsize=7)
    fig.suptitle(f"featstore store operations vs store size ({results['device']})")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    from common import device_string  # noqa: E402

    from featstore.store import Store

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1e6,4e6,16e6,64e6", help="store sizes in rows, comma-separated")
    ap.add_argument("--quick", action="store_true", help="1M rows only, results to scale.quick.json")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per figure (the median is reported)")
    ap.add_argument("--rows-per-shard", type=int, default=65536, help="block size of the store (a billion-row store's)")
    ap.add_argument("--writers-at", type=float, default=16e6, help="store size at which 8 writers register at once")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--dir", default=None, help="where the store is built (default: a temporary folder)")
    a = ap.parse_args(argv)
    sizes = [1_000_000] if a.quick else sorted(int(float(s)) for s in a.sizes.split(","))
    work = a.dir or tempfile.mkdtemp(prefix="bench-scale-")
    path = os.path.join(work, "s.zarr")
    store = Store.create(path, rows_per_shard=a.rows_per_shard)
    results = {"bench": "scale", "device": device_string(), "params": {
        "sizes": sizes, "rows_per_shard": a.rows_per_shard, "rounds": a.rounds, "uids": "random 32-hex-digit, "
        "registered 2^20 per registration", "feature": "dim 4 float16 over every row", "loader": "Loader(store, "
        "['features/f/pooled'], 1024, rank=0, world_size=8), defaults otherwise",
        "statistic": "median seconds over fresh processes; RSS: the largest VmHWM above VmRSS at start",
        "target_rows": TARGET_ROWS}, "sizes": [], "growth": []}
    for size in sizes:
        g = grow(store, size)
        store = Store.open(path, mode="r+")
        t = time.perf_counter()
        blocks = fill_features(store)
        g.update(to=size, feature_blocks=blocks, feature_seconds=time.perf_counter() - t)
        results["growth"].append(g)
        point = measure(path, size, a.rounds)
        point["files"] = {k: sum(len(f) for _, _, f in os.walk(os.path.join(path, k)))
                          for k in ("samples/uid", "features/f/pooled", "_index/uid", "_progress/f")}
        results["sizes"].append(point)
        print(json.dumps(point), flush=True)
        if size == int(a.writers_at) and not a.quick:
            results["concurrent"] = concurrent_writers(path)
            print(json.dumps(results["concurrent"]), flush=True)
            store = Store.open(path, mode="r+")
    x = [p["rows"] for p in results["sizes"]]
    results["fit"] = {w: {k: fit(x, [p[w][k] for p in results["sizes"]]) for k in ("seconds", "rss_above_mib",
                                                                                  "anon_above_mib")}
                      for w in ("add_1000", "lookup_1000", "loader_first")}
    rows = sum(g["rows"] for g in results["growth"])
    results["registration"] = {"rows_per_s": rows / sum(g["seconds"] for g in results["growth"])}
    os.makedirs(a.out, exist_ok=True)
    name = "scale.quick" if a.quick else "scale"
    with open(os.path.join(a.out, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(a.out, f"{name}.png"))
    print(json.dumps(results["fit"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
