"""Read row blocks straight from the shard files featstore writes, bypassing zarr's read path.

zarr's own read path manages ~0.3-0.6 GB/s on wide fp16 columns here (many small async reads and
copies); reading an uncompressed shard with `os.preadv` into a page-aligned buffer runs at memory
speed (~6 GB/s).  Only the default layout is read this way (zarr v3 on a local directory, one
shard per row block, whole-row chunks, bytes codec only, crc32c-checked index at the end);
anything else, or any shard that looks wrong, is left to zarr.  The format itself is untouched:
this only reads what zarr wrote.  `tests/test_loader.py` checks both paths give identical bytes.
"""

from __future__ import annotations

import os
import sys

import numpy as np

try:
    import google_crc32c  # zarr's own crc32c dependency: checks shard indexes
except ImportError:  # pragma: no cover
    google_crc32c = None

_EMPTY = 2**64 - 1  # a shard index entry for a chunk that was never written (all fill value)


def pread_full(fd: int, mv: memoryview, offset: int) -> bool:
    pos = 0
    while pos < len(mv):
        got = os.preadv(fd, [mv[pos:]], offset + pos)
        if got <= 0:
            return False  # the file is shorter than its index says
        pos += got
    return True


class DirectShards:
    """Reads row blocks of one array straight from its shard files.

    Only for the layout featstore writes by default: zarr v3 on a local directory, one shard per
    row block (shard shape (R, *row)), chunks that are whole rows, bytes codec only (no
    compressor), index at the end with crc32c, a fixed-size little-endian dtype.  `of` returns None
    for anything else, and `read` returns False for a shard it does not understand (the caller
    then reads it through zarr, which also raises zarr's own errors).
    """

    def __init__(self, array, base: str, chunk_rows: int, chunks_per_shard: int, row_bytes: int, fill):
        self.array, self.base = array, base
        self.chunk_rows, self.chunks_per_shard, self.row_bytes = chunk_rows, chunks_per_shard, row_bytes
        self.fill = fill
        self.ndim = len(array.shape)

    @classmethod
    def of(cls, array, rows_per_shard: int) -> "DirectShards | None":
        try:
            from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
            from zarr.storage import LocalStore

            if google_crc32c is None or sys.byteorder != "little" or not hasattr(array, "metadata") or array.metadata.zarr_format != 3:
                return None
            store = array.store_path.store
            codecs = array.metadata.codecs
            if not isinstance(store, LocalStore) or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
                return None
            sc = codecs[0]
            dtype = np.dtype(array.dtype)
            shape = tuple(array.shape)
            if (
                getattr(sc.index_location, "value", sc.index_location) != "end"
                or [type(c) for c in sc.codecs] != [BytesCodec]
                or [type(c) for c in sc.index_codecs] != [BytesCodec, Crc32cCodec]
                or dtype.kind not in "biuf"
                or dtype.byteorder == ">"
                or tuple(array.metadata.chunk_grid.chunk_shape) != (rows_per_shard,) + shape[1:]
                or tuple(sc.chunk_shape[1:]) != shape[1:]
                or rows_per_shard % sc.chunk_shape[0]
            ):
                return None
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            base = os.path.join(str(store.root), array.store_path.path)
            return cls(array, base, int(sc.chunk_shape[0]), rows_per_shard // int(sc.chunk_shape[0]), row_bytes,
                       np.asarray(array.fill_value, dtype=dtype))
        except Exception:
            return None

    def read(self, start: int, stop: int, out: np.ndarray) -> bool:
        block = start // (self.chunk_rows * self.chunks_per_shard)
        key = self.array.metadata.encode_chunk_key((block,) + (0,) * (self.ndim - 1))
        n = stop - start
        try:
            fd = os.open(os.path.join(self.base, key), os.O_RDONLY)
        except FileNotFoundError:
            out[...] = self.fill  # a shard never written: all fill value, as zarr reads it
            return True
        try:
            size = os.fstat(fd).st_size
            index_len = 16 * self.chunks_per_shard + 4
            if size < index_len:
                return False
            raw = os.pread(fd, index_len, size - index_len)
            if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                return False
            index = np.frombuffer(raw, dtype="<u8", count=2 * self.chunks_per_shard).reshape(-1, 2).tolist()
            c, rb = self.chunk_rows, self.row_bytes
            mv = memoryview(out.reshape(-1).view(np.uint8))
            need = -(-n // c)
            k = 0
            while k < need:
                off, nbytes = index[k]
                if off == _EMPTY and nbytes == _EMPTY:
                    out[k * c : (k + 1) * c] = self.fill
                    k += 1
                    continue
                if nbytes != c * rb:
                    return False
                j = k + 1  # extend over chunks stored back to back
                while j < need and index[j][1] == c * rb and index[j][0] == off + (j - k) * c * rb:
                    j += 1
                lo, hi = k * c, min(n, j * c)
                if off + (hi - lo) * rb > size - index_len or not pread_full(fd, mv[lo * rb : hi * rb], off):
                    return False
                k = j
            return True
        finally:
            os.close(fd)
