"""``folder`` sources: images found recursively (hidden entries skipped), sorted by relative path.

uid = that path without extension (posix); captions from a JSON file {uid: caption}
(``--captions``), labels from a JSON file {uid: class name or index} (``--labels FILE``), or
``--labels subdirs``: each image's class is the folder it sits in at the top level
(``root/<class>/.../x.jpg``, torchvision's ImageFolder layout; class names sorted, as there).
source_ref = the relative path.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from featstore.errors import BadSample, SourceError, one_line

from .base import IMAGE_EXTS, Source, Record, is_image_name, caption_of, files_fingerprint

SUBDIRS = "subdirs"  # --labels subdirs: one class per top-level subdirectory

class FolderSource(Source):
    """Images under a folder (recursive), with captions from a JSON file {uid: caption} and
    labels from a JSON file {uid: class name or index}."""

    kind = "folder"
    options = ("captions", "labels")

    def __init__(self, path: Path, *, captions=None, labels=None):
        super().__init__(path)
        if not path.is_dir():
            raise SourceError(f"image folder {path} is not a folder")
        self.root = path
        self.captions = None if captions is None else str(Path(captions).expanduser().resolve())
        self._captions = _load_json(Path(self.captions), "captions", "caption") if self.captions else {}
        self.files = _image_files(path)
        if not self.files:
            raise SourceError(f"no images in {path} (looked for {', '.join('.' + e for e in IMAGE_EXTS)})")
        by_folder = labels == SUBDIRS and not Path(SUBDIRS).exists()  # (a file named "subdirs" is a file)
        self.labels = SUBDIRS if by_folder else None if labels is None else str(Path(labels).expanduser().resolve())
        self._labels = self._folder_labels() if by_folder else self._load_labels(Path(self.labels)) if self.labels else {}

    def _load_labels(self, path: Path) -> dict[str, int]:
        """{uid: index}; class names (strings) become indices into their sorted list (`label_names`)."""
        data = _load_json(path, "labels", "class name or index")
        names = {v for v in data.values() if isinstance(v, str)}
        if names and len(names) != len(data.values()) and any(not isinstance(v, str) for v in data.values()):
            raise SourceError(f"labels file {path} mixes class names and indices: use one kind")
        if names:
            self.label_names = sorted(names)
            index = {n: i for i, n in enumerate(self.label_names)}
            return {str(k): index[v] for k, v in data.items()}
        out = {}
        for k, v in data.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SourceError(f"labels file {path}: the label of {k!r} is {v!r}, not a class name or an index >= 0")
            out[str(k)] = v
        return out

    def _folder_labels(self) -> dict[str, int]:
        """{relative path: index of its top-level folder}; images at the top level get no label."""
        classes = sorted({rel.split("/", 1)[0] for rel in self.files if "/" in rel})
        if not classes:
            raise SourceError(f"--labels {SUBDIRS}: {self.path} has no subfolders of images (root/<class>/image.jpg)")
        self.label_names = classes
        index = {c: i for i, c in enumerate(classes)}
        loose = sum("/" not in rel for rel in self.files)
        if loose:
            self._warn(f"{loose} images sit at the top of {self.path}, in no class folder: label left empty")
        return {rel: index[rel.split("/", 1)[0]] for rel in self.files if "/" in rel}

    def fingerprint(self) -> str:
        extra = [p for p in (self.captions, self.labels) if p and p != SUBDIRS]
        return files_fingerprint([self.root / rel for rel in self.files] + extra)

    def records(self) -> Iterator[Record]:
        used: set[str] = set()
        seen: set[str] = set()
        repeated = 0
        lists = [0]
        for rel in self.files:
            uid = rel.rpartition(".")[0]
            repeated += uid in seen
            seen.add(uid)
            key = uid if uid in self._captions else rel if rel in self._captions else None
            if key is not None:
                used.add(key)
            label = self._labels.get(uid, self._labels.get(rel)) if self._labels else None
            yield Record(uid, caption_of(self._captions.get(key), lists) if key else None, label, rel)
        unmatched = len(self._captions) - len(used)
        if unmatched:
            example = self.files[0].rpartition(".")[0]
            self._warn(f"{unmatched} of {len(self._captions)} captions in {self.captions} match no image "
                       f"(keys are paths relative to {self.path} without extension, e.g. {example!r})")
        if repeated:
            self._warn(f"{repeated} images share a uid with another file (same path, other extension)")
        if lists[0]:
            self._warn(f"{lists[0]} captions are lists: the first item is used")

    def read_images(self, refs: Iterable[str], spans=None) -> Iterator[bytes | BadSample]:
        for ref in refs:
            norm = posixpath.normpath(ref)
            if posixpath.isabs(norm) or norm == ".." or norm.startswith("../"):
                yield BadSample("bad-ref", f"{ref!r} is outside {self.path}")
                continue
            try:
                yield (self.root / norm).read_bytes()
            except FileNotFoundError:
                yield BadSample("missing-image", f"{ref}: file not found in {self.path}")
            except OSError as err:
                yield BadSample("unreadable-image", f"{ref}: {err.strerror or err}")


def _image_files(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            if not name.startswith(".") and is_image_name(name):
                found.append(name if rel_dir == "." else f"{rel_dir}/{name}")
    return sorted(found)


def _load_json(path: Path, what: str, value: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{what} file not found: {path}") from None
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot read {what} file {path}: {one_line(err)}") from None
    if not isinstance(data, dict):
        raise SourceError(f"{what} file {path} must hold a JSON object {{uid: {value}}}")
    return data

