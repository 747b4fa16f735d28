"""`featstore eval` is CLIP_benchmark's protocol: the same numbers from CLIP_benchmark's own functions.

CLIP_benchmark (``pip install --no-deps clip-benchmark``: its torchvision/open_clip dependencies
cannot load here) is imported at its narrowest: ``clip_benchmark.metrics.zeroshot_classification``
and ``clip_benchmark.metrics.zeroshot_retrieval`` need only torch, tqdm and scikit-learn (its
``datasets`` and ``models`` packages import torchvision and are not touched; torchvision is not
installed here, so these imports succeeding is the proof).  Both sides run the
same model: a ShareLock head trained here on the real MiniLM's caption features, over the same
rows, class names (the built-in cifar10 list) and templates (CLIP_benchmark's cifar10 ones).

CLIP_benchmark 1.6.2's ``zeroshot_classification.evaluate`` cannot run with NumPy 2.4: its
``accuracy`` ends in ``float()`` of a 1-element array, which NumPy 2.4 refuses.  So the test calls
its ``zero_shot_classifier`` (the per-class prompt averaging) and ``run_classification`` (the
logits), and scores those logits with its own expressions (``topk`` top-k; scikit-learn's
``balanced_accuracy_score`` for the mean per-class recall, as it does).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from featstore.pipelines.backbones import load_backbone
from featstore.store import Store
from featstore.trainers import prompts
from featstore.trainers.sharelock.evaluate import evaluate
from featstore.trainers.sharelock.model import ShareLock
from featstore.trainers.sharelock.train import train_head
from featstore.core.writes import write_block

from sharelock_data import M, image_view, one_thread

try:
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
except ImportError:  # a hard failure, not a skip: the parity is the point
    raise ImportError("this test needs CLIP_benchmark: pip install --no-deps clip-benchmark (make install does)") from None

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)
FEATSTORE = os.path.join(os.path.dirname(sys.executable), "featstore")
PER_CLASS = 30
CAPTIONS = ["there is a {} in this picture", "my {} yesterday afternoon", "a {} seen from the side",
            "an old {} next to a wall", "look at this {}!", "the {} we saw on holiday"]
OTHER_CAPTIONS = ["{} in the middle of the frame", "a snapshot showing one {}", "someone's {} outdoors"]
PLACES = ["Paris", "Lima", "Oslo", "Kyoto", "Cairo", "Quito", "Perth", "Porto", "Dakar", "Hanoi", "Leeds", "Turin"]


def _caption(templates, name, i, rng):  # unique per image (no two captions tie), about its class
    return templates[rng.integers(len(templates))].format(name) + f", {PLACES[i % 12]} {i // 12}"


def _write(store, name, identity, x):
    store.create_feature_set(name, identity, x.shape[1])
    for b in range(store.n_blocks):
        start, stop = store.block_range(b)
        write_block(store, name, b, {"pooled": x[start:stop]}, np.ones(stop - start, bool))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A store of CIFAR-10-labelled rows: synthetic image features of each class, two caption sets
    encoded by the real MiniLM (as `extract --field caption` records them), and a head trained on it."""
    root = tmp_path_factory.mktemp("parity")
    names = prompts.classnames("cifar10")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), PER_CLASS)
    rng.shuffle(labels)
    n = len(labels)
    store = Store.create(str(root / "s.zarr"), rows_per_shard=64)
    captions = [_caption(CAPTIONS, names[y], i, rng) for i, y in enumerate(labels)]
    store.register([f"img-{i:04d}" for i in range(n)], captions=captions, labels=labels, label_names=names)
    z = M["centres"][labels] + 0.5 * rng.standard_normal((n, M["centres"].shape[1]))
    _write(store, "img", {"model": "synthetic-image", "version": 1}, image_view(z, rng).astype(np.float32))
    minilm = load_backbone("minilm")
    for name, field, texts in (("minilm", "caption", captions),
                               ("minilm-2", "caption2", [_caption(OTHER_CAPTIONS, names[y], i, rng) for i, y in enumerate(labels)])):
        feats = np.concatenate([minilm.encode_texts(texts[i : i + 128])["pooled"].numpy() for i in range(0, n, 128)])
        _write(store, name, dict(minilm.identity, field=field, precision="fp32"), feats)
    out = root / "run"
    train_head(store.path, "img", "minilm,minilm-2", out, progress=False,
               overrides=["hidden_dim=256", "batch_size=50", "accumulation_steps=1", "steps=120", "warmup_steps=10",
                          "patience=null", "val_fraction=0.2", "save_every=120"])
    return store.path, str(out), minilm


def _topk(logits, target, k):
    """CLIP_benchmark's `accuracy(logits, target, topk=(k,))`, whose last step (`float()` of a
    1-element array) NumPy 2.4 refuses: the same expression, converted with `.item()`."""
    pred = logits.topk(k, 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / len(target)


class AsClip:
    """The trained ShareLock as a CLIP-like model for CLIP_benchmark: its 'images' are stored
    image features, its 'tokens' text features."""

    def __init__(self, sharelock: ShareLock):
        self.model = sharelock.model

    def encode_image(self, x):
        return self.model.encode_image(x.float())

    def encode_text(self, x):
        return self.model.encode_text(x.float())


def test_zero_shot_and_retrieval_equal_clip_benchmarks(run):
    store_path, run_dir, minilm = run
    out = subprocess.run([FEATSTORE, "eval", "--checkpoint", run_dir, "--store", store_path, "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ours = json.loads(out.stdout)
    zs = ours["zero_shot"]
    names, templates = prompts.classnames("cifar10"), prompts.templates("cifar10")
    assert ours["split"] == "all" and zs["rows"] == 10 * PER_CLASS  # every row, as CLIP_benchmark
    assert zs["class_names"] == "samples/label (= cifar10)" and zs["templates"] == "cifar10" and zs["n_templates"] == 18

    store = Store.open(store_path)
    sl = ShareLock.load(run_dir)
    text_set = sl.feature_sets["text"]
    images = torch.from_numpy(np.asarray(store.array("features/img/pooled")[:], dtype=np.float32))
    labels = torch.from_numpy(store.samples("label").astype(np.int64))

    def tokenizer(texts):  # the prompt features featstore's eval used: the same text backbone, as stored
        return prompts.prompt_features(store_path, text_set, list(texts))

    dataset = torch.utils.data.TensorDataset(images, labels)
    dataset.classes = names
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset))
    model = AsClip(sl)
    classifier = zeroshot_classification.zero_shot_classifier(model, tokenizer, names, templates, "cpu", amp=False)
    logits, target = zeroshot_classification.run_classification(model, classifier, loader, "cpu", amp=False)
    theirs = {"acc1": _topk(logits, target, 1), "acc5": _topk(logits, target, 5),
              "mean_per_class_recall": balanced_accuracy_score(target, logits.argmax(axis=1))}
    assert theirs == {k: zs[k] for k in theirs}, (theirs, zs)
    assert zs["acc1"] > 0.5  # chance: 0.1; a meaningful number, not a trivial agreement

    # the cached prompt features are MiniLM's (float16, as the text feature set stores them)
    sample = [t.format(c=names[3]) for t in templates[:4]]
    direct = minilm.encode_texts(sample)["pooled"]
    torch.testing.assert_close(tokenizer(sample), direct.half().float(), atol=2e-3, rtol=0)

    # retrieval: each image with its two captions (one per caption set)
    rt = ours["retrieval"]
    assert rt["images"] == 10 * PER_CLASS and rt["texts"] == 20 * PER_CLASS and rt["text_sets"] == ["minilm", "minilm-2"]
    stored = {name: np.asarray(store.array(f"features/{name}/pooled")[:], dtype=np.float32) for name in rt["text_sets"]}
    pairs = [(images[i], [f"minilm:{i}", f"minilm-2:{i}"]) for i in range(len(images))]

    def caption_features(keys):
        return torch.from_numpy(np.stack([stored[k.split(":")[0]][int(k.split(":")[1])] for k in keys]))

    def collate(batch):  # images stacked, captions kept as a list per image (CLIP_benchmark's layout)
        return torch.stack([b[0] for b in batch]), [b[1] for b in batch]

    pair_loader = torch.utils.data.DataLoader(pairs, batch_size=len(pairs), collate_fn=collate)
    theirs = zeroshot_retrieval.evaluate(AsClip(sl), pair_loader, caption_features, "cpu", amp=False, recall_k_list=[1, 5, 10])
    assert theirs == {k: rt[k] for k in theirs}, (theirs, rt)
    assert len(theirs) == 6 and rt["text_retrieval_recall@10"] > 0.1  # chance: 10 / 300 per image

    # the Python API with the built-in list by name gives the same
    same = evaluate(run_dir, store_path, classes="cifar10")
    assert {k: same["zero_shot"][k] for k in theirs if k in same["zero_shot"]} == {k: zs[k] for k in theirs if k in zs}
    assert same["zero_shot"]["acc1"] == zs["acc1"] and same["zero_shot"]["class_names"] == "cifar10"
