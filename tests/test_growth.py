"""A store that grows, mixes sources and takes later metadata, hit the way a user hits it: the
`featstore` command in subprocesses, real tars laid out as img2dataset writes them, a real HF
dataset, tiny saved models."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from featstore.store import Store
from featstore.tools.verify import verify
from imagedata import encode, real_images, write_shard
from readonly import read_only_prefix

FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")
R = "8"  # rows per shard: 12 rows per source leave a partly filled block to grow into


def run(*args, check=True):
    out = subprocess.run([FEATSTORE, *map(str, args), "--no-progress"] if args[0] == "extract" else [FEATSTORE, *map(str, args)],
                         capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"featstore {' '.join(map(str, args))} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def img2dataset_folder(path, images, prefix):
    """A download folder as img2dataset leaves it: 00000.tar (+ its parquet/stats beside it)."""
    path.mkdir(parents=True)
    samples = [{"key": f"{i:09d}", "image": encode(img), "caption": f"{prefix} photo of {name}",
                "json": {"uid": f"{prefix}-{name}", "label": i % 3}} for i, (name, img) in enumerate(images)]
    write_shard(path / "00000.tar", samples)
    (path / "00000_stats.json").write_text(json.dumps({"count": len(samples)}))
    return path


@pytest.fixture(scope="module")
def two_downloads(tmp_path_factory):
    """Two folders that both hold 00000.tar, with the same keys but other images and uids."""
    d = tmp_path_factory.mktemp("downloads")
    images = real_images(24)
    return img2dataset_folder(d / "a", images[:12], "a"), img2dataset_folder(d / "b", images[12:], "b")


def by_uid(path, name):
    """{uid: bytes of every array of the feature set at that uid's row}, usable rows only."""
    st = Store.open(path)
    fs = st.feature_set(name)
    usable = fs.usable_rows()
    uids = st.uids()
    arrays = {k: np.asarray(a[:]) for k, a in fs.arrays().items()}
    return {str(uids[i]): tuple(arrays[k][i].tobytes() for k in sorted(arrays)) for i in np.flatnonzero(usable)}


def api(store, source, backbone, **options):
    """The same extraction in this process (for reference stores: no interpreter start-up)."""
    from featstore.pipelines.extract import extract as run_extract

    return run_extract(store, source, backbone, progress=False, log=lambda *_: None, **options)


def extract(store, source, backbone, *extra, check=True):
    args = ["extract", "--store", store, "--backbone", backbone, *extra]
    if source is not None:
        args[3:3] = ["--source", source]
    return run(*args, check=check)


def test_growing_from_a_second_source_never_touches_computed_rows(tmp_path, two_downloads, tiny_dinov2_path,
                                                                   tiny_llama_path):
    a, b = two_downloads
    grown = tmp_path / "grown.zarr"
    extract(grown, a, tiny_dinov2_path, "--name", "dino", "--rows-per-shard", R, "--batch-size", "4")
    api(grown, a, tiny_llama_path, name="minilm", field="caption")
    before = {name: by_uid(grown, name) for name in ("dino", "minilm")}
    assert len(before["dino"]) == 12 and len(before["minilm"]) == 12
    out = extract(grown, b, tiny_dinov2_path, "--name", "dino", "--batch-size", "4").stdout
    assert "12 new rows registered" in out and "coverage: 24 of 24 rows done" in out
    st = Store.open(grown)
    assert st.n_rows == 24 and len(st.sources) == 2
    assert st.samples("source").tolist() == [0] * 12 + [1] * 12
    # every computed row kept its bytes, in both feature sets, and is still served
    after = by_uid(grown, "dino")
    assert len(after) == 24 and all(after[u] == v for u, v in before["dino"].items())
    minilm = by_uid(grown, "minilm")
    assert minilm == before["minilm"]  # the caption set still serves its 12 rows while the other 12 are to do
    assert verify(st)["ok"], verify(st)["problems"]
    # completing the caption set with no --source: each row from its recorded source (captions are in the store)
    out = extract(grown, None, tiny_llama_path, "--name", "minilm", "--field", "caption").stdout
    assert "computed 12 rows" in out and len(by_uid(grown, "minilm")) == 24
    # a grown store equals, uid by uid, the stores built from each source alone (same bytes per uid)
    for src in (a, b):
        alone = tmp_path / f"{src.name}.zarr"
        api(alone, src, tiny_dinov2_path, name="dino", rows_per_shard=int(R), batch_size=4)
        api(alone, src, tiny_llama_path, name="minilm", field="caption")
        for name in ("dino", "minilm"):
            mine = by_uid(grown, name)
            for uid, value in by_uid(alone, name).items():
                assert mine[uid] == value, f"{name}: {uid} differs from the store built from {src.name} alone"
    # re-running either source is a no-op that prints the real coverage
    out = extract(grown, a, tiny_dinov2_path, "--name", "dino").stdout
    assert "nothing to compute" in out and "coverage: 24 of 24 rows done (24 usable)" in out
    assert verify(Store.open(grown))["ok"]


def test_hf_rows_then_image_features_from_a_webdataset_copy(tmp_path, tiny_dinov2_path, tiny_llama_path):
    import datasets

    images = real_images(10)
    records = [{"uid": f"u{i}", "image": {"bytes": encode(img), "path": None}, "caption": f"a photo of {name}"}
               for i, (name, img) in enumerate(images)]
    hf = tmp_path / "hf"
    datasets.Dataset.from_list(records).cast_column("image", datasets.Image()).save_to_disk(str(hf))
    wds = tmp_path / "wds"
    wds.mkdir()
    write_shard(wds / "00000.tar", [{"key": f"{i:09d}", "image": encode(img), "json": {"uid": f"u{i}"}}
                                    for i, (_, img) in enumerate(images)])
    store = tmp_path / "s.zarr"
    api(store, hf, tiny_llama_path, name="llama", field="caption", uid_field="uid", rows_per_shard=4)
    out = extract(store, wds, tiny_dinov2_path, "--name", "dino").stdout
    assert "computed 10 rows" in out and "valid 10, invalid 0" in out and "new rows registered" not in out
    alone = tmp_path / "wds.zarr"
    api(alone, wds, tiny_dinov2_path, name="dino", rows_per_shard=4)
    assert by_uid(store, "dino") == by_uid(alone, "dino")
    # the rows were registered from the HF dataset: with no --source they are computed from it
    api(store, None, tiny_dinov2_path, name="dino2")
    assert by_uid(store, "dino2") == by_uid(store, "dino")
    st = Store.open(store)
    assert st.sources[0]["type"] == "hf" and st.sources[1]["type"] == "webdataset"
    assert verify(st)["ok"]


def test_captions_and_labels_given_on_a_later_run(tmp_path, tiny_llama_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = []
    for name, img in real_images(6):
        (folder / f"{name}.jpg").write_bytes(encode(img))
        names.append(name)
    store = tmp_path / "s.zarr"
    r = extract(store, folder, tiny_llama_path, "--name", "txt", "--field", "caption", "--rows-per-shard", "4", check=False)
    assert r.returncode == 2 and "empty-caption (6)" in r.stderr and r.stderr.count("\n") == 1
    assert "coverage: 6 of 6 rows done (0 usable)" in r.stdout  # the summary first, then the one-line error
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({n: f"a photo of {n}" for n in names}))
    out = extract(store, folder, tiny_llama_path, "--name", "txt", "--field", "caption", "--captions", captions).stdout
    assert "caption filled for 6 existing rows" in out and "valid 6, invalid 0" in out
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({n: ("animal" if n in ("cat", "chelsea", "coffee") else "thing") for n in names}))
    api(store, folder, tiny_llama_path, name="txt", field="caption", captions=str(captions), labels=str(labels))
    st = Store.open(store)
    assert st.samples("label").tolist() == [0 if n in ("cat", "chelsea", "coffee") else 1 for n in sorted(names)]
    assert st.root["samples/label"].attrs["names"] == ["animal", "thing"]
    # a conflicting caption is refused, naming the uid and both values
    captions.write_text(json.dumps({**{n: f"a photo of {n}" for n in names}, "coffee": "a dog"}))
    r = extract(store, folder, tiny_llama_path, "--name", "txt", "--field", "caption", "--captions", captions, check=False)
    assert r.returncode == 2 and "uid 'coffee': caption 'a photo of coffee' in the store vs 'a dog' now" in r.stderr
    assert "--update-metadata" in r.stderr and r.stderr.count("\n") == 1
    out = extract(store, folder, tiny_llama_path, "--name", "txt", "--field", "caption", "--captions", captions, "--update-metadata").stdout
    assert "caption updated for 1 existing rows" in out and "computed 1 rows" in out
    assert Store.open(store).samples("caption").tolist()[sorted(names).index("coffee")] == "a dog"
    assert verify(Store.open(store))["ok"]


def test_webdataset_labels_added_later(tmp_path, two_downloads, tiny_llama_path):
    a, _ = two_downloads
    store = tmp_path / "s.zarr"
    api(store, a, tiny_llama_path, name="txt", field="caption", rows_per_shard=int(R))
    assert "label" not in Store.open(store).sample_fields()
    extract(store, a, tiny_llama_path, "--name", "txt", "--field", "caption", "--label-column", "label")
    assert Store.open(store).samples("label").tolist() == [i % 3 for i in range(12)]


def test_two_processes_appending_different_sources_at_once(tmp_path, two_downloads, tiny_dinov2_path):
    a, b = two_downloads
    store = tmp_path / "s.zarr"
    procs = [subprocess.Popen([FEATSTORE, "extract", "--store", str(store), "--source", str(src), "--backbone",
                               tiny_dinov2_path, "--name", "dino", "--rows-per-shard", R, "--batch-size", "2",
                               "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for src in (a, b)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    st = Store.open(store)
    assert st.n_rows == 24 and sorted(st.uids().tolist()) == sorted([f"a-{n}" for n, _ in real_images(24)[:12]]
                                                                     + [f"b-{n}" for n, _ in real_images(24)[12:]])
    assert st.feature_set("dino").usable_rows().all()
    assert verify(st)["ok"], verify(st)["problems"]
    # each row holds its own source's image: equal, uid by uid, to a store of that source alone
    mine = by_uid(store, "dino")
    for src in (a, b):
        alone = tmp_path / f"{src.name}.zarr"
        api(alone, src, tiny_dinov2_path, name="dino", rows_per_shard=int(R), batch_size=2)
        for uid, value in by_uid(alone, "dino").items():
            assert mine[uid] == value


def test_two_processes_computing_the_same_feature_set(tmp_path, two_downloads, tiny_dinov2_path):
    a, _ = two_downloads
    clean, store = tmp_path / "clean.zarr", tmp_path / "s.zarr"
    args = ["--source", str(a), "--backbone", tiny_dinov2_path, "--name", "dino", "--rows-per-shard", "2",
            "--batch-size", "2", "--no-progress"]
    api(clean, a, tiny_dinov2_path, name="dino", rows_per_shard=2, batch_size=2)
    procs = [subprocess.Popen([FEATSTORE, "extract", "--store", str(store), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    st = Store.open(store)
    assert st.n_rows == 12 and len(st.sources) == 1 and st.feature_set("dino").usable_rows().all()
    assert verify(st)["ok"], verify(st)["problems"]
    assert by_uid(store, "dino") == by_uid(clean, "dino")


def test_kill_while_growing_then_verify_and_rerun(tmp_path, two_downloads, tiny_dinov2_path):
    a, b = two_downloads
    store = tmp_path / "s.zarr"
    api(store, a, tiny_dinov2_path, name="dino", rows_per_shard=4, batch_size=1)
    before = by_uid(store, "dino")
    progress = store / "_progress" / "dino"
    seen = set(os.listdir(progress))
    proc = subprocess.Popen([FEATSTORE, "extract", "--store", str(store), "--source", str(b), "--backbone",
                             tiny_dinov2_path, "--name", "dino", "--batch-size", "1", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (set(os.listdir(progress)) - seen - {"index.json"}):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st = Store.open(store)
    assert verify(st)["ok"], verify(st)["problems"]
    mid = by_uid(store, "dino")
    assert all(mid[u] == v for u, v in before.items())  # the first source's rows are untouched
    assert len(mid) < 24, "the run should have been killed part-way"
    out = extract(store, b, tiny_dinov2_path, "--name", "dino", "--batch-size", "1").stdout
    assert "coverage: 24 of 24 rows done" in out
    assert verify(Store.open(store))["ok"]
    assert all(by_uid(store, "dino")[u] == v for u, v in before.items())


def test_validate_before_writing(tmp_path, two_downloads, tiny_llama_path):
    a, _ = two_downloads
    store = tmp_path / "s.zarr"
    r = extract(store, a, "no-such-model", check=False)
    assert r.returncode == 2 and "unknown backbone" in r.stderr and not store.exists()
    api(store, a, tiny_llama_path, name="txt", field="caption", rows_per_shard=int(R))
    other = tmp_path / "other"
    other.mkdir()
    write_shard(other / "00000.tar", [{"key": "0", "image": encode(real_images(1)[0][1]), "json": {"uid": "new"}}])
    for bad, msg in [(["--backbone", "no-such-model"], "unknown backbone"),
                     (["--backbone", tiny_llama_path, "--name", "txt", "--field", "caption", "--rows-per-shard", "16"],
                      "cannot take effect"),
                     (["--backbone", tiny_llama_path, "--name", "txt", "--field", "caption", "--pooling", "mean"],
                      "different identity")]:
        r = run("extract", "--store", store, "--source", other, *bad, check=False)
        first, *details = r.stderr.splitlines()  # one line; an identity refusal adds one line per differing key
        assert r.returncode == 2 and msg in first and all(d.startswith("  ") for d in details), r.stderr
        assert bool(details) == (msg == "different identity")
        assert Store.open(store).n_rows == 12  # nothing registered
    from featstore.errors import FeatstoreError

    # the same refusals through the function the command calls: the same first line, nothing registered
    for bad, msg in [(dict(rows_per_shard=16), "cannot take effect"), (dict(pooling="mean"), "different identity")]:
        with pytest.raises(FeatstoreError, match=msg) as err:
            api(store, other, tiny_llama_path, name="txt", field="caption", **bad)
        assert all(d.startswith("  ") for d in str(err.value).splitlines()[1:])
        assert Store.open(store).n_rows == 12


def test_one_line_refusals(tmp_path, two_downloads, tiny_llama_path):
    a, _ = two_downloads
    store = tmp_path / "s.zarr"
    r = run("extract", "--store", store, "--backbone", tiny_llama_path, "--field", "caption", "--source", a,
            "--rows-per-shard", "0", check=False)
    assert r.returncode == 2 and "--rows-per-shard must be >= 1" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    from featstore.errors import FeatstoreError

    # the same refusals through the function the command calls (the command's one-line form is above)
    for source, bad, msg in [(a, dict(name="a/b"), "bad feature set name"), (a, dict(source_type="parquet"), "parquet"),
                             (None, dict(update_metadata=True), "give it with --source")]:
        with pytest.raises(FeatstoreError, match=msg) as err:
            api(store, source, tiny_llama_path, field="caption", **bad)
        assert "\n" not in str(err.value)
    assert not store.exists()
    api(store, a, tiny_llama_path, name="txt", field="caption", rows_per_shard=int(R))
    prefix = read_only_prefix(store)  # a store on a read-only mount, even for root
    if prefix is None:
        pytest.skip("cannot make a store read-only for root here (no unshare)")
    try:
        r = subprocess.run([*prefix, FEATSTORE, "extract", "--store", str(store), "--source", str(a), "--backbone",
                            tiny_llama_path, "--field", "caption", "--name", "m2", "--no-progress"],
                           capture_output=True, text=True)
        assert r.returncode == 2 and "not writable" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(store)], check=False)


def test_read_only_store_object_is_one_line(tmp_path, two_downloads, tiny_llama_path):
    a, _ = two_downloads
    store = tmp_path / "s.zarr"
    api(store, a, tiny_llama_path, name="txt", field="caption", rows_per_shard=int(R))
    from featstore.errors import FeatstoreError

    with pytest.raises(FeatstoreError, match="opened read-only"):
        Store.open(store).register(["x"])


def test_xarray_opens_groups_and_consolidated_metadata_stays_current(tmp_path, two_downloads, tiny_dinov2_path):
    import xarray as xr

    a, b = two_downloads
    store = tmp_path / "s.zarr"
    api(store, a, tiny_dinov2_path, name="dino", rows_per_shard=int(R), tokens=True)
    zarr.consolidate_metadata(str(store))
    extract(store, b, tiny_dinov2_path, "--name", "dino", "--tokens")  # an append after consolidation
    g = zarr.open_consolidated(str(store), mode="r")
    assert g["samples/uid"].shape == (24,) and g["features/dino/pooled"].shape[0] == 24
    assert g.attrs["featstore"]["n_rows"] == 24
    ds = xr.open_zarr(str(store), group="features/dino", consolidated=False)
    assert ds.sizes["row"] == 24 and set(ds.data_vars) == {"pooled", "tokens", "valid"}
    assert ds.pooled.dims == ("row", "dim") and ds.tokens.dims == ("row", "token", "token_dim")
    samples = xr.open_zarr(str(store), group="samples", consolidated=False)
    assert samples.sizes["row"] == 24 and {"uid", "source", "source_ref", "caption"} <= set(samples.data_vars)
    assert verify(Store.open(store))["ok"]
