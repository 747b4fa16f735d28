"""Format-1 stores: read as they are, refused for writing with a clear line, converted by `featstore upgrade`."""

import datetime
import json
import os
import subprocess
import sys

import numpy as np
import zarr

from featstore.core import format as fmt
from featstore.store import Store
from featstore.tools.verify import verify
from featstore.core.writes import checksum

FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")


def format1_store(path, n=20, r=8, dim=4):
    """A store laid out exactly as format 1 wrote it: attrs without sources, samples without
    `source`, arrays without dimension names, one `<block>.json` marker per finished block whose
    `rows` were all done, and the manifest record of one registration."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs["featstore"] = {"format": 1, "rows_per_shard": r, "n_rows": n, "created": "2025-01-01T00:00:00+00:00"}
    samples = root.require_group("samples")
    for name, values in (("uid", [f"u{i:03d}" for i in range(n)]), ("caption", [f"caption {i}" for i in range(n)]),
                         ("source_ref", [f"00000.tar:{i:09d}" for i in range(n)])):
        a = samples.create_array(name, shape=(n,), dtype=str, chunks=(r,), shards=(r,), fill_value="")
        a[:] = np.array(values)
    g = root.require_group("features/img")
    pooled = g.create_array("pooled", shape=(n, dim), dtype="float16", chunks=(r, dim), shards=(r, dim), fill_value=0)
    valid = g.create_array("valid", shape=(n,), dtype="bool", chunks=(r,), shards=(r,), fill_value=False)
    g.attrs.update({"identity": {"model": "synthetic"}, "dim": dim, "tokens": None, "token_dtype": None, "pixels": None})
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float16)
    done_blocks = [0, 1]  # block 2 (rows 16-20) was never computed
    for b in done_blocks:
        s, e = b * r, min(b * r + r, n)
        pooled[s:e] = x[s:e]
        valid[s:e] = True
        marker = {"block": b, "rows": [s, e], "n_valid": e - s, "n_invalid": 0, "failures": [],
                  "checksums": {"features/img/pooled": checksum(x[s:e]), "features/img/valid": checksum(np.ones(e - s, bool))},
                  "written_at": datetime.datetime.now().isoformat(), "host": "test"}
        os.makedirs(path / "_progress" / "img", exist_ok=True)
        (path / "_progress" / "img" / f"{b}.json").write_text(json.dumps(marker))
    (path / "_progress" / "manifest.json").write_text(json.dumps({"duplicates": [], "registrations": [
        {"source": "/data/shards", "registered": n, "already_present": 0, "duplicates": 0, "at": "2025-01-01"}]}))
    return x


def test_format1_reads_refuses_writes_and_upgrades(tmp_path):
    path = tmp_path / "old.zarr"
    x = format1_store(path)
    st = Store.open(path)
    assert st.format == 1 and st.feature_set("img").usable_rows().tolist() == [True] * 16 + [False] * 4
    r = subprocess.run([FEATSTORE, "extract", "--store", str(path), "--source", str(tmp_path), "--backbone", "minilm",
                        "--field", "caption", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 2 and "featstore upgrade --store" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    out = subprocess.run([FEATSTORE, "inspect", "--store", str(path)], capture_output=True, text=True, check=True).stdout
    assert "format 1" in out
    out = subprocess.run([FEATSTORE, "upgrade", "--store", str(path)], capture_output=True, text=True, check=True).stdout
    assert "format 1 -> 3" in out and "2 markers converted" in out and "20 uids indexed" in out
    st = Store.open(path, mode="r+")
    assert st.format == 3 and st.sources[0]["location"] == "/data/shards" and st.sources[0]["rows"] == 20
    assert st.samples("source").tolist() == [0] * 20
    fs = st.feature_set("img")
    assert fs.usable_rows().tolist() == [True] * 16 + [False] * 4
    np.testing.assert_array_equal(np.asarray(fs.array("pooled")[:16]), x[:16])
    assert sorted(os.listdir(path / "_progress" / "img")) == ["0-1.json", "1-1.json", "blocks.npy", "index.json", "latest", "layout"]
    assert sorted(os.listdir(path / "_progress" / "img" / "latest")) == ["0.json", "1.json"]  # O(1) block writes
    assert zarr.open_group(str(path), mode="r")["features/img/pooled"].metadata.dimension_names == fmt.DIMS["pooled"]
    result = verify(st)
    assert result["ok"], result["problems"]
    # and it grows like any format-2 store, keeping its rows
    st.register(["new-1", "new-2"], source={"type": "folder", "location": "/x", "options": {}, "fingerprint": "f"})
    fs = Store.open(path).feature_set("img")
    assert fs.usable_rows()[:16].all() and Store.open(path).n_rows == 22
    assert verify(Store.open(path))["ok"]
