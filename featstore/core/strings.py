"""A few strings of a large string array, read straight from its local shard files.

    strings_at(store.root["samples/uid"], rows)   # StringDType, rows in any order

A uid lookup checks each candidate row's stored uid (`featstore.store.Store.lookup_rows`): k
rows in k different shards.  zarr's coordinate selection costs about 1.5 ms per shard it touches
(its async pipeline, the shard index, then the chunk); reading the shard index and the one chunk
with two preads and decoding them here costs a tenth of that, so a lookup stays well under a
second when every hit is in another shard, as in a billion-row store.  Only the layout featstore
writes is read this way (a local sharded array, index at the end, chunks vlen-utf8 then zstd or
nothing); anything else (object storage, another layout) goes through zarr.
"""

from __future__ import annotations

import os

import numpy as np

from featstore.errors import FeatstoreError
from featstore.core.shardfile import google_crc32c, local_base

_MISSING = np.uint64(2**64 - 1)


def unique_counts(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(values, return_counts=True) for a string array, through a stable sort: numpy
    2.4's default (quick) sort of a StringDType array crashes the process on some inputs."""
    values = np.asarray(values).reshape(-1)
    if not len(values):
        return values, np.zeros(0, dtype=np.int64)
    s = values[np.argsort(values, kind="stable")]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return s[starts], np.diff(np.r_[starts, len(s)])


def strings_at(array, rows) -> np.ndarray:
    """array[rows] for a 1-d string array (rows < array.shape[0])."""
    rows = np.asarray(rows, dtype=np.int64)
    direct = _layout(array) if len(rows) else None
    if direct is None:
        return np.asarray(array.get_coordinate_selection(rows)) if len(rows) else np.asarray(array[:0])
    base, shard, chunk, zstd = direct
    out = np.empty(len(rows), dtype=np.dtypes.StringDType())
    key = rows // chunk
    order = np.argsort(key, kind="stable")
    bounds = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1], True])
    per_shard = shard // chunk
    for a, b in zip(bounds[:-1], bounds[1:]):
        c = int(key[order[a]])
        values = _chunk(os.path.join(base, "c", str(c // per_shard)), c % per_shard, per_shard, zstd)
        at = order[a:b]
        out[at] = values[rows[at] - c * chunk] if values is not None else ""
    return out


def _layout(array):
    """(directory, shard rows, chunk rows, zstd or None) when the shards can be read here."""
    try:
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, VLenUTF8Codec, ZstdCodec
    except ImportError:  # pragma: no cover - another zarr
        return None
    meta = array.metadata
    if getattr(meta, "zarr_format", None) != 3 or len(array.shape) != 1 or len(meta.codecs) != 1:
        return None
    sc = meta.codecs[0]
    if not isinstance(sc, ShardingCodec) or getattr(sc.index_location, "value", sc.index_location) != "end":
        return None
    if [type(c) for c in sc.index_codecs] != [BytesCodec, Crc32cCodec]:
        return None
    inner = [type(c) for c in sc.codecs]
    if inner not in ([VLenUTF8Codec], [VLenUTF8Codec, ZstdCodec]):
        return None
    if getattr(meta.chunk_key_encoding, "separator", None) != "/" or getattr(meta.chunk_key_encoding, "name", "") != "default":
        return None
    base = local_base(array)
    if base is None or google_crc32c is None:
        return None
    zstd = None
    if len(inner) == 2:
        import numcodecs

        zstd = numcodecs.Zstd()
    return base, int(meta.chunk_grid.chunk_shape[0]), int(sc.chunk_shape[0]), zstd


def _chunk(path: str, i: int, per_shard: int, zstd) -> np.ndarray | None:
    """Chunk `i` of the shard file at `path`, decoded (None: the chunk or the shard is empty)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        n = per_shard * 16 + 4
        raw = os.pread(fd, n, size - n) if size >= n else b""
        if len(raw) != n or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise FeatstoreError(f"{path}: the shard index is damaged (size or crc32c): run featstore verify")
        index = np.frombuffer(raw[:-4], "<u8").reshape(per_shard, 2)
        offset, nbytes = index[i]
        if offset == _MISSING:
            return None
        raw = os.pread(fd, int(nbytes), int(offset))
    finally:
        os.close(fd)
    if zstd is not None:
        raw = zstd.decode(raw)
    return _vlen_utf8(raw)


def _vlen_utf8(raw: bytes) -> np.ndarray:
    """numcodecs' vlen-utf8 layout: u32 count, then per item u32 length and its bytes."""
    import numcodecs

    return np.asarray(numcodecs.VLenUTF8().decode(raw), dtype=np.dtypes.StringDType())
