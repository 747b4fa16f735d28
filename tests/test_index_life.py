"""The index's life-cycle: extended (only the new rows) when the store grows, refused when the
feature set's identity changed, rebuilt when the rows outgrew an ivf's training; `featstore rm`
removes it, `inspect` lists it, `verify` checks its meta.json.  Real stores: synthetic vectors
written through the store's own block writer, grown by registering more uids (as a second source
does), and a real extract (EfficientNet-Lite0 on real images, two stored views)."""

import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from featstore.core.writes import write_block
from featstore.errors import SearchIndexError
from featstore.pipelines.extract import extract
from featstore.pipelines.search import build_index, query_many
from featstore.pipelines.search_index import load_index
from featstore.store import Store
from imagedata import encode, real_images, write_shard

FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")
R = 64  # rows per block
DIM = 16


def grow(path, x, name="synth", identity=None, valid=None):
    """Register rows up to len(x) (the last block fills, new blocks follow) and write every block
    whose rows are not all done yet."""
    st = Store.open(path, mode="r+") if os.path.exists(path) else Store.create(path, rows_per_shard=R)
    old = st.n_rows
    st.register([f"u{i:06d}" for i in range(old, len(x))])
    first = old // R
    if name not in st.feature_set_names():
        st.create_feature_set(name, identity or {"model": "synthetic", "dim": DIM}, DIM)
        first = 0
    valid = np.ones(len(x), bool) if valid is None else valid
    for b in range(first, st.n_blocks):
        a, z = st.block_range(b)
        write_block(st, name, b, {"pooled": x[a:z]}, valid[a:z],
                    [{"row": int(i), "reason": "synthetic-bad"} for i in np.flatnonzero(~valid[a:z]) + a])
    return Store.open(path)


def topk(path, name, q, k=10):
    hits = query_many(path, name, q, k=k)
    return np.array([[h["row"] for h in hs] for hs in hits]), np.array([[h["score"] for h in hs] for hs in hits])


def test_flat_extend_equals_a_fresh_build(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, DIM)).astype(np.float32)
    valid = np.ones(300, bool)
    valid[::13] = False
    path = str(tmp_path / "s.zarr")
    grow(path, x[:150], valid=valid[:150])  # 2 full blocks and a partly filled one
    first = build_index(path, "synth", progress=False)
    assert first["mode"] == "built" and first["rows_indexed"] == valid[:150].sum()
    again = build_index(path, "synth", progress=False)
    assert again["mode"] == "unchanged" and again["rows_added"] == 0
    grow(path, x, valid=valid)
    with pytest.raises(SearchIndexError, match="featstore index"):
        load_index(Store.open(path), "synth")
    ext = build_index(path, "synth", progress=False)
    assert ext["mode"] == "extended" and ext["kind"] == "flat"
    assert ext["rows_added"] == valid[150:].sum() and ext["rows_indexed"] == valid.sum()
    assert ext["blocks_read"] == 3  # the grown block and two new ones: the full blocks were not read
    q = x[rng.choice(300, 40, replace=False)]
    rows, scores = topk(path, "synth", q)
    assert not np.isin(rows, np.flatnonzero(~valid)).any()
    fresh = str(tmp_path / "fresh.zarr")
    grow(fresh, x, valid=valid)
    build_index(fresh, "synth", progress=False)
    want_rows, want_scores = topk(fresh, "synth", q)
    np.testing.assert_array_equal(rows, want_rows)  # gaussian vectors: no ties
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)


def test_identity_change_is_refused_and_rebuild_forces(tmp_path):
    x = np.random.default_rng(1).standard_normal((100, DIM)).astype(np.float32)
    path = str(tmp_path / "s.zarr")
    grow(path, x)
    build_index(path, "synth", progress=False)
    st = Store.open(path, mode="r+")
    st.remove_feature_set("synth")
    grow(path, x[::-1].copy(), identity={"model": "synthetic", "dim": DIM, "version": 2})
    with pytest.raises(SearchIndexError, match="--rebuild") as e:
        build_index(path, "synth", progress=False)
    assert "\n" not in str(e.value)
    meta = build_index(path, "synth", progress=False, extend=False)
    assert meta["mode"] == "built" and meta["identity"]["version"] == 2
    rows, _ = topk(path, "synth", x[:1], k=1)
    assert rows[0, 0] == 99  # the reversed vectors: row 99 holds x[0]


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_ivf_extends_with_its_quantizer_then_rebuilds_when_outgrown(tmp_path, kind):
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((20, DIM))
    x = (centres[rng.integers(0, 20, 4000)] + 0.3 * rng.standard_normal((4000, DIM))).astype(np.float32)
    path = str(tmp_path / "s.zarr")
    grow(path, x[:900])
    first = build_index(path, "synth", kind=kind, progress=False)
    assert first["trained_for_rows"] == 900
    grow(path, x[:1500])
    ext = build_index(path, "synth", progress=False)  # auto keeps the index's kind
    assert ext["mode"] == "extended" and ext["kind"] == kind and ext["rows_added"] == 600
    assert ext["nlist"] == first["nlist"] and ext["trained_for_rows"] == 900
    index, _ = load_index(Store.open(path), "synth")
    assert index.ntotal == 1500
    rows, _ = topk(path, "synth", x[1200:1201], k=5)
    assert 1200 in rows[0]  # a new row is found through the trained lists
    grow(path, x)  # 4000 > 4 x 900
    out = build_index(path, "synth", progress=False)
    assert out["mode"] == "built" and out["trained_for_rows"] == 4000 and out["kind"] == kind
    assert any("outgrew" in n for n in out["notes"])


def test_an_interrupted_extend_leaves_the_old_index_and_is_redone(tmp_path):
    """The order of the commit: an index file renamed in place before its meta.json (a kill
    between the two) is detected by its row count and rebuilt; before the rename, the old
    index and meta.json are untouched."""
    x = np.random.default_rng(3).standard_normal((200, DIM)).astype(np.float32)
    path = str(tmp_path / "s.zarr")
    grow(path, x[:100])
    build_index(path, "synth", progress=False)
    folder = os.path.join(path, "indexes", "synth")
    before = {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)}
    grow(path, x)
    # what a kill right after the index's rename leaves: a bigger index.faiss beside the old meta.json
    index = faiss.read_index(os.path.join(folder, "index.faiss"))
    index.add_with_ids(x[100:150] / np.linalg.norm(x[100:150], axis=1, keepdims=True), np.arange(100, 150))
    faiss.write_index(index, os.path.join(folder, "index.faiss"))
    assert open(os.path.join(folder, "meta.json"), "rb").read() == before["meta.json"]
    out = build_index(path, "synth", progress=False)
    assert out["mode"] == "built" and out["rows_indexed"] == 200 and any("interrupted" in n for n in out["notes"])
    assert sorted(f for f in os.listdir(folder) if f.startswith("covered-")) == [out["covered"]]
    rows, _ = topk(path, "synth", x[120:121], k=1)
    assert rows[0, 0] == 120


def run(*args):
    return subprocess.run([FEATSTORE, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def view_store(tmp_path_factory):
    """A store of 10 real images with two stored views, and a second source of 4 to grow by."""
    images = real_images(14)
    srcs = [tmp_path_factory.mktemp("wds"), tmp_path_factory.mktemp("wds")]
    for src, part, prefix in ((srcs[0], images[:10], "a"), (srcs[1], images[10:], "b")):
        write_shard(src / "00000.tar", [{"key": f"{i:06d}", "image": encode(img), "caption": f"a photo of {name}",
                                         "json": {"uid": f"{prefix}-{name}"}} for i, (name, img) in enumerate(part)])
    path = tmp_path_factory.mktemp("st") / "v.zarr"
    extract(path, srcs[0], "efficientnet-lite0", name="img", views=2, rows_per_shard=8, batch_size=8,
            progress=False, log=lambda *_: None)
    return str(path), srcs[1]


def test_cli_index_rm_inspect_verify(view_store):
    view_store, more = view_store
    r = run("index", "--store", view_store, "--features", "img", "--json")
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)
    assert meta["view"] == 0 and meta["views"] == 2 and meta["mode"] == "built" and meta["rows_indexed"] == 10
    r = run("index", "--store", view_store, "--features", "img", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "view 0" in r.stdout.splitlines()[-1] and "up to date" in r.stdout.splitlines()[-1]
    r = run("inspect", "--store", view_store, "--json")
    assert r.returncode == 0, r.stderr
    listed = json.loads(r.stdout)["indexes"]
    assert listed["img"]["kind"] == "flat" and listed["img"]["rows_indexed"] == 10 and listed["img"]["current"]
    r = run("inspect", "--store", view_store)
    assert "indexes/img" in r.stdout and "current" in r.stdout
    assert run("verify", "--store", view_store).returncode == 0

    # the store grows: the index is stale (a warning, not a problem) until `featstore index` extends it
    extract(view_store, more, "efficientnet-lite0", name="img", views=2, batch_size=8, progress=False, log=lambda *_: None)
    r = run("verify", "--store", view_store, "--json")
    assert r.returncode == 0, r.stdout
    assert any("indexes/img is stale" in n for n in json.loads(r.stdout)["notes"])
    r = run("inspect", "--store", view_store, "--json")
    assert json.loads(r.stdout)["indexes"]["img"]["current"] is False
    assert "stale" in run("inspect", "--store", view_store).stdout
    r = run("index", "--store", view_store, "--features", "img", "--no-progress")
    assert r.returncode == 0, r.stderr
    line = r.stdout.splitlines()[-1]
    assert line.startswith("extended the flat index of 'img' by 4 rows") and "14 rows; view 0 of 2 stored views" in line
    r = run("query", "--store", view_store, "--features", "img", "--uid", "b-" + real_images(14)[12][0], "-k", "1", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["uid"].startswith("b-"), r.stderr

    # a meta.json that does not fit the store, or is not JSON: a problem
    meta_path = os.path.join(view_store, "indexes", "img", "meta.json")
    good = open(meta_path).read()
    open(meta_path, "w").write(json.dumps(dict(json.loads(good), rows_indexed=99)))
    r = run("verify", "--store", view_store, "--json")
    assert r.returncode == 1 and any("indexes/img" in p and "99" in p for p in json.loads(r.stdout)["problems"])
    open(meta_path, "w").write(json.dumps(dict(json.loads(good), identity={"model": "other"})))
    r = run("verify", "--store", view_store, "--json")
    assert r.returncode == 1 and any("identity" in p for p in json.loads(r.stdout)["problems"])
    open(meta_path, "w").write(good[: len(good) // 2])
    r = run("verify", "--store", view_store)
    assert r.returncode == 1 and "indexes/img/meta.json" in r.stdout
    open(meta_path, "w").write(good)

    r = run("rm", "--store", view_store, "--name", "img")
    assert r.returncode == 0, r.stderr
    assert "index" in r.stdout and not os.path.exists(os.path.join(view_store, "indexes", "img"))
    r = run("inspect", "--store", view_store, "--json")
    assert json.loads(r.stdout)["indexes"] == {}
