"""Pretraining: the PCL epoch loop for one run, in a plain process, a Tune trial or a Ray Train worker.

One unit per phase of the epoch, each readable on its own:

========================  ===========================================================
``state.py``              :class:`RunState` (model, optimiser + lr schedule, RNGs, data,
                          history) and its checkpoint; exact resume
``embed.py``              :func:`embed`: eval-view embeddings of a whole split, gathered by index
``prototypes.py``         :func:`on_epoch_start`: k-means per level + broadcast -> :class:`EpochClusters`
``epoch.py``              :func:`train_epoch`: MoCo steps with InfoNCE + prototype losses
``evaluation.py``         :func:`evaluate_epoch`: kNN on the val split, NMI/AMI of the clusters
``loop.py``               :class:`Trainer` (the phases in order), :func:`train_loop`
``cli.py``                ``python -m pcl_tune.train``
========================  ===========================================================

Distribution lives in :mod:`pcl_tune.distributed`; metric names in :mod:`pcl_tune.metrics`.
"""

from ..checkpoint import BEST_FILE, CHECKPOINT_DIR, CHECKPOINT_FILE, CheckpointError, checkpoint_history
from .cli import build_config, main
from .embed import embed
from .epoch import TrainingDiverged, train_epoch
from .evaluation import evaluate_epoch
from .loop import Callback, Trainer, format_epoch_line, train_loop, write_metrics_csv
from .prototypes import EpochClusters, on_epoch_start
from .state import RunState, resolve_device

__all__ = [
    "BEST_FILE", "CHECKPOINT_DIR", "CheckpointError", "CHECKPOINT_FILE", "Callback", "EpochClusters", "RunState", "Trainer", "TrainingDiverged",
    "build_config", "checkpoint_history", "embed", "evaluate_epoch", "format_epoch_line", "main", "on_epoch_start",
    "resolve_device", "train_epoch", "train_loop", "write_metrics_csv",
]
