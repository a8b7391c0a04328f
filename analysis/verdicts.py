"""Verdicts a researcher can act on: paired ablation differences, the MoCo v2 baseline, the noise
of the objective, and group comparisons at equal budget.

Every comparison here compares like with like:

* **Ablations** (space files with an ``ablation`` section: a grid, paired seeds, full budget).
  Each trial is judged by its metric at its last epoch (the full budget, no selection over
  epochs). A comparison of level ``B`` against reference ``A`` of one factor, with every other
  factor held, takes the per-seed differences ``B - A`` over the seeds where both finished, and
  reports their mean with a two-sided 95 % **paired t** interval (Student t on the differences,
  ``n - 1`` degrees of freedom). The verdict is worded by the interval: it excludes 0, or "no
  difference resolved".
* **The baseline**: the MoCo v2 trial(s) (``pcl.proto_weight`` 0, arm ``moco_v2``) against the best
  PCL trial or cell, paired by seed in an ablation; in a TPE search (one baseline run, one best
  trial) against the noise of the objective.
* **Noise**: the binomial standard error of an accuracy measured on the validation split,
  ``sqrt(p (1 - p) / n)``, and, where seeds were repeated, the seed-to-seed standard deviation.
  Two independent measurements with that error differ by more than ``1.96 * sqrt(2) * SE`` only 5 %
  of the time when they are truly equal: smaller gaps are "within noise".
* **Group comparisons in a TPE + ASHA search** (which loss, which duplicate handling), at one
  budget: on finished trials at their last epoch, or on every trial at the largest epoch all of them
  reached; with fewer than 3 replicates a cell lists its points instead of an interval, and the
  table names the other searched parameters that also differ between the groups (confounders).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pcl_tune import metrics as registry
from pcl_tune.space import ARM_KEY, BASELINE_ARM, SEED_KEY, Param

from .summaries import NOT_SET, ci_table, mean_ci

Z95 = 1.959963984540054
"""Two-sided 95 % normal quantile."""
MIN_INTERVAL = 3
"""Replicates a group needs before an interval is shown (fewer: its points are listed)."""
METHOD = "paired t"


# --------------------------------------------------------------------------- values at a budget

def values_at(epochs: pd.DataFrame, metric: str, epoch: int) -> pd.Series:
    """Each trial's ``metric`` at ``epoch`` (the last record of that epoch), indexed by trial id;
    trials that did not reach it are absent."""
    if metric not in epochs.columns or not len(epochs):
        return pd.Series(dtype=float)
    d = epochs[pd.to_numeric(epochs["epoch"], errors="coerce") == epoch].drop_duplicates("trial_id", keep="last")
    return pd.Series(pd.to_numeric(d[metric], errors="coerce").to_numpy(), index=d["trial_id"].to_numpy(),
                     dtype=float).dropna()


def final_values(trials: pd.DataFrame, epochs: pd.DataFrame, metric: str, max_t: int | None) -> pd.Series:
    """Each finished trial's ``metric`` at the full budget (``max_t``; else its last epoch), by trial id."""
    done = trials[trials["status"] == "finished"]
    if max_t is not None:
        v = values_at(epochs, metric, int(max_t))
        return v[v.index.isin(done["trial_id"])]
    col = f"last_{metric}"
    if col not in done.columns:
        return pd.Series(dtype=float)
    return pd.to_numeric(done.set_index("trial_id")[col], errors="coerce").dropna()


# --------------------------------------------------------------------------- noise

@dataclass(frozen=True)
class Noise:
    """How precisely the objective is measured."""

    metric: str
    n_val: int | None
    """Images in the validation split (None: unknown for this dataset)."""
    at: float
    """The accuracy the binomial error is evaluated at (%, the best value)."""
    binomial_se: float
    """``100 * sqrt(p (1 - p) / n_val)`` in points; NaN when ``n_val`` is unknown or the metric is
    not an accuracy."""
    seed_sd: float = math.nan
    """Seed-to-seed standard deviation (pooled over settings run with several seeds); NaN if none."""
    seed_groups: int = 0

    @property
    def resolution(self) -> float:
        """The smallest gap between two single runs that is more than noise (95 %): ``1.96 * sqrt(2)``
        times the larger of the binomial error and the seed-to-seed spread."""
        se = np.nanmax([self.binomial_se, self.seed_sd]) if not (math.isnan(self.binomial_se)
                                                                 and math.isnan(self.seed_sd)) else math.nan
        return float(Z95 * math.sqrt(2) * se)

    def describe(self) -> str:
        parts = []
        if not math.isnan(self.binomial_se):
            parts.append(f"binomial standard error of `{self.metric}` on the {self.n_val}-image validation split: "
                         f"{self.binomial_se:.2f} points (at {self.at:.1f} %)")
        if not math.isnan(self.seed_sd):
            parts.append(f"seed-to-seed standard deviation: {self.seed_sd:.2f}{_unit_word(self.metric, ' ')} "
                         f"({self.seed_groups} setting(s) run with several seeds)")
        if not parts:
            return f"The noise of `{self.metric}` is unknown (validation size unknown, no repeated seeds)."
        unit = _unit_word(self.metric, " ")
        return ("; ".join(parts).capitalize() + f". Two single runs closer than {self.resolution:.1f}{unit} "
                "(1.96 x sqrt(2) x the larger error) are not resolved.")


def objective_noise(trials: pd.DataFrame, metric: str, value_col: str, n_val: int | None,
                    params: Sequence[str]) -> Noise:
    """The :class:`Noise` of ``metric``: binomial from ``n_val`` at the best ``value_col``, and the
    seed-to-seed spread of trials that share every parameter but the seed."""
    vals = pd.to_numeric(trials.get(value_col, pd.Series(dtype=float)), errors="coerce").dropna()
    best = float(vals.max()) if len(vals) else math.nan
    se = math.nan
    if n_val and registry.unit(metric) == "%" and not math.isnan(best):
        p = min(max(best / 100.0, 0.0), 1.0)
        se = 100.0 * math.sqrt(p * (1 - p) / n_val)
    sd, groups = math.nan, 0
    others = [p for p in params if p != SEED_KEY and p in trials.columns]
    if SEED_KEY in trials.columns and len(vals):
        d = trials.loc[vals.index].copy()
        d["_v"] = vals
        # str() of every value (NaN included: a conditional parameter or a grid cell's missing arm)
        d["_cell"] = d[others].map(str).agg("|".join, axis=1) if others else "all"
        var, dof = 0.0, 0
        for _, g in d.groupby("_cell"):
            if len(g) >= 2:
                var += float(g["_v"].var(ddof=1)) * (len(g) - 1)
                dof += len(g) - 1
                groups += 1
        if dof:
            sd = math.sqrt(var / dof)
    return Noise(metric, n_val, best, se, sd, groups)


# --------------------------------------------------------------------------- paired verdicts

@dataclass(frozen=True)
class Verdict:
    """One paired comparison: ``level - reference`` of ``factor``, other factors at ``context``."""

    metric: str
    factor: str
    level: str
    reference: str
    context: str
    seeds: tuple[Any, ...]
    diffs: tuple[float, ...]
    mean: float
    low: float
    high: float
    level_mean: float = math.nan
    reference_mean: float = math.nan
    method: str = METHOD

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def resolved(self) -> bool:
        """Whether the 95 % interval excludes 0."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    @property
    def label(self) -> str:
        return f"{self.level} − {self.reference}"

    def sentence(self) -> str:
        """``"remap − dedupe (pcl.cluster_schedule=5,10), knn_top1: +3.1 points [+1.2, +5.0], paired t,
        5 seeds"``, or ``"...: no difference resolved: +0.3 points [−1.8, +2.4], ..."``."""
        unit = _unit_word(self.metric, " ")
        ctx = f" ({self.context})" if self.context else ""
        head = f"{self.label}{ctx}, {self.metric}: "
        if self.n < 2:
            return head + f"{_signed(self.mean, self.metric)}{unit} from {self.n} seed: no interval"
        m = self.metric
        body = (f"{_signed(self.mean, m)}{unit} [{_signed(self.low, m)}, {_signed(self.high, m)}], {self.method}, "
                f"{self.n} seeds")
        return head + (body if self.resolved else f"no difference resolved: {body}")

    def row(self) -> dict[str, Any]:
        return {"metric": self.metric, "comparison": self.label, "context": self.context or "",
                "n_seeds": self.n, "level_mean": self.level_mean, "reference_mean": self.reference_mean,
                "diff_mean": self.mean, "ci_low": self.low, "ci_high": self.high, "resolved": self.resolved,
                "method": self.method,
                "diffs": ", ".join(f"{s}: {_signed(d, self.metric)}" for s, d in zip(self.seeds, self.diffs,
                                                                                     strict=True)),
                "verdict": self.sentence()}


def _unit_word(metric: str, lead: str = "") -> str:
    """``"points"`` for a % metric, the registry's unit otherwise ("" when it has none), with ``lead``
    before a non-empty word."""
    unit = registry.unit(metric)
    word = "points" if unit == "%" else (unit or "")
    return f"{lead}{word}" if word else ""


def _signed(x: float, metric: str | None = None) -> str:
    """``+1.3`` with a real minus sign: one decimal for % metrics (and without a metric), three for
    the others (NMI, losses), whose differences are fractions of one."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "nan"
    digits = 1 if metric is None or registry.unit(metric) == "%" else 3
    return f"{x:+.{digits}f}".replace("-", "−")


def paired(values: pd.DataFrame, metric: str, factor: str, level: Any, reference: Any, context: str = "") -> Verdict:
    """The :class:`Verdict` of ``level - reference`` from ``values`` (columns ``seed``, ``factor``,
    ``value``; one row per trial), paired by seed."""
    a = values[values[factor].astype(str) == str(reference)].groupby(SEED_KEY)["value"].mean()
    b = values[values[factor].astype(str) == str(level)].groupby(SEED_KEY)["value"].mean()
    common = [s for s in b.index if s in a.index]
    diffs = (b.loc[common] - a.loc[common]).astype(float)
    ci = mean_ci(diffs)
    return Verdict(metric, factor, str(level), str(reference), context, tuple(common), tuple(diffs.tolist()),
                   ci["mean"], ci["ci_low"], ci["ci_high"], float(b.loc[common].mean()) if common else math.nan,
                   float(a.loc[common].mean()) if common else math.nan)


@dataclass
class AblationResult:
    """Verdicts of an ablation experiment for one metric."""

    metric: str
    verdicts: list[Verdict]
    cells: pd.DataFrame
    """One row per cell: its factor values, ``n`` seeds finished, ``mean`` and the t-interval."""
    baseline: Verdict | None = None
    """Best PCL cell − MoCo v2, paired (None without a baseline)."""
    missing: list[str] = field(default_factory=list)
    """Trials not counted (not finished), as ``trial_id (status)``."""

    def table(self) -> pd.DataFrame:
        rows = [v.row() for v in ([self.baseline] if self.baseline else []) + self.verdicts]
        return pd.DataFrame(rows)


def ablation_factors(trials: pd.DataFrame, grid_params: Sequence[str]) -> list[str]:
    """The factors of an ablation: the arm (when trials carry one) and each grid parameter that
    takes more than one value."""
    out = [ARM_KEY] if ARM_KEY in trials.columns and trials[ARM_KEY].notna().any() else []
    for p in grid_params:
        if p in trials.columns and p != SEED_KEY and trials[p].astype(str).nunique() > 1:
            out.append(p)
    return out


def ablation_verdicts(trials: pd.DataFrame, values: pd.Series, metric: str, grid_params: Sequence[str],
                      orders: dict[str, Sequence[Any]], reference_arm: str | None = None) -> AblationResult:
    """Paired verdicts of an ablation for ``metric``.

    ``values``: each finished trial's metric at the full budget, by trial id (:func:`final_values`).
    Factors are the arm and the grid parameters that vary; the reference level of a grid parameter
    is its first listed value (``orders``), of the arm ``reference_arm`` (default: the first arm).
    Each non-reference level is compared with the reference within every combination of the other
    factors. The baseline (arm ``moco_v2``) in a grid without arms is compared only in
    :attr:`AblationResult.baseline`: the best PCL cell (highest mean over seeds) − MoCo v2.
    """
    d = trials.set_index("trial_id").loc[[t for t in values.index if t in set(trials["trial_id"])]].copy()
    d["value"] = values
    missing = _missing(trials[~trials["trial_id"].isin(values.index)])
    factors = ablation_factors(trials, grid_params)
    grid = [f for f in factors if f != ARM_KEY]
    has_arms = ARM_KEY in factors
    if has_arms:
        d[ARM_KEY] = d[ARM_KEY].astype(object).where(d[ARM_KEY].notna(), NOT_SET)
    is_base = (d[ARM_KEY] == BASELINE_ARM) if ARM_KEY in d.columns else pd.Series(False, index=d.index)
    named_arms = has_arms and bool((d[ARM_KEY] != NOT_SET).any() & (d[ARM_KEY] != BASELINE_ARM).any()) \
        and not (d.loc[~is_base, ARM_KEY] == NOT_SET).any()
    verdicts: list[Verdict] = []
    pcl = d[~is_base]
    compared = ([ARM_KEY] if named_arms else []) + grid
    for f in compared:
        rows = d if (f == ARM_KEY) else pcl
        levels = _levels(rows[f], orders.get(f, []) if f != ARM_KEY else [])
        ref = (reference_arm if (f == ARM_KEY and reference_arm in levels) else levels[0]) if levels else None
        others = [g for g in compared if g != f]  # every other factor held, the arm included
        groups = rows.groupby(others, sort=False, dropna=False) if others else [((), rows)]
        for key, g in groups:
            key = key if isinstance(key, tuple) else (key,)
            ctx = ", ".join(f"{k}={v}" for k, v in zip(others, key, strict=True))
            for level in levels:
                if level == ref:
                    continue
                v = paired(g, metric, f, level, ref, ctx)
                if v.n:
                    verdicts.append(v)
    cell_cols = ([ARM_KEY] if has_arms else []) + grid
    shown = d.copy()
    if has_arms and not named_arms:  # a grid with the baseline beside it: label the two kinds of cell
        shown[ARM_KEY] = shown[ARM_KEY].where(is_base, "PCL")
        for g in grid:  # the baseline's grid values are only the settings it borrowed
            shown[g] = shown[g].astype(object).where(~is_base, "—")
    cells = ci_table(shown.reset_index(), cell_cols, "value", SEED_KEY, orders=orders) if cell_cols else pd.DataFrame()
    baseline = None
    if is_base.any() and (~is_base).any():
        mean_by = pcl.groupby(cell_cols, dropna=False)["value"].mean() if cell_cols else pd.Series(
            {(): pcl["value"].mean()})
        mean_by = mean_by.drop(labels=[k for k in mean_by.index if k == BASELINE_ARM or
                                       (isinstance(k, tuple) and BASELINE_ARM in k)], errors="ignore")
        best_key = mean_by.idxmax() if registry.direction(metric) != "min" else mean_by.idxmin()
        best_key = best_key if isinstance(best_key, tuple) else (best_key,)
        mask = pd.Series(True, index=d.index)
        for c, k in zip(cell_cols, best_key, strict=False):
            mask &= d[c].astype(str) == str(k)
        label = ", ".join(f"{c}={k}" for c, k in zip(cell_cols, best_key, strict=False)
                          if not (c == ARM_KEY and k == NOT_SET))
        both = pd.concat([d[mask].assign(_who="best PCL"), d[is_base].assign(_who=BASELINE_ARM)])
        baseline = paired(both, metric, "_who", "best PCL", BASELINE_ARM,
                          f"best PCL cell: {label}" if label else "the PCL cell")
    return AblationResult(metric, verdicts, cells, baseline, missing)


def _missing(left_out: pd.DataFrame, names: int = 6) -> list[str]:
    """``trial_id (status)`` of the trials left out, or, when there are many, a count per status."""
    if len(left_out) <= names:
        return [f"{r.trial_id} ({r.status})" for r in left_out.itertuples()]
    return [f"{n} {status}" for status, n in left_out["status"].value_counts().items()]


def _levels(series: pd.Series, order: Sequence[Any]) -> list[str]:
    present = list(dict.fromkeys(series.astype(str)))
    listed = [str(v) for v in order if str(v) in present]
    return listed + [v for v in present if v not in listed]


# --------------------------------------------------------------------------- TPE search: the baseline

@dataclass(frozen=True)
class BaselineCheck:
    """The best PCL trial of a search against its MoCo v2 baseline trial, at equal budget."""

    metric: str
    pcl_trial: str
    pcl_value: float
    baseline_trial: str
    baseline_value: float
    epoch: int
    noise: Noise
    pcl_trials: int

    @property
    def gap(self) -> float:
        sign = -1.0 if registry.direction(self.metric) == "min" else 1.0
        return sign * (self.pcl_value - self.baseline_value)

    @property
    def verdict(self) -> str:
        r = self.noise.resolution
        if math.isnan(r):
            return "noise unknown"
        if self.gap > r:
            return "PCL beats MoCo v2"
        if self.gap < -r:
            return "MoCo v2 beats PCL"
        return "not resolved"

    def sentence(self) -> str:
        unit = "points" if registry.unit(self.metric) == "%" else ""
        head = {"PCL beats MoCo v2": "The best PCL trial beats the MoCo v2 baseline by more than the noise",
                "MoCo v2 beats PCL": "**No PCL trial beats MoCo v2 alone**: the baseline is ahead by more than "
                                     "the noise",
                "not resolved": "The best PCL trial does **not** beat the MoCo v2 baseline by more than the noise",
                "noise unknown": "The best PCL trial against the MoCo v2 baseline (noise unknown)"}[self.verdict]
        return (f"{head}: `{self.metric}` {self.pcl_value:.2f} (trial {self.pcl_trial}) vs {self.baseline_value:.2f} "
                f"(trial {self.baseline_trial}) at epoch {self.epoch}, a gap of {_signed(self.gap)} {unit} against a "
                f"resolution of {self.noise.resolution:.1f} {unit}. The best of the {self.pcl_trials} PCL trials that "
                f"reached epoch {self.epoch} was picked on this same validation split, so its lead is optimistic; "
                "an ablation with paired seeds (search_spaces/pcl_vs_moco.yaml) settles it.")


def baseline_check(trials: pd.DataFrame, epochs: pd.DataFrame, metric: str, noise: Noise) -> BaselineCheck | None:
    """The best PCL trial (at the budget the baseline reached) against the baseline trial; None when
    the search ran no baseline or no PCL trial reached that budget."""
    if ARM_KEY not in trials.columns:
        return None
    base = trials[trials[ARM_KEY] == BASELINE_ARM]
    base = base[base["epochs"] > 0]
    if not len(base):
        return None
    b = base.iloc[0]
    epoch = int(b["epochs"])
    at = values_at(epochs, metric, epoch)
    pcl_ids = trials.loc[trials[ARM_KEY] != BASELINE_ARM, "trial_id"]
    pcl = at[at.index.isin(pcl_ids)]
    if b["trial_id"] not in at.index or not len(pcl):
        return None
    best_id = pcl.idxmax() if registry.direction(metric) != "min" else pcl.idxmin()
    return BaselineCheck(metric, str(best_id), float(pcl[best_id]), str(b["trial_id"]), float(at[b["trial_id"]]),
                         epoch, noise, int(len(pcl)))


# --------------------------------------------------------------------------- group comparisons at one budget

@dataclass
class GroupComparison:
    """A comparison of groups of a TPE search's trials at one budget."""

    name: str
    budget: str
    """``"finished trials at epoch 60"`` or ``"all 24 trials at epoch 6 (the largest every one reached)"``."""
    table: pd.DataFrame
    """:func:`analysis.summaries.ci_table` columns plus ``points`` (the values of cells with fewer
    than 3 replicates, whose interval is then NaN)."""
    confounders: list[str]
    by: list[str]


def with_points(table: pd.DataFrame, d: pd.DataFrame, by: Sequence[str], value: str) -> pd.DataFrame:
    """Blank the interval of cells with fewer than :data:`MIN_INTERVAL` replicates and list their points."""
    t = table.copy()
    pts = []
    for _, r in t.iterrows():
        mask = pd.Series(True, index=d.index)
        for c in by:
            mask &= d[c].astype(object).where(d[c].notna(), NOT_SET).astype(str) == str(r[c])
        pts.append(", ".join(f"{v:.1f}" for v in d.loc[mask, value]) if r["n"] < MIN_INTERVAL else "")
    t["points"] = pts
    few = t["n"] < MIN_INTERVAL
    for c in ("std", "ci_low", "ci_high", "ci_half"):
        t.loc[few, c] = math.nan
    return t


def confounders(d: pd.DataFrame, compared: Sequence[str], params: Sequence[Param]) -> list[str]:
    """Searched parameters whose values differ between the trials compared, other than the compared
    ones, the seed, the arm, and parameters that exist only under a compared one (``when`` on it:
    top-K's ``pcl.k`` belongs to the loss being compared)."""
    out = []
    for p in params:
        if p.name in compared or p.name in (SEED_KEY, ARM_KEY) or p.name not in d.columns:
            continue
        if any(k in compared for k, _ in p.when):
            continue
        if d[p.name].dropna().astype(str).nunique() > 1:
            out.append(p.name)
    return out
