"""Sources: where samples come from, read as plain readers (img2dataset's reader style).

    src = open_source("shards/")                       # auto: webdataset | hf | parquet | folder
    for rec in src.records():                          # the manifest, deterministic order, no decoding
        rec.uid, rec.caption, rec.label, rec.source_ref
    for data in src.read_images([r.source_ref for r in batch]):   # raw encoded bytes, same order
        if isinstance(data, BadSample): ...            # one bad sample; never raised by read_images

Kinds (one small class each, same interface):

- ``webdataset``: ``*.tar`` shards as img2dataset writes them (``<key>.jpg|png|webp…``, ``.txt``,
  ``.json``).  uid = the json field ``uid_field`` if given, else the json ``uid`` (``download``
  writes it), else ``<tar stem>/<key>`` (warned: stable only for this download).  caption = the
  ``.txt`` member (``text_column`` names another extension), decoded as UTF-8 with U+FFFD for bad
  bytes; label = the json field ``label_column``.  source_ref = ``<tar name>:<key>``.
- ``hf``: a ``save_to_disk`` folder (a DatasetDict uses its "train" split); ``parquet``: a
  ``.parquet`` file or a folder of them, loaded with ``datasets.load_dataset("parquet")``.  Columns:
  image = the first ``datasets.Image`` column, else "image"; text = "caption" or "text"; label =
  "label" (ClassLabel names become ``label_names``); uid = ``uid_field``, else the row index
  (warned).  source_ref = ``hf:<row index>``.
- ``folder``: images found recursively (hidden entries skipped), sorted by relative path;
  uid = that path without extension (posix); captions from a JSON file {uid: caption}.
  source_ref = the relative path.

A source re-opens in another process from ``spec()`` (``open_source(**src.spec())``), and pickles as
that spec, so ``pickle``/multiprocessing/dask can ship it; caches (tar indexes) are rebuilt lazily.
``warnings`` fills while ``records()`` runs and is complete once it is exhausted.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featstore.errors import BadSample, ConfigError, SourceError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SOURCE_TYPES = ("auto", "webdataset", "hf", "parquet", "folder")
OPTIONS = ("captions", "uid_field", "image_column", "text_column", "label_column")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$")  # webdataset: key = path up to the basename's first dot


@dataclass(frozen=True)
class Record:
    """One sample of a source's manifest."""

    uid: str
    caption: str | None
    label: int | None
    source_ref: str


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

    def read_images(self, refs: Iterable[str]) -> Iterator[bytes | BadSample]:
        raise NotImplementedError

    def read_image(self, source_ref: str) -> bytes:
        """The raw encoded bytes of one image; raises BadSample."""
        (data,) = self.read_images([source_ref])
        if isinstance(data, BadSample):
            raise data
        return data

    def spec(self) -> dict[str, Any]:
        """JSON-able arguments that re-open this source: ``open_source(**spec)``."""
        spec = {"path": self.path, "source_type": self.kind}
        spec.update({k: getattr(self, k) for k in self.options if getattr(self, k) is not None})
        return spec

    def __reduce__(self):
        return (_reopen, (self.spec(),))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def _warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


def _reopen(spec: dict[str, Any]) -> Source:
    return open_source(**spec)


def open_source(
    path: str | os.PathLike,
    source_type: str = "auto",
    *,
    captions: str | os.PathLike | None = None,
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
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"source not found: {path} (give webdataset shards, a saved HF dataset, "
                          "a parquet file or an image folder)")
    p = p.resolve()
    kind = detect_kind(p) if source_type == "auto" else source_type
    if kind == "hf" and _is_parquet(p):
        kind = "parquet"
    cls = _KINDS[kind]
    given = {"captions": captions, "uid_field": uid_field, "image_column": image_column,
             "text_column": text_column, "label_column": label_column}
    wrong = [k for k, v in given.items() if v is not None and k not in cls.options]
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise ConfigError(f"{flags} does not apply to a {kind} source ({p})")
    return cls(p, **{k: v for k, v in given.items() if k in cls.options})


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
    return any(n.endswith(".parquet") for n in names) and not any(_is_image_name(n) for n in names)


def _is_image_name(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_EXTS and "." in name


def _text(value: Any, lists: list[int]) -> str | None:
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


def _label(value: Any) -> int | None:
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


# --------------------------------------------------------------------------- webdataset


class WebDatasetSource(Source):
    """``*.tar`` shards in a folder (or one ``.tar`` file), members grouped by key in tar order."""

    kind = "webdataset"
    options = ("uid_field", "label_column", "image_column", "text_column")
    max_open_shards = 8
    max_cached_indexes = 16

    def __init__(self, path: Path, *, uid_field=None, label_column=None, image_column=None, text_column=None):
        super().__init__(path)
        self.uid_field, self.label_column = uid_field, label_column
        self.image_column, self.text_column = image_column, text_column
        self._text_ext = (text_column or "txt").lower()
        self._image_exts = (image_column.lower(),) if image_column else IMAGE_EXTS
        if path.is_file():
            self.root, self.shards = path.parent, [path.name]
        else:
            self.root = path
            self.shards = sorted(n for n in os.listdir(path) if n.endswith(".tar") and (path / n).is_file())
        if not self.shards:
            raise SourceError(f"no .tar shards in {path}")
        self._shard_set = set(self.shards)
        self._index: dict[str, dict[str, tuple[str, int, int] | None]] = {}  # LRU: shard -> key -> image member

    def records(self) -> Iterator[Record]:
        no_uid = bad_json = bad_label = count = 0
        for shard in self.shards:
            stem = shard[: -len(".tar")]
            for key, small in self._scan(shard):
                meta = None
                if "json" in small:
                    try:
                        meta = json.loads(small["json"])
                    except ValueError:
                        bad_json += 1
                    meta = meta if isinstance(meta, dict) else None
                uid = (meta or {}).get(self.uid_field or "uid")
                if uid is None or uid == "":
                    no_uid += 1
                    uid = f"{stem}/{key}"
                label = None
                if self.label_column is not None:
                    raw = (meta or {}).get(self.label_column)
                    label = _label(raw)
                    bad_label += label is None
                caption = small.get(self._text_ext)
                count += 1
                yield Record(str(uid), _text(caption, [0]), label, f"{shard}:{key}")
        if no_uid:
            field = self.uid_field or "uid"
            hint = "" if self.uid_field else " (pass --uid-field to name one)"
            self._warn(f"{no_uid} samples have no json field {field!r}{hint}: their uid is '<tar stem>/<key>', "
                       "stable only for this download")
        if bad_json:
            self._warn(f"{bad_json} samples have an unreadable .json member")
        if bad_label:
            self._warn(f"{bad_label} samples have no integer json field {self.label_column!r}: label left empty")
        if count == 0:
            raise SourceError(f"no samples in the shards of {self.path}")

    def _scan(self, shard: str) -> list[tuple[str, dict[str, bytes]]]:
        """(key, {small ext: bytes}) per sample in tar order; caches the shard's image index."""
        small_exts = {"json", self._text_ext}
        samples: list[tuple[str, dict[str, bytes]]] = []
        members: dict[str, dict[str, tuple[int, int]]] = {}
        current = None
        duplicates = 0
        try:
            with open(self.root / shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for key, ext, member in _members(tar):
                    if current is None or current[0] != key:
                        current = (key, {})
                        if key in members:  # seen before, not adjacent: webdataset would split it
                            duplicates += 1
                        else:
                            members[key] = {}
                            samples.append(current)
                    members[key].setdefault(ext, (member.offset_data, member.size))
                    if ext in small_exts:
                        f.seek(member.offset_data)
                        current[1][ext] = f.read(member.size)
                # tarfile stops quietly at a truncated header: a whole shard ends with 2 zero blocks
                if os.fstat(f.fileno()).st_size < tar.offset + 2 * tarfile.BLOCKSIZE:
                    raise tarfile.ReadError("truncated")
        except (tarfile.TarError, OSError, EOFError) as err:
            self._warn(f"shard {shard} is unreadable after {len(samples)} samples ({err}); the rest is skipped")
        if duplicates:
            self._warn(f"shard {shard} repeats {duplicates} keys apart from their first members; repeats skipped")
        self._cache_index(shard, members)
        return samples

    def _shard_index(self, shard: str) -> dict[str, tuple[str, int, int] | None]:
        """key -> (image ext, data offset, size) or None, for one shard: built from the tar headers
        once, then kept in a small LRU cache (a few shards' worth, so a long manifest stays small)."""
        index = self._index.pop(shard, None)
        if index is not None:
            self._index[shard] = index  # most recent last
            return index
        members: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with tarfile.open(self.root / shard, mode="r:") as tar:
                for key, ext, member in _members(tar):
                    members.setdefault(key, {}).setdefault(ext, (member.offset_data, member.size))
        except (tarfile.TarError, OSError, EOFError):
            pass  # what was read is kept; records() reports the shard
        return self._cache_index(shard, members)

    def _cache_index(self, shard: str, members: dict[str, dict[str, tuple[int, int]]]):
        index = {}
        for key, exts in members.items():
            ext = next((e for e in self._image_exts if e in exts), None)
            index[key] = None if ext is None else (ext, *exts[ext])
        self._index.pop(shard, None)
        self._index[shard] = index
        while len(self._index) > self.max_cached_indexes:
            self._index.pop(next(iter(self._index)))
        return index

    def read_images(self, refs: Iterable[str]) -> Iterator[bytes | BadSample]:
        handles: dict[str, Any] = {}
        try:
            for ref in refs:
                try:
                    yield self._read(ref, handles)
                except BadSample as bad:
                    yield bad
        finally:
            for handle in handles.values():
                handle.close()

    def _read(self, ref: str, handles: dict[str, Any]) -> bytes:
        shard, sep, key = ref.partition(".tar:")
        shard += ".tar"
        if not sep or shard not in self._shard_set:
            raise BadSample("bad-ref", f"{ref!r} names no shard of {self.path}")
        index = self._shard_index(shard)
        if key not in index:
            raise BadSample("missing-image", f"{ref}: no such sample")
        if index[key] is None:
            raise BadSample("missing-image", f"{ref}: the sample has no image member")
        _, offset, size = index[key]
        handle = handles.pop(shard, None)  # re-inserted last: a small LRU of open shards
        try:
            if handle is None:
                handle = open(self.root / shard, "rb")
            handles[shard] = handle
            if len(handles) > self.max_open_shards:
                handles.pop(next(iter(handles))).close()
            handle.seek(offset)
            data = handle.read(size)
        except OSError as err:
            raise BadSample("unreadable-image", f"{ref}: {err}") from None
        if len(data) != size:
            raise BadSample("truncated-image", f"{ref}: {len(data)} of {size} bytes")
        return data


def _members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, lower-case ext, member) for each regular file of a tar, in tar order."""
    for member in tar:
        match = _KEY_EXT.match(member.name) if member.isfile() else None
        if match is not None:
            yield match.group(1), match.group(2).lower(), member


# --------------------------------------------------------------------------- HF datasets


class HFSource(Source):
    """A dataset saved with ``save_to_disk`` (a DatasetDict's "train" split)."""

    kind = "hf"
    options = ("uid_field", "image_column", "text_column", "label_column")
    batch_size = 256

    def __init__(self, path: Path, *, uid_field=None, image_column=None, text_column=None, label_column=None):
        super().__init__(path)
        self.uid_field, self.image_column = uid_field, image_column
        self.text_column, self.label_column = text_column, label_column
        self._ds = self._load(path)
        if len(self._ds) == 0:
            raise SourceError(f"dataset {path} has no rows")
        import datasets

        features = self._ds.features
        for option in ("uid_field", "image_column", "text_column", "label_column"):
            column = getattr(self, option)
            if column is not None and column not in features:
                flag = "--" + option.replace("_", "-")
                raise SourceError(f"dataset {path} has no column {column!r} ({flag}); "
                                  f"its columns: {', '.join(features)}")
        self._image = image_column or next(
            (c for c, f in features.items() if isinstance(f, datasets.Image)),
            "image" if "image" in features else None)
        self._caption = text_column or next((c for c in ("caption", "text") if c in features), None)
        self._labelcol = label_column or ("label" if "label" in features else None)
        if self._labelcol is not None and isinstance(features[self._labelcol], datasets.ClassLabel):
            self.label_names = list(features[self._labelcol].names)
        if self._image is None:
            self._warn(f"dataset {path} has no image column (pass --image-column): images cannot be read")
        if uid_field is None:
            self._warn("no --uid-field: uids are row indices ('0', '1', …), "
                       "stable only while the dataset is unchanged")
        self._images = None  # the image column, undecoded; made on first read

    def _load(self, path: Path):
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - datasets raises many kinds for a bad folder
            raise SourceError(f"cannot load the saved dataset at {path}: {_one_line(err)}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                splits = sorted(loaded)
                raise SourceError(f"dataset {path} has splits {', '.join(splits)} and no 'train': "
                                  f"give one split's folder, e.g. {path / splits[0]}")
            loaded = loaded["train"]
        return loaded.with_format(None)

    def records(self) -> Iterator[Record]:
        columns = [c for c in (self.uid_field, self._caption, self._labelcol) if c is not None]
        columns = list(dict.fromkeys(columns))
        no_uid = 0
        lists = [0]
        table = self._ds.select_columns(columns) if columns else None
        n = len(self._ds)
        for start in range(0, n, self.batch_size):
            stop = min(n, start + self.batch_size)
            batch = table[start:stop] if table is not None else {}
            for j in range(stop - start):
                index = start + j
                uid = batch[self.uid_field][j] if self.uid_field else None
                if self.uid_field and (uid is None or uid == ""):
                    no_uid += 1
                uid = str(index) if uid is None or uid == "" else str(uid)
                caption = _text(batch[self._caption][j], lists) if self._caption else None
                label = _label(batch[self._labelcol][j]) if self._labelcol else None
                yield Record(uid, caption, label, f"hf:{index}")
        if no_uid:
            self._warn(f"{no_uid} rows have an empty {self.uid_field!r}: their uid is the row index")
        if lists[0]:
            self._warn(f"{lists[0]} captions are lists: the first item is used")

    def read_images(self, refs: Iterable[str]) -> Iterator[bytes | BadSample]:
        refs = list(refs)
        for start in range(0, len(refs), self.batch_size):
            yield from self._read_batch(refs[start:start + self.batch_size])

    def _read_batch(self, refs: list[str]) -> Iterator[bytes | BadSample]:
        n = len(self._ds)
        indices: list[int | BadSample] = []
        for ref in refs:
            head, _, tail = ref.partition(":")
            if head != "hf" or not tail.isdigit() or int(tail) >= n:
                indices.append(BadSample("bad-ref", f"{ref!r} is no row of {self.path} ({n} rows)"))
            elif self._image is None:
                indices.append(BadSample("missing-image", f"{ref}: dataset has no image column"))
            else:
                indices.append(int(tail))
        wanted = [i for i in indices if isinstance(i, int)]
        values = iter(self._image_column()[wanted][self._image] if wanted else [])
        for ref, index in zip(refs, indices):
            yield index if isinstance(index, BadSample) else self._bytes(ref, next(values))

    def _image_column(self):
        if self._images is None:
            import datasets

            images = self._ds.select_columns([self._image])
            if isinstance(images.features[self._image], datasets.Image):
                images = images.cast_column(self._image, datasets.Image(decode=False))
            self._images = images
        return self._images

    def _bytes(self, ref: str, value: Any) -> bytes | BadSample:
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)) and value:
            return bytes(value)
        if isinstance(value, str) and value:
            candidates = [Path(value)] + ([Path(self.path) / value] if not os.path.isabs(value) else [])
            for candidate in candidates:
                try:
                    return candidate.read_bytes()
                except FileNotFoundError:
                    continue
                except OSError as err:
                    return BadSample("unreadable-image", f"{ref}: {value}: {err.strerror or err}")
            return BadSample("missing-image", f"{ref}: file {value} not found")
        return BadSample("missing-image", f"{ref}: empty image")


class ParquetSource(HFSource):
    """A ``.parquet`` file or a folder of them, read through ``datasets.load_dataset("parquet")``."""

    kind = "parquet"

    def _load(self, path: Path):
        import datasets

        files = [path] if path.is_file() else sorted(p for p in path.glob("*.parquet") if p.is_file())
        files = [str(f) for f in files]
        if not files:
            raise SourceError(f"no .parquet files in {path}")
        try:
            return datasets.load_dataset("parquet", data_files=files, split="train").with_format(None)
        except Exception as err:  # noqa: BLE001
            raise SourceError(f"cannot read parquet source {path}: {_one_line(err)}") from None


# --------------------------------------------------------------------------- image folder


class FolderSource(Source):
    """Images under a folder (recursive), with captions from a JSON file {uid: caption}."""

    kind = "folder"
    options = ("captions",)

    def __init__(self, path: Path, *, captions=None):
        super().__init__(path)
        if not path.is_dir():
            raise SourceError(f"image folder {path} is not a folder")
        self.root = path
        self.captions = None if captions is None else str(Path(captions).expanduser().resolve())
        self._captions = _load_captions(Path(self.captions)) if self.captions else {}
        self.files = _image_files(path)
        if not self.files:
            raise SourceError(f"no images in {path} (looked for {', '.join('.' + e for e in IMAGE_EXTS)})")

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
            yield Record(uid, _text(self._captions.get(key), lists) if key else None, None, rel)
        unmatched = len(self._captions) - len(used)
        if unmatched:
            example = self.files[0].rpartition(".")[0]
            self._warn(f"{unmatched} of {len(self._captions)} captions in {self.captions} match no image "
                       f"(keys are paths relative to {self.path} without extension, e.g. {example!r})")
        if repeated:
            self._warn(f"{repeated} images share a uid with another file (same path, other extension)")
        if lists[0]:
            self._warn(f"{lists[0]} captions are lists: the first item is used")

    def read_images(self, refs: Iterable[str]) -> Iterator[bytes | BadSample]:
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
            if not name.startswith(".") and _is_image_name(name):
                found.append(name if rel_dir == "." else f"{rel_dir}/{name}")
    return sorted(found)


def _load_captions(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"captions file not found: {path}") from None
    except (OSError, ValueError) as err:
        raise SourceError(f"cannot read captions file {path}: {_one_line(err)}") from None
    if not isinstance(data, dict):
        raise SourceError(f"captions file {path} must hold a JSON object {{uid: caption}}")
    return data


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


_KINDS: dict[str, type[Source]] = {
    "webdataset": WebDatasetSource,
    "hf": HFSource,
    "parquet": ParquetSource,
    "folder": FolderSource,
}
