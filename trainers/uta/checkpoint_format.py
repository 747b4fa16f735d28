"""UTA's checkpoints: `trainers/checkpoint.py`'s files, with UTA's format name and version."""

from __future__ import annotations

import os

from featstore.errors import CheckpointError
from featstore.trainers import checkpoint
from featstore.trainers.uta.config import UTAConfig
from featstore.trainers.uta.student import UTAStudent

FORMAT = "featstore-uta-checkpoint"
# 3: EVA-02's own blocks (featstore/models/eva02.py; no LayerNorm before the attention's projection)
# 2: an EVA-02-like student from DINOv3 layers; 1: a plain ViT whose CLS was never aligned (neither loads)
VERSION = 3
OLD = {1: "a plain ViT student whose CLS was never aligned",
       2: "an EVA-02-like student built from DINOv3 layers, not EVA-02's own blocks"}


def _refuse_old(state: dict, ckpt_dir: str) -> None:
    version = int(state.get("version", 0))
    if version < VERSION:
        raise CheckpointError(f"{ckpt_dir} is a UTA checkpoint of version {version} "
                              f"({OLD.get(version, 'an older student')}): retrain it with this featstore")


def is_uta_checkpoint(path, which: str = "best") -> bool:
    """Whether `path` (a run or checkpoint directory) holds a UTA checkpoint of any version."""
    return checkpoint.format_of(path, which) == FORMAT


def load_checkpoint(path, which: str = "best", optimizer: bool = False, verify: bool = True) -> checkpoint.Checkpoint:
    """A UTA checkpoint (`<run>/best` or `<run>/last`): state, config, student (eval mode, CPU) and,
    with `optimizer`, the optimizer/RNG tensors.  Files whose checksum differs are refused."""
    ckpt = checkpoint.read(path, which, format=FORMAT, version=VERSION, kind="UTA", optimizer=optimizer,
                           verify=verify, check=_refuse_old)
    ckpt.config = UTAConfig.from_dict(ckpt.state["config"], where=os.path.join(ckpt.path, checkpoint.STATE_FILE))
    ckpt.model = UTAStudent.from_state(ckpt.state, ckpt.weights).eval()
    return ckpt
