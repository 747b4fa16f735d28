#!/usr/bin/env bash
# One command for a machine with a GPU: extraction (a DINOv2-B-sized ViT, a Llama-3-8B-shaped
# decoder) with the projected CC3M precompute time, then the store and training benchmarks,
# all with --device cuda, in under 8 minutes.  Results name the device and never replace this
# repository's CPU results:
#   benchmarks/results/gpu.json  store.gpu.json  train.gpu.json  fresh_crops.json (UTA's step with fresh crops,
#   the EVA02-CLIP teacher in the step)  eva_clip_parity.json (where open_clip imports)
#
#   benchmarks/gpu.sh            on the GPU machine
#   benchmarks/gpu.sh --quick    tiny shapes on CPU (what tests/test_benchmarks.py runs): *.quick.json
#
# The GPU machine's image has torch, transformers, numpy, pandas, pyarrow but not zarr nor the
# benchmark peers: run benchmarks/gpu_wheels.sh here first and carry `.whl` (this script installs
# those wheels into /tmp/featstore-site, no index, no deps, and puts it on PYTHONPATH), then
# featstore itself is installed from this checkout (no deps, offline).
#
# Environment: PYTHON (default .venv/bin/python, else python3); FEATSTORE_BENCH_RESULTS (results
# directory, default benchmarks/results); FEATSTORE_BENCH_DATA (scratch, default bench_data/).
# Each step runs under its own time limit (bench_store also stops starting rounds at its
# --budget, so it writes its results before the limit); a failed step is reported and the others
# still run; the exit status is the number of steps that failed.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
RESULTS=${FEATSTORE_BENCH_RESULTS:-benchmarks/results}
DATA=${FEATSTORE_BENCH_DATA:-bench_data}
export FEATSTORE_BENCH_RESULTS=$RESULTS HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
mkdir -p "$RESULTS" "$DATA"

if [ "${1:-}" = "--quick" ]; then
    DEV=cpu
    # --num-workers 2: decode in processes, as the GPU run does (its default: one per core)
    EXTRACT=(benchmarks/bench_gpu.py --quick --device cpu --num-workers 2 --data-dir "$DATA/gpu")
    STORE=(benchmarks/bench_store.py --quick --device cpu --tag gpu --only featstore,memmap,memmap_threads --no-remote --budget 60
           --data-dir "$DATA/store-gpu")
    TRAIN=(benchmarks/bench_train.py --quick --device cpu --rounds 1 --tag gpu --data-dir "$DATA/train-gpu")
    CROPS=(benchmarks/bench_fresh_crops.py --quick --device cpu --rounds 1)
    LIMITS=(120 120 120 60)
else
    DEV=cuda
    if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
        echo "gpu.sh: installing the carried wheels (.whl/) into /tmp/featstore-site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/featstore-site \
            .whl/*.whl || echo "gpu.sh: installing the wheels failed"
        export PYTHONPATH=/tmp/featstore-site${PYTHONPATH:+:$PYTHONPATH}
    fi
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu.sh: torch sees no CUDA device here (run with --quick for the CPU check)" >&2
        exit 3
    fi
    "$PY" -c "import featstore.pipelines.extract" 2>/dev/null || {
        echo "gpu.sh: featstore is not importable with $PY; installing this checkout (no deps, offline)"
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . || echo "gpu.sh: install failed; steps will fail to import"
    }
    "$PY" - <<'PYEOF'
import importlib, torch
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
for m in ("numpy", "transformers", "zarr", "datasets", "litdata", "featstore.pipelines.extract"):
    try:
        print(f"  {m} {getattr(importlib.import_module(m), '__version__', 'ok')}")
    except Exception as e:  # a step that needs it reports it; bench_store lists the peers it could not run
        print(f"  {m}: cannot import ({type(e).__name__}: {e})")
PYEOF
    df -h /dev/shm 2>/dev/null | tail -1 | awk '{print "shared memory (/dev/shm, DataLoader workers use it): " $2}'
    EXTRACT=(benchmarks/bench_gpu.py --device cuda --data-dir "$DATA/gpu")
    # a third of the CPU run's rows, up to 3 warm + 1 cold rounds, no S3 contenders; --budget: no
    # round starts after 120 s, so the results are written well inside the step's limit
    STORE=(benchmarks/bench_store.py --device cuda --tag gpu --rows 65536 --sharelock-rows 10000 --rounds 3
           --cold-rounds 1 --no-remote --budget 120 --data-dir "$DATA/store-gpu")
    TRAIN=(benchmarks/bench_train.py --device cuda --rounds 2 --tag gpu --data-dir "$DATA/train-gpu")
    CROPS=(benchmarks/bench_fresh_crops.py --device cuda --rounds 3)
    LIMITS=(200 170 100 90)  # 9.3 minutes in all at most; each step expected well under its limit
fi

failed=0
start=$(date +%s)
run() {  # run LIMIT NAME ARGS...
    local limit=$1 name=$2
    shift 2
    local t0
    t0=$(date +%s)
    echo "== $name (limit ${limit}s) =="
    timeout --kill-after=10 "$limit" "$PY" "$@"
    local rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - t0 ))s =="
    [ $rc -eq 0 ] || failed=$((failed + 1))
}
run "${LIMITS[0]}" "extraction + CC3M projection ($DEV)" "${EXTRACT[@]}"
run "${LIMITS[1]}" "store read path ($DEV)" "${STORE[@]}"
run "${LIMITS[2]}" "training ($DEV)" "${TRAIN[@]}"
run "${LIMITS[3]}" "UTA step with fresh crops, EVA02-CLIP teacher in the step ($DEV)" "${CROPS[@]}"
if "$PY" -c "import open_clip, timm" 2>/dev/null; then run 150 "EVA-CLIP port vs open_clip ($DEV)" benchmarks/eva_clip_vs_open_clip.py --device "$DEV" --out "$RESULTS/eva_clip_parity$([ "$DEV" = cpu ] && echo .quick).json"; fi
echo "gpu.sh: $failed step(s) failed, $(( $(date +%s) - start ))s in all; results in $RESULTS"
exit $failed
