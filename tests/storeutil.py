"""Build small real stores with deterministic synthetic features (for store, loader and trainer tests)."""

from __future__ import annotations

import numpy as np

from featstore.store import Store
from featstore.core.writes import write_block


def block_features(name: str, block: int, n: int, dim: int) -> np.ndarray:
    """Deterministic features for one block: the same (name, block) always gives the same bytes."""
    seed = int.from_bytes(name.encode(), "little") % (2**31) + block
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def fill_feature_set(store: Store, name: str, dim: int, *, invalid_every: int = 0, blocks=None,
                     identity: dict | None = None, tokens: tuple[int, int] | None = None, token_dtype="float16") -> None:
    store.create_feature_set(name, identity or {"model": f"synthetic-{name}", "dim": dim}, dim,
                             tokens=tokens, token_dtype=token_dtype)
    for b in range(store.n_blocks) if blocks is None else blocks:
        start, stop = store.block_range(b)
        n = stop - start
        valid = np.ones(n, dtype=bool)
        failures = []
        if invalid_every:
            rows = np.arange(start, stop)
            valid = rows % invalid_every != 0
            failures = [{"row": int(r), "reason": "synthetic-bad"} for r in rows[~valid]]
        cols = {"pooled": block_features(name, b, n, dim)}
        if tokens is not None:
            t = block_features(name + "-tok", b, n, tokens[0] * tokens[1]).reshape(n, *tokens)
            if token_dtype == "int8":
                from featstore.tokens import quantize_int8
                cols["tokens"], cols["tokens_scale"] = quantize_int8(t)
            else:
                cols["tokens"] = t
        write_block(store, name, b, cols, valid, failures)


def make_store(path, n: int = 100, rows_per_shard: int = 16, features: dict[str, int] | None = None,
               labels: bool = True, **kw) -> Store:
    store = Store.create(path, rows_per_shard=rows_per_shard)
    uids = [f"uid-{i:06d}" for i in range(n)]
    store.register(uids, captions=[f"caption {i}" for i in range(n)],
                   labels=(np.arange(n) % 10) if labels else None, source_refs=[f"src:{i}" for i in range(n)],
                   label_names=[str(i) for i in range(10)] if labels else None)
    for name, dim in (features or {}).items():
        fill_feature_set(store, name, dim, **kw)
    return store
