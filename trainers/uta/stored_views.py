"""UTA on stored views (`extract --views K`): what train-uta checks and says about a teacher's views.

The training loader serves one view per image per epoch (`featstore.read.views`, `Loader(view="epoch")`):
the same view of an image in its pixels, teacher tokens and teacher pooled embedding.  Validation and
`featstore eval` read view 0, the centre crop.  Here: the warning of a run longer than its views,
the refusal of `hflip` on views that are already mirrored, and the crop geometry (preprocessing +
views) that light mode and the pixels must share with the teacher.
"""

from __future__ import annotations

from featstore.errors import ConfigError


class ViewsRepeat(UserWarning):
    """A run longer than its teacher's stored views: from then on each image's views repeat."""


def views_note(steps: int, batches_per_epoch: int, views: int) -> str | None:
    """The warning of a run whose epochs exceed the teacher's K > 1 stored views (None otherwise)."""
    epochs = steps / max(1, batches_per_epoch)
    if views <= 1 or epochs <= views:
        return None
    return (f"{steps} steps are {epochs:.1f} epochs of the train split but the teacher has {views} stored views per "
            f"image: from epoch {views + 1} on every image's views repeat (extract with more --views for fresh ones)")


def check_flips(cfg, tdesc: dict) -> None:
    """Refuse `hflip` on a teacher whose stored views are already mirrored: the stored flips carry the
    teacher's own outputs on the mirror; a runtime flip on top would undo some of them and only
    approximate the teacher there (hflip mirrors the token grid)."""
    recipe = tdesc.get("views") or {}
    if cfg.hflip > 0 and recipe.get("flip", 0) > 0:
        raise ConfigError(f"hflip={cfg.hflip}: the teacher's {recipe.get('k')} stored views are already mirrored with "
                          f"p {recipe['flip']} at extraction (with the teacher's own tokens on each mirror); set "
                          "hflip=0, or extract with --view-flip 0 to flip at training time instead")


def crop_identity(fs) -> dict | None:
    """The crop geometry of a feature set's rows: its preprocessing, plus its stored views' recipe."""
    pre = fs.identity.get("preprocess")
    if not isinstance(pre, dict):
        return pre
    return {**pre, "views": fs.identity["views"]} if fs.identity.get("views") else pre
