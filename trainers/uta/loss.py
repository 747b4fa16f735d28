"""UTA's objective: 1 - cosine between the student's kept tokens and the teacher's, plus the CLS term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from featstore.trainers.uta.masks import mask_groups
from featstore.trainers.uta.student import UTAStudent, gather_tokens


def alignment_losses(model: UTAStudent, x: torch.Tensor, targets: torch.Tensor, masks: list[torch.Tensor],
                     pooled: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{"token": mean over every (image, mask, kept position) of 1 - cos(student token, teacher
    token), and with `pooled` (B, D) "cls": mean over every (image, mask) of 1 - cos(student CLS
    embedding, teacher pooled embedding)}.

    `targets` (B, N, D) are on the student's grid.  The input is embedded once; each group of masks
    gathers its kept positions from it and runs the encoder on those alone."""
    e = model.embed(x)
    token_sum, token_n = e.new_zeros((), dtype=torch.float32), 0
    cls_sum, cls_n = e.new_zeros((), dtype=torch.float32), 0
    for keep in mask_groups(masks):
        reps = len(keep) // len(e)
        keep = keep.to(e.device)
        tokens, cls = model.encode(gather_tokens(e.repeat(reps, 1, 1), keep), keep)
        cos = F.cosine_similarity(tokens.float(), gather_tokens(targets.repeat(reps, 1, 1), keep).float(), dim=-1)
        token_sum, token_n = token_sum + (1.0 - cos).sum(), token_n + cos.numel()
        if pooled is not None:
            c = F.cosine_similarity(cls.float(), pooled.repeat(reps, 1).to(cls.device).float(), dim=-1)
            cls_sum, cls_n = cls_sum + (1.0 - c).sum(), cls_n + c.numel()
    out = {"token": token_sum / token_n}
    if pooled is not None:
        out["cls"] = cls_sum / cls_n
    return out


def alignment_loss(model: UTAStudent, x: torch.Tensor, targets: torch.Tensor, masks: list[torch.Tensor],
                   pooled: torch.Tensor | None = None, cls_weight: float = 0.0) -> torch.Tensor:
    """The training objective: token loss + cls_weight * CLS loss (`alignment_losses`)."""
    parts = alignment_losses(model, x, targets, masks, pooled if cls_weight > 0 else None)
    return parts["token"] + cls_weight * parts["cls"] if "cls" in parts else parts["token"]
