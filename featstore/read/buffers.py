"""Memory the loader reads into and serves from: window buffers and batch memory.

- `Buffers`: page-aligned window buffers (columns read into memory before batches are gathered
  from them), reused from window to window; counts the bytes it holds (`held`, `peak`).
- `BatchMemory`: the memory of batch tensors, recycled only once nothing references a batch.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

STR_ROW_BYTES = 64  # what a string cell is counted as when sizing windows and buffers


def aligned_empty(shape: tuple, dtype, align: int = 4096) -> np.ndarray:
    """np.empty, page-aligned: the kernel copies into an unaligned buffer ~3x slower on some CPUs."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf":  # strings and the like: no alignment to gain
        return np.empty(shape, dtype=dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes].view(dtype).reshape(shape)


class Buffers:
    """Window buffers kept for reuse, and how many bytes they hold (`held`, `peak`)."""

    def __init__(self):
        self._free: dict[str, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self.held = 0
        self.peak = 0

    def get(self, key: str, rows: int, tail: tuple, dtype) -> np.ndarray:
        with self._lock:
            free = self._free.setdefault(key, [])
            fits = [i for i, b in enumerate(free) if len(b) >= rows]
            if fits:
                return free.pop(min(fits, key=lambda i: len(free[i])))
            if free:  # too small for this window: give its memory back before taking more
                self.held -= _nbytes(free.pop(0))
            buf = aligned_empty((rows,) + tail, dtype)
            self.held += _nbytes(buf)
            self.peak = max(self.peak, self.held)
            return buf

    def put(self, key: str, buf: np.ndarray) -> None:
        with self._lock:
            self._free.setdefault(key, []).append(buf)


class BatchMemory:
    """Memory for batch tensors, recycled once nothing references a batch any more.

    A batch tensor is `torch.from_numpy` of a fresh ndarray view of a pooled buffer; torch keeps
    that view alive for as long as the tensor's storage lives (views, autograd, anything), and
    the buffer returns to the pool only when the view is gone.  So a batch is never overwritten
    while anyone holds any part of it, and the next batches reuse pages already faulted in,
    instead of fresh allocations from the producer thread's malloc arena, which fault every page
    in again (a consumer that kept `batch["row"]` used to halve the rate that way).
    """

    def __init__(self, keep: int = 8):
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self.keep = keep
        self.reused = 0

    def empty(self, shape: tuple, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        key = (tuple(shape), dtype.str)
        with self._lock:
            free = self._free.get(key)
            raw = free.pop() if free else None
            self.reused += raw is not None
        if raw is None:
            raw = aligned_empty(shape, dtype)
        view = raw.view()
        weakref.finalize(view, self._put, key, raw).atexit = False
        return view

    def _put(self, key: tuple, raw: np.ndarray) -> None:
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) < self.keep:
                free.append(raw)


def _nbytes(buf: np.ndarray) -> int:
    return buf.nbytes if buf.dtype.kind in "biuf" else len(buf) * STR_ROW_BYTES
