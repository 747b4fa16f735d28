"""What the loader tests compare: a loader's batches as numpy, and two such lists equal."""

import numpy as np


def batches(loader):
    return [{k: np.asarray(v) for k, v in b.items()} for b in loader]


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
