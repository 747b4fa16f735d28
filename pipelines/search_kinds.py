"""Which FAISS index for how many rows: the kinds `featstore index` builds and their parameters.

Kinds (`kind="auto"` follows autofaiss's rules of thumb, simplified):

* flat   `IndexFlatIP` in an `IndexIDMap2`: exact; auto picks it below 200,000 rows.
* ivf    `IndexIVFFlat`: nlist = 4*sqrt(rows) lists (at most rows/39, faiss's minimum of training
         points per list), trained on a random sample of at most max(40*nlist, 50,000) rows (faiss's
         k-means wants 39 to 256 per list; 256 made a 1M-row build take most of an hour on 2 cores), then the
         rows added block by block; queries probe the nprobe lists measured at build time to reach
         recall@10 `target_recall` (0.95) on the store's own rows (search_tune.py, as autofaiss
         tunes after building; benchmarks/bench_search.py checks it on held-out queries).
         Auto picks it from 200,000 rows when the float32 vectors fit `memory_mb` (4096 if not given).
* ivfpq  `IndexIVFPQ`: as ivf, each vector stored as m codes of nbits (8-bit PQ, fewer bits when
         the sample has under 256*39 rows: at least 39 training rows per centroid), m the largest
         divisor of dim <= min(64, dim/2) whose codes fit `memory_mb`.  Auto picks it otherwise.
"""

from __future__ import annotations

import math

import numpy as np

from featstore.errors import ConfigError

KINDS = ("auto", "flat", "ivf", "ivfpq")
FLAT_BELOW = 200_000  # rows: auto picks an exact index below this
DEFAULT_MEMORY_MB = 4096
MIN_POINTS_PER_LIST = 39  # faiss warns when k-means gets fewer training points per centroid
TRAIN_POINTS_PER_LIST = 40  # training sample: this many rows per list (faiss's k-means caps it at 256)


def choose(kind: str, n: int, dim: int, memory_mb: float | None) -> dict:
    """The index kind and its parameters for `n` rows of width `dim` (the module docstring's rules)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown index kind {kind!r}; use one of {', '.join(KINDS)}")
    budget = float(memory_mb if memory_mb is not None else DEFAULT_MEMORY_MB) * 2**20
    if kind == "auto":
        kind = "flat" if n < FLAT_BELOW else ("ivf" if n * dim * 4 <= budget else "ivfpq")
    if kind == "flat":
        return {"kind": "flat"}
    nlist = max(1, min(int(4 * math.sqrt(n)), n // MIN_POINTS_PER_LIST))
    out = {"kind": kind, "nlist": nlist, "train_rows": min(n, max(TRAIN_POINTS_PER_LIST * nlist, 50_000))}
    if kind == "ivfpq":
        per_row = max(1, int(budget // max(n, 1)))
        divisors = [m for m in range(1, dim + 1) if dim % m == 0 and m <= max(1, min(64, dim // 2, per_row))]
        # 8-bit codes (256 centroids per sub-vector) want 256*39 training rows; fewer get fewer bits
        nbits = int(min(8, max(4, math.floor(math.log2(max(out["train_rows"], 1) / MIN_POINTS_PER_LIST)))))
        out.update(m=max(divisors), nbits=nbits)
    return out


def factory_string(params: dict) -> str:
    """The faiss.index_factory description of an index kind (the factory owns every sub-index)."""
    if params["kind"] == "flat":
        return "IDMap2,Flat"
    if params["kind"] == "ivf":
        return f"IVF{params['nlist']},Flat"
    return f"IVF{params['nlist']},PQ{params['m']}x{params['nbits']}"


def empty_index(params: dict, dim: int):
    import faiss

    return faiss.index_factory(dim, factory_string(params), faiss.METRIC_INNER_PRODUCT)


def train(index, sample: np.ndarray) -> str:
    """Train the inverted lists' k-means, on every GPU when faiss was built with them (faiss-gpu:
    the k-means' assignment index cloned to the GPUs, as faiss's own GPU benchmarks do; adding and
    searching stay on the CPU index), else on the CPU.  Returns "gpu" or "cpu"."""
    import faiss

    if getattr(faiss, "get_num_gpus", lambda: 0)() > 0 and hasattr(faiss, "index_cpu_to_all_gpus"):
        ivf = faiss.extract_index_ivf(index)
        flat = faiss.IndexFlatIP(ivf.d) if ivf.metric_type == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(ivf.d)
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(flat)
        index.train(sample)
        ivf.clustering_index = None
        return "gpu"
    index.train(sample)
    return "cpu"
