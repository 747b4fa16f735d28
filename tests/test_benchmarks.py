"""The benchmark scripts run as a user runs them, and the README's tables match the results files.

No timing is asserted: these check that the scripts complete and write every key the README and
the issues rely on (the figures themselves come from full runs, see benchmarks/results/).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_sh_quick_runs_every_step_on_cpu_and_writes_its_results(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "PYTHON": sys.executable, "FEATSTORE_BENCH_RESULTS": str(results),
           "FEATSTORE_BENCH_DATA": str(tmp_path / "data")}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--quick"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 step(s) failed" in r.stdout

    gpu = json.loads((results / "gpu.quick.json").read_text())
    assert gpu["bench"] == "gpu" and gpu["device"].startswith("cpu: ")
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
    assert "seed" in store["params"]["contenders"]["featstore"]["loader_defaults"]  # read from the signature
    for run in store["runs"]["featstore_cold"]:
        assert run["resident_after_drop"] < 0.5  # the cold pass really read from disk

    train = json.loads((results / "train.gpu.quick.json").read_text())
    assert {"store_vs_preloaded", "featstore_vs_sharelock"} <= set(train["ratios"])


def test_readme_measured_section_is_what_report_py_makes_from_the_results():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
