"""The experiment folder a search writes and the analysis reads: its file names, its space record,
and the one definition of "the best trial".

``<storage-path>/<name>/`` (a folder, or a prefix on object storage: :mod:`pcl_tune.storage`) holds:

* ``search_space.yaml``: a copy of the space file the search ran (``--resume`` reads it back);
* ``space.json``: :meth:`pcl_tune.space.SearchSpace.to_json` plus a ``run`` record (executor,
  workers, command line, start time);
* ``optuna.db``: the Optuna study (TPE searches);
* Tune's own files: ``experiment_state-*.json``, ``tuner.pkl`` and one ``trial_<id>/`` folder per
  trial (``params.json``, ``result.json``, ``progress.csv``, checkpoints, ``error.txt``);
* ``train_runs/``: Ray Train's run folders (train executor);
* PBT searches: ``pbt_lineage/`` (every trial's start and every clone, :mod:`pcl_tune.pbt`),
  ``pbt_clones/<trial>/`` (the donor checkpoint a clone restored from) and Ray's own
  ``pbt_global.txt`` / ``pbt_policy_*.txt``;
* at the end: ``trials.csv``, ``best.yaml`` (the best trial's full config) and the report;
  ``downstream.csv`` once ``python -m pcl_tune.evaluate --best`` has judged the best trials.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import merge, read_yaml
from .space import ARM_KEY, SearchSpace, SpaceError

SPACE_YAML = "search_space.yaml"
SPACE_JSON = "space.json"
OPTUNA_DB = "optuna.db"
TRAIN_RUNS = "train_runs"
TRIALS_CSV = "trials.csv"
BEST_YAML = "best.yaml"
DOWNSTREAM_CSV = "downstream.csv"
TRIAL_PREFIX = "trial_"
RESULT_JSON = "result.json"
PROGRESS_CSV = "progress.csv"
"""Tune's per-trial results, inside each ``trial_<id>/``."""
REPORT_FILES = ("report.html", "report.md", "analysis")
"""What the analysis writes into an experiment folder (uploaded beside a remote one's trials)."""


def write_space_json(exp_dir: Path, space: SearchSpace, run: dict[str, Any]) -> Path:
    """Write ``space.json``: the resolved space and the ``run`` record beside it."""
    path = exp_dir / SPACE_JSON
    path.write_text(json.dumps({**space.to_json(), "run": run}, indent=2, default=str))
    return path


def read_space_json(exp_dir: Path) -> tuple[SearchSpace, dict[str, Any]]:
    """(space, run record) of an experiment folder; raises :class:`SpaceError` naming the file.

    Reads the format of earlier versions too, whose run fields (``executor``, ``command``, ...)
    stood at the top level.
    """
    path = exp_dir / SPACE_JSON
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SpaceError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{path}: expected a JSON object, got {type(data).__name__}")
    run = data.get("run") if isinstance(data.get("run"), dict) else {
        k: data[k] for k in ("executor", "workers_per_trial", "smoke", "command", "started") if k in data}
    return SearchSpace.from_json(data, path=path), run


def read_space_yaml(exp_dir: Path) -> dict[str, Any]:
    """The copied space file as a dict ({} when absent); YAML errors raise ConfigError."""
    path = exp_dir / SPACE_YAML
    if not path.is_file():
        return {}
    data = read_yaml(path.read_text(), str(path))
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class Best:
    """The best (trial, epoch) of a search for one metric."""

    trial_id: str
    epoch: int
    value: float
    metric: str
    mode: str


def best_epoch(epochs: pd.DataFrame, metric: str, mode: str, score: str = "best",
               max_t: int | None = None) -> Best | None:
    """The best trial by its score (``objective.score``) and the epoch that score comes from.

    ``score="best"``: the best value of ``metric`` over every epoch of every trial. ``score="last"``:
    each trial is scored by its last epoch with a finite value (what Optuna is told and Tune's
    ``scope="last"`` compares), and the best of those wins; with ``max_t``, among the trials that
    reached it when any did (a trial ASHA stopped at epoch 6 is not compared with finished ones by
    its epoch-6 value: Optuna holds it as pruned). Ties go to the earliest row, so to the trial that
    started first.

    ``epochs`` has one row per (trial, epoch) with columns ``trial_id``, ``epoch`` and ``metric``,
    in trial start order. Returns None when no row has a finite value.
    """
    if score not in ("best", "last"):
        raise ValueError(f"score must be 'best' or 'last', got {score!r}")
    if metric not in epochs.columns or epochs.empty:
        return None
    values = pd.to_numeric(epochs[metric], errors="coerce")
    values = values[np.isfinite(values)]
    if values.empty:
        return None
    if score == "last":  # each trial's last finite row (a replayed epoch's row is its last copy)
        last = epochs.loc[values.index].groupby("trial_id", sort=False).tail(1).index
        values = values.loc[last]
        if max_t is not None:
            reached = pd.to_numeric(epochs.loc[values.index, "epoch"], errors="coerce") >= max_t
            if reached.any():
                values = values[reached.to_numpy()]
    idx = values.idxmax() if mode == "max" else values.idxmin()
    row = epochs.loc[idx]
    return Best(str(row["trial_id"]), int(row["epoch"]), float(values.loc[idx]), metric, mode)


def best_config(fixed: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The full (nested) config of a trial: the space's fixed settings merged with its parameters
    (less the arm label of an ablation or baseline trial, which is not a setting)."""
    return merge(fixed, {k: v for k, v in params.items() if k != ARM_KEY})


def write_best_yaml(path: Path, fixed: dict[str, Any], params: dict[str, Any]) -> Path:
    """Write a trial's full config where ``python -m pcl_tune.train --config`` can read it."""
    import yaml

    path.write_text(yaml.safe_dump(best_config(fixed, params), sort_keys=False))
    return path
