"""``webdataset`` sources: ``*.tar`` shards as img2dataset writes them (``<key>.jpg|png|webp…``, ``.txt``,
``.json``).

uid = the json field ``uid_field`` if given, else the json ``uid`` (``download`` writes it), else
``<tar stem>/<key>`` (warned: stable only for this download).  caption = the ``.txt`` member
(``text_column`` names another extension), decoded as UTF-8 with U+FFFD for bad bytes; label =
the json field ``label_column``.  source_ref = ``<tar name>:<key>``; each record also carries the
image member's span (offset, size) in its tar, so a reader handed the spans (a work item) reads
images without indexing the tars again.

The tars may be local or on object storage (``s3://bucket/shards/``, any fsspec URL): remote tars
are streamed once each for the manifest and their images read by ranged reads (`tars`).
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from featstore.errors import BadSample, SourceError

from .base import IMAGE_EXTS, Source, Record, label_of, caption_of
from .tars import open_tars

NO_IMAGE = (-1, 0)  # the span of a sample without an image member
READ_CHUNK = 512  # remote: refs fetched together (their ranged GETs run concurrently)

_KEY_EXT = re.compile(r"^((?:.*/|)[^./][^/]*?)\.([^/]*)$")  # webdataset: key = path up to the basename's first dot

class WebDatasetSource(Source):
    """``*.tar`` shards in a folder (or one ``.tar`` file), members grouped by key in tar order."""

    kind = "webdataset"
    options = ("uid_field", "label_column", "image_column", "text_column")
    max_open_shards = 8
    max_cached_indexes = 16

    def __init__(self, path: Path | str, *, uid_field=None, label_column=None, image_column=None, text_column=None):
        super().__init__(path)
        self.uid_field, self.label_column = uid_field, label_column
        self.image_column, self.text_column = image_column, text_column
        self._text_ext = (text_column or "txt").lower()
        self._image_exts = (image_column.lower(),) if image_column else IMAGE_EXTS
        self.tars = open_tars(path)
        self.shards = self.tars.names
        if not self.shards:
            raise SourceError(f"no .tar shards in {path}" + (" (remote sources are webdataset tars)" if self.tars.remote else ""))
        self._shard_set = set(self.shards)
        self._index: dict[str, dict[str, tuple[str, int, int] | None]] = {}  # LRU: shard -> key -> image member

    def fingerprint(self) -> str:
        return self.tars.fingerprint()

    def records(self) -> Iterator[Record]:
        no_uid = bad_json = bad_label = count = 0
        for shard in self.shards:
            stem = shard[: -len(".tar")]
            samples, index = self._scan(shard)
            for key, small in samples:
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
                    label = label_of(raw)
                    bad_label += label is None
                caption = small.get(self._text_ext)
                count += 1
                span = index.get(key)
                yield Record(str(uid), caption_of(caption, [0]), label, f"{shard}:{key}",
                             span=NO_IMAGE if span is None else span[1:])
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

    def _scan(self, shard: str):
        """([(key, {small ext: bytes})] per sample in tar order, the shard's image index); caches
        the index.  One pass over the tar (remote: one stream)."""
        small_exts = {"json", self._text_ext}
        samples: list[tuple[str, dict[str, bytes]]] = []
        members: dict[str, dict[str, tuple[int, int]]] = {}
        current = None
        duplicates = 0
        try:
            with self.tars.scan(shard) as (tar, read):
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
                        current[1][ext] = read(member)
                # tarfile stops quietly at a truncated header: a whole shard ends with 2 zero blocks
                if self.tars.size(shard) < tar.offset + 2 * tarfile.BLOCKSIZE:
                    raise tarfile.ReadError("truncated")
        except (tarfile.TarError, OSError, EOFError) as err:
            self._warn(f"shard {shard} is unreadable after {len(samples)} samples ({err}); the rest is skipped")
        if duplicates:
            self._warn(f"shard {shard} repeats {duplicates} keys apart from their first members; repeats skipped")
        return samples, self._cache_index(shard, members)

    def _shard_index(self, shard: str) -> dict[str, tuple[str, int, int] | None]:
        """key -> (image ext, data offset, size) or None, for one shard: built from the tar headers
        once, then kept in a small LRU cache (a few shards' worth, so a long manifest stays small)."""
        index = self._index.pop(shard, None)
        if index is not None:
            self._index[shard] = index  # most recent last
            return index
        members: dict[str, dict[str, tuple[int, int]]] = {}
        try:
            with self.tars.scan(shard) as (tar, _):
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

    def read_images(self, refs: Iterable[str], spans=None) -> Iterator[bytes | BadSample]:
        """The image bytes of each ref, in order.  `spans` (one (offset, size) per ref, from the
        records) skip the tar index; without them each shard's index is built once (remote: by
        streaming the tar again)."""
        refs = list(refs)
        spans = [None] * len(refs) if spans is None else list(spans)
        if self.tars.remote:
            for i in range(0, len(refs), READ_CHUNK):
                yield from self._read_remote(refs[i : i + READ_CHUNK], spans[i : i + READ_CHUNK])
            return
        handles: dict[str, Any] = {}
        try:
            for ref, span in zip(refs, spans):
                try:
                    shard, offset, size = self._locate(ref, span)
                    yield self._read_local(ref, shard, offset, size, handles)
                except BadSample as bad:
                    yield bad
        finally:
            for handle in handles.values():
                handle.close()

    def _locate(self, ref: str, span=None) -> tuple[str, int, int]:
        """(shard, offset, size) of a ref's image member; raises BadSample."""
        shard, sep, key = ref.partition(".tar:")
        shard += ".tar"
        if not sep or shard not in self._shard_set:
            raise BadSample("bad-ref", f"{ref!r} names no shard of {self.path}")
        if span is None:
            index = self._shard_index(shard)
            if key not in index:
                raise BadSample("missing-image", f"{ref}: no such sample")
            span = NO_IMAGE if index[key] is None else index[key][1:]
        offset, size = (int(x) for x in span)
        if offset < 0:
            raise BadSample("missing-image", f"{ref}: the sample has no image member")
        return shard, offset, size

    def _read_local(self, ref: str, shard: str, offset: int, size: int, handles: dict[str, Any]) -> bytes:
        handle = handles.pop(shard, None)  # re-inserted last: a small LRU of open shards
        try:
            if handle is None:
                handle = self.tars.opener(shard)
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

    def _read_remote(self, refs: list[str], spans: list) -> list[bytes | BadSample]:
        out: list[bytes | BadSample] = [b""] * len(refs)
        want, where = [], []
        for i, (ref, span) in enumerate(zip(refs, spans)):
            try:
                want.append(self._locate(ref, span))
                where.append(i)
            except BadSample as bad:
                out[i] = bad
        for i, (shard, _, size), data in zip(where, want, self.tars.read_spans(want)):
            out[i] = data if len(data) == size else BadSample("truncated-image", f"{refs[i]}: {len(data)} of {size} bytes")
        return out


def _members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, lower-case ext, member) for each regular file of a tar, in tar order."""
    for member in tar:
        match = _KEY_EXT.match(member.name) if member.isfile() else None
        if match is not None:
            yield match.group(1), match.group(2).lower(), member

