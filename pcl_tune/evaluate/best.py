"""Downstream evaluation of a search's best trials: ``python -m pcl_tune.evaluate --best RUN_DIR``.

Trials are ranked by their score (the search's metric, mode and ``objective.score`` from
``space.json``: the value at a trial's last epoch, or at its best), as Optuna and the analysis rank
them; each is judged from the weights of that epoch (the latest checkpoint's for ``last``; for
``best``, ``best.pt``, which every trial keeps beside its latest checkpoint), on the test split,
next to a random-initialised encoder of the same architecture. The table goes to ``RUN_DIR/downstream.csv``, which the analysis report
shows.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from .. import experiment_folder as F
from ..checkpoint import BEST_FILE, CHECKPOINT_FILE
from .encoder import EvaluationError


def trial_best_values(exp_dir: Path, metric: str, mode: str, score: str = "best") -> pd.DataFrame:
    """One row per trial folder with a result: ``trial_id``, ``trial_dir``, ``best_value`` and
    ``best_epoch``: the trial's score and the epoch it comes from (its best or its last, ``score``)."""
    rows = []
    for d in sorted(exp_dir.glob(f"{F.TRIAL_PREFIX}*")):
        progress = d / F.PROGRESS_CSV
        if not d.is_dir() or not progress.is_file() or progress.stat().st_size == 0:
            continue
        df = pd.read_csv(progress)
        if metric not in df.columns or "epoch" not in df.columns:
            continue
        best = F.best_epoch(df.assign(trial_id=d.name.removeprefix(F.TRIAL_PREFIX)), metric, mode, score)
        if best is not None:
            rows.append({"trial_id": best.trial_id, "trial_dir": d, "best_value": best.value, "best_epoch": best.epoch,
                         "last_epoch": int(pd.to_numeric(df["epoch"], errors="coerce").max())})
    return pd.DataFrame(rows)


def best_checkpoint(exp_dir: Path, trial_dir: Path, file: str = BEST_FILE) -> Path | None:
    """The trial's ``best.pt`` (or ``file``, e.g. ``checkpoint.pt``) in its newest checkpoint folder,
    or its Ray Train run's; None when there is none."""
    trial = trial_dir.name
    for root in (trial_dir, exp_dir / F.TRAIN_RUNS / trial):
        found = sorted(root.glob(f"checkpoint_*/{file}"))
        if found:
            return found[-1]
    return None


def evaluate_best(exp_dir: Path, args: argparse.Namespace,
                  progress: Callable[[str], None] = lambda s: None) -> tuple[list[dict[str, Any]], Path]:
    """Evaluate the ``args.top`` best trials and a random-init baseline; write ``downstream.csv``."""
    from .cli import evaluate_checkpoint

    if not (exp_dir / F.SPACE_JSON).is_file():
        raise EvaluationError(f"{exp_dir}: not a pcl_tune experiment folder (no {F.SPACE_JSON})")
    space, _ = F.read_space_json(exp_dir)
    ranked = trial_best_values(exp_dir, space.metric, space.mode, space.score)
    weights = CHECKPOINT_FILE if space.score == "last" else BEST_FILE  # the scored epoch's weights
    if ranked.empty:
        raise EvaluationError(f"{exp_dir}: no trial reported {space.metric} yet")
    ranked = ranked.sort_values("best_value", ascending=space.mode == "min", kind="stable")
    if space.score == "last":  # finished trials first, as the search and the analysis rank them
        ranked = ranked.sort_values("last_epoch", key=lambda e: e < space.resolved_max_t(), kind="stable")
    ranked = ranked.head(args.top)
    rows: list[dict[str, Any]] = []
    first_ckpt: Path | None = None
    for rank, t in enumerate(ranked.itertuples(), 1):
        ckpt = best_checkpoint(exp_dir, t.trial_dir, weights)
        if ckpt is None:
            progress(f"{t.trial_dir.name}: no {weights} (a search run before best-epoch checkpoints were kept); skipped")
            continue
        first_ckpt = first_ckpt or ckpt
        for r in evaluate_checkpoint(ckpt, args, progress):
            rows.append({"rank": rank, "trial": t.trial_dir.name, f"search_{space.metric}": t.best_value,
                         "best_epoch": t.best_epoch, **r})
    if first_ckpt is None:
        raise EvaluationError(f"{exp_dir}: none of the best {args.top} trials has a {weights}")
    baseline = argparse.Namespace(**{**vars(args), "random_init": True})
    for r in evaluate_checkpoint(first_ckpt, baseline, progress):
        rows.append({"rank": None, "trial": "random init", f"search_{space.metric}": None, "best_epoch": None, **r})
    path = exp_dir / F.DOWNSTREAM_CSV
    pd.DataFrame(rows).to_csv(path, index=False)
    return rows, path
