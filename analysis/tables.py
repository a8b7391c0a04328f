"""Build the two tables of an experiment from its trial folders: ``epochs`` and ``trials``.

``epochs`` has one row per trial and reported epoch; ``trials`` one row per trial (status,
parameters, objective, last and best value of every metric). Metric names, directions and
whether a best value means anything come from the registry, :mod:`pcl_tune.metrics`; the
columns are listed in :class:`analysis.Experiment`'s docstring.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from pcl_tune import metrics

from .errors import Notes
from .trial_files import RESULT_JSON, RawTrial

STATUSES = ("finished", "stopped", "errored", "running", "pending")
"""Trial status values: ``finished`` (reached ``max_t`` epochs), ``stopped`` (ended earlier: ASHA
stopped it), ``errored`` (the trial raised; ``error`` holds the message), ``running`` (no terminal
result yet: the search is still running or was interrupted), ``pending`` (created but not started:
no result, and Tune's state says PENDING; a grid creates all its trials at once)."""

# Fields Tune adds to every result; they are kept in ``epochs`` but are not metrics.
TUNE_FIELDS = frozenset({
    "timestamp", "should_checkpoint", "done", "training_iteration", "trial_id", "date", "time_this_iter_s",
    "time_total_s", "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore",
    "checkpoint_dir_name", "node_id", "config", "logdir", "experiment_tag", "experiment_id",
})
NOT_METRICS = TUNE_FIELDS | {metrics.EPOCH_KEY, metrics.CLUSTERS_KEY}


def epochs_table(raw: Sequence[RawTrial], notes: Notes) -> pd.DataFrame:
    """One row per (trial, epoch): ``trial_id``, ``epoch``, then every field of the results.

    A restored trial may report an epoch twice; the last report is kept (with a warning).
    """
    frames = []
    for t in raw:
        if not t.records:
            continue
        df = pd.DataFrame([{k: v for k, v in r.items() if k != "config"} for r in t.records])
        df["trial_id"] = t.trial_id
        if "epoch" not in df.columns:
            df["epoch"] = df["training_iteration"] if "training_iteration" in df.columns else np.arange(1, len(df) + 1)
        df["epoch"] = pd.to_numeric(df["epoch"], errors="coerce")
        dup = df["epoch"].duplicated(keep="last")
        if dup.any():
            notes.warn(f"{t.path / RESULT_JSON}: epoch(s) {sorted(df.loc[dup, 'epoch'].astype(int).tolist())} "
                       "reported more than once (trial restored); the last report of each is kept")
            df = df[~dup]
        frames.append(df.sort_values("epoch", kind="stable"))
    if not frames:
        return pd.DataFrame({"trial_id": pd.Series(dtype=str), "epoch": pd.Series(dtype=int)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # concat of all-NaN columns
        ep = pd.concat(frames, ignore_index=True, sort=False)
    ep["epoch"] = ep["epoch"].astype("int64")
    first = ["trial_id", "epoch"]
    return ep[first + [c for c in ep.columns if c not in first]]


def metric_columns(epochs: pd.DataFrame) -> list[str]:
    """Numeric metric columns of ``epochs`` (Tune's bookkeeping fields excluded), in report order."""
    return [c for c in epochs.columns
            if c not in NOT_METRICS and c != "trial_id" and not pd.api.types.is_bool_dtype(epochs[c])
            and pd.api.types.is_numeric_dtype(epochs[c])]


def trial_status(t: RawTrial, epochs_run: int, max_t: int | None) -> str:
    """See :data:`STATUSES`.

    Tune marks a trial's last result ``done`` only when the trial ends, and its state file says
    ERROR / TERMINATED / RUNNING as of its last snapshot. A trial that failed, was restarted and
    then ended keeps its ``error.txt`` (and message) but is not errored; an ``error.txt`` newer than
    a RUNNING snapshot means the snapshot is stale and the trial errored.
    """
    state = t.state.status if t.state is not None else None
    if state == "ERROR":
        return "errored"
    if state == "PENDING" and not t.records and t.error is None:
        return "pending"
    if max_t is not None and epochs_run >= max_t:
        return "finished"
    last_done = bool(t.records[-1].get("done")) if t.records else False
    if last_done or state == "TERMINATED":
        return "stopped"
    if t.error is not None:
        retrying = (state in ("RUNNING", "PENDING", "PAUSED") and t.state is not None
                    and t.error_mtime is not None and t.state.snapshot_time >= t.error_mtime)
        return "running" if retrying else "errored"
    return "running"


def _best(values: pd.Series, direction: str) -> tuple[float, Any]:
    """(best value, its index) of ``values``; (NaN, None) when none is a number."""
    s = pd.to_numeric(values, errors="coerce").dropna()
    if s.empty:
        return math.nan, None
    idx = s.idxmax() if direction == "max" else s.idxmin()
    return float(s.loc[idx]), idx


def _start_time(t: RawTrial, df: pd.DataFrame | None) -> float:
    """Tune's start time, else the first result's timestamp minus its running time, else the
    folder's modification time."""
    if t.state is not None and t.state.start_time is not None:
        return t.state.start_time
    if df is not None and {"timestamp", "time_total_s"} <= set(df.columns):
        first = df.iloc[0]
        return float(first["timestamp"]) - float(first["time_total_s"])
    try:
        return t.path.stat().st_mtime
    except OSError:
        return math.nan


def _metric_values(df: pd.DataFrame | None, metric: str, objective: str) -> dict[str, float]:
    """``last_<metric>`` and (where a best means something) ``best_<metric>`` of one trial."""
    col = df[metric] if df is not None and metric in df.columns else None
    valid = pd.to_numeric(col, errors="coerce").dropna() if col is not None else pd.Series(dtype=float)
    out = {f"last_{metric}": float(valid.iloc[-1]) if len(valid) else math.nan}
    if metric != objective and metrics.has_best(metric):
        out[f"best_{metric}"] = _best(valid, metrics.direction(metric))[0] if len(valid) else math.nan
    return out


def trials_table(raw: Sequence[RawTrial], epochs: pd.DataFrame, param_names: Sequence[str], metric: str,
                 mode: str, max_t: int | None) -> pd.DataFrame:
    """One row per trial in start order; see :class:`analysis.Experiment` for the columns."""
    names = list(param_names)
    for t in raw:
        names += [k for k in t.params if k not in names]
    reported = metric_columns(epochs)
    by_trial = dict(tuple(epochs.groupby("trial_id", sort=False))) if len(epochs) else {}
    rows = []
    for order, t in enumerate(raw):
        df = by_trial.get(t.trial_id)
        # The last epoch the trial's model reached (a PBT clone can skip epochs its donor trained).
        n = 0 if df is None or not len(df) else int(df["epoch"].max())
        row: dict[str, Any] = {"trial_id": t.trial_id, "status": trial_status(t, n, max_t)}
        row.update({p: t.params.get(p, np.nan) for p in names})
        row["epochs"] = n
        value, idx = _best(df[metric], mode) if df is not None and metric in df.columns else (math.nan, None)
        row["best_epoch"] = int(df.loc[idx, "epoch"]) if idx is not None else np.nan
        row[f"best_{metric}"] = value
        row["wall_time_s"] = float(pd.to_numeric(df["time_total_s"], errors="coerce").max()) \
            if df is not None and "time_total_s" in df.columns else np.nan
        row["train_time_s"] = float(pd.to_numeric(df["time_epoch"], errors="coerce").sum()) \
            if df is not None and "time_epoch" in df.columns else np.nan
        row["start_time"] = _start_time(t, df)
        row["checkpoint"] = t.checkpoint
        row["error"] = t.error
        row["trial_dir"] = str(t.path)
        row["_order"] = order
        for m in reported:
            row.update(_metric_values(df, m, metric))
        rows.append(row)
    trials = pd.DataFrame(rows)
    if trials.empty:
        return trials
    trials = trials.sort_values(["start_time", "_order"], kind="stable").drop(columns="_order")
    trials.insert(2, "order", np.arange(len(trials)))
    return trials.reset_index(drop=True)


def in_start_order(epochs: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """``epochs`` sorted by the trials' start order, then epoch (so "earliest" means started first)."""
    if not len(epochs) or not len(trials):
        return epochs
    rank = dict(zip(trials["trial_id"], trials["order"]))
    key = epochs["trial_id"].map(rank)
    return epochs.assign(_rank=key).sort_values(["_rank", "epoch"], kind="stable").drop(
        columns="_rank").reset_index(drop=True)
