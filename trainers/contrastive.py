"""The contrastive loss and the retrieval metrics, on L2-normalized embeddings."""

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


@torch.no_grad()
def caption_retrieval(image: torch.Tensor, text: torch.Tensor, text_image, ks=(1, 5, 10), chunk: int = 1024) -> dict:
    """CLIP_benchmark's zero-shot retrieval (``metrics/zeroshot_retrieval.py``) where each image
    has one or more captions: `text_image[j]` is the image row of caption j.

    * ``image_retrieval_recall@k`` (text -> image): the fraction of captions whose image is among
      the k images scoring highest for it;
    * ``text_retrieval_recall@k`` (image -> text): the fraction of images with at least one of
      their captions among the k captions scoring highest for them.

    Embeddings are L2-normalized here as CLIP_benchmark does.  A positive scoring exactly as high
    as a negative counts as retrieved (CLIP_benchmark's ``torch.topk`` breaks such ties in no
    specified order)."""
    image = F.normalize(image.float(), dim=-1)
    text = F.normalize(text.float(), dim=-1)
    owner = torch.as_tensor(text_image, dtype=torch.long)
    if len(owner) != len(text) or (len(owner) and (owner.min() < 0 or owner.max() >= len(image))):
        raise ValueError("text_image must give an image row for every caption")
    out = {}
    # text -> image: negatives scoring above the caption's own image
    ranks = []
    for s in range(0, len(text), chunk):
        sims = text[s : s + chunk] @ image.T
        own = sims.gather(1, owner[s : s + chunk, None])
        ranks.append((sims > own).sum(1))
    rank = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = float((rank < k).float().mean()) if len(rank) else float("nan")
    # image -> text: negatives scoring above the image's best caption
    ranks = []
    for s in range(0, len(image), chunk):
        sims = image[s : s + chunk] @ text.T
        positive = owner[None, :] == torch.arange(s, s + len(sims))[:, None]
        best = sims.masked_fill(~positive, float("-inf")).max(1, keepdim=True).values
        ranks.append(((sims > best) & ~positive).sum(1))
    rank = torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
    for k in ks:
        out[f"text_retrieval_recall@{k}"] = float((rank < k).float().mean()) if len(rank) else float("nan")
    return out
