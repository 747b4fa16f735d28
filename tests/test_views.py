"""Stored views (`extract --views K`) on real photos through a tiny saved DINOv2: the layout, crops
that reproduce the stored pixels, determinism across runs, block layouts and growth, the loader's
one-view-per-row-per-epoch mode (every read path, resume), train-uta on a K=2 store, and
verify / inspect / export on the view axis."""

import collections
import json

import numpy as np
import pytest
import zarr

from featstore.errors import CheckpointError, ConfigError, IdentityMismatch
from featstore.tools.export import export
from featstore.tools.inspect import format_summary, summarize
from featstore.loader import Loader
from featstore.pipelines.extract import extract
from featstore.pipelines.preprocess import Preprocess, decode_image
from featstore.pipelines.crops import EVA02_RATIO, EVA02_SCALE, view_box_pixels
from featstore.store import Store
from featstore.tokens import dequantize_int8
from featstore.tools.verify import verify
from imagedata import encode, real_images, write_shard
from sharelock_data import one_thread

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)
QUIET = dict(progress=False, log=lambda *_: None)
COLUMNS = {"x": "pixels/px", "t": "features/dino/tokens", "p": "features/dino/pooled"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """16 real images (8 photos of 300-512 px, 8 generated of 40-120 px) as two webdataset tars
    of 8 (folders a/ and b/) and both in one folder (ab/); {uid: encoded bytes}."""
    root = tmp_path_factory.mktemp("views")
    images = real_images(16)
    samples = [{"key": f"{i:09d}", "image": encode(img), "json": {"uid": f"img-{name}"}} for i, (name, img) in enumerate(images)]
    for folder, tars in (("a", [samples[:8]]), ("b", [samples[8:]]), ("ab", [samples[:8], samples[8:]])):
        (root / folder).mkdir()
        for t, part in enumerate(tars):
            write_shard(root / folder / f"{t:05d}.tar", part)
    return root, {s["json"]["uid"]: s["image"] for s in samples}


@pytest.fixture(scope="module")
def view_store(photos, tiny_dinov2_path):
    """A K=2 store made by the command: int8 token x channel tokens, pooled and pixels per view."""
    from click.testing import CliRunner

    from featstore.command.cli import main

    root, _ = photos
    path = root / "k2.zarr"
    args = ["extract", "--store", path, "--source", root / "ab", "--backbone", tiny_dinov2_path, "--name", "dino",
            "--tokens", "--token-dtype", "int8", "--pixels", "px", "--views", "2", "--rows-per-shard", "4",
            "--batch-size", "8", "--no-progress"]
    out = CliRunner().invoke(main, [str(a) for a in args])  # the command's own parsing, in this process
    assert out.exit_code == 0, out.output
    return Store.open(path)


def by_uid(store: Store, name: str) -> dict:
    """{uid: bytes of every array of the feature set (and its pixels) at that uid's row}."""
    fs = store.feature_set(name)
    arrays = {k: np.asarray(a[:]) for k, a in fs.arrays().items()}
    return {str(u): {k: a[i].tobytes() for k, a in arrays.items()} for i, u in enumerate(store.uids())}


# ---- the layout ---------------------------------------------------------------------------------
def test_the_view_axis_layout_and_identity(view_store):
    fs = view_store.feature_set("dino")
    assert fs.views == 2 and fs.identity["views"]["k"] == 2
    assert fs.identity["views"]["scale"] == list(EVA02_SCALE) and fs.identity["views"]["ratio"] == list(EVA02_RATIO)
    shapes = {k: (tuple(a.shape), tuple(a.metadata.dimension_names)) for k, a in fs.arrays().items()}
    f = "features/dino/"
    assert shapes[f + "tokens"] == ((16, 2, 16, 32), ("row", "view", "token", "token_dim"))
    assert shapes[f + "tokens_scale"] == ((16, 2, 16), ("row", "view", "token"))
    assert shapes[f + "tokens_channel_scale"] == ((16, 2, 32), ("row", "view", "token_dim"))
    assert shapes[f + "pooled"] == ((16, 2, 32), ("row", "view", "dim"))
    assert shapes[f + "view_crops"] == ((16, 2, 4), ("row", "view", "box"))
    assert shapes[f + "view_flips"] == ((16, 2), ("row", "view"))
    assert shapes[f + "valid"] == ((16,), ("row",))
    assert shapes["pixels/px"] == ((16, 2, 3, 32, 32), ("row", "view", "channel", "height", "width"))
    assert view_store.pixels("px").attrs["identity"]["views"] == fs.identity["views"]
    assert fs.usable_rows().all()
    xr = pytest.importorskip("xarray")  # plain readers see one consistent view dimension
    ds = xr.open_zarr(view_store.path, group="features/dino", consolidated=False)
    assert ds.sizes["view"] == 2 and ds["pooled"].dims == ("row", "view", "dim") and ds["valid"].dims == ("row",)


def test_one_view_is_the_layout_of_a_store_without_views_byte_for_byte(photos, view_store, tiny_dinov2_path, tmp_path):
    root, _ = photos
    opts = dict(name="dino", tokens=True, token_dtype="int8", pixels="px", rows_per_shard=4, batch_size=4, **QUIET)
    extract(tmp_path / "plain.zarr", root / "ab", tiny_dinov2_path, **opts)
    extract(tmp_path / "one.zarr", root / "ab", tiny_dinov2_path, views=1, **opts)
    plain, one = Store.open(tmp_path / "plain.zarr"), Store.open(tmp_path / "one.zarr")
    assert by_uid(one, "dino") == by_uid(plain, "dino")
    for store in (plain, one):
        fs = store.feature_set("dino")
        assert "views" not in fs.identity and fs.attrs["views"] is None and "view_crops" not in fs.group
        assert store.pixels("px").shape == (16, 3, 32, 32) and "views" not in store.pixels("px").attrs["identity"]
    assert plain.feature_set("dino").identity == one.feature_set("dino").identity
    # view 0 of the K=2 store is the centre crop a store without views holds
    assert np.array_equal(np.asarray(view_store.pixels("px")[:])[:, 0], np.asarray(plain.pixels("px")[:]))
    k2 = np.asarray(view_store.feature_set("dino").array("pooled")[:])[:, 0].astype(np.float32)
    np.testing.assert_allclose(k2, np.asarray(plain.feature_set("dino").array("pooled")[:]), atol=2e-2)


def test_the_recorded_crops_reproduce_the_stored_pixels(photos, view_store, tiny_dinov2_path):
    """Cut each recorded box from the original image through the same preprocessing: the stored bytes."""
    _, raw = photos
    from featstore.pipelines.backbones import load_backbone

    pre: Preprocess = load_backbone(tiny_dinov2_path).preprocess
    fs = view_store.feature_set("dino")
    boxes, flips = np.asarray(fs.array("view_crops")[:]), np.asarray(fs.array("view_flips")[:])
    pixels = np.asarray(view_store.pixels("px")[:])
    for row, uid in enumerate(view_store.uids()):
        img = decode_image(raw[str(uid)])
        width, height = img.size
        assert np.array_equal(pixels[row, 0], pre(img)) and not flips[row, 0]  # view 0: the recipe's crop
        np.testing.assert_allclose(boxes[row, 0], pre.centre_box(width, height), rtol=1e-6)
        top, left, h, w = view_box_pixels(boxes[row, 1], width, height)
        assert np.array_equal(pixels[row, 1], pre.resized_crop(img, (top, left, h, w), bool(flips[row, 1]))), uid
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # in EVA-02's ranges up to the rounding to whole pixels (area 0.2-1, aspect 3/4-4/3)
        assert (h + 0.5) * (w + 0.5) >= EVA02_SCALE[0] * width * height
        assert (w - 0.5) / (h + 0.5) <= EVA02_RATIO[1] and (w + 0.5) / (h - 0.5) >= EVA02_RATIO[0]
    assert 0 < flips[:, 1].sum() < len(flips)  # p = 0.5 over 16 images


def test_views_are_the_same_bytes_across_runs_block_layouts_and_growth(photos, tiny_dinov2_path, tmp_path):
    """One store grown from two sources in blocks of 4, another from both at once in blocks of 8: every
    uid has the same views, crops, tokens and pixels (batches of 4 rows in both: batch_size 12 / 3 views)."""
    root, _ = photos
    opts = dict(name="dino", tokens=True, pixels="px", views=3, view_seed=7, batch_size=12, **QUIET)
    grown = tmp_path / "grown.zarr"
    extract(grown, root / "a", tiny_dinov2_path, rows_per_shard=4, **opts)
    before = by_uid(Store.open(grown), "dino")
    extract(grown, root / "b", tiny_dinov2_path, **opts)
    extract(tmp_path / "once.zarr", root / "ab", tiny_dinov2_path, rows_per_shard=8, **opts)
    after, once = by_uid(Store.open(grown), "dino"), by_uid(Store.open(tmp_path / "once.zarr"), "dino")
    assert all(after[u] == v for u, v in before.items())  # growth never touched a computed view
    assert set(after) == set(once) and len(once) == 16
    for uid in once:
        assert after[uid] == once[uid], uid
    # another seed draws other crops
    extract(tmp_path / "seed8.zarr", root / "a", tiny_dinov2_path, rows_per_shard=4, **{**opts, "view_seed": 8})
    other = by_uid(Store.open(tmp_path / "seed8.zarr"), "dino")
    crops = "features/dino/view_crops"
    assert all(other[u][crops] != once[u][crops] for u in other)


# ---- the loader ---------------------------------------------------------------------------------
def _stored(store):
    fs = store.feature_set("dino")
    q, s, c = (np.asarray(fs.array(k)[:]) for k in ("tokens", "tokens_scale", "tokens_channel_scale"))
    return {"x": np.asarray(store.pixels("px")[:]), "t": dequantize_int8(q, s, np.float16, channel_scale=c),
            "p": np.asarray(fs.array("pooled")[:])}


def _check_epochs(loader, want, epochs):
    """Every batch serves each row's epoch view in every column; returns {row: views seen}."""
    seen = collections.defaultdict(list)
    for _ in range(epochs):
        for b in loader:
            rows, views = b["row"].numpy(), b["view"].numpy()
            for key in ("x", "t", "p"):
                assert np.array_equal(b[key].numpy(), want[key][rows, views]), key
            for r, v in zip(rows, views):
                seen[int(r)].append(int(v))
    return seen


@pytest.mark.parametrize("how", [{}, {"direct": False}, {"cache": "ram"}])
def test_the_loader_serves_each_row_every_view_and_one_view_across_columns(view_store, how):
    want = _stored(view_store)
    loader = Loader(view_store, COLUMNS, 3, view="epoch", seed=5, **how)
    kinds = {s.kind for c in loader.columns for s in c.sources()}
    assert kinds == ({"mapped", "local"} if not how else {"zarr"} if "direct" in how else {"ram"})  # pixels mapped
    seen = _check_epochs(loader, want, 2)
    assert len(seen) == 16 and all(sorted(v) == [0, 1] for v in seen.values())  # each view once in K epochs
    first = {r: v[0] for r, v in seen.items()}
    assert 0 < sum(first.values()) < 16  # an epoch mixes views: rows start at different ones
    for k in (0, 1):  # a fixed view, as evaluation reads view 0
        b = next(iter(Loader(view_store, COLUMNS, 16, view=k, shuffle=False, **how)))
        assert (b["view"].numpy() == k).all() and np.array_equal(b["x"].numpy(), want["x"][:, k])
    allv = next(iter(Loader(view_store, COLUMNS, 16, view="all", shuffle=False, **how)))
    assert allv["t"].shape == (16, 2, 16, 32) and "view" not in allv and np.array_equal(allv["t"].numpy(), want["t"])


def test_raw_int8_views_with_their_scales_as_a_gpu_step_reads_them(view_store):
    """On a GPU train-uta takes int8 tokens raw with both scales (per view) and dequantizes in the step."""
    import torch

    from featstore.trainers.uta.batch import loader_columns, prepare_batch

    want = _stored(view_store)
    columns, dequantize = loader_columns("pixels/px", "dino", int8_on_device=True, store=view_store, pooled=True)
    assert not dequantize and columns["target_channel_scale"] == "features/dino/tokens_channel_scale"
    arch = {"grid": 4, "grid_interpolation": None}
    for b in Loader(view_store, columns, 5, view="epoch", seed=3, dequantize=False):
        rows, views = b["row"].numpy(), b["view"].numpy()
        assert b["target"].dtype == torch.int8 and b["target_scale"].shape == (len(rows), 16)
        x, t = prepare_batch(b, arch, None, torch.device("cpu"))
        assert np.array_equal(x.numpy(), want["x"][rows, views])
        np.testing.assert_allclose(t.numpy(), want["t"][rows, views].astype(np.float32), rtol=2e-3, atol=2e-3)


def test_the_loader_reads_one_view_per_row_from_s3(view_store, tmp_path):
    s3fs = pytest.importorskip("s3fs")
    from servers import s3_server

    want = _stored(view_store)
    s3fs.S3FileSystem.clear_instance_cache()  # cached file systems would still point at an earlier server
    try:
        with s3_server():
            fs = s3fs.S3FileSystem()
            fs.mkdir("bucket")
            fs.put(view_store.path, "bucket/k2.zarr", recursive=True)
            remote = Store.open("s3://bucket/k2.zarr")
            loader = Loader(remote, COLUMNS, 4, view="epoch", seed=1)
            assert {c.alias: c.source.kind for c in loader.columns} == {"x": "remote", "t": "remote", "p": "remote"}
            seen = _check_epochs(loader, want, 2)
            assert all(sorted(v) == [0, 1] for v in seen.values())
            reader = loader.columns[0].source.remote  # pixels: one view's bytes per run, never the whole row
            assert reader.layout.row_bytes == 3 * 32 * 32
            cached = Loader(remote, COLUMNS, 4, view="epoch", seed=1, cache="disk", cache_dir=str(tmp_path / "cache"))
            assert {c.source.kind for c in cached.columns} == {"cached"}
            for epoch in range(2):  # fetched on the first epoch, read from the cache on the second
                cached.set_epoch(epoch)
                assert all(sorted(v) == [0, 1] for v in _check_epochs(cached, want, 2).values())
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_resume_mid_epoch_is_exact_and_a_changed_view_mode_is_refused(view_store):
    def batches(loader, n=None):
        out = []
        for b in loader:
            out.append({k: v.numpy().copy() for k, v in b.items()})
            if n is not None and len(out) == n:
                break
        return out

    full = Loader(view_store, COLUMNS, 3, view="epoch", seed=2)
    batches(full)  # epoch 0
    rest = batches(full)  # epoch 1
    part = Loader(view_store, COLUMNS, 3, view="epoch", seed=2)
    batches(part)
    batches(part, 2)  # killed two batches into epoch 1
    state = part.state_dict()
    assert state["view"] == {"view": "epoch", "views": 2}
    resumed = Loader(view_store, COLUMNS, 3, view="epoch", seed=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for a, b in zip(batches(resumed), rest[2:], strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="stored views served"):
        Loader(view_store, COLUMNS, 3, view=0, seed=2).load_state_dict(state)


def test_loader_refusals(view_store, photos, tiny_dinov2_path, tmp_path):
    with pytest.raises(ConfigError, match="holds 2 stored views per row"):
        Loader(view_store, COLUMNS, 4)
    with pytest.raises(ConfigError, match="view 2 does not exist"):
        Loader(view_store, COLUMNS, 4, view=2)
    with pytest.raises(ConfigError, match="view must be"):
        Loader(view_store, COLUMNS, 4, view="random")
    root, _ = photos
    path = tmp_path / "k23.zarr"
    common = dict(rows_per_shard=4, batch_size=6, **QUIET)
    extract(path, root / "a", tiny_dinov2_path, name="two", pixels="px2", views=2, **common)
    extract(path, root / "a", tiny_dinov2_path, name="three", views=3, **common)
    extract(path, root / "a", tiny_dinov2_path, name="two-other", views=2, view_seed=1, **common)
    store = Store.open(path)
    with pytest.raises(ConfigError, match="different numbers of stored views"):
        Loader(store, {"x": "pixels/px2", "p": "features/three/pooled"}, 4, view="epoch")
    with pytest.raises(ConfigError, match="not the same crop"):
        Loader(store, {"x": "pixels/px2", "p": "features/two-other/pooled"}, 4, view="epoch")
    # train-uta's crop check (light mode, pixels): the views' recipe is part of the crop geometry
    from featstore.trainers.uta.arch import same_crop
    from featstore.trainers.uta.stored_views import crop_identity

    same_crop(store.pixels("px2").attrs["identity"], crop_identity(store.feature_set("two")), "px2", "two")
    for other in ("three", "two-other"):
        with pytest.raises(IdentityMismatch, match="same crop"):
            same_crop(crop_identity(store.feature_set(other)), crop_identity(store.feature_set("two")), other, "two")
    # extraction: another K into the same name, view options without views, views of captions
    with pytest.raises(IdentityMismatch, match="views"):
        extract(path, root / "a", tiny_dinov2_path, name="two", pixels="px2", views=3, **common)
    with pytest.raises(ConfigError, match="only apply with --views"):
        extract(path, root / "a", tiny_dinov2_path, name="x", view_seed=3, **common)
    with pytest.raises(ConfigError, match="--views only applies to --field image"):
        extract(path, None, tiny_dinov2_path, name="x", field="caption", views=2, **common)
    with pytest.raises(ConfigError, match="--view-scale"):
        extract(path, root / "a", tiny_dinov2_path, name="x", views=2, view_scale=(0.5, 0.2), **common)


# ---- train-uta ----------------------------------------------------------------------------------
def test_train_uta_on_a_k2_store_reads_one_view_per_epoch_and_warns_past_k_epochs(view_store, tmp_path):
    from featstore.trainers.uta.train import ViewsRepeat, train_uta

    small = ["depth=1", "width=32", "batch_size=4", "val_fraction=0.25", "cpu_threads=1", "warmup_steps=0",
             "drop_path=0", "log_every=1"]
    s = train_uta(view_store.path, "dino", "px", tmp_path / "short", steps=3, overrides=small, progress=False)
    assert not s["notes"] and np.isfinite(s["final"]["val_loss"])  # 3 steps: one epoch of 3 batches
    with pytest.warns(ViewsRepeat, match="2 stored views"):
        s = train_uta(view_store.path, "dino", "px", tmp_path / "long", steps=7, overrides=small, progress=False)
    assert any("from epoch 3 on every image's views repeat" in n for n in s["notes"]), s["notes"]
    with open(tmp_path / "long" / "last" / "checkpoint.json") as f:
        state = json.load(f)
    assert state["loader"]["view"] == {"view": "epoch", "views": 2} and state["teacher"]["views"]["k"] == 2
    with pytest.raises(ConfigError, match="already mirrored"):
        train_uta(view_store.path, "dino", "px", tmp_path / "flip", steps=2, overrides=small + ["hflip=0.5"],
                  progress=False)


# ---- verify / inspect / export ---------------------------------------------------------------------
def test_verify_inspect_and_export_handle_the_view_axis(view_store, tmp_path):
    assert verify(view_store)["ok"], verify(view_store)["problems"]
    s = summarize(view_store)
    assert s["feature_sets"]["dino"]["views"] == 2
    assert "2 stored views per row" in format_summary(s) and "area 0.2-1" in format_summary(s)
    want = _stored(view_store)
    r = export(view_store, "dino", str(tmp_path / "all.npy"))
    assert r["shape"] == [16, 2, 32] and np.array_equal(np.load(tmp_path / "all.npy"), want["p"])
    r = export(view_store, "dino", str(tmp_path / "t1.npy"), array="tokens", view=1)
    assert r["shape"] == [16, 16, 32] and r["view"] == 1
    np.testing.assert_allclose(np.load(tmp_path / "t1.npy"), want["t"][:, 1].astype(np.float32), rtol=1e-3, atol=1e-3)
    export(view_store, "dino", str(tmp_path / "crops.parquet"), array="view_crops")
    with pytest.raises(ConfigError, match="--view 2 does not exist"):
        export(view_store, "dino", str(tmp_path / "x.npy"), view=2)
    # a damaged layout: view 0 marked mirrored (in a copy)
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(view_store.path, copy)
    g = zarr.open_group(str(copy), mode="r+")
    flips = np.asarray(g["features/dino/view_flips"][:])
    flips[0, 0] = True
    g["features/dino/view_flips"][:] = flips
    problems = verify(Store.open(copy))["problems"]
    assert any("view 0 (the centre crop) is marked mirrored" in p for p in problems), problems
