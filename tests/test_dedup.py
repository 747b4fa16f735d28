"""`featstore dedup`: exact duplicates by content hash of the source bytes, near duplicates by the
cosine of real features (EfficientNet-Lite0, real ImageNet weights, through the real extract),
on a store registered from two image folders with planted byte copies and near copies
(resized, JPEG-recompressed, brightened) of scikit-image's photos."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from featstore.errors import ConfigError, DedupError, SourceError, UnknownFeatureSet
from featstore.loader import Loader
from featstore.pipelines.dedup import EXACT_DUP, NEAR_DUP, UNIQUE, keep_rows, load, run_dedup
from featstore.pipelines.extract import extract
from featstore.pipelines.search import build_index
from featstore.pipelines.sources import open_source
from featstore.store import Store
from featstore.tools.inspect import format_summary, summarize

FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")
QUIET = dict(progress=False, log=lambda *_: None)
# distinct photos (skimage's "cat" is "chelsea" again, so it is left out)
DISTINCT_A = ["astronaut", "coffee", "chelsea", "camera", "rocket", "hubble_deep_field", "immunohistochemistry",
              "coins", "moon", "page", "brick", "gravel"]
DISTINCT_B = ["horse", "clock", "retina"]
EXACT_GROUPS = [{"astronaut", "astronaut-copy"}, {"coffee", "coffee-copy"}, {"camera", "camera-copy"}]
NEAR_OF = {"astronaut": ["astronaut-small", "astronaut-bright"],
           "chelsea": ["chelsea-small", "chelsea-q70", "chelsea-bright"], "rocket": ["rocket-small"]}
THRESHOLD = 0.9  # the planted near copies score >= 0.95 with their photo; distinct photos < 0.5


def photo(name):
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.dtype != np.uint8:
        arr = (arr * 255 if arr.max() <= 1 else arr).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def jpeg(img, quality=90):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def variants(img):
    """The near copies: 3/4 size, recompressed at quality 70, 15% brighter (each re-encoded)."""
    return {"small": jpeg(img.resize((img.width * 3 // 4, img.height * 3 // 4))), "q70": jpeg(img, 70),
            "bright": jpeg(ImageEnhance.Brightness(img).enhance(1.15))}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("src-a"), tmp_path_factory.mktemp("src-b")
    encoded = {name: jpeg(photo(name)) for name in DISTINCT_A}
    for name, data in encoded.items():
        (a / f"{name}.jpg").write_bytes(data)
    (a / "astronaut-copy.jpg").write_bytes(encoded["astronaut"])  # a copy inside one source
    (b / "coffee-copy.jpg").write_bytes(encoded["coffee"])  # copies across the sources
    (b / "camera-copy.jpg").write_bytes(encoded["camera"])
    for name, near in NEAR_OF.items():
        made = variants(photo(name))
        for uid in near:
            (b / f"{uid}.jpg").write_bytes(made[uid.rsplit("-", 1)[1]])
    for name in DISTINCT_B:
        (b / f"{name}.jpg").write_bytes(jpeg(photo(name)))
    return a, b


@pytest.fixture(scope="module")
def store(tmp_path_factory, folders):
    path = tmp_path_factory.mktemp("st") / "s.zarr"
    extract(path, folders[0], "efficientnet-lite0", name="img", rows_per_shard=8, batch_size=8, **QUIET)
    extract(path, folders[1], "efficientnet-lite0", name="img", batch_size=8, **QUIET)
    return path


def partition(st, group):
    """The groups of a record as sets of uids (singletons left out)."""
    uids = np.asarray(st.uids()).tolist()
    out = {}
    for row, rep in enumerate(np.asarray(group).tolist()):
        out.setdefault(rep, set()).add(uids[row])
    return sorted((g for g in out.values() if len(g) > 1), key=sorted)


def rows_of(st, uids):
    return st.rows_of(sorted(uids)).tolist()


def check_representatives(st, group, kind, exact_members):
    """Each group's representative is its lowest row, kind 0; exact copies kind 1, the rest kind 2."""
    group, kind = np.asarray(group), np.asarray(kind)
    rows = np.arange(len(group))
    assert (group <= rows).all() and (group[group] == group).all()
    assert ((kind == UNIQUE) == (group == rows)).all()
    exact_rows = set(rows_of(st, exact_members))
    for r in np.flatnonzero(group != rows).tolist():
        assert kind[r] == (EXACT_DUP if r in exact_rows else NEAR_DUP), st.uids()[r]


def test_exact_groups_are_the_planted_copies(store):
    st = Store.open(store)
    assert len(st.sources) == 2
    meta = run_dedup(store, progress=False)
    assert meta["name"] == "exact" and meta["rows"] == st.n_rows == 12 + 1 + 2 + 6 + 3
    assert meta["exact_dup_rows"] == 3 and meta["near_dup_rows"] == 0 and meta["groups"] == 3
    assert meta["cross_source_groups"] == 2 and meta["unhashed_rows"] == 0
    _, group, kind = load(store, "exact")
    assert partition(st, group) == sorted(EXACT_GROUPS, key=sorted)
    # the lowest row represents: each group's other rows are its exact duplicates
    members = {u for g in EXACT_GROUPS for u in g} - {min(g, key=lambda u: st.rows_of([u])[0]) for g in EXACT_GROUPS}
    check_representatives(st, group, kind, members)
    # a budget so small that the hashes go through many buckets groups the same
    small = run_dedup(store, memory_mb=0.0001, progress=False)
    assert small["groups"] == 3
    assert partition(st, load(store, "exact")[1]) == sorted(EXACT_GROUPS, key=sorted)


def expected_near():
    groups = [set(g) for g in EXACT_GROUPS]
    for name, near in NEAR_OF.items():
        g = next((g for g in groups if name in g), None)
        if g is None:
            groups.append(g := {name})
        g.update(near)
    return sorted(groups, key=sorted)


def test_near_groups_hold_the_near_copies_and_no_distinct_pair(store):
    st = Store.open(store)
    meta = run_dedup(store, "img", threshold=THRESHOLD, progress=False)
    assert meta["index"] == "flat (built here)" and meta["feature_set"] == "img"
    assert meta["identity"] == st.feature_set("img").identity
    want = expected_near()
    _, group, kind = load(store, "img")
    assert partition(st, group) == want
    exact_members = {u for g in EXACT_GROUPS for u in g} - {min(g, key=lambda u: st.rows_of([u])[0]) for g in EXACT_GROUPS}
    check_representatives(st, group, kind, exact_members)
    n_near = sum(len(v) for v in NEAR_OF.values())
    assert meta["exact_dup_rows"] == 3 and meta["near_dup_rows"] == n_near
    assert meta["groups"] == len(want) and meta["cross_source_groups"] == 5  # astronaut's copy is inside source 0
    # without exact hashing the byte copies are near duplicates (cosine 1) of the same groups
    assert partition(st, load(store, "img")[1]) == want
    none = run_dedup(store, "img", threshold=THRESHOLD, exact=False, progress=False)
    assert none["exact_dup_rows"] == 0 and none["near_dup_rows"] == n_near + 3
    assert partition(st, load(store, "img")[1]) == want
    # at a cosine above every near copy's, nothing but the byte copies (cosine 1) is grouped
    strict = run_dedup(store, "img", threshold=0.9999, progress=False)
    assert strict["near_dup_rows"] == 0 and partition(st, load(store, "img")[1]) == sorted(EXACT_GROUPS, key=sorted)
    # featstore index's flat index, when current, is the one searched: the same groups
    build_index(store, "img", progress=False)
    again = run_dedup(store, "img", threshold=THRESHOLD, progress=False)
    assert again["index"].startswith("indexes/img") and partition(st, load(store, "img")[1]) == want
    shutil.rmtree(os.path.join(str(store), "indexes"))


def test_record_survives_reopen_and_loader_skips_duplicates(store):
    run_dedup(store, "img", threshold=THRESHOLD, progress=False)
    st = Store.open(store)  # a new process's view: the record is read from disk
    meta, group, kind = load(st, "img")
    mask = keep_rows(st, "img")
    assert mask.dtype == bool and len(mask) == st.n_rows
    assert mask.sum() == st.n_rows - meta["exact_dup_rows"] - meta["near_dup_rows"]
    served = []
    for batch in Loader(st, {"x": "features/img/pooled"}, 4, shuffle=True, seed=3, rows=mask):
        served += batch["row"].tolist()
    assert sorted(served) == np.flatnonzero(mask).tolist()
    dups = set(np.flatnonzero(np.asarray(kind) != UNIQUE).tolist())
    assert dups and not dups & set(served)
    # exactly one row of every group is served
    assert len({int(group[r]) for r in served}) == len(served)


def test_grown_store_record_is_refused(tmp_path, store):
    path = tmp_path / "grown.zarr"
    shutil.copytree(store, path)
    run_dedup(path, "img", threshold=THRESHOLD, progress=False)
    Store.open(path, mode="r+").register(["late-arrival"], source_refs=["late.jpg"])
    for read in (lambda: keep_rows(path, "img"), lambda: load(path, "img")):
        with pytest.raises(DedupError, match="stale") as e:
            read()
        assert "\n" not in str(e.value) and "featstore dedup" in str(e.value)
    assert summarize(Store.open(path))["dedup"]["img"]["stale"]
    assert "STALE" in format_summary(summarize(Store.open(path)))
    with pytest.raises(DedupError, match="stale"):  # the copied exact-only record is stale as well
        keep_rows(path, "exact")
    with pytest.raises(DedupError, match="no duplicate record 'other'"):
        keep_rows(path, "other")
    again = run_dedup(path, progress=False)  # a re-run recomputes over every row (the new one unhashed)
    assert again["rows"] == Store.open(path).n_rows and again["unhashed_rows"] == 1
    assert len(keep_rows(path, "exact")) == again["rows"]


def test_missing_source_is_refused_and_no_exact_still_runs(tmp_path, folders):
    src_dir = tmp_path / "gone"
    shutil.copytree(folders[0], src_dir)
    src = open_source(src_dir)
    recs = list(src.records())
    st = Store.create(tmp_path / "g.zarr", rows_per_shard=4)
    st.register([r.uid for r in recs], source_refs=[r.source_ref for r in recs], source=src.provenance())
    assert run_dedup(st.path, progress=False)["exact_dup_rows"] == 1  # astronaut-copy
    shutil.rmtree(src_dir)
    with pytest.raises(SourceError, match="--no-exact") as e:
        run_dedup(st.path, progress=False)
    assert "\n" not in str(e.value) and "source #0" in str(e.value)
    with pytest.raises(ConfigError, match="nothing to do"):
        run_dedup(st.path, exact=False, progress=False)
    with pytest.raises(UnknownFeatureSet):
        run_dedup(st.path, "img", progress=False)


def run(*args):
    return subprocess.run([FEATSTORE, *args], capture_output=True, text=True, timeout=300)


def test_cli(store):
    r = run("dedup", "--store", str(store), "--features", "img", "--threshold", str(THRESHOLD), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["groups"] == len(expected_near()) and out["cross_source_groups"] == 5
    assert out["path"] == os.path.join(str(store), "dedup", "img")
    r = run("dedup", "--store", str(store), "--no-progress")
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("dedup exact: 24 rows, 3 exact duplicate rows, 3 groups (2 span several sources)")
    r = run("inspect", "--store", str(store))
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stdout.splitlines() if x.startswith("dedup/")]
    assert lines[0].startswith("dedup/exact  24 rows: 3 exact duplicates, 3 groups (2 across sources)")
    assert lines[1].startswith(f"dedup/img  24 rows: 3 exact duplicates, 6 near (cosine >= {THRESHOLD:g}), 5 groups")
    r = run("inspect", "--store", str(store), "--json")
    assert json.loads(r.stdout)["dedup"]["img"]["stale"] is False
    for args in (["--no-exact"], ["--features", "nope"], ["--features", "img", "--threshold", "1.5"],
                 ["--memory-mb", "-1"]):
        r = run("dedup", "--store", str(store), *args)
        assert r.returncode == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = run("dedup", "--help")
    assert r.returncode == 0 and "--threshold" in r.stdout and "keep_rows" in r.stdout


def test_near_duplicates_through_an_ivf_index(tmp_path):
    """3,000 random rows (cosine well below 0.95 between any two) with 40 planted near copies, found
    through `featstore index`'s IVF index; rows registered with no source stay unhashed."""
    from featstore.core.writes import write_block

    n, dim, r = 3000, 48, 512
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    originals = rng.choice(n // 2, 40, replace=False)
    copies = n // 2 + rng.choice(n // 2, 40, replace=False)  # in other blocks than their originals mostly
    x[copies] = x[originals] + 0.02 * rng.standard_normal((40, dim)).astype(np.float32)
    st = Store.create(tmp_path / "ivf.zarr", rows_per_shard=r)
    st.register([f"u{i:05d}" for i in range(n)])
    st.create_feature_set("synth", {"model": "synthetic", "dim": dim}, dim)
    for b in range(st.n_blocks):
        a, z = st.block_range(b)
        write_block(st, "synth", b, {"pooled": x[a:z]}, np.ones(z - a, bool), [])
    build_index(st.path, "synth", kind="ivf", progress=False)
    meta = run_dedup(st.path, "synth", progress=False)
    assert meta["index"] == "indexes/synth (ivf)" and meta["unhashed_rows"] == n and meta["exact_dup_rows"] == 0
    _, group, kind = load(st.path, "synth")
    planted = {(int(min(o, c)), int(max(o, c))) for o, c in zip(originals, copies)}
    found = {(int(group[c]), int(c)) for _, c in planted if group[c] != c}
    assert len(found & planted) >= 36  # IVF probes nlist/8 lists: a copy may sit in an unprobed one
    assert found <= planted and meta["groups"] == len(found) and meta["near_dup_rows"] == len(found)
    assert int((np.asarray(kind) == NEAR_DUP).sum()) == len(found)
