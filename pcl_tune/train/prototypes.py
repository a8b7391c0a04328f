"""The prototype step at the start of an epoch: k-means of the train set's momentum embeddings at
the schedule's counts (rank 0), broadcast to every rank, with PCL's concentration per level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .. import distributed as dist_utils
from ..clustering import ClusterLevel, cluster
from .state import RunState


@dataclass
class EpochClusters:
    """The clustering of one epoch, on the training device, identical on every rank.

    ``levels`` is the clustering the metrics report (NMI, ...); with ``pcl.proto_head: all``,
    ``heads`` holds every head's levels (``heads[0]`` is ``levels``) and the prototype loss uses
    each head's own."""

    levels: list[ClusterLevel]
    counts: list[int]
    heads: list[list[ClusterLevel]] | None = None


def on_epoch_start(run: RunState, epoch: int, features: Tensor) -> EpochClusters:
    """Cluster ``features`` (N, D), the momentum encoder's embeddings of the train set, for ``epoch``
    (with ``pcl.proto_head: all``, (N, H * D): each head's columns clustered on their own)."""
    if run.model.multi_head and run.cfg.pcl.proto_head == "all":
        per_head = [_cluster(run, epoch, f.contiguous()) for f in run.model.split_heads(features)]
        return EpochClusters(per_head[0].levels, per_head[0].counts, [c.levels for c in per_head])
    return _cluster(run, epoch, features)


def _cluster(run: RunState, epoch: int, features: Tensor) -> EpochClusters:
    cfg = run.cfg
    counts = run.schedule.counts(epoch, num_epochs=cfg.epochs, warmup_epochs=cfg.pcl.warmup_epochs,
                                 max_count=features.shape[0])
    c = cfg.clustering
    levels: list[ClusterLevel] = []
    if dist_utils.is_main():
        levels = cluster(features.float().cpu(), counts, temperature=cfg.pcl.proto_temperature, seed=cfg.seed,
                         niter=c.niter, nredo=c.nredo, max_points_per_centroid=c.max_points_per_centroid,
                         min_points_per_centroid=c.min_points_per_centroid, backend=c.backend)
    out = []
    dev = run.device
    for i in range(len(counts)):
        lv = levels[i] if levels else None
        a = dist_utils.broadcast_tensor(lv.assignment.to(dev) if lv else None, device=dev)
        cen = dist_utils.broadcast_tensor(lv.centroids.to(dev) if lv else None, device=dev)
        phi = dist_utils.broadcast_tensor(lv.concentration.to(dev) if lv else None, device=dev)
        out.append(ClusterLevel(a, cen, phi, lv.objective if lv else math.nan, lv.backend if lv else ""))
    return EpochClusters(out, counts)
