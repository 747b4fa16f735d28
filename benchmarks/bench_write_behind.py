"""What the writer thread buys, on a local store and on an S3 store (issue 21), rounds interleaved.

featstore's block runner (`pipelines/blocks.py`) hands each computed row block to writer threads
(`pipelines/write_behind.py`) and goes on with the next block's forward pass; `writes_in_flight=0`
writes on the forward thread instead.  `_behind` is writes_in_flight 1 for the local store (the
default there) and REMOTE_IN_FLIGHT (4: what `default_in_flight` gives a store on object storage)
for the S3 ones.  Six contenders, the same images, backbone and settings:

    local_sync / local_behind   a store on local disk, writes_in_flight 0 / 1
    s3_sync / s3_behind         the same store at s3://featstore-bench/... on moto's S3 server
                                (a child process on 127.0.0.1: every shard a PUT, ~1 ms a request)
    far_sync / far_behind       the same at s3://featstore-far/... on that server, every request of
                                this bucket delayed by --latency-ms (default 20; contenders/slow_s3.py):
                                S3 as far away as a region's is; the delay is a sleep, no CPU

Each run is the block runner alone (what `featstore extract` does after prepare: read the tar,
decode, preprocess, forward, store), the backbone loaded by prepare (untimed), storing pooled
features and the patch tokens as float16 (the bytes a UTA teacher store writes), rows_per_shard =
2 batches.  → `behind_vs_sync_local`, `behind_vs_sync_s3`, `behind_vs_sync_far` (images/s ÷
images/s, paired per round) and `s3_vs_local_sync`, `far_vs_local_sync` (how much slower the
remote store's writes make a synchronous run).

The backbone is DINOv2-small-sized (hidden 384, 12 layers, patch 14, random weights; --quick: 96
and 4): its CPU forward is slow next to writing its tokens, as a GPU's is not.  On these 2-core VMs
moto runs on the same cores as the forward pass.

    python benchmarks/bench_write_behind.py [--quick] [--images N] [--rounds K]
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from bench_extract import VIT, dinov2_small_sized, make_images  # noqa: E402
from common import bench_parser, data_dir, device_string, write_results  # noqa: E402

from featstore.pipelines.write_behind import REMOTE_IN_FLIGHT  # noqa: E402

CONTENDERS = ("local_sync", "local_behind", "s3_sync", "s3_behind", "far_sync", "far_behind")
FAR_BUCKET = "featstore-far"


class Runs:
    def __init__(self, d: str, model: str, n: int, batch: int, urls: dict):
        self.d, self.model, self.n, self.batch, self.urls = d, model, n, batch, urls
        self.shards = make_images(n, os.path.join(d, "shards"))
        self.k = 0

    def _store(self, where: str) -> str:
        self.k += 1
        if where in self.urls:
            return f"{self.urls[where]}/img-{self.k}.zarr"
        path = os.path.join(self.d, f"img-{self.k}.zarr")
        shutil.rmtree(path, ignore_errors=True)
        return path

    def run(self, where: str, in_flight: int) -> float:
        from featstore.pipelines.extract import BlockRunner, prepare

        path = self._store(where)
        spec, store, bb, _ = prepare(path, self.shards, self.model, name="vit", rows_per_shard=self.batch * 2,
                                     batch_size=self.batch, precision="fp32", tokens=True, token_dtype="float16",
                                     writes_in_flight=in_flight, log=lambda *_: None)
        bb.encode_images(torch.zeros(2, 3, 224, 224, dtype=torch.uint8))  # warm-up, untimed
        runner = BlockRunner(spec, backbone=bb, store=store)
        t = time.perf_counter()
        runner.run(store.feature_set("vit").missing_blocks())
        rate = self.n / (time.perf_counter() - t)
        runner.close()
        assert store.feature_set("vit").usable_rows().sum() == self.n
        if where == "local":
            shutil.rmtree(path, ignore_errors=True)
        return rate


def main(argv=None) -> int:
    from contenders.remote import BUCKET, s3_server

    ap = bench_parser(__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=None, help="images per run (default 256; --quick 32)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; --quick 1)")
    ap.add_argument("--latency-ms", type=int, default=20, help="delay of every request to the far bucket (default 20)")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    a = ap.parse_args(argv)
    if a.out:
        import common
        common.RESULTS = __import__("pathlib").Path(a.out)
    n = a.images or (32 if a.quick else 256)
    rounds = a.rounds or (1 if a.quick else 5)
    t_all = time.perf_counter()
    work = data_dir(a, "write_behind")
    model = dinov2_small_sized(os.path.join(work, "vit"), VIT["quick" if a.quick else "full"])
    rates = {c: [] for c in CONTENDERS}
    with s3_server(a.latency_ms, FAR_BUCKET):
        runs = Runs(str(work), model, n, a.batch, {"s3": f"s3://{BUCKET}/wb", "far": f"s3://{FAR_BUCKET}/wb"})
        runs.run("local", 1)  # warm-up: first decode, first forward, first PUTs
        for r in range(rounds):
            for c in CONTENDERS:
                where, how = c.split("_")
                rates[c].append(runs.run(where, 0 if how == "sync" else 1 if where == "local" else REMOTE_IN_FLIGHT))
            print(f"round {r}: " + ", ".join(f"{c} {rates[c][-1]:.1f}/s" for c in CONTENDERS), flush=True)

    def paired(a_: str, b_: str) -> tuple[float, dict]:
        ratios = [x / y for x, y in zip(rates[a_], rates[b_])]
        return statistics.median(ratios), {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                           "rounds": len(ratios)}

    figures = {f"{c}_images_per_s": statistics.median(v) for c, v in rates.items()}
    ratios, spread = {}, {}
    for name, (x, y) in {"behind_vs_sync_local": ("local_behind", "local_sync"),
                         "behind_vs_sync_s3": ("s3_behind", "s3_sync"),
                         "behind_vs_sync_far": ("far_behind", "far_sync"),
                         "s3_vs_local_sync": ("s3_sync", "local_sync"),
                         "far_vs_local_sync": ("far_sync", "local_sync")}.items():
        ratios[name], spread[name] = paired(x, y)
    params = {"images": n, "batch": a.batch, "rounds": rounds, "rows_per_shard": 2 * a.batch,
              "backbone": f"DINOv2-small-sized ViT ({'quick' if a.quick else 'full'}: {VIT['quick' if a.quick else 'full']}), fp32",
              "stored": "pooled + patch tokens float16", "torch_threads": torch.get_num_threads(),
              "s3": "moto's S3 server in a child process on 127.0.0.1", "latency_ms": a.latency_ms,
              "contenders": {"local_sync": "block runner, local store, writes_in_flight=0",
                             "local_behind": "block runner, local store, writes_in_flight=1 (one writer thread: the default there)",
                             "s3_sync": "block runner, s3:// store on moto, writes_in_flight=0",
                             "s3_behind": f"block runner, s3:// store on moto, writes_in_flight={REMOTE_IN_FLIGHT} (the default there)",
                             "far_sync": f"block runner, s3:// store on moto with {a.latency_ms} ms before every request, "
                                         "writes_in_flight=0",
                             "far_behind": f"the same with {a.latency_ms} ms a request, writes_in_flight={REMOTE_IN_FLIGHT}"},
              "wall_seconds": round(time.perf_counter() - t_all, 1)}
    out = write_results("write_behind", params, figures, ratios, quick=a.quick, device=device_string(), spread=spread)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    for k, v in ratios.items():
        print(f"{k}: {v:.3f} (min {spread[k]['min']:.3f}, max {spread[k]['max']:.3f})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
