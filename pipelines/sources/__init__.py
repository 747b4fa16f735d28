"""Sources: where samples come from, read as plain readers (img2dataset's reader style).

    src = open_source("shards/")                       # auto: webdataset | hf | parquet | folder
    for rec in src.records():                          # the manifest, deterministic order, no decoding
        rec.uid, rec.caption, rec.label, rec.source_ref
    for data in src.read_images([r.source_ref for r in batch]):   # raw encoded bytes, same order
        if isinstance(data, BadSample): ...            # one bad sample; never raised by read_images

Kinds, one module each, same interface (`base.Source`): ``webdataset`` (tars as img2dataset
writes them), ``hf`` and ``parquet`` (`hf.py`), ``folder`` (images + captions/labels JSON files).
A URL (``s3://bucket/shards/``, any fsspec URL) is a remote source: webdataset tars, streamed for
the manifest and read by ranged reads (`tars.py`); other kinds are read from local paths.

A source re-opens in another process from ``spec()`` (``open_source(**src.spec())``), and pickles as
that spec, so ``pickle``/multiprocessing/dask can ship it; caches (tar indexes) are rebuilt lazily.
``warnings`` fills while ``records()`` runs and is complete once it is exhausted.
``provenance()`` is what a store records about the source (type, location, options, fingerprint).
"""

from __future__ import annotations

import os
from pathlib import Path

from featstore.errors import ConfigError, SourceError

from .base import IMAGE_EXTS, Record, Source, is_image_name
from .folder import FolderSource
from .hf import HFSource, ParquetSource
from .tars import is_url
from .webdataset import WebDatasetSource

SOURCE_KINDS = ("webdataset", "hf", "parquet", "folder")
SOURCE_TYPES = ("auto",) + SOURCE_KINDS
OPTIONS = ("captions", "labels", "uid_field", "image_column", "text_column", "label_column")
_KINDS: dict[str, type[Source]] = {
    "webdataset": WebDatasetSource,
    "hf": HFSource,
    "parquet": ParquetSource,
    "folder": FolderSource,
}

__all__ = ["Record", "Source", "open_source", "detect_kind", "SOURCE_TYPES", "SOURCE_KINDS", "OPTIONS", "IMAGE_EXTS",
           "WebDatasetSource", "HFSource", "ParquetSource", "FolderSource"]


def open_source(
    path: str | os.PathLike,
    source_type: str = "auto",
    *,
    captions: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    uid_field: str | None = None,
    image_column: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
) -> Source:
    """Open a source; `source_type="auto"` tells the kind from the path (module docstring).

    Raises SourceError (a path that cannot be read as a source) or ConfigError (a bad option).
    """
    if source_type not in SOURCE_TYPES:
        raise ConfigError(f"unknown source type {source_type!r}: use one of {', '.join(SOURCE_TYPES)}")
    given = {"captions": captions, "labels": labels, "uid_field": uid_field, "image_column": image_column,
             "text_column": text_column, "label_column": label_column}
    if is_url(path):
        return _open_remote(str(path), source_type, given)
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"source not found: {path} (give webdataset shards, a saved HF dataset, "
                          "a parquet file or an image folder)")
    p = p.resolve()
    kind = detect_kind(p) if source_type == "auto" else source_type
    if kind == "hf" and _is_parquet(p):
        kind = "parquet"
    cls = _KINDS[kind]
    wrong = [k for k, v in given.items() if v is not None and k not in cls.options]
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise ConfigError(f"{flags} does not apply to a {kind} source ({p})")
    return cls(p, **{k: v for k, v in given.items() if k in cls.options})


def _open_remote(url: str, source_type: str, given: dict) -> Source:
    """A remote source: webdataset tars under a URL (a folder of .tar files, or one .tar)."""
    if source_type not in ("auto", "webdataset"):
        raise SourceError(f"--source-type {source_type} cannot be read from {url}: remote sources are webdataset "
                          "tars; copy the source to a local path")
    wrong = [k for k, v in given.items() if v is not None and k not in WebDatasetSource.options]
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise ConfigError(f"{flags} does not apply to a webdataset source ({url})")
    src = WebDatasetSource(url.rstrip("/"), **{k: v for k, v in given.items() if k in WebDatasetSource.options})
    return src


def detect_kind(path: Path) -> str:
    """The kind `auto` picks for `path` (which exists)."""
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".tar":
            return "webdataset"
        if suffix == ".parquet":
            return "parquet"
        raise SourceError(f"cannot read {path} as a source: expected a .tar shard, a .parquet file or a folder")
    try:
        names = os.listdir(path)
    except OSError as err:
        raise SourceError(f"cannot list source folder {path}: {err.strerror or err}") from None
    if any(n.endswith(".tar") for n in names):
        return "webdataset"
    if "dataset_info.json" in names or "dataset_dict.json" in names:
        return "hf"
    if _is_parquet(path):
        return "parquet"
    return "folder"


def _is_parquet(path: Path) -> bool:
    """A .parquet file, or a folder with .parquet files and no images at its top level."""
    if path.is_file():
        return path.suffix.lower() == ".parquet"
    names = [n.lower() for n in os.listdir(path)]
    return any(n.endswith(".parquet") for n in names) and not any(is_image_name(n) for n in names)

