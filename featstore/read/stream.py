"""Who gathers which batch, and when: a helper thread runs ahead, the consumer helps itself.

A helper thread gathers batches up to `ahead` batches ahead of the consumer, so a consumer busy
with a training step finds its next batch ready.  A consumer that is faster than the helper
(nothing else to do) never sleeps waiting for it: it gathers the next batch nobody has claimed
itself, in its own thread, and only waits when every batch it could take is already being
gathered.  Batches come out in order either way; their gathers release the GIL, so on several
cores both threads copy at once.  Windows (`featstore.read.reader.Window`) are started
`read_ahead` windows ahead of the first batch claimed in them, and their buffers handed back
once every batch of the window is gathered.
"""

from __future__ import annotations

import bisect
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

from featstore.read.reader import Reader, Window

_TODO, _CLAIMED, _DONE = 0, 1, 2


class BatchStream:
    """Iterate once: the batches of `windows`, in order.  `windows` is a sequence of windows
    (each a list of row arrays), or one that computes a window when asked and says how many
    batches each holds (`featstore.read.epoch.RankWindows`: `sizes()`): a window's batches are then
    computed when the window is prepared, in the read pool, and dropped once it is served."""

    def __init__(self, reader: Reader, windows, *, ahead: int, read_ahead: int, read_threads: int):
        self.reader = reader
        self.source = windows
        sizes = windows.sizes() if hasattr(windows, "sizes") else [len(w) for w in windows]
        self.firsts = [0]  # the first job (batch) of each window
        for k in sizes:
            self.firsts.append(self.firsts[-1] + k)
        self.n_jobs = self.firsts[-1]
        self.windows: dict[int, Window] = {}  # started, not yet served whole
        self.left = list(sizes)  # batches of each window not gathered yet
        self.state = bytearray(self.n_jobs)  # _TODO / _CLAIMED / _DONE per batch
        self.results: dict[int, object] = {}
        self.ahead, self.read_ahead, self.read_threads = max(1, ahead), read_ahead, read_threads
        self.cond = threading.Condition()
        self.next = 0  # the batch the consumer yields next
        self.started = 0  # windows started so far
        self.stopped = False
        self.pool: ThreadPoolExecutor | None = None

    def _job(self, j: int) -> tuple[int, int]:
        """(window, batch within it) of job j."""
        wi = bisect.bisect_right(self.firsts, j) - 1
        return wi, j - self.firsts[wi]

    # ---- under self.cond ---------------------------------------------------------------------
    def _claim(self) -> int | None:
        """The first unclaimed batch within `ahead` of the consumer (marked claimed), or None."""
        for j in range(self.next, min(self.next + self.ahead, self.n_jobs)):
            if self.state[j] == _TODO:
                self.state[j] = _CLAIMED
                self._start_windows(self._job(j)[0])
                return j
        return None

    def _start_windows(self, wi: int) -> None:
        while self.started < len(self.left) and self.started <= wi + self.read_ahead:
            i = self.started
            w = Window(None, make=lambda i=i: list(self.source[i]))
            self.windows[i] = w
            self.reader.start(w, self.pool)
            self.started += 1

    # ---- outside it ----------------------------------------------------------------------------
    def _gather(self, j: int) -> None:
        wi, bi = self._job(j)
        with self.cond:
            w = self.windows[wi]
        try:
            w.wait()
            item = self.reader.gather(w, w.batches[bi])
        except BaseException as e:  # raised in the consumer when it reaches this batch
            item = e
        with self.cond:
            self.results[j], self.state[j] = item, _DONE
            self.left[wi] -= 1
            last = self.left[wi] == 0
            self.cond.notify_all()
        if last:  # every batch of the window is a copy now: its buffers can be reused
            futures_wait([f for f in (w.prepared,) if f is not None])
            futures_wait(w.futures)
            self.reader.release(w)
            with self.cond:
                del self.windows[wi]

    def _helper(self) -> None:
        while True:
            with self.cond:
                while not self.stopped and (j := self._claim()) is None:
                    self.cond.wait()
                if self.stopped:
                    return
            self._gather(j)

    def __iter__(self):
        self.pool = ThreadPoolExecutor(max_workers=self.read_threads, thread_name_prefix="featstore-read")
        helper = threading.Thread(target=self._helper, name="featstore-gather", daemon=True)
        helper.start()
        try:
            for i in range(self.n_jobs):
                while True:
                    with self.cond:
                        if self.state[i] == _DONE:
                            item = self.results.pop(i)
                            self.next = i + 1
                            self.cond.notify_all()
                            break
                        j = self._claim()
                        if j is None:
                            self.cond.wait()
                            continue
                    self._gather(j)
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            with self.cond:
                self.stopped = True
                self.cond.notify_all()
            helper.join()
            self.pool.shutdown(wait=True)  # reads in flight finish before their buffers are dropped
