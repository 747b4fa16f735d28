"""The fair limits of `bench_store.py` (issue 21): what this machine allows for the same bytes.

`memmap` (memmap_ram.py) gathers on the consuming thread only, while featstore's Loader gathers
on helper threads (read_threads=4) one batch ahead (prefetch=1).  So the limits here match that:

  memmap_threads  the same .npy memmaps and the Loader's own order, each batch's rows split
                  over `THREADS` threads (np.take(out=) into one fresh tensor per column), the
                  next batch gathered while the current one is consumed: featstore's threads
                  and read-ahead with no store, no index, no window: a random gather's limit
  memcpy          the same bytes in RAM copied in order, batch by batch, into fresh tensors by
                  `THREADS` threads (no gather, no page cache): the machine's copy bandwidth
                  (warm only: nothing to drop)
  disk_seq        the .npy files read front to back, each batch's bytes as `THREADS` parallel
                  preadv calls straight into fresh tensors (a disk serves several requests in
                  flight faster than one), the next batch read ahead: the sequential rate of
                  the page cache (warm) and of the disk (cold, its pages dropped first)

memcpy and disk_seq serve rows in order (no shuffle): they bound the bytes per second, not a
loader; featstore's figure over theirs says how close a shuffled epoch comes to them.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import DIMS, DTYPE, Contender

THREADS = 4  # featstore.Loader's read_threads default (the contender records the value it ran with)


def _empty(n: int, d: int, pin: bool) -> torch.Tensor:
    return torch.empty((n, d), dtype=torch.float16, pin_memory=pin)


def _ahead(make, count: int, pool: ThreadPoolExecutor):
    """Yield make(0), make(1), ... with the next one computed on `pool` while the current is used."""
    nxt = pool.submit(make, 0) if count else None
    for i in range(count):
        cur = nxt.result()
        nxt = pool.submit(make, i + 1) if i + 1 < count else None
        yield cur


class _Limit(Contender):
    """A limit read from the bench's .npy files with THREADS threads (nothing to build)."""

    def build(self) -> None:
        pass

    def files(self):
        return [self.data.npy]

    def describe(self) -> dict:
        return {"settings": self.settings, "threads": THREADS}


class MemmapThreads(_Limit):
    name = "memmap_threads"
    settings = (f"np.load(mmap_mode='r') of .npy files, the Loader's order; each batch's rows split over {THREADS} "
                "threads gathering with np.take(out=) into one fresh tensor per column, the next batch gathered "
                "while the current one is consumed (featstore's read_threads and prefetch)")

    def open(self):
        cols = {k: self.data.column(k) for k in DIMS}
        order, pin = self.data.order, self.data.pin_memory
        gather = ThreadPoolExecutor(THREADS, thread_name_prefix="memmap-gather")
        ahead = ThreadPoolExecutor(1, thread_name_prefix="memmap-ahead")

        def part(m, rows, out, a, b):
            np.take(m, rows[a:b], axis=0, out=out[a:b], mode="clip")

        def make(i):
            rows = order[i]
            batch = {"row": torch.from_numpy(rows)}
            step = -(-len(rows) // THREADS)
            jobs = []
            for k, m in cols.items():
                out = _empty(len(rows), DIMS[k], pin)
                jobs += [gather.submit(part, m, rows, out.numpy(), a, min(a + step, len(rows)))
                         for a in range(0, len(rows), step)]
                batch[k] = out
            for j in jobs:
                j.result()
            return batch

        def epoch():
            try:
                yield from _ahead(make, len(order), ahead)
            finally:
                ahead.shutdown(wait=True)
                gather.shutdown(wait=True)

        return epoch()


class Memcpy(_Limit):
    name = "memcpy"
    settings = (f"the same bytes already in RAM, copied in row order batch by batch into fresh tensors by {THREADS} "
                "threads (np.copyto): the machine's copy bandwidth for an epoch's bytes, no gather, no files")
    cold = False

    def __init__(self, data):
        super().__init__(data)
        self.arrays = None

    def build(self) -> None:
        self.arrays = {k: np.array(self.data.column(k)) for k in DIMS}  # a copy in RAM, not a map

    def files(self):
        return []

    def open(self):
        arrays, n, bs, pin = self.arrays, self.data.n, self.data.batch_size, self.data.pin_memory
        pool = ThreadPoolExecutor(THREADS, thread_name_prefix="memcpy")

        def part(src, dst, a, b):
            np.copyto(dst[a:b], src[a:b])

        def epoch():
            try:
                for start in range(0, n, bs):
                    stop = min(n, start + bs)
                    batch = {"row": torch.arange(start, stop)}
                    step = -(-(stop - start) // THREADS)
                    jobs = []
                    for k, a in arrays.items():
                        out = _empty(stop - start, DIMS[k], pin)
                        src, dst = a[start:stop], out.numpy()
                        jobs += [pool.submit(part, src, dst, i, min(i + step, stop - start))
                                 for i in range(0, stop - start, step)]
                        batch[k] = out
                    for j in jobs:
                        j.result()
                    yield batch
            finally:
                pool.shutdown(wait=True)

        return epoch()


class DiskSequential(_Limit):
    name = "disk_seq"
    settings = (f"the .npy files read front to back, each batch of rows as {THREADS} parallel preadv() calls per column "
                "straight into a fresh tensor, the next batch read ahead: the page cache's (warm) and the disk's "
                "(cold) sequential rate for an epoch's bytes, at featstore's read_threads")

    def open(self):
        n, bs, pin = self.data.n, self.data.batch_size, self.data.pin_memory
        itemsize = np.dtype(DTYPE).itemsize
        fds, offsets = {}, {}
        for k in DIMS:
            offsets[k] = self.data.column(k).offset  # the .npy header's length: rows start there, C order
            fds[k] = os.open(self.data.npy / f"{k}.npy", os.O_RDONLY)
        reads = ThreadPoolExecutor(THREADS, thread_name_prefix="disk-seq")
        ahead = ThreadPoolExecutor(1, thread_name_prefix="disk-seq-ahead")
        starts = list(range(0, n, bs))

        def part(fd, view, offset):
            got = 0
            while got < len(view):
                r = os.preadv(fd, [view[got:]], offset + got)
                if not r:
                    raise OSError(f"short read at byte {offset + got}")
                got += r

        def make(i):
            start = starts[i]
            stop = min(n, start + bs)
            batch = {"row": torch.arange(start, stop)}
            jobs = []
            for k, fd in fds.items():
                out = _empty(stop - start, DIMS[k], pin)
                view = memoryview(out.numpy()).cast("B")
                base = offsets[k] + start * DIMS[k] * itemsize
                step = -(-len(view) // THREADS)
                jobs += [reads.submit(part, fd, view[a:a + step], base + a) for a in range(0, len(view), step)]
                batch[k] = out
            for j in jobs:
                j.result()
            return batch

        def epoch():
            try:
                yield from _ahead(make, len(starts), ahead)
            finally:
                ahead.shutdown(wait=True)
                reads.shutdown(wait=True)
                for fd in fds.values():
                    os.close(fd)

        return epoch()
