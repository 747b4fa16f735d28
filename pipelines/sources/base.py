"""The shared interface of every source kind, and the helpers the kinds share.

A source is a plain reader (img2dataset's reader style): `records()` is its manifest (uid,
caption, label, source_ref; deterministic order, no decoding) and `read_images(refs)` yields raw
encoded bytes or a `BadSample` per ref.  `provenance()` is what the store records about it: its
type, absolute location, the options that define its rows, and a cheap fingerprint.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featstore.errors import BadSample

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

@dataclass(frozen=True)
class Record:
    """One sample of a source's manifest."""

    uid: str
    caption: str | None
    label: int | None
    source_ref: str
    # where the image's bytes are inside the source, when the kind knows it from its manifest
    # (webdataset: (offset, size) in the tar); handed back to `read_images(refs, spans)`
    span: tuple[int, int] | None = field(default=None, compare=False)


class Source:
    """The shared interface; see the module docstring.  Subclasses set `kind` and `options`."""

    kind: str = ""
    options: tuple[str, ...] = ()

    def __init__(self, path: Path):
        self.path = str(path)
        self.warnings: list[str] = []
        self.label_names: list[str] | None = None

    def records(self) -> Iterator[Record]:
        raise NotImplementedError

    def read_images(self, refs: Iterable[str], spans=None) -> Iterator[bytes | BadSample]:
        """Raw bytes (or BadSample) per ref; `spans` are the records' spans of those refs, which
        kinds that know them use to skip their own index (others ignore them)."""
        raise NotImplementedError

    def read_image(self, source_ref: str) -> bytes:
        """The raw encoded bytes of one image; raises BadSample."""
        (data,) = self.read_images([source_ref])
        if isinstance(data, BadSample):
            raise data
        return data

    def spec(self) -> dict[str, Any]:
        """JSON-able arguments that re-open this source: ``open_source(**spec)``."""
        return {"path": self.path, "source_type": self.kind, **self.given_options()}

    def given_options(self) -> dict[str, Any]:
        """The options that define this source's rows (files as absolute paths), as given."""
        return {k: getattr(self, k) for k in self.options if getattr(self, k) is not None}

    def fingerprint(self) -> str:
        """A cheap digest of what the source holds now (file names, sizes, mtimes)."""
        raise NotImplementedError

    def provenance(self) -> dict[str, Any]:
        """What the store records about this source (`attrs.featstore.sources`)."""
        return {"type": self.kind, "location": self.path, "options": self.given_options(),
                "fingerprint": self.fingerprint()}

    def __reduce__(self):  # re-opened by its own class from the same (resolved) path and options
        return (_reopen, (type(self), self.path, self.given_options()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


def _reopen(cls, path: str, options: dict):
    return cls(Path(path), **options)


def files_fingerprint(paths) -> str:
    """sha256 (16 hex) of each file's name, size and mtime; a missing file counts as such."""
    h = hashlib.sha256()
    for path in paths:
        try:
            st = os.stat(path)
            h.update(f"{os.path.basename(str(path))}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{os.path.basename(str(path))}\0missing\n".encode())
    return h.hexdigest()[:16]


def is_image_name(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_EXTS and "." in name


def caption_of(value: Any, lists: list[int]) -> str | None:
    """A caption from a field value: str as is, bytes as UTF-8 (U+FFFD for bad bytes), a list's
    first item (counted in `lists`); missing or empty -> None (img2dataset writes "" for none)."""
    if isinstance(value, (list, tuple)):
        lists[0] += 1
        value = value[0] if value else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if value is None or value == "":
        return None
    return str(value)


def label_of(value: Any) -> int | None:
    """An int class index, or None (missing, negative as in HF's -1, or not an integer)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    if number != value and str(number) != str(value).strip():
        return None
    return number if number >= 0 else None
