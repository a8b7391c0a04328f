"""Timestamps of a search, and the breakdown ``search_overhead.py`` makes of them.

Two sources write one JSON object a line to the file named by ``PCL_TUNE_TIMING_LOG``:

* the trial processes (:func:`pcl_tune.trials.timing_event`): ``trial_start``, ``fit_start`` /
  ``fit_end`` (train executor), ``worker_start``, ``loop_start``, and per epoch ``epoch_end``
  (the loop's record and local checkpoint are written; carries the loop's own ``time_epoch``)
  and ``reported`` (the report call returned);
* the search driver, through :class:`TimingCallback`, a Ray Tune callback the benchmark loads
  with ``RAY_TUNE_CALLBACKS=_overhead_timing.TimingCallback`` (this folder on ``PYTHONPATH``):
  ``tune_setup`` (the Tuner starts), ``tune_result`` (a result reached the driver),
  ``tune_end``, and ``snapshot`` (each experiment snapshot the driver wrote: Tune's
  ``TuneController.save_to_dir``, timed by wrapping it).

:func:`breakdown` turns one run's events into the rows of the benchmark's table.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from pcl_tune.trials import timing_event


def _wrap_snapshots() -> None:
    """Time every experiment snapshot the driver writes (once per process)."""
    from ray.tune.execution.tune_controller import TuneController

    save = TuneController.save_to_dir
    if getattr(save, "_timed", False):
        return

    def timed_save(self: Any) -> None:
        t0 = time.time()
        try:
            save(self)
        finally:
            timing_event("snapshot", seconds=time.time() - t0)

    timed_save._timed = True  # type: ignore[attr-defined]
    TuneController.save_to_dir = timed_save  # type: ignore[method-assign]


class TimingCallback(Callback):
    """Driver-side events of a search (see the module's docstring)."""

    def __init__(self) -> None:
        _wrap_snapshots()

    def setup(self, **info: Any) -> None:
        timing_event("tune_setup")

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                        **info: Any) -> None:
        timing_event("tune_result", epoch=result.get("epoch"))

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        timing_event("tune_end")


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a timing log, in time order."""
    if not path.is_file():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(events, key=lambda e: e["t"])


def _first(events: list[dict[str, Any]], name: str) -> float | None:
    return next((e["t"] for e in events if e["event"] == name), None)


def _last(events: list[dict[str, Any]], name: str) -> float | None:
    return next((e["t"] for e in reversed(events) if e["event"] == name), None)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def breakdown(events: list[dict[str, Any]], launched: float, ended: float) -> dict[str, float | int | None]:
    """Where one search run's wall time went, from its events; None where a phase does not apply.

    Args:
        events: :func:`read_events` of the run's timing log (one trial, one run of its loop).
        launched: wall time at which the benchmark started the process.
        ended: wall time at which the process had exited.

    Keys (seconds unless named otherwise), in the order of a run; the first ones add up to
    ``wall``:

    * ``startup_driver``: process start to the Tuner's start (imports, ``ray.init``, dashboard);
    * ``startup_trial``: the Tuner's start to the trial function's start;
    * ``startup_train``: ``TorchTrainer.fit`` to the worker function's start (controller,
      placement group, worker process, process group);
    * ``startup_run``: the loop function's start to epoch 1's start (data, model);
    * ``sum_time_epoch``: the loop's own epoch times (``time_epoch``), all epochs;
    * ``between_epochs``: the loop's local checkpoint and metrics file, between each epoch's end
      and its report (``between_epochs_ms``: the mean per epoch);
    * ``report_total``: the report calls, from the call to its return: checkpoint upload, and
      waiting until the previous report was taken (``report_plain`` / ``report_ckpt``: the mean
      call without / with a checkpoint, ``n_plain`` / ``n_ckpt`` of them);
    * ``tail``: the last report's return to the process's exit (Train's shut-down,
      ``shutdown_train`` of it; Tune's end, the summary, Ray's shut-down);
    * ``other``: what the above leave of ``wall``.

    Not adding up: ``report_to_tune`` (mean delay from a report call to the driver's receipt),
    ``snapshots`` / ``snapshot_total`` (the driver's experiment snapshots, during the run).
    """
    out: dict[str, float | int | None] = {"wall": ended - launched}
    epochs = [e for e in events if e["event"] == "epoch_end"]
    reported = {e["epoch"]: e["t"] for e in events if e["event"] == "reported"}
    ends = {e["epoch"]: e for e in epochs}
    tune = {e["epoch"]: e["t"] for e in events if e["event"] == "tune_result"}
    setup, trial = _first(events, "tune_setup"), _first(events, "trial_start")
    fit, worker = _first(events, "fit_start"), _first(events, "worker_start")
    loop = _last(events, "loop_start")
    out["startup_driver"] = setup - launched if setup is not None else None
    out["startup_trial"] = trial - setup if trial is not None and setup is not None else None
    out["startup_train"] = worker - fit if worker is not None and fit is not None else None
    first = min(ends) if ends else None
    if first is not None and loop is not None:
        out["startup_run"] = ends[first]["t"] - float(ends[first]["time_epoch"]) - loop
    else:
        out["startup_run"] = None
    out["sum_time_epoch"] = sum(float(e["time_epoch"]) for e in epochs)
    gaps, plain, ckpt, lag = [], [], [], []
    for epoch, e in sorted(ends.items()):
        if epoch - 1 in reported:  # the next epoch starts as soon as the report returns
            gaps.append(e["t"] - reported[epoch - 1] - float(e["time_epoch"]))
        if epoch in reported:
            (ckpt if e.get("checkpoint") else plain).append(reported[epoch] - e["t"])
        if epoch in tune:
            lag.append(tune[epoch] - e["t"])
    out["between_epochs"] = sum(gaps)
    out["between_epochs_ms"] = 1000 * statistics.fmean(gaps) if gaps else None
    out["report_total"] = sum(plain) + sum(ckpt)
    out["report_plain"], out["n_plain"] = _mean(plain), len(plain)
    out["report_ckpt"], out["n_ckpt"] = _mean(ckpt), len(ckpt)
    last_reported = max(reported.values()) if reported else None
    out["tail"] = ended - last_reported if last_reported is not None else None
    fit_end = _last(events, "fit_end")
    out["shutdown_train"] = fit_end - last_reported if fit_end is not None and last_reported is not None else None
    parts = ("startup_driver", "startup_trial", "startup_train", "startup_run", "sum_time_epoch",
             "between_epochs", "report_total", "tail")
    out["other"] = out["wall"] - sum(float(out[k]) for k in parts if out[k] is not None)  # type: ignore[arg-type]
    out["report_to_tune"] = _mean(lag)
    snaps = [float(e["seconds"]) for e in events if e["event"] == "snapshot"]
    out["snapshots"], out["snapshot_total"] = len(snaps), sum(snaps)
    return out
