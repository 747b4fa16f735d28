"""The store commands, run as a user runs them: the installed `featstore` script in a subprocess."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from storeutil import make_store

FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")


def run(*args, check=True):
    out = subprocess.run([FEATSTORE, *map(str, args)], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"featstore {' '.join(map(str, args))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


@pytest.fixture
def store(tmp_path):
    s = make_store(tmp_path / "s.zarr", n=50, rows_per_shard=16, features={"img": 8, "txt": 6}, invalid_every=9)
    s.register(["uid-000001"], source_refs=["again"])  # already present: not a new row
    return s


def test_inspect_text_json_and_plot(store, tmp_path):
    out = run("inspect", "--store", store.path, "--plot", tmp_path / "p.png").stdout
    assert "rows    50 in 4 blocks of 16" in out and "features/img" in out and "synthetic-bad" in out
    s = json.loads(run("inspect", "--store", store.path, "--json").stdout)
    f = s["feature_sets"]["img"]
    assert s["rows"] == 50 and f["coverage"] == 1.0 and f["invalid_rows"] == 6
    assert f["failures_by_reason"] == {"synthetic-bad": 6} and len(f["failure_examples"]["synthetic-bad"]) == 3
    assert f["arrays"]["pooled"]["dtype"] == "float16"
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_verify_passes_then_reports_problems(store):
    assert run("verify", "--store", store.path).stdout.strip().endswith("(8 blocks checked)")
    store.feature_set("img").array("pooled")[20] = np.ones(8, np.float16)
    out = run("verify", "--store", store.path, check=False)
    assert out.returncode == 1 and "PROBLEM: features/img block 1 (rows 16-32)" in out.stdout


def _cache_prompts(store, name):
    """Prompt features cached for text feature set `name`, as eval caches them."""
    import torch

    from featstore.trainers.prompts import prompt_features

    class Encoder:  # stands in for the text backbone
        def encode_texts(self, texts):
            return {"pooled": torch.ones(len(texts), 6)}

    text_set = {"name": name, "identity": store.feature_set(name).identity, "dtype": "float16"}
    prompt_features(store.path, text_set, ["a photo of a cat", "a photo of a dog"], encoder=Encoder())


def test_inspect_shows_and_rm_removes_cached_prompts(store):
    _cache_prompts(store, "txt")
    out = run("inspect", "--store", store.path).stdout
    assert "prompts/txt  2 cached prompt features from synthetic-txt" in out
    assert json.loads(run("inspect", "--store", store.path, "--json").stdout)["prompts"]["txt"]["texts"] == 2
    run("rm", "--store", store.path, "--name", "txt")
    s = json.loads(run("inspect", "--store", store.path, "--json").stdout)
    assert list(s["feature_sets"]) == ["img"] and s["prompts"] == {}
    assert not os.path.exists(os.path.join(store.path, "prompts", "txt"))
    assert run("verify", "--store", store.path).stdout.strip().endswith("blocks checked)")  # still a sound store


def test_rm_and_export(store, tmp_path):

    out = run("export", "--store", store.path, "--name", "img", "--out", tmp_path / "img.npy").stdout
    assert "exported 44 rows (44, 8)" in out
    x = np.load(tmp_path / "img.npy")
    uids = (tmp_path / "img.uids.txt").read_text().split()
    assert x.shape == (44, 8) and len(uids) == 44 and "uid-000000" not in uids
    rows = store.rows_of(uids)
    np.testing.assert_array_equal(x, np.asarray(store.feature_set("img").array("pooled")[:])[rows])
    run("export", "--store", store.path, "--name", "txt", "--out", tmp_path / "txt.parquet")
    import pyarrow.parquet as pq
    t = pq.read_table(tmp_path / "txt.parquet")
    assert t.num_rows == 44 and t.column_names == ["uid", "row", "pooled"]
    run("rm", "--store", store.path, "--name", "img")
    s = json.loads(run("inspect", "--store", store.path, "--json").stdout)
    assert list(s["feature_sets"]) == ["txt"]


@pytest.mark.parametrize("cmd", [["inspect"], ["verify"], ["rm", "--name", "x"], ["export", "--name", "x", "--out", "x.npy"]])
def test_bad_paths_give_one_clear_line(tmp_path, cmd):
    out = run(cmd[0], "--store", tmp_path / "nope.zarr", *cmd[1:], check=False)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().count("\n") == 0 and "no store at" in out.stderr
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text("x")
    out = run(cmd[0], "--store", tmp_path / "dir", *cmd[1:], check=False)
    assert out.returncode == 2 and "not a featstore store" in out.stderr and out.stderr.count("\n") == 1


def test_unknown_feature_set_is_one_line(store, tmp_path):
    out = run("export", "--store", store.path, "--name", "nope", "--out", tmp_path / "x.npy", check=False)
    assert out.returncode == 2 and out.stderr == "error: the store has no feature set 'nope' (it has: img, txt)\n"
    out = run("export", "--store", store.path, "--name", "nope", "--out", tmp_path / "x.npy", "--debug", check=False)
    assert "Traceback" in out.stderr
