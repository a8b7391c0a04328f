"""Semi-supervised classification: fine-tune the whole pretrained encoder plus a linear head on a
class-balanced fraction of the labelled train split (1 % / 10 % in the PCL and SimCLR papers), and
report top-1 / top-5 on a held-out split.

Defaults, and why: SGD with momentum 0.9 and no weight decay, a cosine schedule, and a backbone
learning rate ten times smaller than the new head's (0.01 vs 0.1 at batch 64), because the
pretrained weights should move a little while the randomly initialised head must move a lot
(PCL fine-tunes its ImageNet semi-supervised models the same way, with a 100x gap at batch 256).
Views are random resized crops (and flips where the dataset allows them) without colour
distortion: fine-tuning learns the labels, not invariances.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..augment import MoCoV2Augment, eval_transform
from ..data import augment_setting, iterate_batches
from .encoder import EvaluationError, load_encoder, split


@dataclass(frozen=True)
class SemiResult:
    """Held-out accuracies in percent (``top5`` None with fewer than 5 classes)."""

    top1: float
    top5: float | None
    fraction: float
    labelled: int
    """Labelled train images used."""
    epochs: int
    split: str


def balanced_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced ``fraction`` of ``labels``: round(fraction * n_c) images of
    each class c, at least one; the same subset for the same seed."""
    if not 0 < fraction <= 1:
        raise EvaluationError(f"fraction must lie in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        take = max(1, int(round(fraction * len(members))))
        picked.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(picked))


def semi_supervised(
    checkpoint: str | os.PathLike[str], *, fraction: float, epochs: int = 30, seed: int = 0,
    split_name: str = "test", batch_size: int = 64, lr_backbone: float = 0.01, lr_head: float = 0.1,
    overrides: dict[str, Any] | None = None, random_init: bool = False, device: str | None = None,
) -> SemiResult:
    """Fine-tune ``checkpoint``'s judged encoder on ``fraction`` of the labelled train split; score
    on ``split_name`` (``val`` while searching, ``test`` for the final table). Deterministic given
    ``seed`` on CPU."""
    loaded = load_encoder(checkpoint, overrides=overrides, random_init=random_init, device=device)
    d, dev = loaded.data, loaded.device
    train, held_out = d.train, split(loaded, split_name)
    labels = train.labels.numpy()
    if (labels < 0).all():
        raise EvaluationError(f"dataset {d.name!r} has no labels in its train split: semi-supervised needs them")
    subset = torch.from_numpy(balanced_subset(labels, fraction, seed))
    torch.manual_seed(seed)
    backbone = loaded.encoder.backbone.train()
    head = torch.nn.Linear(loaded.encoder.feature_dim, d.num_classes).to(dev)
    opt = torch.optim.SGD([{"params": backbone.parameters(), "lr": lr_backbone},
                           {"params": head.parameters(), "lr": lr_head}], momentum=0.9, weight_decay=0.0)
    steps_per_epoch = max(1, math.ceil(len(subset) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    view = MoCoV2Augment(d.image_size, d.mean, d.std, scale=(augment_setting(loaded.cfg, "crop_min_scale"), 1.0),
                         jitter_p=0.0, gray_p=0.0, blur_p=0.0, flip_p=augment_setting(loaded.cfg, "flip_p"))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = subset[torch.randperm(len(subset), generator=gen)]
        for _, images, y in iterate_batches(train, order, batch_size, num_workers=loaded.cfg.data.num_workers):
            x = view(images.to(dev), gen).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(head(backbone(x)), y.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    backbone.eval()
    correct1 = correct5 = total = 0
    with torch.no_grad():
        for _, images, y in iterate_batches(held_out, None, 256, num_workers=loaded.cfg.data.num_workers):
            logits = head(backbone(eval_transform(images.to(dev), d.image_size, d.mean, d.std)))
            y = y.to(dev)
            top = logits.topk(min(5, d.num_classes), dim=1).indices
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y[:, None]).any(1).sum())
            total += len(y)
    return SemiResult(top1=100.0 * correct1 / total, top5=100.0 * correct5 / total if d.num_classes >= 5 else None,
                      fraction=fraction, labelled=len(subset), epochs=epochs, split=split_name)
