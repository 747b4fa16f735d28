"""`featstore index` / `featstore query`: FAISS nearest neighbours over stored features, on stores
made by the real extract (real images through EfficientNet-Lite0 and a tiny DINOv2, captions through the packaged MiniLM)
and, for the inverted-list kinds, a few thousand clustered vectors written through the store's own
block writer."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from featstore.core.writes import write_block
from featstore.errors import ConfigError, SearchIndexError, UnknownFeatureSet
from featstore.pipelines.extract import extract
from featstore.pipelines.search import build_index, query, query_many
from featstore.store import Store
from featstore.tools.verify import verify
from imagedata import encode, real_images, write_shard

FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")
QUIET = dict(progress=False, log=lambda *_: None)

CAPTIONS = [
    "an astronaut in a white space suit standing next to a flag",
    "a cup of hot coffee on a saucer",
    "a tabby cat lying on a sofa",
    "a red sports car driving along a coastal road",
    "a bowl of fresh strawberries and cream",
    "a snowy mountain peak under a clear blue sky",
    "a man playing an acoustic guitar on stage",
    "children building a sandcastle on the beach",
    "an old steam locomotive crossing a stone bridge",
    "a plate of spaghetti with tomato sauce",
    "a lighthouse on a rocky cliff at sunset",
    "a dog catching a frisbee in a park",
    "a stack of old books on a wooden desk",
    "a hot air balloon floating over green fields",
    "a chess board in the middle of a game",
    "a sailing boat on a calm lake",
    "a bicycle leaning against a brick wall",
    "a bowl of ramen noodles with an egg",
    "a waterfall in a tropical forest",
    "a city skyline at night with lit windows",
]


def samples(images, captions, prefix):
    return [{"key": f"{prefix}{i:06d}", "image": encode(img), "caption": cap, "json": {"uid": f"{prefix}-{name}"}}
            for i, ((name, img), cap) in enumerate(zip(images, captions))]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two sources: the first 14 real images with captions, then 6 more (the store grows)."""
    images = real_images(len(CAPTIONS))
    first, second = tmp_path_factory.mktemp("wds1"), tmp_path_factory.mktemp("wds2")
    write_shard(first / "00000.tar", samples(images[:14], CAPTIONS[:14], "a"))
    write_shard(second / "00000.tar", samples(images[14:], CAPTIONS[14:], "b"))
    return first, second


@pytest.fixture(scope="module")
def store(tmp_path_factory, shards):
    path = tmp_path_factory.mktemp("st") / "s.zarr"
    extract(path, shards[0], "efficientnet-lite0", name="img", rows_per_shard=8, batch_size=8, **QUIET)
    extract(path, shards[0], "minilm", field="caption", batch_size=16, **QUIET)
    return path


def cosine_topk(x, q, k):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = q @ x.T
    return np.argsort(-s, axis=1, kind="stable")[:, :k], np.sort(s, axis=1)[:, ::-1][:, :k]


def test_flat_index_is_exact(store):
    meta = build_index(store, "img", progress=False)
    assert meta["kind"] == "flat" and meta["rows_indexed"] == 14 and meta["store_rows"] == 14
    st = Store.open(store)
    assert meta["identity"] == st.feature_set("img").identity
    assert os.path.isfile(os.path.join(str(store), "indexes", "img", "index.faiss"))
    x = np.asarray(st.feature_set("img").array("pooled")[:], dtype=np.float32)
    uids = st.uids().tolist()
    hits = query(store, "img", uid=uids[3], k=5)
    assert hits[0]["row"] == 3 and hits[0]["uid"] == uids[3] and hits[0]["score"] == pytest.approx(1, abs=1e-4)
    assert hits[0]["caption"] == CAPTIONS[3] and hits[0]["source_ref"]
    want, scores = cosine_topk(x, x, 5)
    got = query_many(store, "img", x, k=5)
    rows = np.array([[h["row"] for h in hs] for hs in got])
    np.testing.assert_allclose([[h["score"] for h in hs] for hs in got], scores, atol=1e-4)
    # the same top-k as brute force: equal rows, or rows whose cosines tie within float error
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(np.take_along_axis(xn @ xn.T, rows, 1), scores, atol=1e-4)
    # each row's first hit is itself, or the same picture (skimage's "chelsea" and "cat" are one photo)
    np.testing.assert_allclose(xn[rows[:, 0]], xn, atol=1e-3)
    assert (rows == want).mean() > 0.8
    assert verify(st)["ok"]  # the index folder does not disturb the store


def test_ivf_recall(tmp_path):
    """4,000 rows in 40 clusters (a store's features are clustered, not uniform noise)."""
    n, dim, r = 4000, 32, 1024
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, dim))
    x = (centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)
    st = Store.create(tmp_path / "big.zarr", rows_per_shard=r)
    st.register([f"u{i:05d}" for i in range(n)], captions=[f"caption {i}" for i in range(n)])
    st.create_feature_set("synth", {"model": "synthetic", "dim": dim}, dim)
    valid = np.ones(n, bool)
    valid[::97] = False  # invalid rows are never indexed
    for b in range(st.n_blocks):
        a, z = st.block_range(b)
        write_block(st, "synth", b, {"pooled": x[a:z]}, valid[a:z],
                    [{"row": int(i), "reason": "synthetic-bad"} for i in np.flatnonzero(~valid[a:z]) + a])
    stored = np.asarray(st.feature_set("synth").array("pooled")[:], dtype=np.float32)
    q = stored[rng.choice(np.flatnonzero(valid), 100, replace=False)]
    good = np.flatnonzero(valid)
    want = good[cosine_topk(stored[good], q, 10)[0]]
    for kind in ("ivf", "ivfpq"):
        meta = build_index(st.path, "synth", kind=kind, progress=False)
        assert meta["kind"] == kind and meta["rows_indexed"] == valid.sum() and meta["nlist"] >= 16
        got = np.array([[h["row"] for h in hs] for hs in query_many(st.path, "synth", q, k=10)])
        assert not np.isin(got, np.flatnonzero(~valid)).any()
        recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)])
        assert recall >= (0.9 if kind == "ivf" else 0.6), (kind, recall)


def test_nprobe_is_the_fewest_lists_measured_to_reach_the_target(tmp_path):
    """build_index measures recall@10 on 256 of the store's rows (their own row left out) over an
    nprobe sweep and keeps the first nprobe reaching the target; held-out queries from the same
    clusters then see about that recall."""
    from featstore.pipelines.search_tune import ExactTopK

    n, dim, r = 6000, 32, 1024
    rng = np.random.default_rng(3)
    centres = 3 * rng.standard_normal((60, dim))
    x = (centres[rng.integers(0, 60, n)] + rng.standard_normal((n, dim))).astype(np.float32)
    st = Store.create(tmp_path / "tune.zarr", rows_per_shard=r)
    st.register([f"u{i:05d}" for i in range(n)])
    st.create_feature_set("synth", {"model": "synthetic", "dim": dim}, dim)
    for b in range(st.n_blocks):
        a, z = st.block_range(b)
        write_block(st, "synth", b, {"pooled": x[a:z]}, np.ones(z - a, bool), [])
    stored = np.asarray(st.feature_set("synth").array("pooled")[:], dtype=np.float32)
    # the running top-k over blocks is numpy's exact top-k
    q = stored[:5] / np.linalg.norm(stored[:5], axis=1, keepdims=True)
    truth = ExactTopK(q, np.arange(5))
    for a in range(0, n, 1000):
        truth.update(stored[a:a + 1000] / np.linalg.norm(stored[a:a + 1000], axis=1, keepdims=True), np.arange(a, a + 1000))
    order = np.argsort(-truth.scores, axis=1, kind="stable")
    np.testing.assert_array_equal(np.take_along_axis(truth.rows, order, 1), cosine_topk(stored, stored[:5], 11)[0])

    held_out = (centres[rng.integers(0, 60, 300)] + rng.standard_normal((300, dim))).astype(np.float32)
    want = cosine_topk(stored, held_out, 10)[0]
    picked = {}
    for target in (0.8, 0.99):
        meta = build_index(st.path, "synth", kind="ivf", target_recall=target, extend=False, progress=False)
        c = meta["calibration"]
        assert c["queries"] == 256 and c["target"] == target and c["reached"]
        probes = [p for p, _ in c["sweep"]]
        assert probes == [2 ** i for i in range(len(probes))]  # 1, 2, 4, ... up to the first reaching it
        assert c["sweep"][-1] == [c["nprobe"], c["recall"]] and c["recall"] >= target
        assert all(rec < target for _, rec in c["sweep"][:-1]) and meta["nprobe"] == c["nprobe"]
        assert json.load(open(os.path.join(meta["path"], "meta.json")))["nprobe"] == c["nprobe"]
        got = np.array([[h["row"] for h in hs] for hs in query_many(st.path, "synth", held_out, k=10)])
        picked[target] = (c["nprobe"], np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want)]))
        assert picked[target][1] >= target - 0.05, (target, picked)
    assert picked[0.8][0] < picked[0.99][0], picked  # a lower target probes fewer lists


def test_growth_refuses_a_stale_index_until_reindexed(tmp_path, shards, tiny_dinov2_path):
    path = tmp_path / "g.zarr"
    extract(path, shards[0], tiny_dinov2_path, name="dino", rows_per_shard=8, **QUIET)
    build_index(path, "dino", progress=False)
    assert len(query(path, "dino", uid="a-astronaut", k=3)) == 3
    extract(path, shards[1], tiny_dinov2_path, name="dino", **QUIET)
    with pytest.raises(SearchIndexError, match="featstore index") as e:
        query(path, "dino", uid="a-astronaut")
    assert "\n" not in str(e.value) and "14" in str(e.value) and "20" in str(e.value)
    meta = build_index(path, "dino", progress=False)
    assert meta["rows_indexed"] == 20
    new = Store.open(path).uids().tolist()[-1]
    assert new in [h["uid"] for h in query(path, "dino", uid=new, k=3)]  # the tiny model's features nearly tie


def test_text_query_finds_the_paraphrased_caption(store):
    build_index(store, "minilm", progress=False)
    hits = query(store, "minilm", text="a kitten sleeping on the couch", k=3)
    assert hits[0]["caption"] == "a tabby cat lying on a sofa"
    hits = query(store, "minilm", text="an espresso in a little cup", k=3)
    assert hits[0]["caption"] == "a cup of hot coffee on a saucer"
    with pytest.raises(ConfigError, match="computed from images"):
        query(store, "img", text="a cat")


def test_unindexed_and_unknown(tmp_path, store):
    with pytest.raises(UnknownFeatureSet):
        build_index(store, "nope", progress=False)
    with pytest.raises(SearchIndexError, match="object storage"):
        build_index(Store(f"s3://bucket/{tmp_path.name}.zarr", Store.open(store).root, "r"), "img", progress=False)
    with pytest.raises(ConfigError, match="unknown index kind"):
        build_index(store, "img", kind="hnsw", progress=False)


def run(*args):
    return subprocess.run([FEATSTORE, *args], capture_output=True, text=True, timeout=120)


def test_cli(store):
    r = run("index", "--store", str(store), "--features", "img", "--json")
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)
    assert meta["rows_indexed"] == 14 and meta["kind"] == "flat"
    r = run("index", "--store", str(store), "--features", "img", "--no-progress")
    assert r.returncode == 0 and "indexed 14 rows of 'img'" in r.stdout
    r = run("query", "--store", str(store), "--features", "img", "--uid", "a-astronaut", "-k", "4", "--json")
    assert r.returncode == 0, r.stderr
    hits = json.loads(r.stdout)
    assert len(hits) == 4 and hits[0]["uid"] == "a-astronaut"
    r = run("query", "--store", str(store), "--features", "img", "--uid", "a-astronaut", "-k", "2")
    assert r.returncode == 0 and "a-astronaut" in r.stdout.splitlines()[1]
    for args in (["index", "--store", str(store), "--features", "nope"],
                 ["query", "--store", str(store), "--features", "nope", "--uid", "x"],
                 ["query", "--store", str(store), "--features", "img", "--uid", "no-such-uid"]):
        r = run(*args)
        assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
