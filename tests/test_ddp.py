"""Multi-process training: `torchrun --nproc_per_node 2 -m featstore train-head|train-uta ...` on CPU
with the gloo backend, real processes on 127.0.0.1, against one process at the same global batch.

What the comparison rests on: the Loader gives rank r the contiguous slice [r*per, (r+1)*per) of
each epoch's order, per = floor(n / B) * B / 2 rows.  With B <= n < 2B there is one global batch per
epoch and both runs see the same rows at the same positions of it: 1 process takes order[0:B],
the 2 ranks order[0:B/2] and order[B/2:B] (the n - B rows each epoch leaves out still differ from
epoch to epoch, so the epoch order has to match too).  With n >= 2B the 2-rank global batches are
other rows than one process's (rank 1 reads from the middle of the epoch), so the curves would only
agree in distribution; there we compare a 2-rank run with itself resumed.

Launching: `torchrun --nnodes 1 --master_addr 127.0.0.1` on a free port, gloo on the loopback device
(GLOO_SOCKET_IFNAME=lo).  torch's TCPStore (the rendezvous, in the torchrun agent) has no bind
address option in torch 2.13: it listens on all interfaces, for the seconds a launch lasts.

Tolerances, relative, at every logged step.  The two runs add the same numbers in another order
(gathered logits, BatchNorm statistics summed over ranks, DDP's gradient average): ~1e-7 a step.
train-uta (SwiGLU/GELU, smooth): UTA_RTOL 1e-4 on losses, val losses, val cosines and grad norms;
measured 3e-7 over 12 steps.  train-head (ReLU): HEAD_RTOL 1e-3 on losses and val losses; measured
3.5e-6 over 20 steps (2 micro-batches a step), and 1.3e-4 (val loss; 1.6e-5 train loss) in this test
at accumulation_steps=1, where at step 9 a pre-activation lay within float error of 0: the ReLU
passes it in one run and not in the other, one (row, unit) of the B*hidden terms of the gradient
differs (~5e-5 of it), and Adam carries that forward.  What the tolerances
catch, measured: without the global BatchNorm the train-head losses differ by 4%; each rank drawing
UTA masks for its own rows instead of its share of the global batch's, by 7e-4 at the first step;
with negatives from its own rows only, the step-1 loss is lower by ~log 2 (5.89 vs 6.59).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from featstore.split import split_by_uid
from featstore.store import Store
from featstore.trainers.sharelock.train import train_head
from featstore.trainers.uta.train import train_uta
from featstore.core.writes import write_block

from sharelock_data import make_aligned_store, one_thread
from signals import default_sigint

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)
BIN = os.path.dirname(sys.executable)
HEAD_RTOL = 1e-3  # train-head: losses and val losses (ReLU kinks, see the module docstring)
UTA_RTOL = 1e-4  # train-uta: losses, val losses, val cosines, grad norms (smooth activations)
TIMEOUT_S = 420  # one torchrun launch (tiny store, a few dozen steps); a hang fails the test instead of the suite
HEAD = ["hidden_dim=64", "accumulation_steps=2", "dropout=0", "warmup_steps=3", "log_every=1", "patience=null",
        "cpu_threads=1", "val_every=5", "save_every=10"]


def _sets(items) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, tmp_path, audit_root=None, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m featstore ARGS` on 127.0.0.1 (gloo on the loopback device).
    With `audit_root`, every rank logs what it writes under that directory (see `_audit_hook`)."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    if audit_root:
        hook_dir = tmp_path / "audit-hook"
        hook_dir.mkdir(exist_ok=True)
        (hook_dir / "sitecustomize.py").write_text(AUDIT_HOOK)
        env.update(PYTHONPATH=os.pathsep.join([str(hook_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   FEATSTORE_AUDIT_ROOT=str(audit_root), FEATSTORE_AUDIT_LOG=str(tmp_path / "audit"))
    cmd = [os.path.join(BIN, "torchrun"), "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "featstore", *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, "\n".join(_rank_errors(r.stderr)) or r.stderr[-3000:]
    return r


def _rank_errors(stderr: str) -> list[str]:
    """The ranks' own error lines (torchrun's summary after them only says that a rank failed)."""
    return [line for line in stderr.splitlines() if line.startswith("error:") or "Error" in line][:20]


# Installed in each rank through sitecustomize: Python's audit hooks see every file a process
# opens for writing, and every mkdir/rename/remove (safetensors writes from Rust, but only into a
# directory the checkpoint code made with os.mkdir and then renames).
AUDIT_HOOK = textwrap.dedent('''
    import os, sys
    _root, _log, _rank = os.environ.get("FEATSTORE_AUDIT_ROOT"), os.environ.get("FEATSTORE_AUDIT_LOG"), os.environ.get("RANK")
    if _root and _log and _rank is not None:
        _out = open(f"{_log}.rank{_rank}", "a", buffering=1)
        _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        _EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.symlink"}

        def _under(p):
            try:
                p = os.path.abspath(os.fsdecode(p))
            except TypeError:
                return False
            return p == _root or p.startswith(_root + os.sep)

        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                if isinstance(flags, int) and flags & _WRITE and _under(path):
                    _out.write(f"open {path}\\n")
            elif event in _EVENTS:
                paths = [a for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))]
                if any(_under(p) for p in paths):
                    _out.write(f"{event} {paths}\\n")

        sys.addaudithook(_hook)
''')


def _audit(tmp_path, rank: int) -> list[str]:
    path = tmp_path / f"audit.rank{rank}"
    return path.read_text().splitlines() if path.exists() else []


def _metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_curves_match(one: list[dict], two: list[dict], keys, rtol: float) -> float:
    """Same logged steps; every value of `keys` within `rtol`; returns the largest relative gap."""
    assert [r["step"] for r in one] == [r["step"] for r in two]
    worst = 0.0
    for a, b in zip(one, two):
        for k in keys:
            if a.get(k) is None:
                assert b.get(k) is None, (a["step"], k)
                continue
            gap = abs(a[k] - b[k]) / max(abs(a[k]), 1e-12)
            assert gap <= rtol, f"step {a['step']} {k}: 1 process {a[k]!r} vs 2 ranks {b[k]!r}"
            worst = max(worst, gap)
    return worst


def _global_batch(store_path, val_fraction=0.1) -> int:
    """An even global batch B with B <= n_train < 2B, leaving some rows out of every epoch."""
    n = int(split_by_uid(Store.open(store_path).uids(), val_fraction)[0].sum())
    b = (n * 3 // 4) // 2 * 2
    assert b <= n < 2 * b and b < n
    return b


# ---- train-head ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head_runs(tmp_path_factory):
    """One store; the same 20-step run by one process and by `torchrun --nproc_per_node 2`."""
    base = tmp_path_factory.mktemp("ddp-head")
    store = make_aligned_store(base / "s.zarr", n=300, rows_per_shard=64)
    sets = HEAD + [f"batch_size={_global_batch(store.path)}"]
    one = train_head(store.path, "img", "txt", base / "one", overrides=sets, steps=20, progress=False)
    audit_root = base / "two"
    r = _torchrun(["train-head", "--store", store.path, "--image", "img", "--text", "txt", "--out", str(base / "two"),
                   "--steps", "20", *_sets(sets), "--json"], base, audit_root=audit_root)
    return {"base": base, "store": store.path, "sets": sets, "one": one, "two": str(base / "two"), "stdout": r.stdout}


def test_two_ranks_match_one_process_at_the_same_global_batch(head_runs):
    one, two = _metrics(head_runs["one"]["out_dir"]), _metrics(head_runs["two"])
    worst = _assert_curves_match(one, two, ("loss", "val_loss"), HEAD_RTOL)
    print(f"train-head, 1 process vs 2 ranks: largest relative gap {worst:.2g} (losses)")
    assert one[-1]["val_loss"] < 0.5 * one[0]["val_loss"]  # it learned something worth comparing
    # the weights end up the same too: every tensor within 1% (relative L2; measured at most 2e-3,
    # the small BatchNorm biases) and the rest of the state exactly
    a, b = (load_file(os.path.join(d, "last", "model.safetensors")) for d in (head_runs["one"]["out_dir"], head_runs["two"]))
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k].double(), b[k].double()
        assert float((x - y).norm()) <= 1e-2 * float(x.norm()) + 1e-12, k


def test_world_size_recorded_and_only_rank_0_writes(head_runs):
    base, two = head_runs["base"], head_runs["two"]
    state = json.load(open(os.path.join(two, "last", "checkpoint.json")))
    assert state["world_size"] == 2 and state["per_rank_batch"] * 2 == state["config"]["batch_size"]
    assert json.load(open(os.path.join(head_runs["one"]["out_dir"], "last", "checkpoint.json")))["world_size"] == 1
    records = _metrics(two)
    assert records[0]["step"] == 0 and records[0]["world_size"] == 2
    assert [r["step"] for r in records] == sorted({r["step"] for r in records})  # one line per step: one writer
    assert sorted(os.listdir(two)) == sorted(os.listdir(head_runs["one"]["out_dir"]))
    summary = json.loads(head_runs["stdout"])  # one summary: rank 1 printed nothing
    assert summary["world_size"] == 2 and summary["rank"] == 0 and summary["train_rows"] == head_runs["one"]["train_rows"]
    rank0, rank1 = _audit(base, 0), _audit(base, 1)
    assert any("metrics.jsonl" in line for line in rank0) and any("os.rename" in line for line in rank0)  # the hook sees writes
    assert rank1 == [], rank1[:5]


def test_resume_under_torchrun_is_exact_and_another_world_size_is_refused(head_runs, tmp_path):
    """A 2-rank run stopped at step 5 and resumed to 12 ends where an uninterrupted one does:
    several batches per epoch (resumed mid-epoch), dropout on (each rank draws its own masks from
    (seed, step, rank), so no rank's RNG state needs saving).  A constant learning rate makes the
    5-step run the first 5 steps of the 12-step one."""
    sets = [s for s in head_runs["sets"] if not s.startswith(("dropout=", "batch_size=", "warmup_steps="))]
    sets += ["dropout=0.3", "batch_size=64", "warmup_steps=0", "min_lr_ratio=1.0"]
    common = ["train-head", "--store", head_runs["store"], "--image", "img", "--text", "txt", *_sets(sets), "--json"]
    _torchrun([*common, "--out", str(tmp_path / "straight"), "--steps", "12"], tmp_path)
    _torchrun([*common, "--out", str(tmp_path / "resumed"), "--steps", "5"], tmp_path)
    _torchrun([*common, "--out", str(tmp_path / "resumed"), "--steps", "12", "--resume"], tmp_path)
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in straight] == list(range(13))
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]
    a, b = (load_file(os.path.join(tmp_path / d, "last", "model.safetensors")) for d in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = json.load(open(tmp_path / "resumed" / "last" / "checkpoint.json"))
    assert state["per_rank_batch"] == 32  # 4 batches per rank per epoch: resumed mid-epoch

    # one process cannot continue a 2-rank run (each rank's share of the order depends on the world size)
    r = subprocess.run([os.path.join(BIN, "featstore"), *common, "--out", str(tmp_path / "resumed"), "--steps", "20",
                        "--resume"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 2 and "trained on 2 process(es), this run has 1" in r.stderr
    assert "--nproc_per_node 2" in r.stderr and "Traceback" not in r.stderr


def test_batch_that_does_not_split_over_the_ranks_is_refused(head_runs, tmp_path):
    sets = [s for s in head_runs["sets"] if not s.startswith("batch_size=")] + ["batch_size=63"]
    cmd = [os.path.join(BIN, "torchrun"), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "featstore", "train-head", "--store", head_runs["store"],
           "--image", "img", "--text", "txt", "--out", str(tmp_path / "run"), "--steps", "3", *_sets(sets)]
    r = subprocess.run(cmd, env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"}, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode != 0
    assert "batch_size 63 (the global batch) does not split evenly over 2 processes" in r.stderr
    assert not (tmp_path / "run").exists()


def test_ctrl_c_under_torchrun_saves_one_checkpoint_and_resume_finishes(head_runs, tmp_path):
    """Ctrl-C in the terminal reaches torchrun and every rank: the ranks agree to stop at the same
    step, rank 0 saves `last` there and alone says so (one line), and --resume finishes the run."""
    sets = [s for s in head_runs["sets"] if not s.startswith(("batch_size=", "val_every="))]
    sets += ["batch_size=64", "val_every=1000", "save_every=100000"]
    out = tmp_path / "run"
    common = ["train-head", "--store", head_runs["store"], "--image", "img", "--text", "txt", "--out", str(out),
              *_sets(sets)]
    args = [*common, "--steps", "100000", "--no-progress"]
    cmd = [os.path.join(BIN, "torchrun"), "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "featstore", *args]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                             preexec_fn=default_sigint)  # SIGINT not ignored, however pytest was started
    try:
        deadline = time.time() + TIMEOUT_S  # a guard against a hung test, not a timing assertion
        while not ((out / "metrics.jsonl").exists() and len(_metrics(out)) > 3):
            assert child.poll() is None and time.time() < deadline, child.communicate()
            time.sleep(0.05)
        os.killpg(child.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: torchrun and both ranks get it
        _, stderr = child.communicate(timeout=TIMEOUT_S)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert (out / "last" / "checkpoint.json").exists(), (child.returncode, stderr[-3000:])
    stopped = json.load(open(out / "last" / "checkpoint.json"))["step"]
    ours = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert ours == [f"interrupted: stopped at step {stopped}, checkpoint saved in {out}/last: re-run the same "
                    "command with --resume to continue from there"], stderr[-3000:]
    assert max(r["step"] for r in _metrics(out)) == stopped and stopped > 0
    _torchrun([*common, "--steps", str(stopped + 3), "--resume"], tmp_path)
    assert json.load(open(out / "last" / "checkpoint.json"))["step"] == stopped + 3


# ---- train-uta --------------------------------------------------------------------------------------
PRE = {"name": "synthetic", "resize": 16, "crop": 16, "interpolation": "bicubic", "resize_mode": "shortest"}


def _uta_store(path, n: int = 300) -> Store:
    """Crops (3, 16, 16) and a teacher whose 4x4 grid of 16-d tokens is a fixed nonlinear map of
    each 4x4 patch (pooled: their mean), all written through the store's own writer."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 3, 16, 16), dtype=np.uint8)
    patches = pixels.reshape(n, 3, 4, 4, 4, 4).transpose(0, 2, 4, 1, 3, 5).reshape(n, 16, 48) / 255.0 - 0.5
    tokens = np.tanh(patches @ rng.standard_normal((48, 16))).astype(np.float32)
    store = Store.create(str(path), rows_per_shard=64)
    store.register([f"u{i:04d}" for i in range(n)])
    store.create_feature_set("teach", {"model": "synthetic-teacher", "preprocess": PRE}, 16, tokens=(16, 16),
                             pixels="crops", pixels_shape=(3, 16, 16),
                             pixels_identity={**PRE, "mean": [0.5] * 3, "std": [0.25] * 3})
    for b in range(store.n_blocks):
        lo, hi = store.block_range(b)
        write_block(store, "teach", b, {"pooled": tokens[lo:hi].mean(1), "tokens": tokens[lo:hi], "pixels": pixels[lo:hi]},
                    np.ones(hi - lo, bool))
    return store


def test_train_uta_two_ranks_match_one_process(tmp_path):
    store = _uta_store(tmp_path / "u.zarr")
    sets = ["depth=1", "width=32", "drop_path=0", "hflip=0.5", "warmup_steps=2", "lr=2e-3", "log_every=1",
            "val_every=4", "val_max_rows=32", "cpu_threads=1", f"batch_size={_global_batch(store.path)}"]
    one = train_uta(store.path, "teach", "crops", tmp_path / "one", overrides=sets, steps=12, progress=False)
    _torchrun(["train-uta", "--store", store.path, "--teacher", "teach", "--pixels", "crops", "--out",
               str(tmp_path / "two"), "--steps", "12", *_sets(sets), "--json"], tmp_path)
    a, b = _metrics(one["out_dir"]), _metrics(tmp_path / "two")
    worst = _assert_curves_match(a, b, ("loss", "val_loss", "val_token_cos", "val_cls_cosine", "grad_norm"), UTA_RTOL)
    print(f"train-uta, 1 process vs 2 ranks: largest relative gap {worst:.2g}")
    assert a[-1]["val_loss"] < a[0]["val_loss"]
    state = json.load(open(tmp_path / "two" / "last" / "checkpoint.json"))
    assert state["world_size"] == 2 and b[0]["world_size"] == 2


def test_python_dash_m_featstore(tmp_path):
    r = subprocess.run([sys.executable, "-m", "featstore", "--help"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0 and "train-head" in r.stdout and "Usage: featstore" in r.stdout
    # and the entry point does not pull in torch to print help
    r = subprocess.run([sys.executable, "-c", "import sys, featstore.__main__; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.stdout.strip() == "False", r.stderr
