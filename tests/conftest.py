"""Shared test setup: nothing in the suite may call out of the machine or write to ~/.cache."""

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="featstore-test-hf-")
os.environ.setdefault("HF_HOME", _HF_HOME)
os.environ.setdefault("FEATSTORE_CACHE_DIR", tempfile.mkdtemp(prefix="featstore-test-cache-"))  # Loader(cache="disk")
os.environ["XDG_CACHE_HOME"] = os.path.join(_HF_HOME, "xdg-cache")  # eval's prompt cache for stores it cannot write
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dinov2_path(tmp_path_factory):
    from models import tiny_dinov2

    return tiny_dinov2(str(tmp_path_factory.mktemp("models") / "tiny-dinov2"))


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    from models import tiny_llama

    return tiny_llama(str(tmp_path_factory.mktemp("models") / "tiny-llama"))
