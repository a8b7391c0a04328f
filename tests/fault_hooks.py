"""Test-only Ray Tune callbacks, loaded into a search driver by Ray's ``RAY_TUNE_CALLBACKS``
environment variable (``fault_hooks.PauseDriver``), with this folder on ``PYTHONPATH``.

Ray calls these callbacks before its loggers. ``PauseDriver`` names two points of the driver for
:func:`pcl_tune.faults.pause_point`, counted over the whole search:

* ``driver/result{N}``: the N-th result has reached the searcher and the scheduler, its checkpoint
  is on storage, and its row is not yet in the trial's ``progress.csv`` (the loggers come next);
* ``driver/complete{N}``: the N-th finished trial is committed to Optuna's study, and Tune has not
  yet recorded it as finished in its experiment state.

``DeleteAfterFirstTrial`` removes the folder named by ``PCL_TUNE_TEST_DELETE`` when the first
trial finishes: a dataset that disappears in the middle of a search.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from ray.tune import Callback

from pcl_tune.faults import pause_point


class PauseDriver(Callback):
    def __init__(self) -> None:
        self.results = 0
        self.completed = 0

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        self.results += 1
        pause_point(f"driver/result{self.results}")

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.completed += 1
        pause_point(f"driver/complete{self.completed}")


class DeleteAfterFirstTrial(Callback):
    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        folder = os.environ.get("PCL_TUNE_TEST_DELETE")
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
