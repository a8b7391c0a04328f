"""Each trial's status, config and start time as Tune last saved them (``experiment_state-*.json``).

The state file's format is private to Tune, so it is read with Ray's own reader,
:class:`ray.tune.ExperimentAnalysis`. When that reader fails on the file (a copy edited by hand, a
value pickled by an environment that cannot be imported here, a file from another Ray version),
a reader of the raw JSON takes over: the few fields used here are plain JSON in every version
seen so far. Either way the result is the same ``{trial_id: TrialState}``, and falling back is
warned about.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Notes

STATE_GLOB = "experiment_state-*.json"


@dataclass(frozen=True)
class TrialState:
    """A trial as Tune's experiment state last saw it."""

    trial_id: str
    status: str | None = None
    """Tune's status: ``PENDING``, ``RUNNING``, ``PAUSED``, ``TERMINATED`` or ``ERROR``."""
    config: dict[str, Any] = field(default_factory=dict)
    start_time: float | None = None
    num_failures: int = 0
    snapshot_time: float = 0.0
    """Modification time of the state file this was read from."""


def newest_state_file(exp: Path) -> Path | None:
    """The state file Tune itself would restore from: the greatest name (names carry the time)."""
    files = sorted(exp.glob(STATE_GLOB), key=lambda p: p.name)
    return files[-1] if files else None


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence one logger: ExperimentAnalysis logs every trial whose results it cannot read, and
    damaged results are reported here already, once, naming the file."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_with_ray(state_file: Path) -> dict[str, TrialState]:
    """Read ``state_file`` with :class:`ray.tune.ExperimentAnalysis`; raises whatever Ray raises."""
    from ray.tune import ExperimentAnalysis

    with _quiet("ray.tune.analysis.experiment_analysis"):
        analysis = ExperimentAnalysis(str(state_file))
    snapshot = state_file.stat().st_mtime
    out = {}
    for trial in analysis.trials:
        meta = trial.run_metadata
        out[str(trial.trial_id)] = TrialState(
            trial_id=str(trial.trial_id), status=str(trial.status), config=dict(trial.config or {}),
            start_time=float(meta.start_time) if meta.start_time is not None else None,
            num_failures=int(meta.num_failures or 0), snapshot_time=snapshot)
    return out


def read_raw(state_file: Path) -> dict[str, TrialState]:
    """Read the fields used here from the raw JSON; entries that do not parse are skipped.

    Raises OSError / ValueError / KeyError / TypeError when the file as a whole is unreadable.
    """
    entries = json.loads(state_file.read_text())["trial_data"]
    snapshot = state_file.stat().st_mtime
    out: dict[str, TrialState] = {}
    for entry in entries:
        try:
            meta = json.loads(entry[0]) if isinstance(entry[0], str) else dict(entry[0])
            runtime = json.loads(entry[1]) if len(entry) > 1 and isinstance(entry[1], str) else {}
            tid = str(meta["trial_id"])
            start = runtime.get("start_time")
            out[tid] = TrialState(
                trial_id=tid, status=meta.get("status"),
                config=meta.get("config") if isinstance(meta.get("config"), dict) else {},
                start_time=float(start) if start not in (None, "None") else None,
                num_failures=int(runtime.get("num_failures") or 0), snapshot_time=snapshot)
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    return out


def read_trial_states(exp: Path, notes: Notes) -> dict[str, TrialState]:
    """Trial status / config / start time from the newest state file; {} when there is none."""
    f = newest_state_file(exp)
    if f is None:
        return {}
    try:
        return read_with_ray(f)
    except Exception as e:  # any failure of Ray's reader: the raw JSON is tried next
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
    try:
        states = read_raw(f)
    except (OSError, ValueError, KeyError, TypeError) as e:
        notes.warn(f"{f}: unreadable Tune state ({type(e).__name__}); trial status taken from the results only")
        return {}
    notes.warn(f"{f}: Ray's ExperimentAnalysis could not read it ({reason}); trial status read from its raw JSON")
    return states
