"""Read one trial folder (``trial_<id>/``) as Tune wrote it, tolerating damage.

A trial folder holds ``params.json`` (the sampled parameters), ``result.json`` (one JSON line per
reported epoch), ``progress.csv`` (the same results as CSV), the latest ``checkpoint_*/`` and
``error.txt`` / ``error.pkl`` when the trial raised.

Ray's own readers (``ExperimentAnalysis.trial_dataframes``, ``Result.metrics_dataframe``) drop a
trial's whole history when one line of its ``result.json`` is invalid, which is exactly what a
search killed mid-write leaves behind; so the results are read here line by line, keeping every
readable epoch and warning about the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pcl_tune.experiment_folder import PROGRESS_CSV, RESULT_JSON, TRIAL_PREFIX

from .errors import Notes
from .tune_state import TrialState

PARAMS_JSON = "params.json"
ERROR_FILES = ("error.txt", "error.pkl")


@dataclass
class RawTrial:
    """Everything read from one trial folder."""

    trial_id: str
    path: Path
    params: dict[str, Any]
    records: list[dict[str, Any]]
    """One dict per reported epoch, in the order reported."""
    error: str | None
    """Last line of ``error.txt`` (at most 500 characters), or a pointer to ``error.pkl``."""
    error_text: str | None
    error_mtime: float | None
    checkpoint: str | None
    state: TrialState | None
    """What Tune's experiment state says about the trial, when it says anything."""


def trial_dirs(exp: Path) -> list[Path]:
    """The experiment's trial folders, sorted by name."""
    return sorted(d for d in exp.glob(f"{TRIAL_PREFIX}*") if d.is_dir())


def trial_id_of(trial_dir: Path) -> str:
    return trial_dir.name.removeprefix(TRIAL_PREFIX)


def read_records(trial_dir: Path, notes: Notes) -> list[dict[str, Any]]:
    """The trial's results, one dict per reported epoch, from ``result.json`` (or ``progress.csv``).

    Lines that are not valid JSON (a result being written when the search was killed) are skipped
    with a warning naming the file and line. When ``progress.csv`` holds more results than the
    readable part of ``result.json``, it is used instead (with a warning).
    """
    records: list[dict[str, Any]] = []
    rj = trial_dir / RESULT_JSON
    if rj.is_file():
        try:
            lines = rj.read_text(errors="replace").splitlines()
        except OSError as e:
            notes.warn(f"{rj}: unreadable ({e})")
            lines = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                what = "truncated last line" if i == len(lines) else f"invalid JSON on line {i}"
                notes.warn(f"{rj}: {what} skipped ({len(line)} characters); the other results are kept")
                continue
            if isinstance(rec, dict):
                records.append(rec)
    pc = trial_dir / PROGRESS_CSV
    if pc.is_file() and pc.stat().st_size > 0:
        try:
            df = pd.read_csv(pc)
        except Exception as e:  # any parser failure: the JSON results (if any) stand
            if not records:
                notes.warn(f"{pc}: unreadable ({type(e).__name__}: {e})")
            df = None
        if df is not None and len(df) > len(records):
            if records or rj.is_file():
                notes.warn(f"{rj}: {len(records)} readable result(s) but {pc.name} has {len(df)}; using {pc.name}")
            df = df[[c for c in df.columns if not str(c).startswith("config/")]]
            records = [{k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()}
                       for row in df.to_dict("records")]
    return records


def _read_params(trial_dir: Path, records: list[dict[str, Any]], state: TrialState | None,
                 notes: Notes) -> dict[str, Any]:
    """``params.json``, else the ``config`` of the results, else Tune's state (with a warning)."""
    pj = trial_dir / PARAMS_JSON
    if pj.is_file():
        try:
            loaded = json.loads(pj.read_text())
        except (OSError, ValueError) as e:
            notes.warn(f"{pj}: unreadable ({type(e).__name__})")
        else:
            if isinstance(loaded, dict):
                return loaded
            notes.warn(f"{pj}: expected a JSON object")
    cfg = next((r["config"] for r in reversed(records) if isinstance(r.get("config"), dict)), None)
    if cfg is not None:
        params, source = dict(cfg), "the 'config' of its results"
    elif state is not None and state.config:
        params, source = dict(state.config), "Tune's experiment state"
    else:
        params, source = {}, None
    pending = not records and state is not None and state.status == "PENDING" and bool(state.config)
    if not pj.is_file() and not pending:  # an unreadable one was warned about above; a pending
        # trial (created, not started: Tune writes params.json at the start) is no damage
        notes.warn(f"{pj}: missing; parameters recovered from {source}" if source else
                   f"{pj}: missing and no other record of the parameters; they are shown as NaN")
    return params


def _read_error(trial_dir: Path) -> tuple[str | None, str | None]:
    """(one-line message, full text) of ``error.txt``; ``error.pkl`` alone gives a pointer to it."""
    txt = trial_dir / "error.txt"
    if txt.is_file():
        try:
            text = txt.read_text(errors="replace")
        except OSError as e:
            return f"error.txt unreadable: {e}", None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        message = lines[-1] if lines else "error.txt is empty"
        return message[:500], text
    pkl = trial_dir / "error.pkl"
    if pkl.is_file():
        return f"errored (pickled exception in {pkl})", None
    return None, None


def _latest_checkpoint(trial_dir: Path) -> str | None:
    """The checkpoint folder written last. Not the highest-numbered: Tune numbers a trial's
    checkpoints by a counter that a restore can set back (a Population Based Training clone
    continues from a copied checkpoint), so an older folder Tune has not deleted yet can carry a
    higher number than the newest."""
    def written(d: Path) -> tuple[float, str]:
        times = [f.stat().st_mtime for f in d.iterdir() if f.is_file()]
        return (max(times) if times else d.stat().st_mtime, d.name)

    ckpts = [d for d in trial_dir.glob("checkpoint_*") if d.is_dir()]
    return str(max(ckpts, key=written)) if ckpts else None


def read_trial(trial_dir: Path, state: TrialState | None, notes: Notes) -> RawTrial:
    """One trial folder; missing or damaged files are warned about, never fatal."""
    records = read_records(trial_dir, notes)
    params = _read_params(trial_dir, records, state, notes)
    error, error_text = _read_error(trial_dir)
    err_files = [f for f in (trial_dir / name for name in ERROR_FILES) if f.is_file()]
    error_mtime = max(f.stat().st_mtime for f in err_files) if err_files else None
    return RawTrial(trial_id=trial_id_of(trial_dir), path=trial_dir, params=params, records=records, error=error,
                    error_text=error_text, error_mtime=error_mtime, checkpoint=_latest_checkpoint(trial_dir),
                    state=state)
