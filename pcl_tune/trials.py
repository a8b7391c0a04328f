"""What runs inside a Tune trial: the two trial executors and the reporter that feeds Tune.

Both executors run the same loop (:func:`pcl_tune.train.train_loop`):

* ``direct``: the loop runs inside the Tune trial (CPU, one GPU or a fraction of one). Right for
  small trials: a Ray Train start-up costs ~25 s on a 2-core machine.
* ``train``: the trial builds and fits a ``TorchTrainer`` with N DDP workers (gloo on CPU, NCCL on
  GPU); metrics reach Tune per epoch through ``TuneReportCallback`` (Ray Train V2).

Both hand the run's checkpoint to Ray with every ``checkpoint_every``-th epoch's report and the
last one (:func:`tune_reporter`). What the ``train`` executor costs per epoch, and why it sets
Ray Train's controller poll interval (:data:`TRAIN_POLL_INTERVAL_S`) and quiets Ray Train's
per-report log lines (:func:`quiet_train_reports`), is measured in ``benchmarks/README.md``
(search overhead).

Ray is imported inside the functions: they run in Ray's processes, and this module stays
importable without starting anything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINT_FILE

TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
"""Ray Train V2's controller poll interval (seconds; Ray's default 2.0). The controller takes at
most one report per worker per poll and a worker's report queue holds one: a run whose epochs
are shorter than the interval waits for the poll at every epoch."""

TRAIN_POLL_INTERVAL_S = 0.5
"""The poll interval a ``train`` trial's Train run gets unless :data:`TRAIN_POLL_ENV` is set. With
Ray's 2 s every epoch shorter than 2 s waited for the poll (a 1.2 s epoch took 2 s). Polling costs
CPU: over 30 s, the controller and one worker used 0.15 s more CPU at 0.5 s than at 2 s, and
0.72 s more at 0.1 s (measured on 2 cores); 0.5 s makes epochs from 0.5 s up wait for nothing."""

TRAIN_LOG_ENV = "PCL_TUNE_TRAIN_LOG"
"""``verbose`` (or ``1``): show Ray Train's per-report INFO lines (every worker's metrics dict at
every epoch) on the console. By default they are DEBUG records (:func:`quiet_train_reports`)."""

TRAIN_REPORT_MODULES = (
    "ray.train.v2._internal.execution.context",  # "Reporting training result N: TrainingReport(...)"
    "ray.train.v2._internal.execution.storage",  # "Checkpoint successfully created at: ..."
    "ray.train._internal.storage",  # the same line from a Tune trial's own reports (direct executor)
)
"""The Ray Train modules whose ``logger`` writes an INFO line at every report on each worker (and,
the last one, in every direct-executor trial).
Their loggers are taken from the modules, not by name: Ray 2.60's ``context`` module names its
logger after its file path (``logging.getLogger(__file__)``), outside ``ray.train``, so Ray Train's
own ``LoggingConfig(log_level=...)`` does not reach it (it propagates to the worker's root logger,
whose console handler prints INFO)."""

TIMING_LOG_ENV = "PCL_TUNE_TIMING_LOG"
"""A file path: trials append timestamped events to it, one JSON object a line (the search-overhead
benchmark's breakdown). Unset, nothing is written."""


def _stage_checkpoint(checkpoint: Any, staging: Path) -> Path | None:
    """Copy a Ray checkpoint's files into a local staging folder; return it (None without one)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        if not (Path(d) / CHECKPOINT_FILE).is_file():
            return None
        shutil.copytree(d, staging, dirs_exist_ok=True)
        return staging


def settings_of(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's config settings: its params less the arm label (:data:`pcl_tune.space.ARM_KEY`)."""
    from .space import ARM_KEY

    return {k: v for k, v in params.items() if k != ARM_KEY}


def threads_for(cpus: float) -> int:
    """torch threads for a process that holds ``cpus`` logical CPUs (at least one)."""
    return max(1, int(cpus))


def timing_event(event: str, **fields: Any) -> None:
    """Append ``{"t": wall time, "event": event, "pid": ..., **fields}`` to the file named by
    :data:`TIMING_LOG_ENV` (nothing without it). Lines from several processes interleave whole."""
    path = os.environ.get(TIMING_LOG_ENV)
    if not path:
        return
    line = json.dumps({"t": time.time(), "event": event, "pid": os.getpid(), **fields}, default=str) + "\n"
    with open(path, "a") as f:
        f.write(line)


def hands_checkpoint(epoch: int, checkpoint_every: int, epochs: int | None) -> bool:
    """Whether epoch ``epoch`` (0-based) hands its checkpoint to Ray: every ``checkpoint_every``-th
    epoch (1-based count) and the last of ``epochs``."""
    done = epoch + 1
    return done % checkpoint_every == 0 or (epochs is not None and done >= epochs)


def tune_reporter(report: Callable[..., None], make_checkpoint: Callable[[str], Any],
                  restored: Path | None, *, checkpoint_every: int = 1, epochs: int | None = None,
                  trial: tuple[str, dict[str, Any]] | None = None,
                  ) -> Callable[[int, dict[str, Any], Path | None], None]:
    """The loop's per-epoch callback for a Tune trial or a Train worker, with Tune's quirks handled.

    * A checkpoint goes with the report of every ``checkpoint_every``-th epoch and of the last
      (``epochs``, the run's length), as :func:`hands_checkpoint` says; other epochs report
      metrics only. The loop still writes its local checkpoint every epoch: only what Ray copies
      to storage changes. A trial restored later goes on from the last checkpoint handed over.

    * Keys in one fixed order (:func:`pcl_tune.metrics.ordered`): Tune's CSV logger, resuming a
      trial, appends to the old ``progress.csv`` under its header but maps columns by the first
      new result's key order, so a different order put values under the wrong columns.
    * Replay of the restored epoch: a driver killed between a trial's report and the write of its
      log loses that epoch's row, and Tune then restores the trial from that very epoch's
      checkpoint. The restored epoch's record (saved beside the checkpoint) is reported again,
      without a checkpoint, before training goes on; readers keep the last row of each epoch.
    * With ``trial`` (the trial id and its searched settings), every checkpoint handed over
      carries ``lineage.json`` (:data:`pcl_tune.checkpoint.CHECKPOINT_LINEAGE`): the restored
      checkpoint's entries up to its epoch, then one entry per epoch trained here.
    """
    from .checkpoint import checkpoint_lineage, write_checkpoint_lineage
    from .metrics import ordered
    from .train import checkpoint_history

    node = _node_id()
    history = checkpoint_history(restored) if restored is not None else []
    restored_epoch = int(history[-1]["epoch"]) if history else 0
    carried = [e for e in checkpoint_lineage(restored) if e["epoch"] <= restored_epoch] if restored else []
    lineage = {e["epoch"]: e for e in carried}

    def callback(epoch: int, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        handed = ckpt_dir is not None and hands_checkpoint(epoch, checkpoint_every, epochs)
        if trial is not None and epoch + 1 > restored_epoch:
            lineage[epoch + 1] = {"epoch": epoch + 1, "trial": trial[0], "settings": trial[1]}
        if handed and trial is not None and ckpt_dir is not None:
            write_checkpoint_lineage(ckpt_dir, [lineage[k] for k in sorted(lineage) if k <= epoch + 1])
        checkpoint = make_checkpoint(str(ckpt_dir)) if handed else None
        timing_event("epoch_end", epoch=epoch + 1, time_epoch=metrics.get("time_epoch"), checkpoint=handed)
        report({**_clean(ordered(metrics)), "node_id": node}, checkpoint=checkpoint)
        timing_event("reported", epoch=epoch + 1, checkpoint=handed)

    if history:
        callback(restored_epoch - 1, history[-1], None)
    return callback


def direct_trial(params: dict[str, Any], *, fixed: dict[str, Any], threads: int) -> None:
    """Tune function trainable: one PCL run inside the trial process, reporting every epoch."""
    import torch
    from ray import tune

    from .config import config_from_dict, merge
    from .train import train_loop

    timing_event("trial_start", executor="direct")
    quiet_train_reports()
    torch.set_num_threads(threads)
    cfg = config_from_dict(merge(merge(fixed, settings_of(params)), {"threads": threads, "progress": False}))
    with tempfile.TemporaryDirectory(prefix="pcl_tune_trial_") as tmp:
        work = Path(tmp)
        resume = _stage_checkpoint(tune.get_checkpoint(), work / "restore")
        report = tune_reporter(tune.report, tune.Checkpoint.from_directory, resume,
                               checkpoint_every=cfg.checkpoint_every, epochs=cfg.epochs,
                               trial=(tune.get_context().get_trial_id(), settings_of(params)))
        timing_event("loop_start")
        train_loop(cfg, out_dir=work / "run", callback=report, resume_from=resume, verbose=False)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker function: the same loop under DDP; rank 0 writes the checkpoint."""
    import ray.train
    import torch

    from .config import config_from_dict
    from .train import train_loop

    timing_event("worker_start", rank=ray.train.get_context().get_world_rank())
    quiet_train_reports()
    torch.set_num_threads(int(loop_config["threads"]))
    cfg = config_from_dict(loop_config["config"])
    with tempfile.TemporaryDirectory(prefix="pcl_tune_worker_") as tmp:
        work = Path(tmp)
        resume = _stage_checkpoint(ray.train.get_checkpoint(), work / "restore")
        trial = loop_config.get("trial")
        report = tune_reporter(ray.train.report, ray.train.Checkpoint.from_directory, resume,
                               checkpoint_every=cfg.checkpoint_every, epochs=cfg.epochs,
                               trial=(str(trial[0]), dict(trial[1])) if trial else None)
        timing_event("loop_start")
        train_loop(cfg, out_dir=work / "run", callback=report, resume_from=resume, verbose=False)


def train_trial(params: dict[str, Any], *, fixed: dict[str, Any], workers: int, cpus_per_worker: float,
                gpus_per_worker: float, train_storage: str, max_failures: int) -> None:
    """Tune function trainable that fits a ``TorchTrainer`` with ``workers`` DDP workers.

    The Train run is named after the Tune trial, so a restored trial's Train run resumes from
    its own latest checkpoint (Ray Train V2 reloads it from storage). Its controller polls the
    workers every :data:`TRAIN_POLL_INTERVAL_S` seconds unless ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``
    is set (Ray's 2 s default made every epoch shorter than 2 s last 2 s).
    """
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from .config import merge

    timing_event("trial_start", executor="train")
    # Read by the TorchTrainer here and passed on to its controller and workers (Ray Train V2
    # propagates its own environment variables when they are set in this process).
    os.environ.setdefault(TRAIN_POLL_ENV, str(TRAIN_POLL_INTERVAL_S))
    use_gpu = gpus_per_worker > 0
    threads = threads_for(cpus_per_worker)
    cfg = merge(merge(fixed, settings_of(params)), {"threads": threads, "progress": False})
    trial_id = tune.get_context().get_trial_id()
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg, "threads": threads, "trial": [trial_id, settings_of(params)]},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"trial_{trial_id}", storage_path=train_storage,
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    timing_event("fit_start")
    trainer.fit()
    timing_event("fit_end")


def train_reports_verbose() -> bool:
    """Whether :data:`TRAIN_LOG_ENV` asks for Ray Train's per-report INFO lines on the console."""
    return os.environ.get(TRAIN_LOG_ENV, "").strip().lower() in ("1", "true", "yes", "verbose", "info")


class _InfoToDebug(logging.Filter):
    """A logger filter that makes the logger's own INFO records DEBUG records: passed on as DEBUG
    where the logger is enabled for DEBUG (Ray Train's ``ray.train`` loggers: their system log
    files take them, their console handler does not), dropped where it is not, as a
    ``logger.debug`` call would be."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO:
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


_INFO_TO_DEBUG = _InfoToDebug()


def quiet_train_reports(verbose: bool | None = None) -> bool:
    """In this process, make the INFO lines that Ray Train writes at every report (each worker's
    whole metrics dict, every epoch: :func:`train_report_loggers`) DEBUG records, so the console
    keeps Tune's trial table and the search's own lines. Where Ray Train logs DEBUG, its system log
    files (``<ray session>/logs/train/ray-train-sys-worker-*.log``) still get them.

    Args:
        verbose: keep them INFO (undo an earlier call); default :func:`train_reports_verbose`
            (``PCL_TUNE_TRAIN_LOG=verbose``).

    Returns:
        Whether the lines are now DEBUG. Called by each Train worker (:func:`train_worker`).
    """
    if verbose is None:
        verbose = train_reports_verbose()
    for logger in train_report_loggers():
        logger.removeFilter(_INFO_TO_DEBUG)
        if not verbose:
            logger.addFilter(_INFO_TO_DEBUG)
    return not verbose


def train_report_loggers() -> list[logging.Logger]:
    """The loggers of :data:`TRAIN_REPORT_MODULES` (each module's ``logger``; by the module's name
    where it has none). Imports the modules; starts nothing."""
    import importlib

    out = []
    for name in TRAIN_REPORT_MODULES:
        try:
            logger = getattr(importlib.import_module(name), "logger", None)
        except ImportError:  # another Ray version: nothing to quiet there
            continue
        out.append(logger if isinstance(logger, logging.Logger) else logging.getLogger(name))
    return out


def _node_id() -> str:
    """The Ray node this process runs on (reported with every result: where did the trial run?)."""
    import ray

    try:
        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return ""


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    """Plain Python scalars only (Tune's JSON logger and Optuna want floats, not tensors)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        else:
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                out[k] = str(v)
    return out
