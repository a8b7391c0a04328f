"""Population Based Training searches: who cloned whom, and the schedule each trial learned.

A trial's final model was trained through a chain of segments (trial, epochs, settings).
:func:`schedule` lists the settings in effect at each of its epochs, with the cluster counts the
loop used (the schedule's counts at that epoch). It reads them from the final checkpoint's
``lineage.json`` (:data:`pcl_tune.checkpoint.CHECKPOINT_LINEAGE`), which travels with the weights
when a trial is cloned and so is exact even for a search killed and resumed: Tune resumes from its
last saved state, which can predate clones the killed driver had already logged. Without it (a
checkpoint that is gone) the chain is rebuilt from the search's lineage log (:mod:`pcl_tune.pbt`).
:func:`lineage_metrics` reads the same model's per-epoch records (``metrics.json``).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from pcl_tune.checkpoint import CHECKPOINT_METRICS, checkpoint_lineage
from pcl_tune.clustering import ClusterSchedule
from pcl_tune.pbt import Segment, lineage, read_lineage_log, settings_by_epoch

if TYPE_CHECKING:
    from .experiment import Experiment

SCHEDULE_KEY = "pcl.cluster_schedule"


def is_pbt(exp: Experiment) -> bool:
    """Whether the experiment was a Population Based Training search."""
    return bool(exp.space.is_pbt)


def mutated(exp: Experiment) -> list[str]:
    """The settings PBT perturbed (``pbt.mutate``)."""
    return list(exp.space.pbt.mutate) if exp.space.pbt is not None else []


def clones(exp: Experiment) -> pd.DataFrame:
    """One row per clone, in time order: ``trial_id`` (the clone), ``donor``, ``donor_epoch`` (the
    checkpoint it continued from), ``trial_epoch`` (where the clone was when it was replaced), the
    seconds since the search's first event, and the new value of each mutated setting.

    This is the log as the search wrote it: after a kill and ``--resume`` it can list clones the
    resume undid (made after Tune's last saved state). :func:`schedule` is exact either way."""
    events = read_lineage_log(exp.path)
    t0 = float(events[0]["time"]) if events else 0.0
    keys = mutated(exp)
    rows = [{"trial_id": e["trial"], "donor": e.get("donor"), "donor_epoch": e.get("donor_epoch"),
             "trial_epoch": e.get("trial_epoch"), "time_s": float(e["time"]) - t0,
             **{k: e["config"].get(k) for k in keys}}
            for e in events if e["event"] == "clone"]
    return pd.DataFrame(rows, columns=["trial_id", "donor", "donor_epoch", "trial_epoch", "time_s", *keys])


def last_epochs(exp: Experiment) -> dict[str, int]:
    """Each trial's last reported epoch."""
    if not len(exp.epochs):
        return {}
    return {str(k): int(v) for k, v in exp.epochs.groupby("trial_id")["epoch"].max().items()}


def schedule(exp: Experiment, trial_id: str) -> pd.DataFrame:
    """The settings in effect at each epoch of ``trial_id``'s final model.

    Columns: ``epoch``, ``trained_in`` (the trial whose process trained that epoch: the trial
    itself, or an ancestor it was cloned from), each mutated setting, and ``clusters`` (the
    counts per level the loop clustered at, comma-separated; empty in the warm-up).
    """
    segs = model_segments(exp, trial_id)
    if not segs:
        return pd.DataFrame(columns=["epoch", "trained_in", *mutated(exp), "clusters"])
    keys = mutated(exp)
    extra = [SCHEDULE_KEY] if SCHEDULE_KEY not in keys else []
    rows = settings_by_epoch(segs, keys + extra)
    base = exp.space.base_config()
    for r in rows:
        spec = r.get(SCHEDULE_KEY) or base.pcl.cluster_schedule
        if r["epoch"] <= base.pcl.warmup_epochs:
            r["clusters"] = ""
        else:
            counts = ClusterSchedule.parse(spec).counts(r["epoch"] - 1, num_epochs=base.epochs,
                                                        warmup_epochs=base.pcl.warmup_epochs)
            r["clusters"] = ",".join(str(c) for c in counts)
        for k in extra:
            r.pop(k, None)
    df = pd.DataFrame(rows).rename(columns={"trial": "trained_in"})
    return df[["epoch", "trained_in", *keys, "clusters"]]


def schedules(exp: Experiment) -> pd.DataFrame:
    """:func:`schedule` of every trial, stacked, with a ``trial_id`` column first."""
    frames = [schedule(exp, t).assign(trial_id=t) for t in last_epochs(exp)]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, ignore_index=True)
    return df[["trial_id", *[c for c in df.columns if c != "trial_id"]]]


def segments(exp: Experiment, trial_id: str) -> pd.DataFrame:
    """The lineage of ``trial_id``'s final model as segments: ``trained_in``, ``first_epoch``,
    ``last_epoch`` and the mutated settings of each segment (the oldest first)."""
    keys = mutated(exp)
    segs = model_segments(exp, trial_id)
    if not segs:
        return pd.DataFrame(columns=["trained_in", "first_epoch", "last_epoch", *keys])
    return pd.DataFrame([{"trained_in": s.trial, "first_epoch": s.first, "last_epoch": s.last,
                          **{k: s.config.get(k) for k in keys}} for s in segs])


def model_segments(exp: Experiment, trial_id: str) -> list[Segment]:
    """The segments of ``trial_id``'s final model, oldest first: from its final checkpoint's
    ``lineage.json`` when that covers every epoch, else from the lineage log ([] without either)."""
    last = last_epochs(exp).get(trial_id)
    if last is None:
        return []
    carried = checkpoint_segments(exp, trial_id)
    if carried and carried[-1].last == last and sum(s.last - s.first + 1 for s in carried) == last:
        return carried
    events = read_lineage_log(exp.path)
    return lineage(events, trial_id, last) if events else []


def checkpoint_segments(exp: Experiment, trial_id: str) -> list[Segment]:
    """``lineage.json`` of ``trial_id``'s final checkpoint as segments (consecutive epochs trained
    in one trial with the same settings); [] when the checkpoint or the file is missing, or the
    entries do not run 1, 2, 3, ... without a gap."""
    ckpt = getattr(exp._raw.get(trial_id), "checkpoint", None)
    entries = checkpoint_lineage(ckpt) if ckpt else []
    if [e["epoch"] for e in entries] != list(range(1, len(entries) + 1)):
        return []
    segs: list[Segment] = []
    for e in entries:
        settings = dict(e.get("settings") or {})
        if segs and segs[-1].trial == e["trial"] and segs[-1].config == settings:
            segs[-1] = replace(segs[-1], last=e["epoch"])
        else:
            segs.append(Segment(str(e["trial"]), e["epoch"], e["epoch"], settings))
    return segs


def lineage_metrics(exp: Experiment, trial_id: str) -> pd.DataFrame:
    """The per-epoch records of ``trial_id``'s final model, from its latest checkpoint's
    ``metrics.json`` (empty when the checkpoint is gone or unreadable)."""
    raw = exp._raw.get(trial_id)
    ckpt = getattr(raw, "checkpoint", None)
    if not ckpt:
        return pd.DataFrame()
    path = Path(ckpt) / CHECKPOINT_METRICS
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):
        return pd.DataFrame()
    if not isinstance(records, list):
        return pd.DataFrame()
    df = pd.DataFrame([r for r in records if isinstance(r, dict)])
    if "epoch" in df.columns:
        df = df.drop_duplicates("epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    return df


def summary_lines(exp: Experiment) -> list[str]:
    """Plain-language lines about the population: clones made, and the best trial's lineage."""
    c = clones(exp)
    lines = [f"{len(c)} clone(s) in a population of {exp.space.pbt.population if exp.space.pbt else '?'}"
             + (f"; every {exp.space.pbt.interval} epochs the bottom {exp.space.pbt.quantile:.0%} continued from a "
                f"top-{exp.space.pbt.quantile:.0%} trial with perturbed settings" if exp.space.pbt else "") + "."]
    try:
        best = exp.best()
    except Exception:
        return lines
    seg = segments(exp, best.trial_id)
    if len(seg) > 1:
        chain = " -> ".join(f"{r.trained_in} (epochs {r.first_epoch}-{r.last_epoch})" for r in seg.itertuples())
        lines.append(f"The best trial's model went through {len(seg)} trial(s): {chain}.")
    elif len(seg) == 1:
        lines.append("The best trial was never cloned: its settings were fixed from start to end.")
    return lines


def numeric_settings(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """The settings of ``keys`` whose values in ``df`` are all numbers (plotted on a y axis)."""
    out = []
    for k in keys:
        if k not in df.columns:
            continue
        vals = [v for v in df[k] if v is not None and not (isinstance(v, float) and math.isnan(v))]
        if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out.append(k)
    return out

