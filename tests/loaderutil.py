"""What the loader tests share: a store with every kind of column, a loader's batches as numpy,
and two such lists equal."""

import numpy as np

from featstore.core.writes import write_block
from storeutil import make_store


def mixed_store(path):
    """45 rows in blocks of 16 (a partial last block), invalid rows, int8 tokens with scales, and a
    128-d column "w" (its shards can be mapped; the narrow ones are read with pread)."""
    local = make_store(path, n=45, rows_per_shard=16, features={"t": 8}, tokens=(4, 8), token_dtype="int8",
                       invalid_every=7)
    local.create_feature_set("w", {"model": "wide"}, 128)
    for b in range(local.n_blocks):
        start, stop = local.block_range(b)
        rng = np.random.default_rng(b)
        write_block(local, "w", b, {"pooled": rng.standard_normal((stop - start, 128))}, np.ones(stop - start, bool))
    return local


def batches(loader):
    return [{k: np.asarray(v) for k, v in b.items()} for b in loader]


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
