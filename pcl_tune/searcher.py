"""The Optuna searcher the search uses: Ray Tune's ``OptunaSearch``, safe to resume after a kill.

Kept apart from :mod:`pcl_tune.search` because Tune pickles the searcher into the experiment
folder and must import its class on restore; this module imports Ray at the top, the CLI does not.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger("pcl_tune.search")


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that skips results for trials Optuna has already finished.

    Optuna commits a finished trial to its SQLite study at once; Tune saves its own state every
    few seconds. A driver killed in between restores that trial as still running, and the
    trial's next result makes Optuna raise ``UpdateFinishedTrialError`` inside Tune's controller,
    which ends the whole search. Intermediate values only feed Optuna's pruners, which this
    project does not use (ASHA stops trials), so such a result is logged and not passed on.
    """

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError as exc:
            log.warning("trial %s: a result after Optuna finished the trial (a resumed search); not passed "
                        "to Optuna: %s", trial_id, exc)
