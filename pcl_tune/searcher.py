"""The Optuna searcher the search uses: Ray Tune's ``OptunaSearch``, safe to resume after a kill.

Kept apart from :mod:`pcl_tune.search` because Tune pickles the searcher into the experiment
folder and must import its class on restore; this module imports Ray at the top, the CLI does not.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import optuna
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from .space import ARM_KEY, BASELINE_ARM

log = logging.getLogger("pcl_tune.search")


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells Optuna what ASHA did, skips results for trials Optuna has already
    finished, and runs the MoCo v2 baseline trial beside the study.

    **Stopped trials are pruned trials.** Stock ``OptunaSearch`` tells Optuna every trial ASHA
    stopped as COMPLETE with its last value, so TPE reads a trial stopped at epoch 6 (kNN ~20 %)
    as a finished trial that scored 20 % beside finished ones at 50 %: it learns "starts fast",
    not "ends well". Here (``stopped_trials="pruned"``) a trial that ends before its budget
    (``max_t``, or its own ``epochs`` when smaller) is told as PRUNED; Optuna's TPE ranks pruned
    trials after complete ones, by how far they got and then by their value there, from the
    intermediate values reported every epoch (at ``step = epoch``, so a restored trial's replayed
    epoch lands on its own step). A finished trial is COMPLETE with its score: its ``last`` or its
    ``best`` epoch's value (``score``, the space's ``objective.score``); an errored one is FAIL.
    ``stopped_trials="complete"`` keeps the stock behaviour (for comparisons).

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

    def __init__(self, *args: Any, baseline: dict[str, Any] | None = None, max_t: int | None = None,
                 score: str = "last", stopped_trials: str = "pruned", time_attr: str = "epoch", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if score not in ("last", "best") or stopped_trials not in ("pruned", "complete"):
            raise ValueError(f"score must be last|best and stopped_trials pruned|complete, got {score!r}, "
                             f"{stopped_trials!r}")
        self._baseline = dict(baseline) if baseline else None
        self._baseline_position = 1 if kwargs.get("points_to_evaluate") else 0
        self._baseline_trials: set[str] = set()
        self._max_t = max_t
        self._score = score
        self._stopped_trials = stopped_trials
        self._time_attr = time_attr
        self._values: dict[str, dict[int, float]] = {}  # trial -> step -> objective (pickled with the searcher)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        baseline = getattr(self, "_baseline", None)
        if baseline is not None and not self._baseline_trials and len(self._ot_trials) >= self._baseline_position:
            self._baseline_trials.add(trial_id)
            return dict(baseline)
        return super().suggest(trial_id)

    def _is_baseline(self, trial_id: str) -> bool:
        return trial_id in getattr(self, "_baseline_trials", ())

    def _budget(self, trial_id: str) -> int | None:
        """The epoch a trial runs to unless stopped: ``max_t``, or its own ``epochs`` when smaller."""
        epochs = self._ot_trials[trial_id].params.get("epochs") if trial_id in self._ot_trials else None
        budgets = [int(b) for b in (self._max_t, epochs) if b is not None]
        return min(budgets) if budgets else None

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self._is_baseline(trial_id):
            return
        if not hasattr(self, "_values"):  # a searcher pickled by an earlier version, resumed
            self._stock_result(trial_id, result)
            return
        value, step = result.get(self.metric), result.get(self._time_attr)
        if trial_id in self._completed_trials or value is None or step is None:
            return
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return  # NaN epochs (before the first evaluation) tell Optuna nothing
        self._values.setdefault(trial_id, {})[int(step)] = float(value)
        self._stock_result(trial_id, result, lambda: self._ot_trials[trial_id].report(float(value), int(step)))

    def _stock_result(self, trial_id: str, result: dict[str, Any], report: Any = None) -> None:
        """Pass a result on to Optuna (``report``, else the stock way); a trial Optuna already
        finished (a resumed search) is logged, not raised into Tune's loop."""
        try:
            if report is not None:
                report()
            else:
                super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError as exc:
            log.warning("trial %s: a result after Optuna finished the trial (a resumed search); not passed "
                        "to Optuna: %s", trial_id, exc)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if self._is_baseline(trial_id):
            return
        if not hasattr(self, "_values") or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        state, value = self._verdict(trial_id, result, error)
        try:
            if state == optuna.trial.TrialState.COMPLETE:
                self._ot_study.tell(self._ot_trials[trial_id], value)
            else:
                self._ot_study.tell(self._ot_trials[trial_id], state=state)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError) as exc:
            # Optuna already holds it as finished (the driver died between Optuna's commit and
            # Tune's snapshot), or a value it refuses: logged, never raised into Tune's loop.
            log.warning("trial %s: not told to Optuna again: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    def _verdict(self, trial_id: str, result: dict[str, Any] | None,
                 error: bool) -> tuple[optuna.trial.TrialState, float | None]:
        """How a trial that ended is told to Optuna: (state, value for COMPLETE)."""
        TS = optuna.trial.TrialState
        values = self._values.get(trial_id, {})
        if result and isinstance(result.get(self.metric), (int, float)) and result.get(self._time_attr) is not None \
                and math.isfinite(result[self.metric]):
            values = {**values, int(result[self._time_attr]): float(result[self.metric])}
        if error:
            return TS.FAIL, None
        if not values:
            return TS.PRUNED if result is None else TS.FAIL, None
        last_step = max(values)
        budget = self._budget(trial_id)
        if self._stopped_trials == "pruned" and budget is not None and last_step < budget:
            return TS.PRUNED, None
        if self._stopped_trials == "complete" or self._score == "last":
            return TS.COMPLETE, values[last_step]
        best = max if self.mode == "max" else min
        return TS.COMPLETE, best(values.values())


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
