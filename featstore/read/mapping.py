"""One read-only numpy view over all the shard files of an array: the warm path's single copy.

The shard files of an array are mapped side by side into one reserved address range, so the
array's rows [0, n) are one `(n, *row)` ndarray backed by the page cache, exactly like a memmap
of a single .npy file.  A batch is then one `np.take` from the mapping straight into the batch
tensor: one copy, as a numpy memmap gathered in the same order.  Rows of shards never written
read as zeros (the reservation's own pages), which is zarr's reading when the fill value is 0.

Only where that is exact: Linux, the layout `ShardLayout` reads, a block's bytes a multiple of
the page size (true for the default 4096 rows per shard), and every mapped shard storing its
rows in order from offset 0 (what zarr writes for a whole shard).  `MappedArray.of` returns
None otherwise and the loader reads those columns into buffers instead.

Files are mapped as they are when the view is made: zarr replaces a shard file by rename, never
in place, so a block rewritten later (the store grew) leaves this view on the old file, whose
computed rows are the same bytes.  The reservation is unmapped when the last view is gone.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import numpy as np

from featstore.core.shardfile import LocalShards

_PAGE = mmap.PAGESIZE
_HUGE = 2 << 20  # a PMD mapping's size on x86-64 and arm64 (4 KiB pages)
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
_MADV_WILLNEED = 3

if sys.platform.startswith("linux"):
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _libc.madvise.restype = ctypes.c_int
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.mincore.restype = ctypes.c_int
    _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
else:  # pragma: no cover
    _libc = None


class MappedArray:
    """Rows [0, n_rows) of one array as a read-only ndarray over its mapped shard files."""

    def __init__(self, region: mmap.mmap, view: np.ndarray, layout, rows_per_shard: int, n_rows: int):
        self._region = region  # owns the address range; unmapped when collected
        self.view = view
        self.layout, self.rows_per_shard, self.n_rows = layout, rows_per_shard, n_rows
        self.row_bytes = layout.row_bytes
        self._addr = view.ctypes.data

    @classmethod
    def of(cls, array, rows_per_shard: int, n_rows: int, blocks) -> "MappedArray | None":
        """Map the shards of `blocks` (those the loader serves); None when not exactly possible."""
        reader = LocalShards.of(array, rows_per_shard)
        if reader is None:
            return None
        mapped = cls.reserve(reader.layout, rows_per_shard, n_rows)
        if mapped is None:
            return None
        for b in blocks:
            try:
                fd = os.open(os.path.join(reader.base, reader.layout.key(int(b))), os.O_RDONLY)
            except FileNotFoundError:
                continue  # never written: the reservation's zeros are its rows
            try:
                if not mapped.map_shard(int(b), fd):
                    return None
            finally:
                os.close(fd)
        return mapped

    @classmethod
    def reserve(cls, layout, rows_per_shard: int, n_rows: int) -> "MappedArray | None":
        """The address range for rows [0, n_rows) of an array of this `ShardLayout`, all zeros
        until `map_shard` maps a block's file there; None when mapping cannot be exact."""
        if _libc is None or n_rows == 0:
            return None
        block_bytes = rows_per_shard * layout.row_bytes
        if block_bytes % _PAGE or (layout.fill != 0).any():
            return None
        total = -(-n_rows // rows_per_shard) * block_bytes
        # reserved _HUGE bytes more, so the view can start on a 2 MiB boundary: a shard mapped at an
        # address congruent to its file offset (0) modulo 2 MiB can have the page cache's large
        # folios mapped whole (one PMD entry, not 512 PTEs: fewer faults and TLB misses); every
        # block starts on one when its bytes are a multiple of 2 MiB (4096 rows of 512 B or more)
        region = mmap.mmap(-1, total + _HUGE, flags=_MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, prot=mmap.PROT_READ)
        whole = np.frombuffer(region, dtype=np.uint8)
        base = whole[(-whole.ctypes.data) % _HUGE:][:total]
        count = n_rows * int(np.prod(layout.tail, dtype=np.int64))
        view = base.view(layout.dtype)[:count].reshape((n_rows,) + tuple(layout.tail))
        return cls(region, view, layout, rows_per_shard, n_rows)

    def map_shard(self, block: int, fd: int) -> bool:
        """Map the open shard file `fd` as the rows of `block`; False when the file does not hold
        them in order from offset 0 with a valid index (then nothing was mapped)."""
        layout, r = self.layout, self.rows_per_shard
        rows = min(r, self.n_rows - block * r)
        size, n = os.fstat(fd).st_size, layout.index_bytes
        index = layout.parse_index(os.pread(fd, n, size - n)) if size >= n else None
        length = -(-rows // layout.chunk_rows) * layout.chunk_rows * layout.row_bytes
        if index is None or not layout.identity_rows(index, rows) or length > size - n:
            return False
        at = self._addr + block * r * layout.row_bytes
        return _libc.mmap(at, length, mmap.PROT_READ, _MAP_SHARED | _MAP_FIXED, fd, 0) == at

    def will_need(self, runs, sample: int = 16) -> None:
        """Ask the kernel to read these row runs [(start, stop)] ahead, unless a sample of them is
        already in the page cache (warm: the hints would only cost syscalls)."""
        runs = list(runs)
        step = max(1, len(runs) // sample)
        if all(self._resident(*self._pages(start, stop)) for start, stop in runs[::step]):
            return
        for start, stop in runs:
            _libc.madvise(*self._pages(start, stop), _MADV_WILLNEED)

    def _pages(self, start: int, stop: int) -> tuple[int, int]:
        a = self._addr + start * self.row_bytes
        lo = a - a % _PAGE
        return lo, self._addr + stop * self.row_bytes - lo

    def _resident(self, lo: int, n: int) -> bool:
        vec = np.zeros(-(-n // _PAGE), np.uint8)  # one byte per page; tested at once, not page by page in Python
        if _libc.mincore(lo, n, vec.ctypes.data_as(ctypes.c_void_p)) != 0:
            return False
        return bool((vec & 1).all())
