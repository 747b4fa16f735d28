"""Shared test setup: nothing in the suite may call out of the machine or write to ~/.cache."""

import os
import tempfile

_HF_HOME = tempfile.mkdtemp(prefix="featstore-test-hf-")
os.environ.setdefault("HF_HOME", _HF_HOME)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
