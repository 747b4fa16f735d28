"""The contrastive loss and the retrieval metric, on L2-normalized embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): the mean of image→text and text→image cross-entropy, where row i
    of `image` matches row i of `text` and every other row of the batch is a negative."""
    logits = logit_scale * image.float() @ text.float().T
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@torch.no_grad()
def retrieval_recall(image: torch.Tensor, text: torch.Tensor, ks=(1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Recall@k both ways over a gallery where row i of `image` matches row i of `text`:
    `i2t_r1` is the fraction of images whose own caption ranks first among all captions.
    Ties count against the query (a strict ">" count of better candidates would be kinder)."""
    image, text = image.float(), text.float()
    out = {}
    for name, queries, keys in (("i2t", image, text), ("t2i", text, image)):
        ranks = []
        for start in range(0, len(queries), chunk):
            sims = queries[start : start + chunk] @ keys.T
            own = sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))]
            ranks.append((sims >= own[:, None]).sum(1) - 1)  # candidates scoring at least as high, minus itself
        rank = torch.cat(ranks) if ranks else torch.zeros(0)
        for k in ks:
            out[f"{name}_r{k}"] = float((rank < k).float().mean()) if len(rank) else float("nan")
    return out
