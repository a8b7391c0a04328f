"""Summary tables of a search, computed from the trials table with pandas (intervals and rank
correlations with ``scipy.stats``).

Every function takes the ``trials`` DataFrame of :class:`analysis.Experiment` (one row per trial,
the per-trial objective in ``best_<metric>``) and returns a new DataFrame whose columns are listed
in its docstring. The objective of a trial is its best value over its epochs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

NOT_SET = "(not set)"
"""Group label of trials in which a conditional parameter was not sampled."""
ALL = "(all)"

SCHEDULE = "pcl.cluster_schedule"
PROTO_LOSS = "pcl.proto_loss"
DUPLICATES = "pcl.duplicates"
SEED = "seed"
# Prototype losses whose ProtoNCE levels use pcl.duplicates (top-K levels ignore it).
USES_DUPLICATES = ("proto_nce", "topk_below")


# --------------------------------------------------------------------------- confidence intervals

def mean_ci(values: Iterable[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean and Student-t interval of independent replicates (NaNs dropped), via ``scipy.stats``.

    Returns a dict with ``n``, ``mean``, ``std`` (sample, ddof=1), ``sem``, ``ci_half`` (half-width
    ``t_{(1+confidence)/2, n-1} * sem``), ``ci_low`` and ``ci_high``. With one replicate the spread
    and the interval are NaN; with none, everything but ``n`` is NaN.
    """
    x = pd.to_numeric(pd.Series(list(values), dtype="float64"), errors="coerce").dropna().to_numpy()
    n = int(x.size)
    mean = float(x.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "sem": math.nan, "ci_half": math.nan,
                "ci_low": math.nan, "ci_high": math.nan}
    sem = float(stats.sem(x))
    if sem == 0:  # identical replicates: scipy returns NaN bounds for a zero scale
        low = high = mean
    else:
        low, high = (float(v) for v in stats.t.interval(confidence, n - 1, loc=mean, scale=sem))
    return {"n": n, "mean": mean, "std": float(x.std(ddof=1)), "sem": sem, "ci_half": high - mean,
            "ci_low": low, "ci_high": high}


def _ordered(df: pd.DataFrame, cols: Sequence[str], orders: dict[str, Sequence[Any]] | None) -> pd.DataFrame:
    """Sort rows by ``cols``, in the given choice order where one is known, else by value."""
    if not len(df) or not cols:
        return df.reset_index(drop=True)
    keys = []
    for c in cols:
        order = [str(v) for v in (orders or {}).get(c, [])]
        s = df[c].astype(str)
        rank = {v: i for i, v in enumerate(order)}
        extra = sorted(v for v in s.unique() if v not in rank)
        rank.update({v: len(order) + i for i, v in enumerate(extra)})
        keys.append(s.map(rank))
    tmp = pd.DataFrame({f"_k{i}": k for i, k in enumerate(keys)}, index=df.index)
    idx = tmp.sort_values(list(tmp.columns), kind="stable").index
    return df.loc[idx].reset_index(drop=True)


def ci_table(df: pd.DataFrame, by: Sequence[str], value: str, replicate: str | None = None,
             mode: str = "max", confidence: float = 0.95,
             orders: dict[str, Sequence[Any]] | None = None) -> pd.DataFrame:
    """Mean of ``value`` with a t confidence interval per group of ``by``.

    With ``replicate`` (e.g. ``"seed"``) the rows of a group are first averaged per replicate
    value, so each seed counts once (two trials that differ only in a setting the group pools over
    do not narrow the interval); without it every row is a replicate.

    Columns: the ``by`` columns (missing values shown as ``"(not set)"``), ``n`` (replicates),
    ``n_trials`` (rows), ``mean``, ``std``, ``ci_low``, ``ci_high``, ``ci_half`` (``confidence``
    t-interval over the replicates; NaN when n = 1) and ``best`` (max, or min for ``mode="min"``,
    of the rows).
    """
    by = list(by)
    cols = by + ["n", "n_trials", "mean", "std", "ci_low", "ci_high", "ci_half", "best"]
    d = df[df[value].notna()].copy() if value in df.columns else df.iloc[0:0].copy()
    if not len(d):
        return pd.DataFrame(columns=cols)
    for c in by:
        d[c] = d[c].astype(object).where(d[c].notna(), NOT_SET)
    rows = []
    for key, g in d.groupby(by, sort=False, dropna=False) if by else [((), d)]:
        key = key if isinstance(key, tuple) else (key,)
        if replicate is not None and replicate in g.columns:
            reps = g.groupby(g[replicate].astype(object).where(g[replicate].notna(), NOT_SET), dropna=False)[value].mean()
        else:
            reps = g[value]
        ci = mean_ci(reps, confidence)
        best = g[value].max() if mode == "max" else g[value].min()
        rows.append({**dict(zip(by, key)), "n": ci["n"], "n_trials": len(g), "mean": ci["mean"],
                     "std": ci["std"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
                     "ci_half": ci["ci_half"], "best": float(best)})
    return _ordered(pd.DataFrame(rows, columns=cols), by, orders)


def ci_pivot(table: pd.DataFrame, row: str | None, col: str, digits: int = 2) -> pd.DataFrame:
    """A :func:`ci_table` as a wide display table: ``row`` values down, ``col`` values across,
    cells ``"mean ± ci_half (n=N)"`` (just ``"mean (n=1)"`` when the interval is undefined)."""
    if not len(table):
        return pd.DataFrame()

    def cell(r: pd.Series) -> str:
        if pd.isna(r["ci_half"]):
            return f"{r['mean']:.{digits}f} (n={int(r['n'])})"
        return f"{r['mean']:.{digits}f} ± {r['ci_half']:.{digits}f} (n={int(r['n'])})"

    t = table.copy()
    t["cell"] = t.apply(cell, axis=1)
    if row is None:
        t["_row"] = ALL
        row = "_row"
    rows = list(dict.fromkeys(t[row].astype(str)))
    cols = list(dict.fromkeys(t[col].astype(str)))
    wide = pd.DataFrame("", index=pd.Index(rows, name=row if row != "_row" else ""), columns=cols)
    for _, r in t.iterrows():
        wide.loc[str(r[row]), str(r[col])] = r["cell"]
    wide.columns.name = col
    return wide


# --------------------------------------------------------------------------- per-parameter summaries

def _fmt_num(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.3g}"


def bin_values(series: pd.Series, bins: int = 4, order: Sequence[Any] | None = None) -> pd.Series:
    """Group labels for a parameter: categorical values as strings; numeric values with more than
    ``bins`` distinct values in quantile bins (``pd.qcut``, or equal-width ``pd.cut`` when quantiles
    coincide) labelled ``"[lo, hi]"``. Missing values are labelled ``"(not set)"``. The result is an
    ordered Categorical: bins in increasing order, categories in ``order`` (e.g. the choices of
    the space) where given, else in order of appearance."""
    s = series
    numeric = pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
    present = s.dropna()
    if not numeric or present.nunique() <= bins:
        if numeric:
            order = [_fmt_num(float(v)) if not float(v).is_integer() else str(int(v)) for v in sorted(present.unique())]
            labels = s.map(lambda v: NOT_SET if pd.isna(v) else (str(int(v)) if float(v).is_integer() else _fmt_num(float(v))))
        else:
            seen = list(dict.fromkeys(str(v) for v in present))
            order = [str(v) for v in (order or []) if str(v) in seen] + seen
            labels = s.map(lambda v: NOT_SET if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
        cats = order + ([NOT_SET] if (labels == NOT_SET).any() else [])
        return pd.Series(pd.Categorical(labels, categories=list(dict.fromkeys(cats)), ordered=True), index=s.index)
    x = present.astype(float)
    try:
        cut = pd.qcut(x, q=bins, duplicates="drop")
        if cut.cat.categories.size < 2:
            raise ValueError
    except ValueError:
        cut = pd.cut(x, bins=bins)
    codes = pd.Series(cut.cat.codes, index=x.index)
    # Label each bin by the smallest and largest value in it (qcut's edges are padded).
    names = {}
    for c in sorted(codes.unique()):
        v = x[codes == c]
        names[c] = f"[{_fmt_num(v.min())}, {_fmt_num(v.max())}]" if v.min() != v.max() else _fmt_num(v.min())
    labels = pd.Series(NOT_SET, index=s.index, dtype=object)
    labels.loc[x.index] = codes.map(names)
    cats = list(dict.fromkeys(names.values())) + ([NOT_SET] if (labels == NOT_SET).any() else [])
    return pd.Series(pd.Categorical(labels, categories=cats, ordered=True), index=s.index)


def effects(trials: pd.DataFrame, params: Sequence[str], objective: str, bins: int = 4,
            orders: dict[str, Sequence[Any]] | None = None) -> pd.DataFrame:
    """Objective statistics per value of each parameter (numeric parameters binned, see
    :func:`bin_values`; categories in the order of ``orders[param]`` where given). Trials without an
    objective value are left out.

    Columns: ``param``, ``value`` (the value or bin label), ``count``, ``mean``, ``std``, ``min``,
    ``max`` of the objective.
    """
    cols = ["param", "value", "count", "mean", "std", "min", "max"]
    d = trials[trials[objective].notna()] if objective in trials.columns else trials.iloc[0:0]
    parts = []
    for p in params:
        if p not in d.columns or not len(d):
            continue
        labels = bin_values(d[p], bins, (orders or {}).get(p))
        g = d.groupby(labels, observed=True)[objective].agg(["count", "mean", "std", "min", "max"])
        g = g.reset_index(names="value")
        g["value"] = g["value"].astype(str)
        g.insert(0, "param", p)
        parts.append(g)
    if not parts:
        return pd.DataFrame(columns=cols)
    return pd.concat(parts, ignore_index=True)[cols]


def leaderboard(trials: pd.DataFrame, objective: str, mode: str = "max", top: int = 10,
                params: Sequence[str] = (), *, finished_first: bool = False) -> pd.DataFrame:
    """The ``top`` trials by objective (trials without a value last, then dropped if beyond ``top``);
    with ``finished_first``, finished trials before the others (a trial's last value is then at
    different budgets: a stopped trial's is not ranked among finished ones).

    Columns: ``rank``, ``trial_id``, ``status``, the objective column, ``best_epoch``, ``epochs``,
    ``best_so_far`` (best objective among the trials started up to and including this one: did the
    search still improve when it ran?), then the ``params``.
    """
    hist = best_so_far(trials, objective, mode).set_index("trial_id")["best_so_far"]
    d = trials.sort_values(objective, ascending=(mode == "min"), na_position="last", kind="stable")
    if finished_first and "status" in d.columns:
        d = d.sort_values("status", key=lambda s: s != "finished", kind="stable")
    d = d.head(top)
    out = pd.DataFrame({"rank": np.arange(1, len(d) + 1), "trial_id": d["trial_id"].to_numpy(),
                        "status": d["status"].to_numpy(), objective: d[objective].to_numpy(),
                        "best_epoch": d["best_epoch"].to_numpy() if "best_epoch" in d else np.nan,
                        "epochs": d["epochs"].to_numpy()})
    out["best_so_far"] = out["trial_id"].map(hist).to_numpy()
    for p in params:
        if p in d.columns:
            out[p] = d[p].to_numpy()
    return out


def best_so_far(trials: pd.DataFrame, objective: str, mode: str = "max") -> pd.DataFrame:
    """The search's progress in trial start order.

    Columns: ``order`` (0 = first trial started), ``trial_id``, ``status``, ``value`` (the trial's
    objective), ``best_so_far`` (running best; NaN until a trial reports), ``new_best`` (bool).
    """
    d = trials.sort_values("order", kind="stable") if "order" in trials.columns else trials
    value = pd.to_numeric(d[objective], errors="coerce") if objective in d.columns else pd.Series(np.nan, index=d.index)
    running = value.cummax() if mode == "max" else value.cummin()
    # cummax skips NaN but leaves NaN in place: carry the running best forward.
    running = running.ffill()
    prev = running.shift(1)
    new = value.notna() & (prev.isna() | (value > prev if mode == "max" else value < prev))
    return pd.DataFrame({"order": np.arange(len(d)), "trial_id": d["trial_id"].to_numpy(),
                         "status": d["status"].to_numpy(), "value": value.to_numpy(),
                         "best_so_far": running.to_numpy(), "new_best": new.to_numpy()})


# --------------------------------------------------------------------------- compute

def compute_accounting(trials: pd.DataFrame, max_t: int | None, epochs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Epochs the search spent against running every trial for the full budget ``max_t``.

    One row. Columns: ``trials``, ``finished``, ``stopped``, ``errored``, ``running``, ``pending`` (counts),
    ``max_t``, ``epochs_spent`` (sum of the epochs each trial ran), ``epochs_full_budget``
    (``trials * max_t``), ``epochs_saved`` (full - spent), ``saved_fraction`` (saved / full),
    ``train_time_s`` (sum of per-epoch ``time_epoch`` over all trials), ``time_per_epoch_s`` (mean),
    ``full_budget_time_s`` (``time_per_epoch_s * epochs_full_budget``, an estimate),
    ``trial_time_s`` (sum of Tune's ``time_total_s`` per trial, start-up included) and ``span_s``
    (first trial start to last result).
    """
    n = len(trials)
    counts = trials["status"].value_counts() if n else pd.Series(dtype=int)
    spent = int(trials["epochs"].sum()) if n else 0
    full = int(n * max_t) if max_t else math.nan
    train_time = float(trials["train_time_s"].sum(min_count=1)) if n and "train_time_s" in trials else math.nan
    per_epoch = train_time / spent if spent and not math.isnan(train_time) else math.nan
    span = math.nan
    if epochs is not None and len(epochs) and "timestamp" in epochs.columns and n:
        last = pd.to_numeric(epochs["timestamp"], errors="coerce").max()
        first = pd.to_numeric(trials["start_time"], errors="coerce").min()
        span = float(last - first) if pd.notna(last) and pd.notna(first) else math.nan
    row = {
        "trials": n,
        **{s: int(counts.get(s, 0)) for s in ("finished", "stopped", "errored", "running", "pending")},
        "max_t": max_t if max_t else math.nan,
        "epochs_spent": spent,
        "epochs_full_budget": full,
        "epochs_saved": (full - spent) if isinstance(full, int) else math.nan,
        "saved_fraction": (1 - spent / full) if isinstance(full, int) and full else math.nan,
        "train_time_s": train_time,
        "time_per_epoch_s": per_epoch,
        "full_budget_time_s": per_epoch * full if isinstance(full, int) else math.nan,
        "trial_time_s": float(trials["wall_time_s"].sum(min_count=1)) if n and "wall_time_s" in trials else math.nan,
        "span_s": span,
    }
    return pd.DataFrame([row])


# --------------------------------------------------------------------------- simple importance

def _spearman(x: pd.Series, y: pd.Series) -> float:
    """``scipy.stats.spearmanr``'s rho; NaN when a side is constant."""
    if x.nunique() < 2 or y.nunique() < 2:
        return math.nan
    return float(stats.spearmanr(x.to_numpy(float), y.to_numpy(float)).statistic)


def eta_squared(groups: pd.Series, y: pd.Series) -> float:
    """Share of the variance of ``y`` explained by the group means (between-group SS / total SS)."""
    d = pd.DataFrame({"g": groups.astype(str), "y": y}).dropna()
    total = ((d["y"] - d["y"].mean()) ** 2).sum()
    if len(d) < 2 or total == 0 or d["g"].nunique() < 2:
        return math.nan
    g = d.groupby("g")["y"].agg(["count", "mean"])
    between = (g["count"] * (g["mean"] - d["y"].mean()) ** 2).sum()
    return float(between / total)


def simple_importance(trials: pd.DataFrame, params: dict[str, bool], objective: str) -> pd.DataFrame:
    """Rank-based parameter importance without a model (the fallback when Optuna's cannot run).

    ``params`` maps each parameter name to whether it is numeric. Numeric parameters score
    ``|Spearman rho|`` between the value and the objective over the trials where the parameter was
    set; categorical ones score eta squared (variance of the group means over the total variance).
    Both lie in [0, 1] but measure different things, and with few trials they are noisy.

    Columns: ``param``, ``importance`` (the score), ``share`` (scores normalised to sum to 1),
    ``method`` (``"|spearman|"`` or ``"eta^2"``), ``n`` (trials used); sorted by importance.
    """
    d = trials[trials[objective].notna()] if objective in trials.columns else trials.iloc[0:0]
    rows = []
    for p, numeric in params.items():
        if p not in d.columns:
            continue
        sub = d[d[p].notna()]
        if numeric:
            x = pd.to_numeric(sub[p], errors="coerce")
            ok = x.notna()
            score = abs(_spearman(x[ok], sub.loc[ok, objective])) if ok.sum() >= 3 else math.nan
            rows.append({"param": p, "importance": score, "method": "|spearman|", "n": int(ok.sum())})
        else:
            rows.append({"param": p, "importance": eta_squared(sub[p], sub[objective]), "method": "eta^2",
                         "n": len(sub)})
    out = pd.DataFrame(rows, columns=["param", "importance", "method", "n"])
    total = out["importance"].sum(min_count=1)
    out.insert(2, "share", out["importance"] / total if pd.notna(total) and total > 0 else math.nan)
    return out.sort_values("importance", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- loss ablation tables

def _varies(df: pd.DataFrame, col: str) -> bool:
    return col in df.columns and df[col].dropna().astype(str).nunique() > 1


def loss_variant_order(variants: Iterable[str], orders: dict[str, Sequence[Any]] | None = None) -> list[str]:
    """``loss_variant`` labels sorted by the listed order of ``pcl.proto_loss``, then of
    ``pcl.duplicates`` (unknown values last, alphabetically)."""
    orders = orders or {}
    losses = [str(v) for v in orders.get(PROTO_LOSS, [])]
    dups = [str(v) for v in orders.get(DUPLICATES, [])]

    def key(label: str) -> tuple[int, str, int, str]:
        loss, _, dup = label.partition(" / ")
        return (losses.index(loss) if loss in losses else len(losses), loss,
                dups.index(dup) if dup in dups else len(dups), dup)

    return sorted(dict.fromkeys(str(v) for v in variants), key=key)


def loss_variants(d: pd.DataFrame) -> pd.Series:
    """Each trial's ``loss_variant`` label: its ``pcl.proto_loss``, with `` / <pcl.duplicates>``
    appended for losses that use the duplicate handling when that setting varies."""
    variant = d[PROTO_LOSS].astype(str)
    if _varies(d, DUPLICATES):
        uses = d[PROTO_LOSS].isin(USES_DUPLICATES)
        variant = variant.where(~uses, variant + " / " + d[DUPLICATES].astype(str))
    return variant


def loss_comparisons(trials: pd.DataFrame, objective: str, mode: str = "max", confidence: float = 0.95,
                     orders: dict[str, Sequence[Any]] | None = None,
                     fixed_loss: str | None = None) -> dict[str, pd.DataFrame]:
    """Duplicate handling and prototype-loss comparison tables (see :func:`ci_table`), made only
    for what varies across the trials.

    * ``"duplicates"`` (when ``pcl.duplicates`` varies): rows per cluster schedule (if it varies),
      prototype loss (if it varies) and ``pcl.duplicates``, over the trials whose loss has ProtoNCE
      levels (proto_nce, topk_below: top-K levels ignore the setting).
    * ``"proto_loss"`` (when ``pcl.proto_loss`` varies): rows per cluster schedule (if it varies) and
      ``loss_variant`` (the loss, with `` / <duplicates>`` appended for losses that use it when
      ``pcl.duplicates`` varies).

    ``fixed_loss`` is the loss of every trial when ``pcl.proto_loss`` is not searched (a fixed top-K
    loss makes the duplicate setting moot: no table). Replicates are seeds when ``seed`` is a
    searched column (trials are first averaged per seed), else trials. Columns are those of
    :func:`ci_table`.
    """
    out: dict[str, pd.DataFrame] = {}
    d = trials[trials[objective].notna()] if objective in trials.columns else trials.iloc[0:0]
    if not len(d):
        return out
    rows = [SCHEDULE] if _varies(d, SCHEDULE) else []
    rep = SEED if SEED in d.columns else None
    if _varies(d, DUPLICATES) and (PROTO_LOSS in d.columns or fixed_loss is None or fixed_loss in USES_DUPLICATES):
        sub = d[d[PROTO_LOSS].isin(USES_DUPLICATES)] if PROTO_LOSS in d.columns else d
        by = rows + ([PROTO_LOSS] if _varies(sub, PROTO_LOSS) else []) + [DUPLICATES]
        out["duplicates"] = ci_table(sub, by, objective, rep, mode, confidence, orders)
    if _varies(d, PROTO_LOSS):
        dd = d.copy()
        dd["loss_variant"] = loss_variants(dd)
        order = dict(orders or {})
        order["loss_variant"] = loss_variant_order(dd["loss_variant"], orders)
        out["proto_loss"] = ci_table(dd, rows + ["loss_variant"], objective, rep, mode, confidence, order)
    return out
