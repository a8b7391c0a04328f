"""PNG figures of an experiment that Optuna has no figure for, or that stand in for Optuna's when
there is no study (see :mod:`analysis.study`).

Every function takes an :class:`analysis.Experiment` (or a table) and a path, writes the figure
and returns the path, or returns None when there is nothing to draw (e.g. no prototype metrics).
Legends sit outside the axes; axis labels carry the registry's units (:func:`pcl_tune.metrics.label`).

Figures are built as :class:`matplotlib.figure.Figure` objects, not through pyplot: they need no
backend, leave the caller's backend (a notebook's) alone and hold no global figure state.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D

from pcl_tune.metrics import label as metric_label

from .summaries import bin_values

if TYPE_CHECKING:
    from .experiment import Experiment
    from .importance import Importance

DPI = 110
STATUS_STYLE = {
    # status: (marker, colour of the marker edge, legend text)
    "finished": ("o", "black", "finished (max_t epochs)"),
    "stopped": ("X", "tab:red", "stopped early by ASHA"),
    "errored": ("x", "black", "errored"),
    "running": (">", "tab:gray", "running (no terminal result)"),
    "pending": (".", "tab:gray", "pending (not started)"),
}
STATUS_COLOR = {"finished": "tab:blue", "stopped": "tab:red", "errored": "black", "running": "tab:gray", "pending": "lightgray"}
MAX_TRIAL_LEGEND = 16


def _save(fig: Figure, path: Path) -> Path:
    """Write the PNG with every legend inside the saved area (legends sit outside the axes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    legends = [a for ax in fig.axes for a in ax.get_children() if isinstance(a, Legend)]
    extra = list(dict.fromkeys(fig.get_default_bbox_extra_artists() + list(fig.legends) + legends))
    fig.savefig(path, dpi=DPI, bbox_inches="tight", bbox_extra_artists=extra)
    return path


def _subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float],
              squeeze: bool = True) -> tuple[Figure, Any]:
    """``pyplot.subplots`` without pyplot: a detached Figure and its axes."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def _colors(n: int) -> list[tuple[float, float, float, float]]:
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def objective_vs_epoch(exp: Experiment, path: Path) -> Path | None:
    """The objective of every trial over its epochs. The last epoch of each trial carries a marker
    for its status (ASHA-stopped trials: red X); grey dotted lines mark ASHA's rungs."""
    ep, metric = exp.epochs, exp.metric
    if not len(ep) or metric not in ep.columns:
        return None
    trials = exp.trials
    fig, ax = _subplots(figsize=(8.5, 4.8))
    colors = _colors(len(trials))
    handles = []
    for color, (_, t) in zip(colors, trials.iterrows()):
        d = ep[ep["trial_id"] == t["trial_id"]][["epoch", metric]].dropna()
        if not len(d):
            continue
        (line,) = ax.plot(d["epoch"], d[metric], "-", color=color, lw=1.4, alpha=0.9,
                          label=f"{t['trial_id']} ({t['status']})")
        handles.append(line)
        marker, edge, _ = STATUS_STYLE.get(str(t["status"]), ("o", "black", ""))
        last = d.iloc[-1]
        ax.plot([last["epoch"]], [last[metric]], marker=marker, ms=9, color=color, mec=edge, mew=1.5, ls="none",
                zorder=5)
    for r in exp.rungs():
        ax.axvline(r, color="0.6", ls=":", lw=1)
    best = exp.best() if ep[metric].notna().any() else None
    if best is not None:
        ax.plot([best.epoch], [best.value], marker="*", ms=16, color="gold", mec="black", ls="none", zorder=6)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{metric} per epoch, {len(trials)} trials ({exp.mode} is better)")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    status_handles = [Line2D([], [], marker=m, color="0.5", mec=e, ls="none", ms=8, label=txt)
                      for s, (m, e, txt) in STATUS_STYLE.items() if (trials["status"] == s).any()]
    if best is not None:
        status_handles.append(Line2D([], [], marker="*", color="gold", mec="black", ls="none", ms=12,
                                     label=f"best: {best.value:.3g} ({best.trial_id}, epoch {best.epoch})"))
    if exp.rungs():
        status_handles.append(Line2D([], [], color="0.6", ls=":", label="ASHA rung"))
    leg = ax.legend(handles=status_handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
                    title="last epoch marker", title_fontsize=8, frameon=False)
    ax.add_artist(leg)
    if len(handles) <= MAX_TRIAL_LEGEND:
        ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(1.02, 0.0), fontsize=8, title="trial",
                  title_fontsize=8, frameon=False)
    return _save(fig, path)


def best_so_far(exp: Experiment, path: Path) -> Path | None:
    """Each trial's objective in start order, with the running best as a step line."""
    h = exp.best_so_far()
    if not h["value"].notna().any():
        return None
    fig, ax = _subplots(figsize=(7.5, 4.0))
    for status, (marker, _, txt) in STATUS_STYLE.items():
        d = h[h["status"] == status]
        if len(d):
            ax.plot(d["order"], d["value"], marker=marker, ls="none", ms=7, label=f"trial: {txt}",
                    color=STATUS_COLOR[status])
    ax.step(h["order"], h["best_so_far"], where="post", color="tab:green", lw=2, label="best so far")
    ax.set_xlabel("trial (in start order)")
    ax.set_ylabel(f"trial's score: {exp.score} {metric_label(exp.metric)}")
    ax.set_title("search progress")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    return _save(fig, path)


def importance_bars(imp: Importance, path: Path) -> Path | None:
    """Horizontal bars of the importance shares; the method is in the title."""
    t = imp.table.dropna(subset=["share"])
    if not len(t):
        return None
    t = t.iloc[::-1]
    fig, ax = _subplots(figsize=(7.5, 0.45 * len(t) + 1.4))
    colors = ["tab:orange" if m == "eta^2" else "tab:blue" for m in t["method"]]
    ax.barh(t["param"], t["share"], color=colors)
    for y, (v, m) in enumerate(zip(t["share"], t["method"])):
        ax.text(v, y, f" {v:.2f}" + ("" if imp.evaluator else f" ({m})"), va="center", fontsize=8)
    ax.set_xlabel("importance (share of the total, 0-1)")
    ax.set_xlim(0, max(1e-9, float(t["share"].max())) * 1.3)
    method = imp.method if imp.evaluator else "simple fallback: |Spearman| / eta^2"
    ax.set_title(f"parameter importance: {method}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def param_effects(exp: Experiment, params: Sequence[str], path: Path) -> Path | None:
    """The trial objective against each parameter: scatter (log axis for log-scale ranges) for
    numeric parameters, box plot with the points for categorical ones."""
    t = exp.trials[exp.trials[exp.objective_col].notna()]
    params = [p for p in params if p in t.columns and t[p].notna().any()]
    if not params or not len(t):
        return None
    ncols = min(3, len(params))
    nrows = math.ceil(len(params) / ncols)
    fig, axes = _subplots(nrows, ncols, figsize=(4.6 * ncols, 3.7 * nrows), squeeze=False)
    y_label = f"trial's score: {exp.score} {metric_label(exp.metric)}"
    for ax, p in zip(axes.flat, params):
        spec = exp.space.param(p)
        if exp.is_numeric(p):
            d = t[t[p].notna()]
            for status, (marker, _, txt) in STATUS_STYLE.items():
                s = d[d["status"] == status]
                if len(s):
                    ax.plot(s[p].astype(float), s[exp.objective_col], marker=marker, ls="none", ms=7, alpha=0.85,
                            color=STATUS_COLOR[status], label=txt)
            if spec is not None and spec.log:
                _log_x(ax)
            elif spec is not None and spec.kind == "int":
                ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
            ax.set_xlabel(p + (" (log scale)" if spec is not None and spec.log else ""))
            missing = int(t[p].isna().sum())
            if missing:
                ax.set_title(f"{p} (not set in {missing} trial(s))", fontsize=9)
        else:
            labels = bin_values(t[p].astype(object), order=exp.choice_orders().get(p))
            cats = [c for c in labels.cat.categories if (labels == c).any()]
            data = [t.loc[labels == c, exp.objective_col].to_numpy(float) for c in cats]
            ax.boxplot(data, showfliers=False)
            ax.set_xticks(range(1, len(cats) + 1), [_short(c) for c in cats], rotation=20, ha="right", fontsize=8)
            rng = np.random.default_rng(0)
            for i, vals in enumerate(data, 1):
                ax.plot(i + rng.uniform(-0.12, 0.12, len(vals)), vals, "o", color="0.3", alpha=0.6, ms=5)
            ax.set_xlabel(p)
        ax.set_ylabel(y_label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(params):]:
        ax.set_visible(False)
    handles = [Line2D([], [], marker=m, color=STATUS_COLOR[s], ls="none", ms=7, label=txt)
               for s, (m, _, txt) in STATUS_STYLE.items() if (t["status"] == s).any()]
    if any(exp.is_numeric(p) for p in params):
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles), fontsize=8,
                   frameon=False, title="numeric panels: marker = trial status", title_fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
    else:
        fig.tight_layout()
    return _save(fig, path)


def _log_x(ax: Axes) -> None:
    """Log-scale x axis with a few plain tick labels (1-2-5 steps, finer for a narrow range)."""
    _log_axis(ax, "x")


def _log_axis(ax: Axes, which: str) -> None:
    """Log scale on axis ``which`` (``x`` or ``y``) with a few plain tick labels."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    lo, hi = ax.get_xlim() if which == "x" else ax.get_ylim()
    ticks: list[float] = []
    for mantissas in ((1.0, 2.0, 5.0), (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)):
        ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                 for m in mantissas if lo <= m * 10.0 ** k <= hi]
        if len(ticks) >= 3:
            break
    if len(ticks) < 2:
        ticks = [float(f"{v:.2g}") for v in np.geomspace(lo, hi, 4)[1:-1]]
    axis.set_major_locator(ticker.FixedLocator(ticks))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _short(label: str, n: int = 22) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def _levels(columns: Sequence[str], prefix: str) -> list[int]:
    pat = re.compile(rf"^{prefix}_(\d+)$")
    return sorted(int(m.group(1)) for c in columns if (m := pat.match(c)))


def proto_levels(exp: Experiment, path: Path) -> Path | None:
    """``acc_proto_i`` (%) and ``loss_proto_i`` per clustering level over epochs: the mean over the
    trials that report the level (line) and their min-max range (band)."""
    ep = exp.epochs
    levels = sorted(set(_levels(ep.columns, "acc_proto")) | set(_levels(ep.columns, "loss_proto")))
    if not levels or not any(ep.get(f"acc_proto_{i}", pd.Series(dtype=float)).notna().any() for i in levels):
        return None
    fig, axes = _subplots(1, 2, figsize=(11, 4.2))
    colors = _colors(len(levels))
    for ax, prefix, ylabel in ((axes[0], "acc_proto", "prototype accuracy acc_proto_i (%)"),
                               (axes[1], "loss_proto", "prototype loss loss_proto_i")):
        for color, i in zip(colors, levels):
            col = f"{prefix}_{i}"
            if col not in ep.columns or not ep[col].notna().any():
                continue
            g = ep[["epoch", col]].dropna().groupby("epoch")[col].agg(["mean", "min", "max", "count"])
            ax.plot(g.index, g["mean"], "-o", ms=4, color=color, label=f"level {i}")
            ax.fill_between(g.index, g["min"], g["max"], color=color, alpha=0.15, lw=0)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    warm = [int(v) for v in exp.epochs.loc[exp.epochs.get("acc_proto", pd.Series(dtype=float)).isna(), "epoch"]] \
        if "acc_proto" in ep.columns else []
    if warm:
        span = f"epoch {min(warm)}" if min(warm) == max(warm) else f"epochs {min(warm)}-{max(warm)}"
        note = f"; none in warm-up ({span})"
    else:
        note = ""
    fig.suptitle(f"prototype metrics per level: mean over trials, band = min-max{note}", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False,
               title="clustering level i\n(i-th count of the\ncluster schedule)", title_fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def comparison(table: pd.DataFrame, group: str, row: str | None, metric: str, path: Path, title: str,
               groups: Sequence[str] | None = None, replicates: str = "seeds") -> Path | None:
    """Mean objective with its 95 % t-interval over ``replicates`` per ``group`` value (one colour
    each, in the order of ``groups`` when given), side by side for every ``row`` value (e.g. cluster
    schedule). Groups with a ``points`` entry (fewer than 3 replicates) are drawn as their points."""
    if not len(table):
        return None
    rows = list(dict.fromkeys(table[row].astype(str))) if row else ["(all)"]
    present = list(dict.fromkeys(table[group].astype(str)))
    groups = [str(g) for g in (groups or []) if str(g) in present] + \
        [g for g in present if g not in [str(x) for x in (groups or [])]]
    fig, ax = _subplots(figsize=(max(6.0, 1.1 * len(rows) * max(1, len(groups)) * 0.5 + 3), 4.2))
    width = 0.8 / max(1, len(groups))
    colors = _colors(len(groups))
    for j, (gname, color) in enumerate(zip(groups, colors)):
        d = table[table[group].astype(str) == gname]
        xs, ys, err = [], [], []
        for _, r in d.iterrows():
            x = rows.index(str(r[row])) if row else 0
            pts = str(r.get("points", "") or "")
            if pts:  # too few replicates for an interval: the points themselves, no mean marker
                vals = [float(v) for v in pts.split(",")]
                ax.plot([x - 0.4 + width * (j + 0.5)] * len(vals), vals, "x", color=color, ms=6)
                continue
            xs.append(x - 0.4 + width * (j + 0.5))
            ys.append(r["mean"])
            err.append(0.0 if pd.isna(r["ci_half"]) else r["ci_half"])
        ax.errorbar(xs, ys, yerr=err, fmt="o", color=color, capsize=4, ms=7, label=gname)
    ax.set_xticks(range(len(rows)), rows, rotation=15 if len(rows) > 3 else 0)
    ax.set_xlabel(row or "")
    ax.set_ylabel(f"mean {metric_label(metric)} at the table's budget")
    ax.set_title(f"{title}\n(error bars: 95% t-interval over {replicates}; x: the points of groups with < 3)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False, title=group, title_fontsize=8)
    return _save(fig, path)


def head_temperatures(exp: Experiment, path: Path) -> Path | None:
    """Multi-head runs (``model.head: amcl``): per head, the positive pairs' temperature over epochs
    (each trial's mean as a line, its 10th-90th percentile as a band) and the head's instance
    accuracy; None when no trial reports them. A temperature sliding to the range's lower end is
    the collapse the penalty is there to prevent."""
    ep = exp.epochs
    heads = _levels(ep.columns, "tau_pos_mean_head")
    if not heads or not any(ep[f"tau_pos_mean_head_{h}"].notna().any() for h in heads):
        return None
    fig, axes = _subplots(1, 2, figsize=(11, 4.2))
    colors = _colors(len(heads))
    for color, h in zip(colors, heads):
        cols = [f"tau_pos_mean_head_{h}", f"tau_pos_p10_head_{h}", f"tau_pos_p90_head_{h}", f"acc_inst_head_{h}"]
        first = True
        for _, g in ep.dropna(subset=[cols[0]]).groupby("trial_id"):
            g = g.sort_values("epoch")
            axes[0].plot(g["epoch"], g[cols[0]], "-", color=color, lw=1.2, label=f"head {h}" if first else None)
            if cols[1] in g and cols[2] in g:
                axes[0].fill_between(g["epoch"], g[cols[1]], g[cols[2]], color=color, alpha=0.12, lw=0)
            if cols[3] in g:
                axes[1].plot(g["epoch"], g[cols[3]], "-", color=color, lw=1.2)
            first = False
    axes[0].set_ylabel("positive-pair temperature (mean; band p10-p90)")
    _log_y(axes[0])
    axes[1].set_ylabel(metric_label("acc_inst_head_0").replace("_0", "_h"))
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.suptitle("multi-head runs: each head's temperatures and instance accuracy, one line per trial", fontsize=10)
    axes[0].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["best_so_far", "comparison", "head_temperatures", "importance_bars", "objective_vs_epoch",
           "param_effects", "proto_levels"]


def pbt_schedules(exp: Experiment, path: Path) -> Path | None:
    """Population Based Training: per epoch, the objective of each trial's final model (from its
    checkpoint's records) and each mutated numeric setting and the finest cluster count along its
    lineage (:mod:`analysis.pbt`). The best trial is drawn thick; the others thin."""
    from . import pbt

    table = pbt.schedules(exp)
    if not len(table):
        return None
    keys = pbt.numeric_settings(table, pbt.mutated(exp))
    table = table.assign(finest_clusters=[float(c.split(",")[-1]) if isinstance(c, str) and c else math.nan
                                          for c in table["clusters"]])
    panels = ["objective", *keys] + (["finest_clusters"] if table["finest_clusters"].notna().any() else [])
    try:
        best_id = exp.best().trial_id
    except Exception:
        best_id = None
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _subplots(nrows, ncols, figsize=(11.0, 2.6 * nrows))
    flat = list(np.ravel(axes))
    trials = list(dict.fromkeys(table["trial_id"]))
    colors = dict(zip(trials, _colors(len(trials))))
    for ax, panel in zip(flat, panels):
        for t in trials:
            lw, alpha, z = (2.6, 1.0, 5) if t == best_id else (1.0, 0.55, 2)
            if panel == "objective":
                d = pbt.lineage_metrics(exp, t)
                if not len(d) or exp.metric not in d.columns:
                    continue
                ax.plot(d["epoch"], d[exp.metric], "-", color=colors[t], lw=lw, alpha=alpha, zorder=z)
            else:
                d = table[table["trial_id"] == t]
                ax.step(d["epoch"], d[panel].astype(float), where="mid", color=colors[t], lw=lw, alpha=alpha, zorder=z)
        if panel == "objective":
            ax.set_ylabel(metric_label(exp.metric))
            ax.set_title("objective along each trial's lineage", fontsize=9)
        else:
            ax.set_ylabel("finest cluster count" if panel == "finest_clusters" else panel, fontsize=8)
            param = exp.space.param(panel)
            if (param is not None and param.log) or panel == "finest_clusters":
                _log_y(ax)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    for ax in flat[max(0, len(panels) - ncols):len(panels)]:
        ax.set_xlabel("epoch")
    if best_id is not None:
        fig.suptitle(f"Settings learned by Population Based Training (thick: best trial {best_id})", fontsize=10)
    return _save(fig, path)


def _log_y(ax: Axes) -> None:
    """A log y axis with plain tick labels (settings span decades)."""
    _log_axis(ax, "y")
