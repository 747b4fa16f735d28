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

    Embeddings are L2-normalized here, and the means taken in float32, as CLIP_benchmark does.
    Ties (exactly equal scores, e.g. duplicate captions) are where CLIP_benchmark's ``torch.topk``
    picks in no specified order; here a query tied between positives and negatives counts the
    probability that a uniformly random order puts a positive in the top k, so without ties the
    numbers are CLIP_benchmark's, and a collapsed model scores chance, not 0 or 1."""
    image = F.normalize(image.float(), dim=-1)
    text = F.normalize(text.float(), dim=-1)
    owner = torch.as_tensor(text_image, dtype=torch.long)
    if len(owner) != len(text) or (len(owner) and (owner.min() < 0 or owner.max() >= len(image))):
        raise ValueError("text_image must give an image row for every caption")
    found = {"image": [], "text": []}  # per query, per k: the chance a positive is in the top k
    for s in range(0, len(text), chunk):  # text -> image: one positive per caption
        sims = text[s : s + chunk] @ image.T
        positive = torch.zeros_like(sims, dtype=torch.bool)
        positive[torch.arange(len(sims)), owner[s : s + chunk]] = True
        found["image"].append(_hit_chance(sims, positive, ks))
    for s in range(0, len(image), chunk):  # image -> text: every caption of the image is a positive
        sims = image[s : s + chunk] @ text.T
        positive = owner[None, :] == torch.arange(s, s + len(sims))[:, None]
        found["text"].append(_hit_chance(sims, positive, ks))
    out = {}
    for kind in ("image", "text"):
        hits = torch.cat(found[kind]) if found[kind] else torch.zeros(0, len(ks))
        for i, k in enumerate(ks):
            out[f"{kind}_retrieval_recall@{k}"] = hits[:, i].float().mean().item() if len(hits) else float("nan")
    return out


def _hit_chance(sims: torch.Tensor, positive: torch.Tensor, ks) -> torch.Tensor:
    """(queries, len(ks)) float64: the probability that the top k, ordered by score with ties in a
    uniformly random order, holds a positive.  With g negatives above the best positive, and t
    negatives and p positives tied with it, that is 0 when g >= k, else 1 - C(t, m) / C(t + p, m)
    with m = min(k - g, t + p) tied places left in the top k (1 when there are no ties)."""
    best = sims.masked_fill(~positive, float("-inf")).max(1, keepdim=True).values
    above = ((sims > best) & ~positive).sum(1).double()
    tied = sims == best
    t = (tied & ~positive).sum(1).double()
    p = (tied & positive).sum(1).double()
    out = []
    for k in ks:
        m = torch.minimum(k - above, t + p).clamp(min=0)
        log_ratio = _log_choose(t, m) - _log_choose(t + p, m)
        chance = torch.where(m > t, torch.ones_like(t), 1 - torch.exp(log_ratio))
        out.append(torch.where(above >= k, torch.zeros_like(t), chance))
    return torch.stack(out, dim=1)


def _log_choose(n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    m = torch.minimum(m, n)  # only used where m <= n
    return torch.lgamma(n + 1) - torch.lgamma(m + 1) - torch.lgamma(n - m + 1)
