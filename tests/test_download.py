"""download(): real img2dataset runs against a loopback HTTP server — good images, a 404 and a
broken file — then the shards read straight back through open_source; resume; argument checks."""

from __future__ import annotations

import io
import json
import shutil
import signal
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage import data as skdata

from featstore.errors import BadSample, ConfigError
from featstore.pipelines.download import download, url_uid
from featstore.pipelines.sources import open_source
from servers import serve_directory

GOOD = {  # file name -> pixels
    "astronaut.png": lambda: skdata.astronaut()[::8, ::8],
    "cat.jpg": lambda: skdata.chelsea()[::6, ::6],
    "coins.png": lambda: skdata.coins()[::6, ::6],
    "blue.webp": lambda: np.full((24, 40, 3), (10, 20, 220), np.uint8),
    "tall.jpg": lambda: np.tile(np.linspace(0, 255, 60, dtype=np.uint8)[:, None, None], (1, 20, 3)),
}
SHARD = 4  # samples per shard: 7 rows -> 2 shards


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Base url of a loopback server holding GOOD, a broken 'image' and no `gone.png` (404)."""
    root = tmp_path_factory.mktemp("site")
    for name, make in GOOD.items():
        Image.fromarray(make()).save(root / name)
    (root / "broken.jpg").write_bytes(b"this is not an image, just bytes\x00\x01")
    with serve_directory(root) as base:
        yield base


def url_rows(base: str) -> pd.DataFrame:
    names = ["astronaut.png", "cat.jpg", "gone.png", "coins.png", "broken.jpg", "blue.webp", "tall.jpg"]
    return pd.DataFrame({"url": [f"{base}/{n}" for n in names],
                         "text": [f"a picture of {n.split('.')[0]}" for n in names],
                         "id": [f"item-{i}" for i in range(len(names))]})


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    with tarfile.open(path) as tar:
        out: dict[str, dict[str, bytes]] = {}
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
        return out


@pytest.fixture(scope="module")
def with_uid_col(site, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dl-uid")
    rows = url_rows(site)
    rows.to_parquet(tmp / "urls.parquet")
    before = signal.getsignal(signal.SIGINT)
    summary = download(tmp / "urls.parquet", tmp / "out", caption_col="text", uid_col="id", image_size=32,
                       threads=4, samples_per_shard=SHARD, progress=False)
    assert signal.getsignal(signal.SIGINT) is before  # img2dataset's handler does not outlive the call
    return tmp / "out", rows, summary


def test_shards_carry_uid_and_summary_counts_failures(with_uid_col):
    out, rows, summary = with_uid_col
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    good = rows[~rows.url.str.contains("gone|broken")]
    samples = {}
    for tar in sorted(out.glob("*.tar")):
        samples.update(tar_samples(tar))
    metas = [json.loads(s["json"]) for s in samples.values()]
    assert sorted(m["uid"] for m in metas) == sorted(good.id)
    assert all(m["url"] == rows.url[rows.id == m["uid"]].item() for m in metas)

    assert summary["shards"] == 2 and summary["samples"] == 7
    assert summary["successes"] == 5 and summary["failed"] == 2
    reasons = summary["failures_by_reason"]
    assert sum(reasons.values()) == 2
    assert reasons[next(r for r in reasons if "404" in r)] == 1
    assert reasons[next(r for r in reasons if "404" not in r)] == 1  # the broken file ("Image decoding error")
    assert summary["duplicate_urls"] == summary["duplicate_uids"] == 0
    assert summary["incomplete_shards"] == 0 and summary["skipped_shards"] == 0
    assert Path(summary["log"]).is_file()  # progress=False: img2dataset's output went there


def test_open_source_reads_download_straight(with_uid_col):
    out, rows, _ = with_uid_col
    src = open_source(out)
    assert src.kind == "webdataset"
    recs = list(src.records())
    assert src.warnings == []
    good = rows[~rows.url.str.contains("gone|broken")]
    assert {r.uid: r.caption for r in recs} == dict(zip(good.id, good.text))
    for rec, data in zip(recs, src.read_images([r.source_ref for r in recs])):
        assert not isinstance(data, BadSample), rec
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "JPEG" and min(im.size) == 32  # keep_ratio: shorter side = image_size


def test_rerun_resumes_only_unfinished_shards(with_uid_col, tmp_path):
    done, rows, first = with_uid_col
    out = tmp_path / "out"
    shutil.copytree(done, out)
    for name in ("00001.tar", "00001.parquet", "00001_stats.json"):  # as if killed during shard 1
        (out / name).unlink()
    kept = (out / "00000.tar").stat().st_mtime_ns
    urls = tmp_path / "urls.parquet"
    rows.to_parquet(urls)
    args = dict(caption_col="text", uid_col="id", image_size=32, threads=4, samples_per_shard=SHARD, progress=False)

    again = download(urls, out, **args)
    assert (out / "00000.tar").stat().st_mtime_ns == kept  # finished shard skipped
    assert (out / "00001.tar").is_file() and again["skipped_shards"] == 1
    for key in ("shards", "successes", "failed", "failures_by_reason"):
        assert again[key] == first[key]
    assert sorted(r.uid for r in open_source(out).records()) == sorted(
        r.uid for r in open_source(done).records())

    started = time.perf_counter()
    third = download(urls, out, **args)  # nothing left: img2dataset is not even started
    assert time.perf_counter() - started < 10
    assert third["skipped_shards"] == 2 and third["successes"] == first["successes"]
    assert (out / "00000.tar").stat().st_mtime_ns == kept


def test_url_hash_uids_from_csv_without_captions(site, tmp_path):
    rows = url_rows(site).rename(columns={"url": "image_url"})
    rows = pd.concat([rows, rows.iloc[[0]]])  # a duplicate row: kept, and reported
    rows[["image_url"]].to_csv(tmp_path / "urls.csv", index=False)
    summary = download(tmp_path / "urls.csv", tmp_path / "out", url_col="image_url", caption_col=None,
                       image_size=32, threads=4, progress=False)
    assert summary["duplicate_urls"] == 1 and summary["duplicate_uids"] == 1
    assert summary["successes"] == 6 and summary["failed"] == 2
    (sample, *_), = [list(tar_samples(t).values()) for t in (tmp_path / "out").glob("*.tar")]
    assert "txt" not in sample
    meta = json.loads(sample["json"])
    assert meta["uid"] == url_uid(meta["url"]) and len(meta["uid"]) == 16

    recs = list(open_source(tmp_path / "out").records())
    good = [u for u in rows.image_url if "gone" not in u and "broken" not in u]
    assert sorted(r.uid for r in recs) == sorted(url_uid(u) for u in good)
    assert all(r.caption is None for r in recs)


def test_arguments_checked_before_any_work(site, tmp_path):
    url_rows(site).to_parquet(tmp_path / "urls.parquet")
    (tmp_path / "urls.txt").write_text("http://127.0.0.1/x.png\n")
    pd.DataFrame({"url": ["http://127.0.0.1/a.png"], "id": [None]}).to_parquet(tmp_path / "noid.parquet")
    out = tmp_path / "out"
    bad = [
        (dict(urls=tmp_path / "missing.parquet"), "not found"),
        (dict(urls=tmp_path / "urls.txt"), "must be one of"),
        (dict(urls=tmp_path / "urls.parquet", url_col="link"), "no column 'link'"),
        (dict(urls=tmp_path / "urls.parquet"), "caption_col=None"),  # default 'caption' is absent
        (dict(urls=tmp_path / "urls.parquet", caption_col="text", uid_col="nope"), "no column 'nope'"),
        (dict(urls=tmp_path / "noid.parquet", caption_col=None, uid_col="id"), "empty in 1 rows"),
        (dict(urls=tmp_path / "urls.parquet", caption_col="text", encode_format="gif"), "encode_format"),
        (dict(urls=tmp_path / "urls.parquet", caption_col="text", processes=0), "processes"),
        (dict(urls=tmp_path / "urls.parquet", caption_col="text",
              extra_img2dataset_kwargs={"output_folder": "x"}), "out_dir"),
        (dict(urls=tmp_path / "urls.parquet", caption_col="text",
              extra_img2dataset_kwargs={"no_such_option": 1}), "no argument 'no_such_option'"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError, match=message) as err:
            download(out_dir=out, **kwargs)
        assert "\n" not in str(err.value)
    assert not out.exists()


def test_download_json_is_json_only(site, tmp_path):
    """`featstore download --json` as a script reads it: stdout is the JSON summary and nothing
    else (img2dataset's own lines and its workers' go to stderr)."""
    import os
    import subprocess
    import sys

    url_rows(site).to_parquet(tmp_path / "urls.parquet")
    r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "featstore"), "download", tmp_path / "urls.parquet",
                        "--out", tmp_path / "out", "--caption-col", "text", "--uid-col", "id", "--image-size", "32",
                        "--threads", "4", "--processes", "1", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)  # the whole of stdout parses
    assert summary["successes"] == 5 and summary["shards"] == 1
    assert "- success:" in r.stderr  # img2dataset's worker lines still report, on stderr
