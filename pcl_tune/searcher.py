"""The Optuna searcher the search uses: Ray Tune's ``OptunaSearch``, safe to resume after a kill.

Kept apart from :mod:`pcl_tune.search` because Tune pickles the searcher into the experiment
folder and must import its class on restore; this module imports Ray at the top, the CLI does not.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from .space import ARM_KEY, BASELINE_ARM

log = logging.getLogger("pcl_tune.search")


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that skips results for trials Optuna has already finished, and runs the
    MoCo v2 baseline trial beside the study.

    Optuna commits a finished trial to its SQLite study at once; Tune saves its own state every
    few seconds. A driver killed in between restores that trial as still running, and the
    trial's next result makes Optuna raise ``UpdateFinishedTrialError`` inside Tune's controller,
    which ends the whole search. Intermediate values only feed Optuna's pruners, which this
    project does not use (ASHA stops trials), so such a result is logged and not passed on.

    ``baseline`` (a trial config, :meth:`pcl_tune.space.SearchSpace.baseline_point`) is suggested
    once, right after the first of ``points_to_evaluate`` (first when there are none). Optuna never
    hears of it: its ``pcl.proto_weight`` lies outside the searched space, and TPE would otherwise
    model a value it cannot propose. The flag that it was issued is part of the searcher's pickled
    state, so a resumed search does not run it twice.
    """

    def __init__(self, *args: Any, baseline: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._baseline = dict(baseline) if baseline else None
        self._baseline_position = 1 if kwargs.get("points_to_evaluate") else 0
        self._baseline_trials: set[str] = set()

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        baseline = getattr(self, "_baseline", None)
        if baseline is not None and not self._baseline_trials and len(self._ot_trials) >= self._baseline_position:
            self._baseline_trials.add(trial_id)
            return dict(baseline)
        return super().suggest(trial_id)

    def _is_baseline(self, trial_id: str) -> bool:
        return trial_id in getattr(self, "_baseline_trials", ())

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if self._is_baseline(trial_id):
            return
        super().on_trial_complete(trial_id, result, error)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self._is_baseline(trial_id):
            return
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError as exc:
            log.warning("trial %s: a result after Optuna finished the trial (a resumed search); not passed "
                        "to Optuna: %s", trial_id, exc)


class BaselineExemptASHA(AsyncHyperBandScheduler):
    """ASHA that records the baseline trial's results in its rungs but never stops it early, so the
    MoCo v2 baseline always reaches the full budget and compares like for like with finished trials."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        at = result.get(self._time_attr)
        if (action == TrialScheduler.STOP and trial.config.get(ARM_KEY) == BASELINE_ARM and at is not None
                and at < self._max_t):
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action
