"""Block writes on writer threads behind the forward pass.

    writes = WriteBehind(in_flight=1, what="features/dino")
    for item in items:
        job = compute(item)              # the forward pass; job() writes the block, returns its marker
        writes.submit(item.block, job)   # waits only while `in_flight` blocks are still unwritten
    markers = writes.finish()            # every marker, in submission order

While a writer thread quantizes and writes block k (`featstore.core.writes.write_rows`: the block's
shards whole, then its marker), the forward thread computes block k+1.  At most `in_flight`
computed blocks are in the writers, each on a writer thread of its own (blocks are independent:
each is written under its own lock, as concurrent jobs write them), so memory stays bounded at
`in_flight + 1` blocks (the one being computed).  `in_flight=0` writes on the calling thread: the
synchronous path, which writes the same bytes (a job's arrays belong to it alone once handed over).

How many (`default_in_flight`, extract's `writes_in_flight=None`), from
benchmarks/bench_write_behind.py and bench_extract.py: a store on object storage gets
REMOTE_IN_FLIGHT writers, since a block's write there is many requests whose latency several
writers overlap; a local store gets one (on this 2-core CPU a writer thread measured 1.00 with
float16 tokens and 1.10 with int8 tokens quantized on it, an earlier run 0.92: within the noise,
for one block of memory, and behind a GPU forward pass the CPU is free to write).

Errors: the first write that fails stops the job.  The forward thread sees it at its next check
(between batches) or hand-over and raises it; writes not started yet are cancelled (writes
already running on other writer threads finish: their blocks are computed and correct).  A
FeatstoreError keeps its one line; anything else becomes `WriteFailed`, one line naming the block.
An error on the forward side (or Ctrl-C) lets the writes already handed over finish (their blocks
are computed and correct), then raises.  Kill safety is the writer's own: a kill at any moment
leaves blocks without a marker at most, which a re-run computes.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from featstore.core.files import is_url
from featstore.errors import FeatstoreError, WriteFailed

REMOTE_IN_FLIGHT = 4


def default_in_flight(store_path: str) -> int:
    """Writer threads for a job writing to `store_path`."""
    return REMOTE_IN_FLIGHT if is_url(str(store_path)) else 1


class WriteBehind:
    def __init__(self, in_flight: int = 1, what: str = "the feature set"):
        if in_flight < 0:
            raise ValueError("in_flight must be >= 0")
        self.in_flight = int(in_flight)
        self.what = what
        self.markers: list[dict] = []
        self._pending: collections.deque[tuple[int, Future]] = collections.deque()
        self._pool = ThreadPoolExecutor(self.in_flight, thread_name_prefix="featstore-writer") if self.in_flight else None

    def submit(self, block: int, job: Callable[[], dict]) -> None:
        """Hand block `block`'s write over; waits while `in_flight` writes are unfinished."""
        if self._pool is None:
            self.markers.append(_run(block, job, self.what))
            return
        self.check()
        while len(self._pending) >= self.in_flight:
            self._collect_oldest()
        self._pending.append((block, self._pool.submit(_run, block, job, self.what)))

    def check(self) -> None:
        """Collect finished writes; raise the error of one that failed (cheap: never waits)."""
        while self._pending and self._pending[0][1].done():
            self._collect_oldest()

    def finish(self) -> list[dict]:
        """Wait for every write; the markers in submission order."""
        while self._pending:
            self._collect_oldest()
        return self.markers

    def abort(self) -> None:
        """After an error on the forward side: let the writes handed over finish (errors of
        theirs give way to the one being raised)."""
        while self._pending:
            _, fut = self._pending.popleft()
            try:
                self.markers.append(fut.result())
            except Exception:  # noqa: BLE001 - the forward side's error is the one the user sees
                pass

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _collect_oldest(self) -> None:
        _, fut = self._pending.popleft()
        try:
            self.markers.append(fut.result())
        except BaseException:
            for _, later in self._pending:  # nothing after a failed write is written
                later.cancel()
            self._pending.clear()
            raise


def _run(block: int, job: Callable[[], dict], what: str) -> dict:
    try:
        return job()
    except FeatstoreError:
        raise
    except Exception as err:  # noqa: BLE001 - every write error reaches the user as one line
        first = (str(err).strip().splitlines() or [""])[0]
        raise WriteFailed(f"writing block {block} of {what} failed ({type(err).__name__}: {first}); the blocks "
                          "written before it are kept: fix the cause and run the same command again") from err
