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
ORDER = ["store", "store.limits", "extract", "write_behind", "train", "uta", "scale", "search", "gpu", "store.gpu",
         "train.gpu"]
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

from report_sections import (render_extract, render_generic, render_gpu, render_scale, render_search, render_store,
                             render_train, render_uta, render_write_behind)


TITLES = {"store": "Store read path — `bench_store.py`", "extract": "Extraction — `bench_extract.py`",
          "train": "Training data path — `bench_train.py`", "uta": "UTA token targets — `bench_uta.py`",
          "gpu": "GPU extraction and the CC3M projection — `bench_gpu.py` (gpu.sh)",
          "scale": "Store operations vs store size — `bench_scale.py`",
          "search": "Nearest-neighbour search vs brute force — `bench_search.py`",
          "write_behind": "The writer thread on a local and an S3 store — `bench_write_behind.py`",
          "store.gpu": "Store read path on the GPU machine — `gpu.sh`",
          "store.limits": "Store read path against this machine's limits — `bench_store.py --tag limits`", "train.gpu": "Training on the GPU machine — `gpu.sh`"}
RENDER = {"store": render_store, "extract": render_extract, "train": render_train, "uta": render_uta, "scale": render_scale,
          "search": render_search, "gpu": render_gpu, "write_behind": render_write_behind}
NOTES = {  # what to keep in mind reading each table (no figures here: those come from the files)
    "store.limits": "The same harness and rows as the table above, run on its own (`--only featstore,memmap,"
                    "memmap_threads,memcpy,disk_seq,hf_iterable --no-remote`) against the limits of "
                    "`benchmarks/contenders/limits.py`: `memmap_threads` gathers with featstore's read_threads a "
                    "batch ahead (the fair limit of a shuffled gather), `memcpy` copies the same bytes in order in "
                    "RAM, `disk_seq` reads the files front to back (page cache warm, disk cold). memcpy and disk_seq "
                    "do not shuffle: they bound bytes per second, and a shuffled epoch's reads are random.",
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
             "whole store (the shuffle figure above); a larger `window` gives longer runs. Both featstore and "
             "`hf_iterable` read cold at about the disk's sequential rate (`disk_seq`), which bounds every "
             "reader, so neither can pass the other by much there. litdata over S3 (0.2.76 with moto) gave "
             "very different rates from one full run to the next on this machine, and in an earlier run its "
             "later epoch was slower than its first; we have not found why: read its remote ratios as unexplained, not as a "
             "margin. The first epoch over S3 is bounded by what the server hands out (`s3_whole_objects`).",
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
    "search": "The vectors are synthetic: clusters make an inverted-file index work, and how well depends on "
              "how clustered real embeddings are, so read recall here as this mixture's, and check it on a real "
              "feature set (`featstore query` against a flat index). ivf_16 and ivf are one index searched with "
              "two nprobe values; from 200,000 rows `--kind auto` builds ivf, trained on max(40·nlist, 50,000) "
              "rows, and keeps the fewest lists it measured (on 256 of the store's own rows, their own row left "
              "out) to reach recall@10 0.95 (`--target-recall`; `pipelines/search_tune.py`): the table's recall "
              "is on held-out queries, a check of that measurement, and `query(..., nprobe=)` trades recall for "
              "speed per query. Finer lists behind an HNSW quantizer or compressed codes were not tried: their "
              "k-means and training did not fit "
              "this 2-core VM's time box. Single queries leave faiss one thread for every kind: "
              "two threads on one query mostly waited on each other on this shared VM. Batch queries/s use both "
              "cores, where brute force is one matrix product and gains the most.",
    "write_behind": "A block written to S3 costs 8 requests: its lock, the root zarr.json, the block's pointer, "
                    "one PUT per shard (written whole, never read back first), the new marker and pointer, the "
                    "unlock (`core/writes.py`; tests/test_remote_store.py counts them on moto). On moto over "
                    "loopback they are quick, so the S3 store costs little more than the local one "
                    "(`s3_vs_local_sync`). With 20 ms before every request (`far`, a store a region away) writing "
                    "in line costs the forward pass only what `far_vs_local_sync` shows, and the four writer "
                    "threads (`REMOTE_IN_FLIGHT`, each on a block of its own) have that much at most to win back "
                    "(`behind_vs_sync_far`). On the local "
                    "store the CPU forward pass keeps both cores busy and a writer thread neither wins nor loses "
                    "beyond the noise (`behind_vs_sync_local` here, `write_behind_vs_sync` in the extraction "
                    "table), so `extract` keeps one there, as behind a GPU forward pass, where the CPU is free to "
                    "write (`pipelines/write_behind.py:default_in_flight`; `writes_in_flight=` overrides it).",
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
        note = NOTES.get(name, NOTES.get(name.split(".")[0]))
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
