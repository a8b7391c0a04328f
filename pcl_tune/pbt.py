"""Population Based Training, the parts that need no Ray: bounded perturbations and lineages.

The scheduler itself (:class:`pcl_tune.searcher.BoundedPBT`) is Ray Tune's
``PopulationBasedTraining`` with two changes: settings are perturbed by :func:`perturb` (inside
the space's bounds, from a seeded generator) and every clone is written to the experiment's
lineage log, the folder ``pbt_lineage/``, one JSON file per event:

* ``{"event": "start", "trial": id, "config": {...}, "time": t}``: a trial joined the population
  (a resumed search writes it again for its trials: the first one counts);
* ``{"event": "clone", "trial": id, "donor": id, "donor_epoch": E, "trial_epoch": e, "config":
  {...}, "operations": {...}, "time": t}``: trial ``id``, at its epoch ``e``, dropped its own
  state and continued from the donor's checkpoint of epoch ``E`` with the perturbed ``config``
  from epoch ``E + 1`` on.

From the log alone, :func:`lineage` rebuilds the history of any trial's final model: the chain of
(trial, first epoch, last epoch, settings) segments it was trained through, and from that the
settings in effect at every epoch (:func:`settings_by_epoch`), i.e. the schedule PBT learned.
The times are the driver's clock, so "the donor as it was when it was cloned" is well defined
even when the donor was itself cloned later.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .space import Param

LINEAGE_DIR = "pbt_lineage"


def perturb(config: dict[str, Any], params: list[Param], rng: np.random.Generator, *,
            resample_probability: float, factors: tuple[float, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    """A copy of ``config`` with each of ``params`` perturbed, and a note per setting of what was done.

    * with probability ``resample_probability``: a fresh draw from the parameter's distribution;
    * a float range: times one of ``factors`` (a step of the same relative size at any scale),
      clipped to ``[low, high]``;
    * an integer range: one step up or down (multiplying a small integer by 0.8 or 1.2 and
      rounding would leave it where it was), clipped;
    * a choice: the neighbouring value on a random side in the listed order (clipped at the ends),
      or a fresh draw when the current value is not among the choices.
    """
    new = dict(config)
    ops: dict[str, str] = {}
    for p in params:
        old = config.get(p.name)
        if rng.random() < resample_probability or not p.contains(old):
            new[p.name] = draw(p, rng)
            ops[p.name] = "resample"
            continue
        if p.kind == "choice":
            i = next(j for j, c in enumerate(p.choices) if c == old and isinstance(c, bool) == isinstance(old, bool))
            shift = int(rng.choice([-1, 1]))
            j = min(max(i + shift, 0), len(p.choices) - 1)
            new[p.name] = p.choices[j]
            ops[p.name] = f"shift {'left' if shift < 0 else 'right'}" + (" (at the end)" if i == j else "")
        elif p.kind == "int":
            step = int(p.step or 1)
            shift = int(rng.choice([-step, step]))
            new[p.name] = int(min(max(int(old) + shift, int(p.low)), int(p.high)))  # type: ignore[arg-type]
            ops[p.name] = f"{shift:+d}"
        else:
            f = float(rng.choice(list(factors)))
            value = float(old) * f
            new[p.name] = float(min(max(value, float(p.low)), float(p.high)))  # type: ignore[arg-type]
            ops[p.name] = f"* {f:g}" + (" (clipped)" if new[p.name] != value else "")
    return new, ops


def to_gp(p: Param, value: Any) -> float:
    """A numeric parameter's value on the axis PB2's Gaussian process models: log10 for a log
    range (a step from 0.001 to 0.002 is as large as one from 0.05 to 0.1), the value otherwise."""
    return math.log10(float(value)) if p.log else float(value)


def gp_bounds(p: Param) -> tuple[float, float]:
    """``[low, high]`` of a numeric parameter on the GP's axis (:func:`to_gp`)."""
    return to_gp(p, p.low), to_gp(p, p.high)


def from_gp(p: Param, x: float) -> Any:
    """The inverse of :func:`to_gp`, clipped to the bounds; an integer range rounds to its step."""
    value = 10.0 ** float(x) if p.log else float(x)
    lo, hi = float(p.low), float(p.high)  # type: ignore[arg-type]
    value = min(max(value, lo), hi)
    if p.kind == "int":
        step = int(p.step or 1)
        return int(min(max(int(lo) + step * round((value - lo) / step), int(lo)), int(hi)))
    return value


def draw(p: Param, rng: np.random.Generator) -> Any:
    """One value of ``p``'s distribution (log-uniform for a log range)."""
    if p.kind == "choice":
        return p.choices[int(rng.integers(len(p.choices)))]
    lo, hi = float(p.low), float(p.high)  # type: ignore[arg-type]
    if p.kind == "int":
        step = int(p.step or 1)
        if p.log:
            v = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
            return int(min(max(v, lo), hi))
        return int(lo) + step * int(rng.integers((int(hi) - int(lo)) // step + 1))
    if p.log:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return float(rng.uniform(lo, hi))


@dataclass(frozen=True)
class Segment:
    """Epochs ``first..last`` (1-based, inclusive) of a lineage, trained in ``trial`` with ``config``."""

    trial: str
    first: int
    last: int
    config: dict[str, Any]


def read_lineage_log(exp_dir: str | Path) -> list[dict[str, Any]]:
    """The lineage log's events in time order ([] without a log); unreadable files are skipped
    (an event being written when the driver was killed)."""
    folder = Path(exp_dir) / LINEAGE_DIR
    events = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            ev = json.loads(path.read_text(errors="replace"))
        except (OSError, ValueError):
            continue
        if isinstance(ev, dict) and ev.get("event") in ("start", "clone") and "trial" in ev:
            events.append(ev)
    return sorted(events, key=lambda e: float(e.get("time", 0.0)))


def lineage(events: list[dict[str, Any]], trial: str, last_epoch: int, *, before: float = math.inf) -> list[Segment]:
    """The segments the model of ``trial`` went through up to ``last_epoch``, as it was at time ``before``.

    Follows the trial's last clone before ``before`` back to its donor as it was at that clone's
    time, and so on to a trial that was never cloned. Raises ``ValueError`` when a trial has no
    start event (a log from another search) or the chain loops.
    """
    segments: list[Segment] = []
    seen = 0
    while True:
        seen += 1
        if seen > 10_000:
            raise ValueError(f"the lineage of trial {trial} loops")
        clones = [e for e in events if e["event"] == "clone" and e["trial"] == trial and float(e["time"]) < before]
        if not clones:
            start = next((e for e in events if e["event"] == "start" and e["trial"] == trial), None)
            if start is None:
                raise ValueError(f"trial {trial}: no start event in the lineage log")
            if last_epoch >= 1:
                segments.append(Segment(trial, 1, last_epoch, dict(start["config"])))
            return segments[::-1]
        c = clones[-1]
        donor_epoch = int(c["donor_epoch"])
        if donor_epoch < last_epoch:  # else every epoch asked for came from the donor
            segments.append(Segment(trial, donor_epoch + 1, last_epoch, dict(c["config"])))
        trial, last_epoch, before = str(c["donor"]), min(donor_epoch, last_epoch), float(c["time"])


def settings_by_epoch(segments: list[Segment], keys: list[str]) -> list[dict[str, Any]]:
    """One row per epoch of a lineage: ``epoch``, the ``trial`` it was trained in and each of ``keys``."""
    rows = []
    for s in segments:
        for epoch in range(s.first, s.last + 1):
            rows.append({"epoch": epoch, "trial": s.trial, **{k: s.config.get(k) for k in keys}})
    return rows
