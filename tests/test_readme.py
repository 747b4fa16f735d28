"""README.md's Python snippets run, as a reader would paste them into one session, against a small
real store (`cc.zarr`: a tiny DINOv2 under the name the README uses, and MiniLM captions) and a head
trained on it (`run/`), in a folder that also holds the `photo.jpg` the README encodes."""

import json
import os
import re

import numpy as np
import pytest
import torch

from imagedata import real_images

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", open(README, encoding="utf-8").read(), re.S | re.M)


@pytest.fixture
def reader_folder(tmp_path, tiny_dinov2_path, monkeypatch):
    from featstore.pipelines.extract import extract
    from featstore.trainers.sharelock.train import train_head

    images = tmp_path / "images"
    images.mkdir()
    captions = {}
    for i, (name, img) in enumerate(real_images(40)):
        img.convert("RGB").resize((48, 40)).save(images / f"{i:03d}.png")
        captions[f"{i:03d}"] = f"a picture called {name.replace('-', ' ')} number {i}"
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    real_images(1)[0][1].convert("RGB").save(tmp_path / "photo.jpg")
    quiet = dict(progress=False, log=lambda *_: None, captions=str(tmp_path / "captions.json"), rows_per_shard=16)
    extract(tmp_path / "cc.zarr", images, tiny_dinov2_path, name="dinov2-small", **quiet)
    extract(tmp_path / "cc.zarr", images, "minilm", field="caption", name="minilm", **quiet)
    train_head(tmp_path / "cc.zarr", "dinov2-small", "minilm", tmp_path / "run", progress=False,
               overrides=["hidden_dim=32", "batch_size=8", "accumulation_steps=1", "steps=3", "val_fraction=0.3"])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_python_snippets_run(reader_folder, capsys):
    blocks = python_blocks()
    assert len(blocks) >= 2 and "split_by_uid" in blocks[0] and "ShareLock.load" in blocks[1]
    session: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"README.md python block {i + 1}", "exec"), session)  # noqa: S102 - the README's own code
    # what the snippets claim: masks over the rows; the same image as a path, a PIL image and an array
    store, train, val = session["store"], session["train"], session["val"]
    assert train.dtype == bool and train.shape == (store.n_rows,) and np.array_equal(train, ~val)
    images, texts = session["images"], session["texts"]
    assert images.shape == (3, texts.shape[1]) and torch.allclose(images[0], images[1]) and torch.allclose(images[0], images[2])
    assert torch.allclose(images.norm(dim=1), torch.ones(3), atol=1e-4) and session["stored"].shape[0] == 4
    assert "train rows" in capsys.readouterr().out
