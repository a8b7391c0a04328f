"""The epoch loop: the phases of an epoch in order, the per-epoch record, and :func:`train_loop`.

Per epoch ``e`` (0-based):

1. ``e >= pcl.warmup_epochs``: the prototype step (:func:`~.prototypes.on_epoch_start`) on the
   momentum encoder's embeddings of the whole train set: from a pass (:func:`~.embed.embed`;
   ``clustering.features: pass``) or the keys the training steps wrote into the run's feature bank
   (:func:`~.embed.bank_features`; ``bank``).
2. one training epoch (:func:`~.epoch.train_epoch`).
3. every ``eval.every`` epochs and at the last: evaluation (:func:`~.evaluation.evaluate_epoch`).
4. the epoch's record (every metric of :mod:`pcl_tune.metrics`, NaN where not measured) ->
   ``metrics.csv``; checkpoint -> ``<out>/checkpoint/``; then ``callback(epoch, metrics, ckpt_dir)``,
   the hook a search's reporter plugs into. Nothing here knows about Tune.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from .. import distributed as dist_utils
from .. import metrics as M
from ..config import TrainConfig, config_from_dict
from .embed import bank_features, embed
from .epoch import train_epoch
from .evaluation import evaluate_epoch
from .prototypes import EpochClusters, on_epoch_start
from .state import RunState, is_new_best

Callback = Callable[[int, dict[str, Any], Path | None], None]


class Trainer:
    """Runs the epochs of one :class:`RunState`; keeps the embeddings one epoch hands the next."""

    def __init__(self, cfg: TrainConfig, out_dir: str | os.PathLike[str] | None = None) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.run = RunState.build(cfg)
        self._next_heads: Tensor | None = None

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """One full epoch (features, clustering, training, evaluation); returns its record.

        The train-set pass that builds the kNN bank at the end of an epoch also yields the key
        embeddings the next epoch clusters (the key encoder does not change in between), so an
        evaluated epoch costs one pass over the train set, not two. With a feature bank
        (``clustering.features: bank``) the clustering reads the bank instead, so an epoch that is
        not evaluated makes no pass at all, and the evaluation pass computes no head embeddings.
        """
        cfg, run = self.cfg, self.run
        t_start = time.perf_counter()
        clustering_on = epoch >= cfg.pcl.warmup_epochs
        evaluate_now = (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.epochs
        t = time.perf_counter()
        clusters: EpochClusters | None = None
        heads, self._next_heads = self._next_heads, None
        if clustering_on and run.bank is not None:
            heads = bank_features(run)
        elif clustering_on and heads is None:
            heads, _ = embed(run, run.data.train, head=True, backbone=False)
        t_feat = time.perf_counter() - t
        t = time.perf_counter()
        if clustering_on:
            assert heads is not None
            clusters = on_epoch_start(run, epoch, heads)
        t_clu = time.perf_counter() - t
        t = time.perf_counter()
        metrics: dict[str, Any] = {M.EPOCH_KEY: epoch + 1, **train_epoch(run, epoch, clusters)}
        t_train = time.perf_counter() - t
        t_eval = 0.0
        if evaluate_now:
            t = time.perf_counter()
            need_heads = run.bank is None and cfg.pcl.warmup_epochs <= epoch + 1 < cfg.epochs
            self._next_heads, train_bank = embed(run, run.data.train, head=need_heads, backbone=True)
            # The pass serves the kNN bank and, after warm-up, the next epoch's clustering: count it
            # as feature extraction whenever clustering will use it, as evaluation otherwise.
            if need_heads:
                t_feat += time.perf_counter() - t
                t = time.perf_counter()
            assert train_bank is not None
            metrics.update(evaluate_epoch(run, train_bank, clusters))
            t_eval = time.perf_counter() - t
        counts = clusters.counts if clusters else [0] * run.schedule.num_levels
        for i, c in enumerate(counts):
            metrics[f"num_clusters_{i}"] = c
        metrics[M.CLUSTERS_KEY] = ",".join(str(c) for c in counts) if clusters else ""
        metrics.update(time_features=t_feat, time_clustering=t_clu, time_train=t_train, time_eval=t_eval,
                       time_epoch=time.perf_counter() - t_start)
        return M.complete(metrics, run.schedule.num_levels, run.model.num_heads if run.model.multi_head else 0)


def format_epoch_line(m: dict[str, Any]) -> str:
    """One human-readable line per epoch; ``-`` where a metric was not measured."""
    def f(key: str, fmt: str = ".3f") -> str:
        v = m.get(key, math.nan)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    return (f"epoch {m['epoch']:>3}  loss {f('loss')}  inst {f('loss_inst')}/{f('acc_inst', '.1f')}%  "
            f"proto {f('loss_proto')}/{f('acc_proto', '.1f')}%  knn {f('knn_top1', '.2f')}%  "
            f"nmi {f('nmi')}  clusters [{m.get('clusters', '')}]  {f('time_epoch', '.1f')}s "
            f"(feat {f('time_features', '.1f')} clu {f('time_clustering', '.1f')} train {f('time_train', '.1f')} "
            f"eval {f('time_eval', '.1f')})")


def write_metrics_csv(history: list[dict[str, Any]], path: Path) -> None:
    """Write the per-epoch records atomically (columns in the registry's order)."""
    import pandas as pd

    tmp = path.with_suffix(".csv.tmp")
    pd.DataFrame([M.ordered(m) for m in history]).to_csv(tmp, index=False)
    os.replace(tmp, path)


def train_loop(
    config: TrainConfig | dict[str, Any],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    callback: Callback | None = None,
    resume_from: str | os.PathLike[str] | None = None,
    max_epochs: int | None = None,
    verbose: bool = True,
) -> list[dict[str, Any]]:
    """Run (or continue) one pretraining run; returns the per-epoch records.

    Args:
        config: a :class:`TrainConfig` or a dict accepted by :func:`config_from_dict`.
        out_dir: where ``metrics.csv`` and ``checkpoint/`` go (rank 0); None keeps nothing.
        callback: called on every rank after each epoch with (epoch, record, checkpoint folder or
            None): the hook a search's reporter plugs into.
        resume_from: a checkpoint folder or file to continue from.
        max_epochs: stop after this many epochs in this call (the schedule still spans
            ``config.epochs``); used to test exact resumption.
        verbose: print one line per epoch (rank 0).
    """
    cfg = config if isinstance(config, TrainConfig) else config_from_dict(config)
    trainer = Trainer(cfg, out_dir)
    run = trainer.run
    if resume_from is not None:
        run.resume(resume_from)
    main = dist_utils.is_main()
    if verbose and main:
        print(f"[pcl_tune] {run.data.summary()}; device {run.device}; world size {run.world}; "
              f"cluster schedule {run.schedule.spec()}", flush=True)
    end = cfg.epochs if max_epochs is None else min(cfg.epochs, run.start_epoch + max_epochs)
    for epoch in range(run.start_epoch, end):
        record = trainer.run_epoch(epoch)
        run.history.append(record)
        ckpt = run.save_checkpoint(trainer.out_dir, epoch, best=is_new_best(run.history, cfg.eval.best_metric))
        if trainer.out_dir is not None and main:
            write_metrics_csv(run.history, trainer.out_dir / "metrics.csv")
        if verbose and main:
            print(format_epoch_line(record), flush=True)
        if callback is not None:
            callback(epoch, record, ckpt)
    return run.history
