"""What the core's modules need of a store, as a protocol: `featstore.store.Store` is one.

The core (feature sets, registration, block writes) works on a store object handed to it and
never imports `featstore.store`, which imports the core: this names the part of the store they
use, so the dependency runs one way.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from featstore.core.files import StoreFiles


class StoreView(Protocol):
    path: str
    mode: str
    files: StoreFiles
    root: object  # the zarr group at the store's root

    @property
    def n_rows(self) -> int: ...

    @property
    def rows_per_shard(self) -> int: ...

    @property
    def n_blocks(self) -> int: ...

    def block_range(self, block: int) -> tuple[int, int]: ...

    def block_sizes(self) -> np.ndarray: ...

    def require_writable(self) -> None: ...
