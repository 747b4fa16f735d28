"""Sources: every kind on real data (tar shards, saved datasets, parquet, image folders), auto
detection, bad samples, warnings, re-opening in another process, and one set of uids and captions
read the same from three kinds."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data as skdata

from featstore.errors import BadSample, ConfigError, SourceError
from featstore.pipelines.download import download
from featstore.pipelines.sources import Record, open_source
from servers import serve_directory


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def small(array: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((32, 32)))


# uid (path without extension) -> (format, pixels): nested dirs, mixed formats, an upper-case suffix
PICTURES = {
    "astronaut": ("PNG", lambda: small(skdata.astronaut())),
    "animals/cat": ("JPEG", lambda: small(skdata.chelsea())),
    "animals/deep/coffee": ("WEBP", lambda: small(skdata.coffee())),
    "gray/camera": ("PNG", lambda: small(skdata.camera())),
    "red": ("JPEG", lambda: np.full((20, 30, 3), (200, 30, 30), np.uint8)),
}
SUFFIX = {"PNG": ".png", "JPEG": ".JPG", "WEBP": ".webp"}
CAPTIONS = {"astronaut": "an astronaut", "animals/cat": "a cat", "animals/deep/coffee": "coffee",
            "red": "a red square — ünïcode"}  # gray/camera has no caption


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An image folder holding PICTURES (plus a hidden image and a text file, both ignored)."""
    root = tmp_path_factory.mktemp("folder")
    for uid, (fmt, make) in PICTURES.items():
        path = root / (uid + SUFFIX[fmt])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(make(), fmt))
    (root / ".hidden.png").write_bytes((root / "red.JPG").read_bytes())
    (root / "notes.txt").write_text("not an image")
    return root


def rel_of(uid: str) -> str:
    return uid + SUFFIX[PICTURES[uid][0]]


@pytest.fixture(scope="module")
def captions_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("captions") / "captions.json"
    path.write_text(json.dumps({**CAPTIONS, "nowhere/ghost": "no such image"}), encoding="utf-8")
    return path


def hf_features(label: bool = True) -> datasets.Features:
    features = {"image": datasets.Image(), "caption": datasets.Value("string"), "uid": datasets.Value("string")}
    if label:
        features["label"] = datasets.ClassLabel(names=["photo", "animal", "plain"])
    return datasets.Features(features)


def hf_rows(folder: Path) -> dict[str, list]:
    uids = sorted(PICTURES)
    return {
        "image": [{"bytes": (folder / rel_of(u)).read_bytes(), "path": None} for u in uids],
        "caption": [CAPTIONS.get(u) for u in uids],
        "uid": uids,
        "label": [1 if u.startswith("animals/") else 2 if u == "red" else 0 for u in uids],
    }


@pytest.fixture(scope="module")
def hf_dir(folder, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "ds"
    datasets.Dataset.from_dict(hf_rows(folder), features=hf_features()).save_to_disk(str(path))
    return path


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A webdataset shard laid out as img2dataset writes it: <key>.<ext> members, sample by sample."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def meta(**fields) -> bytes:
    return json.dumps({"key": "x", "status": "success", **fields}).encode()


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """Two shards: every member kind, a sample without image, one without .txt, a bad UTF-8 caption,
    one without a json uid; an img2dataset-style parquet beside them.  Returns (dir, uid -> image)."""
    root = tmp_path_factory.mktemp("wds")
    img = {u: (folder / rel_of(u)).read_bytes() for u in PICTURES}
    write_tar(root / "00000.tar", [
        ("000000000", {"jpg": img["animals/cat"], "txt": b"a cat", "json": meta(uid="u0", label=1)}),
        ("000000001", {"png": img["astronaut"], "txt": b"caf\xe9 au lait", "json": meta(uid="u1", label=0)}),
        ("000000002", {"txt": b"no image here", "json": meta(uid="u2", label=2)}),
        ("000000003", {"webp": img["animals/deep/coffee"], "json": meta(uid="u3", label="n/a")}),
    ])
    write_tar(root / "00001.tar", [
        ("000010000", {"jpeg": img["red"], "txt": b"red", "json": meta(id="x9", label=2)}),
    ])
    pd.DataFrame({"key": ["000000000"], "status": ["success"]}).to_parquet(root / "00000.parquet")
    return root, {"u0": img["animals/cat"], "u1": img["astronaut"], "u3": img["animals/deep/coffee"],
                  "00001/000010000": img["red"]}


def read_all(source, refs):
    return [x.reason if isinstance(x, BadSample) else x for x in source.read_images(refs)]


# ---------------------------------------------------------------------------- webdataset


def test_webdataset_records_captions_labels_and_fallback_uid(shards):
    root, images = shards
    src = open_source(root, label_column="label")  # tars win over the parquet beside them
    assert src.kind == "webdataset"
    recs = list(src.records())
    assert [r.uid for r in recs] == ["u0", "u1", "u2", "u3", "00001/000010000"]
    assert recs[0] == Record("u0", "a cat", 1, "00000.tar:000000000")
    assert recs[1].caption == "caf\ufffd au lait"  # non-UTF-8 byte marked, not fatal
    assert recs[3].caption is None  # no .txt member
    assert [r.label for r in recs] == [1, 0, 2, None, 2]
    assert src.label_names is None
    assert any("1 samples have no json field 'uid'" in w and "stable only for this download" in w
               for w in src.warnings)
    assert any("integer json field 'label'" in w for w in src.warnings)

    got = read_all(src, [r.source_ref for r in recs] + ["00000.tar:999", "nope.tar:000000000", "junk"])
    assert got == [images["u0"], images["u1"], "missing-image", images["u3"], images["00001/000010000"],
                   "missing-image", "bad-ref", "bad-ref"]
    with pytest.raises(BadSample) as err:
        src.read_image(recs[2].source_ref)
    assert err.value.reason == "missing-image"
    src.max_cached_indexes = 1  # shards' indexes evicted and rebuilt from the headers: same bytes
    refs = [recs[4].source_ref, recs[0].source_ref, recs[4].source_ref, recs[3].source_ref]
    assert read_all(src, refs) == [images["00001/000010000"], images["u0"], images["00001/000010000"], images["u3"]]


def test_webdataset_uid_field_single_tar_and_index_without_records(shards):
    root, images = shards
    src = open_source(root, uid_field="id")
    assert [r.uid for r in src.records()][-1] == "x9"
    assert any("4 samples have no json field 'id'" in w for w in src.warnings)

    one = open_source(root / "00001.tar")  # a single shard; images readable before records() ran
    assert one.read_image("00001.tar:000010000") == images["00001/000010000"]
    assert [r.source_ref for r in one.records()] == ["00001.tar:000010000"]


def test_webdataset_truncated_and_empty_shards(shards, tmp_path):
    root, _ = shards
    data = (root / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[: len(data) // 2])
    src = open_source(tmp_path)
    recs = list(src.records())  # what is readable, then a warning; never an exception
    assert 0 < len(recs) < 4
    assert any("00000.tar" in w and "unreadable" in w for w in src.warnings)

    empty = tmp_path / "empty"
    empty.mkdir()
    write_tar(empty / "00000.tar", [])
    with pytest.raises(SourceError, match="no samples"):
        list(open_source(empty).records())


# ---------------------------------------------------------------------------- HF datasets


def test_hf_dataset_with_classlabel(hf_dir, folder):
    src = open_source(hf_dir, uid_field="uid")
    assert src.kind == "hf"
    assert src.label_names == ["photo", "animal", "plain"]
    recs = list(src.records())
    uids = sorted(PICTURES)
    assert [r.uid for r in recs] == uids
    assert [r.caption for r in recs] == [CAPTIONS.get(u) for u in uids]
    assert recs[uids.index("animals/cat")].label == 1
    assert [r.source_ref for r in recs] == [f"hf:{i}" for i in range(len(uids))]
    assert src.warnings == []
    got = read_all(src, [r.source_ref for r in reversed(recs)] + ["hf:99", "hf:x"])
    assert got == [(folder / rel_of(u)).read_bytes() for u in reversed(uids)] + ["bad-ref", "bad-ref"]

    plain = open_source(hf_dir)  # no uid field: row indices, with a warning
    assert [r.uid for r in plain.records()] == [str(i) for i in range(len(uids))]
    assert any("row indices" in w for w in plain.warnings)


def test_hf_missing_images_paths_and_splits(folder, tmp_path):
    astronaut = (folder / "astronaut.png").read_bytes()
    rows = {"picture": [{"bytes": astronaut, "path": None}, None, {"bytes": astronaut, "path": None}],
            "file": [str(folder / "astronaut.png"), None, str(tmp_path / "gone.png")],  # paths as text
            "text": ["one", "two", None]}
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"picture": datasets.Image(), "file": datasets.Value("string"), "text": datasets.Value("string")}))
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    dd.save_to_disk(str(tmp_path / "dd"))
    src = open_source(tmp_path / "dd")  # the "train" split; image column found by feature type
    assert [r.caption for r in src.records()] == ["one", "two", None]
    assert read_all(src, ["hf:0", "hf:1", "hf:2"]) == [astronaut, "missing-image", astronaut]
    by_path = open_source(tmp_path / "dd", image_column="file")
    assert read_all(by_path, ["hf:0", "hf:1", "hf:2"]) == [astronaut, "missing-image", "missing-image"]

    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "novalid"))
    with pytest.raises(SourceError, match="no 'train'") as err:
        open_source(tmp_path / "novalid")
    assert "\n" not in str(err.value) and "validation" in str(err.value)
    with pytest.raises(SourceError, match="no column 'nope'"):
        open_source(tmp_path / "dd", label_column="nope")


def test_parquet_file_folder_and_binary_column(hf_dir, folder, tmp_path):
    ds = datasets.load_from_disk(str(hf_dir))
    (tmp_path / "pq").mkdir()
    ds.select(range(3)).to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    ds.select(range(3, len(ds))).to_parquet(str(tmp_path / "pq" / "part-1.parquet"))
    src = open_source(tmp_path / "pq", uid_field="uid")  # a folder of parquet files, in name order
    assert src.kind == "parquet"
    recs = list(src.records())
    assert [r.uid for r in recs] == sorted(PICTURES)
    assert src.label_names == ["photo", "animal", "plain"]
    assert src.read_image(recs[1].source_ref) == (folder / rel_of(recs[1].uid)).read_bytes()
    assert open_source(tmp_path / "pq" / "part-1.parquet", "hf").kind == "parquet"

    # img2dataset's parquet output format: raw bytes in a binary column
    red = (folder / "red.JPG").read_bytes()
    pd.DataFrame({"key": ["k0"], "jpg": [red], "txt": ["red"]}).to_parquet(tmp_path / "i2d.parquet")
    raw = open_source(tmp_path / "i2d.parquet", image_column="jpg", text_column="txt", uid_field="key")
    assert list(raw.records()) == [Record("k0", "red", None, "hf:0")]
    assert raw.read_image("hf:0") == red


# ---------------------------------------------------------------------------- folders


def test_folder_nested_with_captions(folder, captions_file):
    src = open_source(folder, captions=captions_file)
    assert src.kind == "folder"
    recs = list(src.records())
    assert [r.uid for r in recs] == sorted(PICTURES)  # nested, case-insensitive suffixes, hidden skipped
    assert {r.uid: r.caption for r in recs} == {u: CAPTIONS.get(u) for u in PICTURES}
    assert recs[0].source_ref == "animals/cat.JPG"
    assert any(w.startswith("1 of 5 captions") for w in src.warnings)
    got = read_all(src, [r.source_ref for r in recs] + ["nope.png", "../outside.png"])
    assert got == [(folder / r.source_ref).read_bytes() for r in recs] + ["missing-image", "bad-ref"]

    bare = open_source(folder)
    assert all(r.caption is None for r in bare.records()) and bare.warnings == []


# ---------------------------------------------------------------------------- errors and options


def test_bad_paths_and_options(folder, shards, tmp_path, captions_file):
    cases = [
        (SourceError, dict(path=tmp_path / "missing")),
        (SourceError, dict(path=tmp_path)),  # empty folder: no images
        (SourceError, dict(path=captions_file)),  # a file of no source kind
        (SourceError, dict(path=folder, captions=tmp_path / "none.json")),
        (SourceError, dict(path=tmp_path, source_type="hf")),
        (ConfigError, dict(path=folder, source_type="zip")),
        (ConfigError, dict(path=shards[0], captions=captions_file)),
        (ConfigError, dict(path=folder, uid_field="id")),
    ]
    (tmp_path / "bad.json").write_text("{not json")
    cases.append((SourceError, dict(path=folder, captions=tmp_path / "bad.json")))
    for error, kwargs in cases:
        with pytest.raises(error) as err:
            open_source(**kwargs)
        assert str(err.value) and "\n" not in str(err.value), kwargs


# ---------------------------------------------------------------------------- re-opening elsewhere

_CHILD = """
import hashlib, json, pickle, sys
from featstore.errors import BadSample
from featstore.pipelines.sources import open_source
specs = json.loads(sys.argv[1])
pickled = pickle.loads(open(sys.argv[2], "rb").read())
def digest(src):
    refs = [r.source_ref for r in src.records()]
    return [[r, x.reason if isinstance(x, BadSample) else hashlib.sha1(x).hexdigest()]
            for r, x in zip(refs, src.read_images(list(reversed(refs))))]
print(json.dumps([[digest(open_source(**s)) for s in specs], [digest(p) for p in pickled]]))
"""


def digest(src):
    refs = [r.source_ref for r in src.records()]
    return [[r, x.reason if isinstance(x, BadSample) else hashlib.sha1(x).hexdigest()]
            for r, x in zip(refs, src.read_images(list(reversed(refs))))]


def test_spec_and_pickle_reopen_in_another_process(folder, captions_file, hf_dir, shards, tmp_path):
    sources = [open_source(folder, captions=captions_file), open_source(hf_dir, uid_field="uid"),
               open_source(shards[0], label_column="label")]
    specs = [s.spec() for s in sources]
    assert specs[0] == {"path": str(folder), "source_type": "folder", "captions": str(captions_file)}
    assert json.loads(json.dumps(specs)) == specs
    expected = [digest(s) for s in sources]
    assert [digest(pickle.loads(pickle.dumps(s))) for s in sources] == expected
    (tmp_path / "sources.pkl").write_bytes(pickle.dumps(sources))
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(specs), str(tmp_path / "sources.pkl")],
                         capture_output=True, text=True, check=True, timeout=120)
    by_spec, by_pickle = json.loads(out.stdout)
    assert by_spec == expected and by_pickle == expected


# ---------------------------------------------------------------------------- one set, three kinds


def test_same_uids_and_captions_across_kinds(folder, captions_file, hf_dir, tmp_path):
    uids = sorted(PICTURES)
    with serve_directory(folder) as base:
        pd.DataFrame({"url": [f"{base}/{rel_of(u)}" for u in uids],
                      "caption": [CAPTIONS.get(u) for u in uids],
                      "uid": uids}).to_parquet(tmp_path / "urls.parquet")
        summary = download(tmp_path / "urls.parquet", tmp_path / "shards", uid_col="uid", image_size=32,
                           threads=4, progress=False)
    assert summary["successes"] == len(uids), summary

    kinds = [open_source(tmp_path / "shards"), open_source(hf_dir, uid_field="uid"),
             open_source(folder, captions=captions_file)]
    assert [k.kind for k in kinds] == ["webdataset", "hf", "folder"]
    expected = {u: CAPTIONS.get(u) for u in uids}
    for src in kinds:
        recs = list(src.records())
        assert {r.uid: r.caption for r in recs} == expected, src.kind
        for data in src.read_images([r.source_ref for r in recs]):
            Image.open(io.BytesIO(data)).load()


def test_folder_classes_from_subfolders_then_zero_shot_ready(tmp_path, tiny_dinov2_path):
    """`--labels subdirs`: an ImageFolder layout (root/<class>/image) carries its labels, so the store
    it makes has label names for zero-shot; images in no class folder get no label, with a warning."""
    import os

    root = tmp_path / "photos"
    for rel, pixels in [("cat/a.png", skdata.chelsea()), ("cat/deep/b.png", skdata.chelsea()[::-1]),
                        ("dog/c.png", skdata.astronaut()), ("loose.png", skdata.coffee())]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encode(small(pixels), "PNG"))
    src = open_source(root, labels="subdirs")
    assert src.label_names == ["cat", "dog"]
    assert [(r.uid, r.label) for r in src.records()] == [("cat/a", 0), ("cat/deep/b", 0), ("dog/c", 1), ("loose", None)]
    assert any("1 images sit at the top" in w for w in src.warnings)
    assert [r.label for r in pickle.loads(pickle.dumps(src)).records()] == [0, 0, 1, None]

    featstore = os.path.join(os.path.dirname(sys.executable), "featstore")
    out = subprocess.run([featstore, "extract", "--store", str(tmp_path / "s.zarr"), "--source", str(root),
                          "--labels", "subdirs", "--backbone", tiny_dinov2_path, "--name", "img", "--no-progress"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    from featstore.store import Store

    store = Store.open(tmp_path / "s.zarr")
    assert store.samples("label").tolist() == [0, 0, 1, -1]
    assert list(store.array("samples/label").attrs["names"]) == ["cat", "dog"]
