"""The benchmark scripts run as a user runs them, and the README's tables match the results files.

No timing is asserted: these check that the scripts complete and write every key the README and
the issues rely on (the figures themselves come from full runs, see benchmarks/results/), that
they need none of the benchmark peers (litdata, mosaic streaming, Lance: `make test` never
installs them), and that the peers' install step would notice a package of the project moving.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import install_peers  # noqa: E402

PEERS = ("litdata", "streaming", "lance")
BLOCK_PEERS = f'''\
import importlib.abc, sys
class _NoPeers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {PEERS!r}:
            raise ImportError(f"{{name}} is a benchmark peer, blocked by the test: this path must not need it")
sys.meta_path.insert(0, _NoPeers())
'''


def test_gpu_sh_quick_runs_every_step_on_cpu_without_the_peers_and_writes_its_results(tmp_path):
    results = tmp_path / "results"
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCK_PEERS)  # every Python process of the run: no peer imports
    env = {**os.environ, "PYTHON": sys.executable, "FEATSTORE_BENCH_RESULTS": str(results),
           "FEATSTORE_BENCH_DATA": str(tmp_path / "data"),
           "PYTHONPATH": os.pathsep.join([str(block), *filter(None, [os.environ.get("PYTHONPATH")])])}
    blocked = subprocess.run([sys.executable, "-c", "import litdata"], env=env, capture_output=True, text=True)
    assert blocked.returncode != 0 and "blocked by the test" in blocked.stderr  # the blocker works
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 step(s) failed" in r.stdout

    gpu = json.loads((results / "gpu.quick.json").read_text())
    assert gpu["bench"] == "gpu" and gpu["device"].startswith("cpu: ")
    assert gpu["params"]["decode_workers"] == 2  # decode in processes, as on the GPU
    for key in ("forward_images_per_s", "extract_images_per_s", "batched_captions_per_s", "one_caption_per_s",
                "gemm_flops_per_s", "image_flops", "caption_flops"):
        assert gpu["figures"][key] > 0, key
    for key in ("extract_vs_forward", "batched_vs_one_caption", "cc3m_sharelock_reported_vs_ours"):
        assert gpu["ratios"][key] > 0, key
    proj = gpu["projection"]
    assert proj["cc3m_total_gpu_hours"] == proj["cc3m_images_hours"] + proj["cc3m_captions_hours"]
    assert proj["flop_bound_hours_at_measured_gemm"] > 0 and proj["target_gpu_hours"] == 1.5
    assert 12 <= gpu["figures"]["caption_mean_tokens"] <= 20  # "~16 tokens" captions

    store = json.loads((results / "store.gpu.quick.json").read_text())
    assert store["bench"] == "store" and store["params"]["quick"] is True
    for key in ("featstore_samples_per_s", "memmap_samples_per_s", "featstore_cold_samples_per_s"):
        assert store["figures"][key] > 0, key
    assert {"featstore_vs_memmap", "featstore_vs_memmap_cold", "shuffle_quality"} <= set(store["ratios"])
    featstore = store["params"]["contenders"]["featstore"]
    assert "seed" in featstore["loader_defaults"] and "window_bytes" in featstore["loader_defaults"]  # the signature
    assert featstore["effective"]["window_rows"] >= store["params"]["batch_size"]  # what the default came to
    assert f"window {featstore['effective']['window_rows']:,} rows" in featstore["settings"]
    for run in store["runs"]["featstore_cold"]:
        assert run["resident_after_drop"] < 0.5  # the cold pass really read from disk

    train = json.loads((results / "train.gpu.quick.json").read_text())
    assert {"store_vs_preloaded", "featstore_vs_sharelock_staged"} <= set(train["ratios"])

    crops = json.loads((results / "fresh_crops.quick.json").read_text())  # UTA's step, the EVA02-CLIP teacher in it
    assert all(crops["figures"][f"{m}_steps_per_s"] > 0 for m in ("none", "resample", "teacher"))
    assert set(crops["ratios"]) == {"resample_vs_stored_crop", "teacher_vs_stored_crop"}


def test_install_peers_notices_a_project_package_that_moved():
    before = {"numpy": "2.4.6", "transformers": "5.24.0", "zarr": "3.1.6"}
    after = {"numpy": "2.1.3", "transformers": "5.24.0", "litdata": "0.2.76"}  # a downgrade, a removal, an addition
    assert install_peers.changes(before, after) == ["numpy 2.4.6 -> 2.1.3", "zarr 3.1.6 was removed"]
    assert install_peers.changes(before, {**before, "litdata": "0.2.76"}) == []


def test_install_peers_reads_the_versions_a_fresh_interpreter_imports():
    snapshot = install_peers.snapshot()
    imported = install_peers.imported_versions()
    assert set(imported) == {"numpy", "transformers", "torch", "featstore"}
    for name, version in imported.items():
        assert snapshot[name] == version, name  # what runs is what is installed


def test_readme_measured_section_is_what_report_py_makes_from_the_results():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bench_scale_measures_every_size_and_fits_the_curve(tmp_path):
    """bench_scale as issue 18's figures are made, on tiny sizes: a store grown through two sizes,
    each operation timed in fresh processes, the fitted slopes and the plot written."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--sizes", "3000,6000", "--rounds", "1",
           "--rows-per-shard", "1024", "--writers-at", "0", "--dir", str(tmp_path), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads((tmp_path / "out" / "scale.json").read_text())
    assert [p["rows"] for p in d["sizes"]] == [3000, 6000] and [g["to"] for g in d["growth"]] == [3000, 6000]
    for p in d["sizes"]:
        for what in ("add_1000", "lookup_1000", "loader_first"):
            assert p[what]["seconds"] > 0 and p[what]["anon_above_mib"] is not None
        assert p["files"]["_index/uid"] > 0
    assert {"per_million_rows", "at_1_28B", "per_doubling", "at_1_28B_log"} <= set(d["fit"]["add_1000"]["seconds"])
    assert d["registration"]["rows_per_s"] > 0 and (tmp_path / "out" / "scale.png").stat().st_size > 0


def test_bench_search_quick_writes_every_figure_and_flat_is_exact(tmp_path):
    """bench_search --quick (issue 22): a real store of clustered 768-d rows, flat / ivf indexes built by
    build_index, recall against numpy's exact top-10 (flat must find all of it), the nprobe sweep."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_search.py"), "--quick", "--rounds", "2", "--single", "5",
           "--queries", "200", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads((tmp_path / "out" / "search.quick.json").read_text())
    assert d["bench"] == "search" and d["params"]["quick"] is True and d["params"]["rows"] == 20_000
    assert set(d["figures"]) == {"flat", "ivf_16", "ivf"}
    for name, f in d["figures"].items():
        assert f["p50_ms"] > 0 and f["p99_ms"] >= f["p50_ms"] and f["batch_queries_per_s"] > 0, name
        assert f["build_rows_per_s"] > 0 and 0 <= f["recall_at_10"] <= 1, name
        assert d["spread"][name]["speedup"]["rounds"] == 2
        assert d["ratios"][f"{name}_speedup_vs_flat"] > 0
    assert d["figures"]["flat"]["recall_at_10"] == 1.0  # brute force finds numpy's exact top-10
    calibration = d["params"]["builds"]["ivf"]["calibration"]  # build_index's own measurement of its nprobe
    assert d["figures"]["ivf"]["nprobe"] == d["params"]["builds"]["ivf"]["nprobe"] == calibration["nprobe"]
    assert calibration["recall"] >= calibration["target"] == 0.95 and calibration["queries"] == 256
    sweep = d["sweep"]
    assert [s["nprobe"] for s in sweep] == sorted(s["nprobe"] for s in sweep) and len(sweep) >= 5
    assert sweep[-1]["recall_at_10"] >= sweep[0]["recall_at_10"]  # probing more lists never finds less here
    assert set(d["goal"]) == {"recall_at_10", "speedup", "met_by_default", "sweep_settings_meeting_it"}
    assert (tmp_path / "out" / "search.quick.png").stat().st_size > 0  # the recall / speed-up plot
    assert not (tmp_path / "data").exists()  # the store and its indexes are removed without --keep


def test_bench_write_behind_quick_writes_every_figure(tmp_path):
    """bench_write_behind --quick (issue 21): the block runner into a local store and into an S3 store
    on moto, with and without the writer thread; every contender wrote all its rows."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_write_behind.py"), "--quick", "--data-dir",
           str(tmp_path / "data"), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads((tmp_path / "out" / "write_behind.quick.json").read_text())
    assert d["bench"] == "write_behind" and d["params"]["quick"] is True and d["params"]["images"] == 32
    assert set(d["figures"]) == {f"{c}_{m}_images_per_s" for c in ("local", "s3", "far") for m in ("sync", "behind")}
    assert all(v > 0 for v in d["figures"].values())
    assert set(d["ratios"]) == {"behind_vs_sync_local", "behind_vs_sync_s3", "behind_vs_sync_far", "s3_vs_local_sync",
                                "far_vs_local_sync"}
    assert all(d["spread"][k]["rounds"] == 1 for k in d["ratios"])
    assert not (tmp_path / "data").exists()
