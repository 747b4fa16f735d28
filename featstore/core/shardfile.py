"""The shard files featstore writes, read without zarr's read path.

zarr's own read path manages ~0.3-0.6 GB/s on wide fp16 columns here (many small async reads and
copies); an uncompressed shard can instead be read (or mapped) at memory speed.  Only the
default layout qualifies: zarr v3, one shard per row block (shard shape (R, *row)), chunks that
are whole rows, bytes codec only (no compressor), the index at the end with crc32c, a fixed-size
little-endian dtype.  `ShardLayout.of` returns None for anything else, and a shard that looks
wrong is left to zarr (which raises zarr's own errors).  The format itself is untouched: this
only reads what zarr wrote; tests check every path against zarr's bytes.

    layout = ShardLayout.of(array, rows_per_shard)     # None: read it through zarr
    index = layout.parse_index(tail_bytes)              # the (offset, nbytes) of each chunk
    for offset, nbytes, row in layout.pieces(index, lo, hi): ...   # rows [lo, hi) of a block
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace

import numpy as np

try:
    import google_crc32c  # zarr's own crc32c dependency: checks shard indexes
except ImportError:  # pragma: no cover
    google_crc32c = None

EMPTY = 2**64 - 1  # a shard index entry for a chunk that was never written (all fill value)


@dataclass(frozen=True)
class ShardLayout:
    """Where the rows of one array are in its shard files."""

    array: object  # the zarr array (for its chunk key encoding)
    dtype: np.dtype
    tail: tuple  # the shape of one row
    chunk_rows: int
    chunks_per_shard: int
    row_bytes: int
    fill: np.ndarray

    @classmethod
    def of(cls, array, rows_per_shard: int) -> "ShardLayout | None":
        try:
            from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

            if google_crc32c is None or sys.byteorder != "little" or getattr(array.metadata, "zarr_format", None) != 3:
                return None
            codecs = array.metadata.codecs
            if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
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
            c = int(sc.chunk_shape[0])
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            return cls(array, dtype, shape[1:], c, rows_per_shard // c, row_bytes, np.asarray(array.fill_value, dtype=dtype))
        except Exception:
            return None

    @property
    def rows_per_shard(self) -> int:
        return self.chunk_rows * self.chunks_per_shard

    @property
    def index_bytes(self) -> int:
        return 16 * self.chunks_per_shard + 4

    def key(self, block: int) -> str:
        """The shard's key (path) relative to the array."""
        return self.array.metadata.encode_chunk_key((block,) + (0,) * (len(self.array.shape) - 1))

    def split_views(self, views: int) -> "ShardLayout":
        """The same shards read as `views` times as many rows of one view each (an array with a
        view axis after `row`, `featstore.read.views`): view row `row * K + view` is the K-th part of
        the row's bytes, so one view of a row is one contiguous range, like a row."""
        if views == 1:
            return self
        return replace(self, tail=tuple(self.tail[1:]), chunk_rows=self.chunk_rows * views,
                       row_bytes=self.row_bytes // views)

    def parse_index(self, raw: bytes) -> list | None:
        """[(offset, nbytes)] per chunk from a shard's last `index_bytes` bytes; None when they are
        not a valid index (wrong size or checksum)."""
        if len(raw) != self.index_bytes or google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            return None
        return np.frombuffer(raw, dtype="<u8", count=2 * self.chunks_per_shard).reshape(-1, 2).tolist()

    def pieces(self, index: list, lo: int, hi: int) -> list | None:
        """Rows [lo, hi) of a block (rows relative to the block) as [(offset, nbytes, row)]: byte
        ranges of the shard holding them, back-to-back chunks merged; offset None = fill value.
        None when the index does not hold these rows the way featstore writes them."""
        c, rb = self.chunk_rows, self.row_bytes
        out = []
        k = lo // c
        while k * c < hi:
            off, nbytes = index[k]
            a, b = max(lo, k * c), min(hi, (k + 1) * c)
            if off == EMPTY and nbytes == EMPTY:
                piece = (None, (b - a) * rb, a)
            elif nbytes != c * rb:
                return None
            else:
                piece = (off + (a - k * c) * rb, (b - a) * rb, a)
            last = out[-1] if out else None
            if last and piece[0] is not None and last[0] is not None and last[0] + last[1] == piece[0]:
                out[-1] = (last[0], last[1] + piece[1], last[2])
            elif last and piece[0] is None and last[0] is None:
                out[-1] = (None, last[1] + piece[1], last[2])
            else:
                out.append(piece)
            k += 1
        return out

    def identity_rows(self, index: list, rows: int) -> bool:
        """True when the first `rows` rows of the shard are stored in order from offset 0 (the
        shard can then be mapped as one (rows, *tail) array)."""
        c, rb = self.chunk_rows, self.row_bytes
        return all(index[k][0] == k * c * rb and index[k][1] == c * rb for k in range(-(-rows // c)))


def pread_full(fd: int, mv: memoryview, offset: int) -> bool:
    pos = 0
    while pos < len(mv):
        got = os.preadv(fd, [mv[pos:]], offset + pos)
        if got <= 0:
            return False  # the file is shorter than its index says
        pos += got
    return True


def local_base(array) -> str | None:
    """The directory of a zarr array on a local file system (None for any other store)."""
    from zarr.storage import LocalStore

    store = array.store_path.store
    if not isinstance(store, LocalStore):
        return None
    return os.path.join(str(store.root), array.store_path.path)


class LocalShards:
    """Reads row runs of one array straight from its local shard files (`os.preadv`)."""

    def __init__(self, layout: ShardLayout, base: str):
        self.layout, self.base = layout, base

    @classmethod
    def of(cls, array, rows_per_shard: int, views: int = 1) -> "LocalShards | None":
        """`views` K > 1: read one view per row of an array with a view axis (rows are then
        view rows, `ShardLayout.split_views`)."""
        layout = ShardLayout.of(array, rows_per_shard)
        base = local_base(array) if layout is not None else None
        return cls(layout.split_views(views), base) if base is not None else None

    def index(self, fd: int) -> list | None:
        size = os.fstat(fd).st_size
        n = self.layout.index_bytes
        if size < n:
            return None
        return self.layout.parse_index(os.pread(fd, n, size - n))

    def read(self, block: int, lo: int, hi: int, out: np.ndarray) -> bool:
        """Rows [lo, hi) of `block` (relative to the block) into `out`; False: leave it to zarr."""
        try:
            fd = os.open(os.path.join(self.base, self.layout.key(block)), os.O_RDONLY)
        except FileNotFoundError:
            out[...] = self.layout.fill  # a shard never written: all fill value, as zarr reads it
            return True
        try:
            return self.read_fd(fd, lo, hi, out)
        finally:
            os.close(fd)

    def read_fd(self, fd: int, lo: int, hi: int, out: np.ndarray) -> bool:
        """Rows [lo, hi) of the open shard file `fd` into `out`; False: leave it to zarr."""
        index = self.index(fd)
        pieces = self.layout.pieces(index, lo, hi) if index is not None else None
        if pieces is None:
            return False
        rb = self.layout.row_bytes
        limit = os.fstat(fd).st_size - self.layout.index_bytes
        mv = memoryview(out.reshape(-1).view(np.uint8))
        for off, nbytes, row in pieces:
            dst = (row - lo) * rb
            if off is None:
                out[row - lo : row - lo + nbytes // rb] = self.layout.fill
            elif off + nbytes > limit or not pread_full(fd, mv[dst : dst + nbytes], off):
                return False
        return True
