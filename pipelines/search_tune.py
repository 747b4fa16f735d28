"""Pick an ivf / ivfpq index's nprobe from the recall it measures on the store's own rows.

autofaiss tunes an index's search parameters after building it; so does `featstore index`, for
recall: `CALIBRATION_QUERIES` rows of the training sample are the queries.  Their exact top-k is
kept while the build adds the rows block by block (one matrix product a block: queries x dim
multiply-adds a row, beside the nlist x dim that assigning the row to its list takes, and no
extra pass over the store), then nprobe is swept over powers of two and the smallest whose
recall@k reaches `target` is kept.  A query is a stored row, so its own row is left out of both
lists: recall is measured on its other neighbours, as a held-out query would see them.  An
extended index keeps the nprobe measured when it was built.

When no nprobe up to nlist reaches the target (an ivfpq index is capped by its codes' precision),
the smallest nprobe within 0.005 of the best recall is kept and the record says so.
"""

from __future__ import annotations

import numpy as np

CALIBRATION_QUERIES = 256
DEFAULT_TARGET = 0.95
K = 10
PLATEAU = 0.005


class ExactTopK:
    """Running exact top-(k+1) inner products of fixed queries over row blocks added one at a time."""

    def __init__(self, queries: np.ndarray, query_rows: np.ndarray, k: int = K):
        self.q = np.ascontiguousarray(queries, dtype=np.float32)
        self.query_rows = np.asarray(query_rows, np.int64)
        self.k = k + 1  # one more: the query's own row comes back too
        self.scores = np.full((len(self.q), 0), -np.inf, np.float32)
        self.rows = np.zeros((len(self.q), 0), np.int64)

    def update(self, vectors: np.ndarray, rows: np.ndarray) -> None:
        s = self.q @ np.asarray(vectors, np.float32).T  # (queries, block rows)
        ids = np.broadcast_to(np.asarray(rows, np.int64), s.shape)
        s, ids = self._top(s, ids)  # the block's own top first: never a queries x all-rows array
        self.scores, self.rows = self._top(np.concatenate([self.scores, s], 1), np.concatenate([self.rows, ids], 1))

    def _top(self, scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if scores.shape[1] <= self.k:
            return scores, np.ascontiguousarray(ids)
        top = np.argpartition(-scores, self.k - 1, axis=1)[:, :self.k]
        return np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)

def recall(truth: ExactTopK, got_rows: np.ndarray, k: int = K) -> float:
    """Mean recall@k of `got_rows` (queries x (k+1) ids) against the exact lists, own rows left out."""
    hits = total = 0
    for i, own in enumerate(truth.query_rows.tolist()):
        order = np.argsort(-truth.scores[i], kind="stable")
        exact = [r for r in truth.rows[i][order].tolist() if r != own][:k]
        found = [r for r in got_rows[i].tolist() if r != own and r >= 0][:k]
        hits += len(set(exact) & set(found))
        total += len(exact)
    return hits / max(total, 1)


def tune_nprobe(index, truth: ExactTopK, nlist: int, target: float = DEFAULT_TARGET) -> dict:
    """{"nprobe", "recall", "target", "queries", "sweep": [[nprobe, recall], ...], "reached"}."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    sweep: list[list] = []
    nprobe = 1
    while True:
        ivf.nprobe = min(nprobe, nlist)
        _, got = index.search(truth.q, truth.k)
        sweep.append([int(ivf.nprobe), round(recall(truth, got), 4)])
        if sweep[-1][1] >= target or ivf.nprobe >= nlist:
            break
        nprobe *= 2
    reached = sweep[-1][1] >= target
    best = max(r for _, r in sweep)
    pick = sweep[-1] if reached else next(s for s in sweep if s[1] >= best - PLATEAU)
    ivf.nprobe = pick[0]
    return {"nprobe": pick[0], "recall": pick[1], "target": target, "queries": len(truth.q), "reached": reached,
            "sweep": sweep}
