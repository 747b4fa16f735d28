"""Several text feature sets for one image set: ShareLock trains on several caption files (e.g.
the original captions and synthetic ones) encoded by one language model, and picks one of them
at random for each sample each time it is drawn.

Training draws each row's set uniformly as a pure function of (seed, step, store row), so a resumed
run draws the same and a DDP rank draws for its rows exactly what one process would; validation
gives each row one fixed set, so validation losses compare.
"""

from __future__ import annotations

import numpy as np
import torch

from featstore.errors import ConfigError, IdentityMismatch
from featstore.core.identity import identity_diff, lines

from featstore.trainers.backbone_link import NOT_POOLED


def text_names(text) -> list[str]:
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    if not names or not all(names) or len(set(names)) != len(names):
        raise ConfigError(f"text must name one or more distinct text feature sets (a,b,c), got {text!r}")
    return names


def modality(described: dict) -> str | None:
    """"image" or "text": what a feature set ({"name", "identity", ...}) encodes, when its identity says."""
    identity = described.get("identity") or {}
    return identity.get("modality") or {"image": "image", "caption": "text"}.get(identity.get("field"))


def check_modalities(image: dict, texts: list[dict]) -> None:
    """--image must name image features and --text text features: a swapped pair is refused."""
    wrong = [f"--image '{image['name']}' holds text features"] if modality(image) == "text" else []
    wrong += [f"--text '{t['name']}' holds image features" for t in texts if modality(t) == "image"]
    if wrong:
        swapped = len(wrong) == 1 + len(texts)
        raise ConfigError(f"{' and '.join(wrong)}: " + ("swap --image and --text" if swapped else
                          "--image takes an image feature set, --text caption feature sets"))


def check_one_backbone(described: list[dict]) -> None:
    """Several caption sets must come from one text backbone: same width, same identity but for
    how they were stored or which field they encode."""
    first = described[0]
    for other in described[1:]:
        diff = identity_diff({**first["identity"], "dim": first["dim"]}, {**other["identity"], "dim": other["dim"]},
                             then=f"('{first['name']}')", now=f"('{other['name']}')", ignore=NOT_POOLED)
        if diff:
            raise IdentityMismatch(f"text feature sets '{first['name']}' and '{other['name']}' come from different "
                                   f"text backbones (sample only caption sets of one backbone):{lines(diff)}")


def train_text(batch: dict, columns: list[str], seed: int, step: int) -> torch.Tensor:
    """Each row's text features from one of the text sets, drawn uniformly (one set: itself)."""
    if len(columns) == 1:
        return batch[columns[0]]
    choice = torch.from_numpy(row_draw(batch["row"].numpy(), len(columns), seed, step))
    return torch.stack([batch[c] for c in columns])[choice, torch.arange(len(choice))]


def row_draw(rows: np.ndarray, k: int, seed: int, step: int) -> np.ndarray:
    """A uniform draw in [0, k) per store row, a pure function of (seed, step, row): splitmix64 of
    the row mixed with (seed, step), so it does not depend on which rows share the batch or rank."""
    key = np.uint64((int(seed) * 1_000_003 + int(step) * 7_919 + 1) % 2**64)
    with np.errstate(over="ignore"):
        x = rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + key
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return (x % np.uint64(k)).astype(np.int64)


def val_choices(n_rows: int, k: int, seed: int) -> torch.Tensor:
    """Which of `k` text sets each store row shows validation: fixed, so validation losses compare."""
    return torch.randint(k, (n_rows,), generator=torch.Generator().manual_seed(seed + 7919))


def val_text(batch: dict, columns: list[str], choice_by_row: torch.Tensor) -> torch.Tensor:
    if len(columns) == 1:
        return batch[columns[0]]
    choice = choice_by_row[batch["row"]]
    return torch.stack([batch[c] for c in columns])[choice, torch.arange(len(choice))]
