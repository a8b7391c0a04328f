"""The evaluation phase of an epoch: kNN of the val split against the train bank, and agreement
of each clustering level with the train labels (labels are used here only, never in training).
"""

from __future__ import annotations

import warnings

import numpy as np
from torch import Tensor

from ..evaluate import cluster_agreement, fewshot_episodes, knn_accuracy
from .embed import embed
from .prototypes import EpochClusters
from .state import RunState


def evaluate_epoch(run: RunState, train_feats: Tensor, clusters: EpochClusters | None) -> dict[str, float]:
    """``knn_top1`` and ``fewshot_5w{1,5}s`` (%), and with clusters ``nmi``/``ami`` (means over levels) and ``nmi_i``/``ami_i``.

    Args:
        train_feats: (N, F) L2-normalised backbone features of the train split (the kNN bank).
    """
    cfg, d = run.cfg, run.data
    out: dict[str, float] = {}
    _, val_feats = embed(run, d.val, head=False, backbone=True)
    assert val_feats is not None
    out["knn_top1"] = knn_accuracy(val_feats, d.val.labels.to(run.device), train_feats,
                                   d.train.labels.to(run.device), d.num_classes, k=cfg.eval.knn_k, t=cfg.eval.knn_t)
    if cfg.eval.fewshot_episodes > 0:
        # Episodes over classes pretraining never saw where the dataset has them (mini-ImageNet's 16
        # validation classes); else over the val split's images of the training classes.
        fs_feats, fs_labels = val_feats, d.val.labels
        if d.fewshot is not None:
            fs_feats = embed(run, d.fewshot, head=False, backbone=True)[1]
            fs_labels = d.fewshot.labels
        assert fs_feats is not None
        out.update(fewshot_metrics(fs_feats, fs_labels, episodes=cfg.eval.fewshot_episodes, seed=cfg.seed))
    if clusters is not None:
        nmis, amis = [], []
        for i, lv in enumerate(clusters.levels):
            nmi, ami = cluster_agreement(lv.assignment, d.train.labels)
            out[f"nmi_{i}"], out[f"ami_{i}"] = nmi, ami
            nmis.append(nmi)
            amis.append(ami)
        out["nmi"], out["ami"] = float(np.mean(nmis)), float(np.mean(amis))
    return out


FEWSHOT_SETTINGS: dict[str, int] = {"fewshot_5w1s": 1, "fewshot_5w5s": 5}
"""Per-epoch few-shot metric -> shots (5-way, 15 queries per class)."""


def fewshot_metrics(features: Tensor, labels: Tensor, *, episodes: int, seed: int) -> dict[str, float]:
    """The per-epoch few-shot metrics (nearest class mean; cheap): {} when ``episodes`` is 0 or the
    split has fewer than 5 classes with 1 + 15 (5 + 15) images each."""
    out: dict[str, float] = {}
    if episodes <= 0:
        return out
    for name, shots in FEWSHOT_SETTINGS.items():
        try:
            with warnings.catch_warnings():  # small classes are skipped: expected on small val splits
                warnings.simplefilter("ignore", UserWarning)
                out[name] = fewshot_episodes(features, labels, n_way=5, k_shot=shots, n_query=15, episodes=episodes,
                                             classifier="prototype", seed=seed).mean
        except ValueError:  # too few classes: the metric stays NaN
            pass
    return out
