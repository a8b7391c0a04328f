"""Warm starts: a new search begins from what earlier searches learned (``--warm-start RUN_DIR ...``).

Two things carry over from each earlier experiment folder:

* **Its best configurations**, evaluated first: the ``top`` trials by score (finished trials before
  stopped ones, then by the earlier space's ``objective.score``), restricted to the new space's
  parameters. A configuration with a value the new space cannot take, or missing one of its
  unconditional parameters, is left out, with a note naming the parameter.
* **Its trials, told to the new Optuna study**, when the two spaces are compatible: the same
  searched parameters with the same distributions and conditions, and the same objective (metric
  and mode). Finished trials go in as COMPLETE with their score; stopped ones as PRUNED with their
  per-epoch values (or as COMPLETE with their last value, under ``searcher.stopped_trials:
  complete``), so TPE starts informed. The MoCo v2 baseline and errored trials are not told, nor
  the trials of an ablation.

Incompatible spaces are not an error: one note names the difference, and only the configurations
carry over. A folder that is not an experiment is (:class:`~pcl_tune.space.SpaceError`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from . import experiment_folder as F
from .space import ARM_KEY, BASELINE_ARM, SearchSpace, SpaceError, _condition_holds


@dataclass
class PastTrial:
    """One trial of an earlier search, as the new study is told it."""

    params: dict[str, Any]
    state: str
    """``COMPLETE`` or ``PRUNED``."""
    value: float
    intermediate: dict[int, float] = field(default_factory=dict)


@dataclass
class WarmStart:
    """What carries over: configurations to evaluate first, trials for Optuna, and notes for the user."""

    points: list[dict[str, Any]] = field(default_factory=list)
    trials: list[PastTrial] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the console and the dry run."""
        return (f"warm start from {', '.join(self.sources)}: {len(self.points)} configuration(s) evaluated first, "
                f"{len(self.trials)} earlier trial(s) told to TPE")


def _trial_rows(exp_dir: Path, old: SearchSpace) -> list[dict[str, Any]]:
    """Each readable trial of an experiment: params, per-epoch objective, finished or not."""
    rows = []
    max_t = old.resolved_max_t()
    for d in sorted(exp_dir.glob(f"{F.TRIAL_PREFIX}*")):
        progress, params_file = d / F.PROGRESS_CSV, d / "params.json"
        if not progress.is_file() or not params_file.is_file() or progress.stat().st_size == 0:
            continue
        try:
            params = json.loads(params_file.read_text())
            df = pd.read_csv(progress)
        except (OSError, ValueError):
            continue
        if old.metric not in df.columns or "epoch" not in df.columns or not isinstance(params, dict):
            continue
        values = pd.to_numeric(df[old.metric], errors="coerce")
        per_epoch = {int(e): float(v) for e, v in zip(df["epoch"], values) if math.isfinite(v)}
        if not per_epoch:
            continue
        budget = min(max_t, int(params.get("epochs", max_t)))
        last_epoch = max(per_epoch)
        best = max(per_epoch.values()) if old.mode == "max" else min(per_epoch.values())
        score = per_epoch[last_epoch] if old.score == "last" else best
        rows.append({"params": params, "per_epoch": per_epoch, "finished": int(df["epoch"].max()) >= budget,
                     "score": score, "last": per_epoch[last_epoch]})
    return rows


def _difference(old: SearchSpace, new: SearchSpace) -> str | None:
    """Why TPE cannot take ``old``'s trials as ``new``'s (None when it can)."""
    if (old.metric, old.mode) != (new.metric, new.mode):
        return f"its objective is {old.mode} {old.metric}, this search's {new.mode} {new.metric}"
    a = {p.name: p.to_json() for p in old.params}
    b = {p.name: p.to_json() for p in new.params}
    if set(a) != set(b):
        only_old, only_new = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        parts = ([f"only there: {', '.join(only_old)}"] if only_old else []) + \
                ([f"only here: {', '.join(only_new)}"] if only_new else [])
        return "its searched parameters differ (" + "; ".join(parts) + ")"
    for name in b:
        if a[name] != b[name]:
            return f"search.{name} differs: {old.param(name).describe()} there, {new.param(name).describe()} here"  # type: ignore[union-attr]
    return None


def _point(settings: dict[str, Any], new: SearchSpace) -> tuple[dict[str, Any] | None, str | None]:
    """The new space's parameters as an earlier trial had them (``settings``: its full flat config),
    or (None, why not). Conditional parameters whose condition fails are left to the searcher."""
    point: dict[str, Any] = {}
    for p in new.params:
        if not _condition_holds(p, point, settings):
            continue
        if p.name in settings:
            if not p.contains(settings[p.name]):
                return None, f"search.{p.name} = {settings[p.name]!r} is outside {p.describe()}"
            point[p.name] = settings[p.name]
        else:
            return None, f"search.{p.name} is no setting there"
    return point, None


def load_warm_start(run_dirs: list[str | Path], space: SearchSpace, *, top: int = 3) -> WarmStart:
    """What ``run_dirs`` (earlier experiment folders) give a new search over ``space``."""
    if top < 0:
        raise SpaceError(f"--warm-start-top {top}: expected an integer >= 0")
    ws = WarmStart()
    for run_dir in run_dirs:
        exp = Path(run_dir).expanduser()
        if not (exp / F.SPACE_JSON).is_file():
            raise SpaceError(f"--warm-start {run_dir}: not a pcl_tune experiment folder (no {F.SPACE_JSON})")
        old, _ = F.read_space_json(exp)
        ws.sources.append(str(run_dir))
        rows = [r for r in _trial_rows(exp, old) if r["params"].get(ARM_KEY) != BASELINE_ARM]
        if not rows:
            ws.notes.append(f"{run_dir}: no trial with a {old.metric} value to start from")
            continue
        base = old.base_config().flat()  # a trial's full settings: the earlier space's fixed ones + its params
        sign = -1.0 if old.mode == "max" else 1.0
        ranked = sorted(rows, key=lambda r: (not r["finished"], sign * r["score"]))
        taken, left_out = 0, []
        for r in ranked:
            if taken >= top:
                break
            point, why = _point({**base, **r["params"]}, space)
            if point is None:
                left_out.append(why)
                continue
            if point not in ws.points and point not in space.points_to_evaluate:
                ws.points.append(point)
            taken += 1
        if left_out:
            ws.notes.append(f"{run_dir}: {len(left_out)} of its best configurations left out, e.g. {left_out[0]}")
        why_not = "it is an ablation (a grid over seeds)" if old.is_ablation else _difference(old, space)
        if why_not:
            ws.notes.append(f"{run_dir}: its trials are not told to TPE: {why_not}; only its best configurations "
                            "are evaluated first")
            continue
        for r in rows:
            params = {k: v for k, v in r["params"].items() if space.param(k) is not None}
            if r["finished"] or space.stopped_trials == "complete":
                ws.trials.append(PastTrial(params, "COMPLETE", r["score"] if r["finished"] else r["last"],
                                           r["per_epoch"]))
            else:
                ws.trials.append(PastTrial(params, "PRUNED", r["last"], r["per_epoch"]))
    return ws


def seed_study(storage: Any, study_name: str, space: SearchSpace, trials: list[PastTrial]) -> int:
    """Add earlier ``trials`` to the (new) Optuna study; returns how many were added."""
    import optuna

    study = optuna.create_study(storage=storage, study_name=study_name, load_if_exists=True,
                                direction="maximize" if space.mode == "max" else "minimize")
    added = 0
    for t in trials:
        dists = {k: space.param(k).distribution() for k in t.params}  # type: ignore[union-attr]
        state = optuna.trial.TrialState.COMPLETE if t.state == "COMPLETE" else optuna.trial.TrialState.PRUNED
        try:
            study.add_trial(optuna.trial.create_trial(
                params=t.params, distributions=dists, state=state, intermediate_values=t.intermediate,
                value=t.value if state == optuna.trial.TrialState.COMPLETE else None))
        except ValueError:  # a value the distribution refuses: leave it out
            continue
        added += 1
    return added
