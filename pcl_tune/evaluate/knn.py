"""Weighted kNN and cluster agreement with labels, on tensors of frozen features.

All functions take features and labels as tensors and return plain numbers. Accuracies are in
percent. The search objective is computed on the ``val`` split; ``test`` is for the final report
of chosen configurations only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def knn_predict(
    query: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, *, k: int = 20, t: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Weighted kNN (Wu et al. 2018): each of the k most cosine-similar bank samples votes for its
    label with weight exp(s / t).

    Args:
        query: (Nq, D) L2-normalised features.
        bank: (Nb, D) L2-normalised features.
        bank_labels: (Nb,) labels in [0, num_classes).

    Returns:
        (Nq,) predicted labels.
    """
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, query.shape[0], chunk):
        sim = query[start:start + chunk] @ bank.T  # (c, Nb)
        top_s, top_i = sim.topk(k, dim=1)
        w = (top_s / t).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=w.dtype, device=w.device)
        votes.scatter_add_(1, bank_labels[top_i].to(w.device), w)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(
    query: Tensor, query_labels: Tensor, bank: Tensor, bank_labels: Tensor, num_classes: int, *,
    k: int = 20, t: float = 0.07,
) -> float:
    """Top-1 accuracy (%) of :func:`knn_predict`; NaN when there are no labelled queries."""
    mask_q, mask_b = query_labels >= 0, bank_labels >= 0
    if not bool(mask_q.any()) or not bool(mask_b.any()):
        return math.nan
    pred = knn_predict(query[mask_q], bank[mask_b], bank_labels[mask_b], num_classes, k=k, t=t)
    return float((pred.cpu() == query_labels[mask_q].cpu()).float().mean()) * 100.0


def cluster_agreement(assignment: Tensor, labels: Tensor) -> tuple[float, float]:
    """(NMI, AMI) between a clustering and the labels, over labelled samples (NaN when none)."""
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    lab = labels.cpu().numpy()
    mask = lab >= 0
    if not mask.any():
        return math.nan, math.nan
    a = assignment.cpu().numpy()[mask]
    lab = lab[mask]
    return float(normalized_mutual_info_score(lab, a)), float(adjusted_mutual_info_score(lab, a))


def raw_pixel_features(images: Tensor) -> Tensor:
    """Flattened, centred and L2-normalised pixels: the baseline any encoder must beat."""
    x = images.float().flatten(1)
    x = x - x.mean(1, keepdim=True)
    return torch.nn.functional.normalize(x, dim=1)
