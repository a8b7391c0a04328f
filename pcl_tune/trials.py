"""What runs inside a Tune trial: the two trial executors and the reporter that feeds Tune.

Both executors run the same loop (:func:`pcl_tune.train.train_loop`):

* ``direct``: the loop runs inside the Tune trial (CPU, one GPU or a fraction of one). Right for
  small trials: a Ray Train start-up costs ~25 s on a 2-core machine.
* ``train``: the trial builds and fits a ``TorchTrainer`` with N DDP workers (gloo on CPU, NCCL on
  GPU); metrics reach Tune per epoch through ``TuneReportCallback`` (Ray Train V2).

Ray is imported inside the functions: they run in Ray's processes, and this module stays
importable without starting anything.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINT_FILE


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


def tune_reporter(report: Callable[..., None], make_checkpoint: Callable[[str], Any],
                  restored: Path | None) -> Callable[[int, dict[str, Any], Path | None], None]:
    """The loop's per-epoch callback for a Tune trial or a Train worker, with Tune's quirks handled.

    * Keys in one fixed order (:func:`pcl_tune.metrics.ordered`): Tune's CSV logger, resuming a
      trial, appends to the old ``progress.csv`` under its header but maps columns by the first
      new result's key order, so a different order put values under the wrong columns.
    * Replay of the restored epoch: a driver killed between a trial's report and the write of its
      log loses that epoch's row, and Tune then restores the trial from that very epoch's
      checkpoint. The restored epoch's record (saved beside the checkpoint) is reported again,
      without a checkpoint, before training goes on; readers keep the last row of each epoch.
    """
    from .metrics import ordered
    from .train import checkpoint_history

    node = _node_id()

    def callback(epoch: int, metrics: dict[str, Any], ckpt_dir: Path | None) -> None:
        checkpoint = make_checkpoint(str(ckpt_dir)) if ckpt_dir is not None else None
        report({**_clean(ordered(metrics)), "node_id": node}, checkpoint=checkpoint)

    if restored is not None:
        history = checkpoint_history(restored)
        if history:
            callback(int(history[-1]["epoch"]) - 1, history[-1], None)
    return callback


def direct_trial(params: dict[str, Any], *, fixed: dict[str, Any], threads: int) -> None:
    """Tune function trainable: one PCL run inside the trial process, reporting every epoch."""
    import torch
    from ray import tune

    from .config import merge
    from .train import train_loop

    torch.set_num_threads(threads)
    cfg = merge(merge(fixed, settings_of(params)), {"threads": threads, "progress": False})
    with tempfile.TemporaryDirectory(prefix="pcl_tune_trial_") as tmp:
        work = Path(tmp)
        resume = _stage_checkpoint(tune.get_checkpoint(), work / "restore")
        report = tune_reporter(tune.report, tune.Checkpoint.from_directory, resume)
        train_loop(cfg, out_dir=work / "run", callback=report, resume_from=resume, verbose=False)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker function: the same loop under DDP; rank 0 writes the checkpoint."""
    import ray.train
    import torch

    from .train import train_loop

    torch.set_num_threads(int(loop_config["threads"]))
    with tempfile.TemporaryDirectory(prefix="pcl_tune_worker_") as tmp:
        work = Path(tmp)
        resume = _stage_checkpoint(ray.train.get_checkpoint(), work / "restore")
        report = tune_reporter(ray.train.report, ray.train.Checkpoint.from_directory, resume)
        train_loop(loop_config["config"], out_dir=work / "run", callback=report, resume_from=resume, verbose=False)


def train_trial(params: dict[str, Any], *, fixed: dict[str, Any], workers: int, cpus_per_worker: float,
                gpus_per_worker: float, train_storage: str, max_failures: int) -> None:
    """Tune function trainable that fits a ``TorchTrainer`` with ``workers`` DDP workers.

    The Train run is named after the Tune trial, so a restored trial's Train run resumes from
    its own latest checkpoint (Ray Train V2 reloads it from storage).
    """
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from .config import merge

    use_gpu = gpus_per_worker > 0
    threads = threads_for(cpus_per_worker)
    cfg = merge(merge(fixed, settings_of(params)), {"threads": threads, "progress": False})
    trial_id = tune.get_context().get_trial_id()
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": cfg, "threads": threads},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"trial_{trial_id}", storage_path=train_storage,
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    trainer.fit()


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
