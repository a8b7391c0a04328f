"""Read a ``pcl_tune.search`` experiment folder: every file, into the pieces an Experiment holds.

The folder's layout and file names are :mod:`pcl_tune.experiment_folder`'s. The reading is split
by what is read:

* :mod:`analysis.space_record`: what was searched (``space.json``, or inferred from the trials);
* :mod:`analysis.tune_state`: Tune's experiment state (status, start time), via Ray's reader;
* :mod:`analysis.trial_files`: each ``trial_<id>/`` folder (parameters, results, errors);
* :mod:`analysis.tables`: the ``trials`` and ``epochs`` DataFrames built from them.

Everything that can be read is read: a truncated ``result.json`` line, a missing ``params.json``
or an unreadable state file produce an :class:`~analysis.errors.AnalysisWarning` that names the
file (also kept in ``Experiment.warnings``), and the partial data stay in the tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pcl_tune import metrics
from pcl_tune.experiment_folder import SPACE_JSON, TRIAL_PREFIX, TRIALS_CSV
from pcl_tune.space import SearchSpace

from .errors import AnalysisError, Notes
from .space_record import read_space
from .tables import epochs_table, in_start_order, metric_columns, trials_table
from .trial_files import RawTrial, read_trial, trial_dirs, trial_id_of
from .tune_state import read_trial_states


@dataclass
class FolderContents:
    """Everything read from one experiment folder (see :class:`analysis.Experiment`)."""

    path: Path
    space: SearchSpace
    run: dict[str, Any]
    space_inferred: bool
    metric: str
    mode: str
    raw: list[RawTrial]
    trials: pd.DataFrame
    epochs: pd.DataFrame
    warnings: list[str]
    complete: bool


def is_experiment(path: Path) -> bool:
    """A folder with ``space.json`` or at least one trial folder."""
    return path.is_dir() and ((path / SPACE_JSON).is_file() or bool(trial_dirs(path)))


def objective(space: SearchSpace, metric: str | None, mode: str | None) -> tuple[str, str]:
    """The (metric, mode) to analyse: the search's, or ``metric`` with ``mode`` defaulting to the
    search's for its own metric and to the registry's direction for any other."""
    chosen = metric if metric is not None else space.metric
    if mode is None:
        mode = metrics.direction(chosen, objective=space.metric, mode=space.mode)  # type: ignore[arg-type]
    if mode not in ("min", "max"):
        raise AnalysisError(f"mode must be min or max, got {mode!r}")
    return chosen, mode


def local_copy(run_dir: str | Path) -> Path:
    """The folder to read: ``run_dir`` itself, or a remote experiment's up-to-date working copy."""
    from pcl_tune.storage import StorageError, Store, is_uri

    if not is_uri(str(run_dir)):
        return Path(run_dir).expanduser()
    try:
        store = Store.of_folder(str(run_dir))
        if not store.exists():
            raise AnalysisError(f"{store.display}: no such experiment (nothing stored under it)")
        return store.pull()
    except StorageError as e:
        raise AnalysisError(str(e)) from None


def read_experiment(run_dir: str | Path, metric: str | None = None, mode: str | None = None) -> FolderContents:
    """Read every file of the folder (use :func:`analysis.load`, which wraps this in an Experiment).
    A URI (``s3://bucket/prefix/name``) is first downloaded into its working copy
    (:meth:`pcl_tune.storage.Store.pull`, checkpoint weights left remote), which is then read."""
    exp = local_copy(run_dir)
    if not exp.exists():
        raise AnalysisError(f"{exp}: no such folder")
    if not exp.is_dir():
        raise AnalysisError(f"{exp}: not a folder (pass an experiment folder, <storage-path>/<name>)")
    exp = exp.resolve()
    if not is_experiment(exp):
        raise AnalysisError(f"{exp}: not a pcl_tune experiment (no {SPACE_JSON} and no {TRIAL_PREFIX}* folders)")
    notes = Notes()
    states = read_trial_states(exp, notes) if trial_dirs(exp) else {}
    raw = [read_trial(d, states.get(trial_id_of(d)), notes) for d in trial_dirs(exp)]
    space, run, inferred = read_space(exp, raw, notes)
    metric, mode = objective(space, metric, mode)
    epochs = epochs_table(raw, notes)
    if len(epochs) and metric not in epochs.columns:
        known = ", ".join(metric_columns(epochs))
        raise AnalysisError(f"{exp}: metric {metric!r} was never reported; reported metrics: {known}")
    trials = trials_table(raw, epochs, space.param_names, metric, mode, space.max_t)
    return FolderContents(path=exp, space=space, run=run, space_inferred=inferred, metric=metric, mode=mode,
                          raw=raw, trials=trials, epochs=in_start_order(epochs, trials), warnings=notes.items,
                          complete=(exp / TRIALS_CSV).is_file())
