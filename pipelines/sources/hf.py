"""``hf`` sources (a ``save_to_disk`` folder; a DatasetDict uses its "train" split) and ``parquet``
sources (a ``.parquet`` file or a folder of them, loaded with ``datasets.load_dataset("parquet")``).

Columns: image = the first ``datasets.Image`` column, else "image"; text = "caption" or "text";
label = "label" (ClassLabel names become ``label_names``); uid = ``uid_field``, else the row index
(warned).  source_ref = ``hf:<row index>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from featstore.errors import BadSample, SourceError, one_line

from .base import Source, Record, label_of, caption_of, files_fingerprint

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
            raise SourceError(f"cannot load the saved dataset at {path}: {one_line(err)}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                splits = sorted(loaded)
                raise SourceError(f"dataset {path} has splits {', '.join(splits)} and no 'train': "
                                  f"give one split's folder, e.g. {path / splits[0]}")
            loaded = loaded["train"]
        return loaded.with_format(None)

    def fingerprint(self) -> str:
        fp = getattr(self._ds, "_fingerprint", None)
        return str(fp) if fp else files_fingerprint(sorted(Path(self.path).rglob("*.arrow")))

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
                caption = caption_of(batch[self._caption][j], lists) if self._caption else None
                label = label_of(batch[self._labelcol][j]) if self._labelcol else None
                yield Record(uid, caption, label, f"hf:{index}")
        if no_uid:
            self._warn(f"{no_uid} rows have an empty {self.uid_field!r}: their uid is the row index")
        if lists[0]:
            self._warn(f"{lists[0]} captions are lists: the first item is used")

    def read_images(self, refs: Iterable[str], spans=None) -> Iterator[bytes | BadSample]:
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
        self._files = files
        if not files:
            raise SourceError(f"no .parquet files in {path}")
        try:
            return datasets.load_dataset("parquet", data_files=files, split="train").with_format(None)
        except Exception as err:  # noqa: BLE001
            raise SourceError(f"cannot read parquet source {path}: {one_line(err)}") from None

    def fingerprint(self) -> str:
        return files_fingerprint(self._files)

