"""Small helpers shared by the benchmarks (`benchmarks/bench_*.py`).

Importing: a benchmark run as `python benchmarks/bench_x.py` has `benchmarks/` first on
`sys.path`, so it just does `from common import device_string, drop_cache, ...`.  Anything else
(a test, a notebook) puts `benchmarks/` on `sys.path` first.  Only the standard library is used.

    device_string()          "cpu: 2 cores AMD EPYC, AVX2" (+ ", cuda: <name>" when asked about a GPU)
    bench_parser(doc)        argparse with --quick, --data-dir, --keep
    data_dir(args, bench)    a fresh scratch directory (bench_data/<bench>/ by default; gitignored)
    files(*paths)            every regular file under the given files and directories
    drop_cache(paths)        fsync + posix_fadvise(DONTNEED) each file: the next read is cold (disk)
    warm_cache(paths)        read each file once: the next read is warm (page cache)
    resident_fraction(paths) the fraction of those files' pages in the page cache (mincore)
    timed(fn)                (seconds, fn()) with time.perf_counter
    print_table(rows)        a markdown table from a list of dicts
    write_results(...)       benchmarks/results/<bench>[.<tag>][.quick].json in the DESIGN.md format

These VMs evict page cache that no process touched for about a minute, so "warm" must mean
"just read" (`warm_cache` right before the timed pass), never "read at the start of the run".
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import shutil
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("FEATSTORE_BENCH_RESULTS") or HERE / "results")  # the tests write elsewhere


def device_string(gpu: str | None = None) -> str:
    """ "cpu: <n> cores <model name from /proc/cpuinfo>, <widest vector ISA>", plus the GPU's name
    when one is used.  The ISA matters: bf16 is faster than fp32 with AVX-512 BF16 or AMX and
    several times slower with AVX2 alone, and shared VMs of one model name come with either."""
    model, flags = "unknown cpu", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown cpu":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = next((name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"),
                                        ("avx2", "AVX2")) if flag in flags), None)
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = f"cpu: {n} cores {model}" + (f", {isa}" if isa else "")
    return f"{out}, cuda: {gpu}" if gpu else out


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes; finishes in under a minute")
    p.add_argument("--data-dir", default=None, help="scratch directory for generated data (default bench_data/<bench>)")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    return p


def data_dir(args, bench: str) -> Path:
    """A fresh, empty scratch directory for one benchmark's generated data."""
    d = Path(args.data_dir) if args.data_dir else HERE.parent / "bench_data" / bench
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def files(*paths) -> list[str]:
    out = []
    for p in paths:
        p = str(p)
        if os.path.isfile(p):
            out.append(p)
        else:
            for root, _, names in os.walk(p):
                out += [os.path.join(root, n) for n in sorted(names)]
    return out


def drop_cache(*paths) -> int:
    """Evict the files under `paths` from the page cache (no root needed).  Dirty pages cannot be
    dropped, hence the fsync; pages still mapped by a live mmap are not dropped either, so close
    memmaps/datasets first.  Returns the number of bytes asked to drop."""
    total = 0
    for path in files(*paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def warm_cache(*paths) -> int:
    """Read every file under `paths` once, so they are in the page cache.  Returns bytes read."""
    total, buf = 0, bytearray(8 << 20)
    for path in files(*paths):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def resident_fraction(*paths) -> float:
    """Fraction of the pages of the files under `paths` that are in the page cache (mincore(2))."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    have = want = 0
    for path in files(*paths):
        size = os.path.getsize(path)
        if size == 0:
            continue
        n = -(-size // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * n)()
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap failed: {path}")
            try:
                if libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore failed: {path}")
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        have += sum(v & 1 for v in bytes(vec))  # bit 0: resident
        want += n
    return have / want if want else 0.0


def timed(fn, *args, **kwargs):
    """(seconds, result) of one call."""
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - t, result


def print_table(rows: list[dict], title: str | None = None) -> str:
    """Print (and return) a markdown table; the columns are the first row's keys."""
    if title:
        print(f"\n{title}\n")
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def results_path(bench: str, quick: bool = False, tag: str | None = None) -> Path:
    """benchmarks/results/<bench>[.<tag>][.quick].json: a quick run never replaces a full one, and
    a run on another machine (tag "gpu") never replaces this one's."""
    return RESULTS / ".".join([bench, *([tag] if tag else []), *(["quick"] if quick else []), "json"])


def write_results(bench: str, params: dict, figures: dict, ratios: dict, *, quick: bool = False,
                  device: str | None = None, tag: str | None = None, **extra) -> Path:
    """Write `results_path(bench, quick, tag)` in the DESIGN.md format; extra keys go after the four."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = results_path(bench, quick, tag)
    doc = {"bench": bench, "device": device or device_string(), "params": {**params, "quick": quick},
           "figures": figures, "ratios": ratios, **extra}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path
