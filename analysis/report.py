"""The experiment report: ``report.md`` and a self-contained ``report.html`` (PNGs embedded as
base64) in the experiment folder, with the tables (CSV + Parquet) and PNGs in ``<exp>/analysis/``.

``pcl_tune.search`` calls :func:`write_report` at the end of a search. Nothing here chooses a
matplotlib backend: :mod:`analysis.plots` needs none, and Optuna's figures (:mod:`analysis.study`)
use the caller's; a command-line caller should call ``matplotlib.use("Agg")`` first, as
``python -m analysis`` does.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd

from pcl_tune import metrics
from pcl_tune.config import flatten, unflatten

from . import pbt, plots, study
from .experiment import ANALYSIS_DIR, Experiment, compare, load
from .importance import MIN_TRIALS, Importance, make_evaluator
from .render import Block, fmt, render_html, render_markdown
from .summaries import ci_pivot, loss_variant_order
from .tables import STATUSES

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
MAX_EFFECT_PLOTS = 6

Figures = dict[str, Block | None]
"""Figure name -> its image block (path and caption), None when there was nothing to draw."""


# --------------------------------------------------------------------------- figures

def _important_params(exp: Experiment, imp: Importance) -> list[str]:
    ranked = [p for p in imp.table["param"] if p in exp.params]
    ranked += [p for p in exp.params if p not in ranked]
    return ranked[:MAX_EFFECT_PLOTS]


def _img(path: Path | None, caption: str) -> Block | None:
    return Block("img", caption, path=path) if path is not None else None


def _search_figures(exp: Experiment, imp: Importance, folder: Path) -> Figures:
    """Search progress, parameter importance and the objective against each parameter: Optuna's
    figures of the study when there is one for this objective, ours otherwise (and for the
    importance whenever the table came from the simple fallback)."""
    params = _important_params(exp, imp)
    st = exp.study() if exp.own_objective else None
    if st is None or not study.completed(st):
        return {
            "history": _img(plots.best_so_far(exp, folder / "best_so_far.png"),
                            "Search progress: each trial's objective in start order and the best so far"),
            "importance": _img(plots.importance_bars(imp, folder / "importance.png"), "Parameter importance"),
            "effects": _img(plots.param_effects(exp, params, folder / "param_effects.png"),
                            "Objective against the most important parameters"),
        }
    target = f"{exp.metric} at the trial's last epoch"
    told = ("Optuna's values: the objective at each trial's last epoch (at the stop for trials ASHA stopped), "
            "as the searcher was told")
    if imp.evaluator is not None:
        importance = _img(study.importance_plot(st, make_evaluator(imp.evaluator, imp.seed),
                                                folder / "optuna_importance.png", target),
                          f"Parameter importance (Optuna, {imp.method})")
    else:
        importance = _img(plots.importance_bars(imp, folder / "importance.png"), "Parameter importance")
    return {
        "history": _img(study.history_plot(st, folder / "optuna_history.png", target),
                        f"Optimisation history (Optuna). {told}"),
        "importance": importance,
        "effects": _img(study.slice_plot(st, params, folder / "optuna_slice.png", target),
                        f"Objective against the most important parameters (Optuna slice plot). {told}"),
    }


def make_figures(exp: Experiment, imp: Importance, folder: Path) -> Figures:
    """Draw every figure of the report into ``folder``."""
    figs: Figures = {
        "objective_vs_epoch": _img(plots.objective_vs_epoch(exp, folder / "objective_vs_epoch.png"),
                                   "Objective per epoch of every trial; marker at each trial's last epoch "
                                   "(red X: stopped early by ASHA)"),
        **_search_figures(exp, imp, folder),
        "proto_levels": _img(plots.proto_levels(exp, folder / "proto_levels.png"),
                             "acc_proto_i (%) and loss_proto_i per level over epochs"),
        "head_temperatures": _img(plots.head_temperatures(exp, folder / "head_temperatures.png"),
                                  "Multi-head runs: each head's positive-pair temperatures and instance accuracy "
                                  "per epoch"),
    }
    orders = exp.choice_orders()
    comparisons = exp.comparisons()
    for i, c in enumerate(comparisons):
        group = "pcl.duplicates" if c.name == "duplicates" else "loss_variant"
        d = c.table
        row = "pcl.cluster_schedule" if "pcl.cluster_schedule" in d.columns else None
        title = ("ProtoNCE duplicate handling" if c.name == "duplicates" else "prototype loss") + f", {c.budget}"
        groups = loss_variant_order(d[group], orders) if group == "loss_variant" else orders.get(group)
        # The first table of a name keeps the plain file name; a second budget gets a suffix.
        stem = f"compare_{c.name}" + ("" if all(x.name != c.name for x in comparisons[:i]) else f"_{i}")
        path = plots.comparison(d, group, row, exp.metric, folder / f"{stem}.png", title,
                                groups=groups, replicates=exp.replicates)
        figs[f"cmp_{i}"] = _img(path, ("Duplicate handling" if c.name == "duplicates" else "Prototype loss")
                                + f", {c.budget}")
    if pbt.is_pbt(exp):
        figs["pbt_schedules"] = _img(plots.pbt_schedules(exp, folder / "pbt_schedules.png"),
                                     "Population Based Training: the objective and the settings along each "
                                     "trial's lineage (thick: the best trial)")
    return figs


# --------------------------------------------------------------------------- sections

def _duration(s: float) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "NaN"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _with_unit(value: float, metric: str) -> str:
    unit = metrics.unit(metric)
    return f"{value:.4g}" + (f" {unit}" if unit else "")


def _header(exp: Experiment) -> list[Block]:
    sp, run, t = exp.space, exp.run, exp.trials
    comp = exp.compute().iloc[0]
    state = "complete" if exp.complete else "**still running or interrupted** (no `trials.csv` yet): partial results"
    counts = ", ".join(f"{int(comp[s])} {s}" for s in STATUSES if comp[s])
    planned = "" if exp.space_inferred else f" of {sp.total_trials()} planned"
    budget = (f"; ASHA on the epoch: grace period {sp.grace_period}, reduction factor {sp.reduction_factor}, "
              f"max_t {exp.max_t}" if sp.asha else f"; no early stopping, max_t {exp.max_t}")
    blocks = [Block("h1", f"pcl_tune experiment `{sp.name}`"), Block("list", items=[
        f"Folder: `{exp.path}`",
        f"Search: {state}; {len(t)} trials ({counts}){planned}",
        f"Objective: **{exp.mode} `{exp.metric}`** (validation split; per trial, the best epoch counts)"
        + ("" if exp.own_objective else f"; the search optimised {sp.mode} `{sp.metric}`"),
        f"Searcher: {sp.algorithm}{budget}" + (f"; executor {run['executor']}" if run.get("executor") else "")
        + ("; smoke run" if run.get("smoke") else ""),
        f"Started: {run.get('started') or 'unknown'}; report written {time.strftime('%Y-%m-%d %H:%M:%S')}",
    ])]
    if sp.description.strip():
        blocks.append(Block("p", sp.description.strip()))
    if run.get("command"):
        blocks += [Block("p", "Search command:"), Block("code", str(run["command"]))]
    return blocks


def _best_section(exp: Experiment, best_yaml: Path, best_yaml_written: bool) -> list[Block]:
    best = exp.best()
    written = (" (written by the analysis from space.json's fixed settings and the trial's parameters: the "
               "search had not written it)") if best_yaml_written else ""
    return [
        Block("h2", "Best configuration"),
        Block("p", f"Best `{best.metric}` = **{_with_unit(best.value, best.metric)}** in trial `{best.trial_id}` "
                   f"({best.status}) at epoch {best.epoch}."),
        Block("table", table=pd.DataFrame({"parameter": list(best.params),
                                           "value": [str(v) for v in best.params.values()]})),
        Block("list", items=[
            f"Latest checkpoint of that trial: `{best.checkpoint or 'none kept'}` (Tune keeps the latest only; it "
            "may be later than the best epoch)",
            f"Full config: `{best_yaml}`{written}",
        ]),
        Block("p", "Re-run the best configuration from scratch:"), Block("code", exp.rerun_command()),
    ]


def _pbt_section(exp: Experiment, figs: Figures, saved: list[Path]) -> list[Block]:
    """Population Based Training: the clones, the best trial's lineage and learned schedule."""
    if not pbt.is_pbt(exp):
        return []
    blocks = [Block("h2", "Population Based Training"), Block("list", items=pbt.summary_lines(exp))]
    best = exp.best()
    seg = pbt.segments(exp, best.trial_id)
    if len(seg):
        blocks += [Block("h3", f"Lineage of the best trial ({best.trial_id})"), Block("table", table=seg)]
    if figs.get("pbt_schedules") is not None:
        blocks.append(figs["pbt_schedules"])
    blocks.append(Block("p", "The best trial's settings changed during training: `best.yaml` holds its final "
                             "settings, and training them from scratch is another run. Its model is in its "
                             "checkpoint; the settings in effect at every epoch of every trial are in "
                             "`analysis/pbt_schedules.csv`, the clones in `analysis/pbt_clones.csv`."))
    c = pbt.clones(exp)
    if len(c):
        blocks += [Block("h3", "Clones"), Block("table", table=c)]
    return blocks


def save_pbt_tables(exp: Experiment, folder: Path) -> list[Path]:
    """``pbt_schedules.csv`` and ``pbt_clones.csv`` of a PBT search (nothing otherwise)."""
    if not pbt.is_pbt(exp):
        return []
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, df in (("pbt_schedules", pbt.schedules(exp)), ("pbt_clones", pbt.clones(exp))):
        path = folder / f"{name}.csv"
        df.to_csv(path, index=False)
        out.append(path)
    return out


def _searched_section(exp: Experiment) -> list[Block]:
    rows = []
    for p in exp.space.params:
        values = exp.trials[p.name] if p.name in exp.trials.columns else pd.Series(dtype=object)
        rows.append({"parameter": p.name, "distribution": p.describe(), "trials that set it": int(values.notna().sum())})
    flat = flatten(unflatten(exp.space.fixed))
    fixed = pd.DataFrame({"setting": list(flat), "value": [str(v) for v in flat.values()]})
    caption = "Fixed settings (space.json `fixed`)" + (" (inferred: no space.json)" if exp.space_inferred else "")
    return [Block("h2", "What was searched"), Block("table", table=pd.DataFrame(rows)),
            Block("table", table=fixed, text=caption)]


def _asha_note(exp: Experiment) -> str:
    """What ASHA's stops mean for the importance computed on Optuna's study."""
    if not exp.space.asha:
        return ""
    if exp.space.stopped_trials == "pruned":
        return (" ASHA-stopped trials are pruned in Optuna's study, so Optuna's ranking rests on the trials that "
                "finished; the like-for-like rankings below also use the stopped ones, at the first rung.")
    return (" Under ASHA a stopped trial counts with its value at the stop (told to Optuna as complete), so this "
            "ranking mostly says which settings start fast; the like-for-like rankings below do not mix budgets.")


def _search_section(exp: Experiment, figs: Figures, imp: Importance, top: int) -> list[Block]:
    """Leaderboard, progress, importance and per-parameter effects."""
    t = exp.trials
    blocks = [Block("h2", f"Leaderboard (top {min(top, len(t))} of {len(t)})"),
              Block("p", exp.noise().describe()),
              Block("table", table=exp.leaderboard(top),
                    text=f"`{exp.objective_col}`: the trial's score, its "
                         f"{'last epoch' if exp.score == 'last' else 'best epoch'}'s {metrics.label(exp.metric)} "
                         "(the space's `objective.score`, as Optuna scored it); "
                         "`gap`: behind the best; `vs_best`: within noise when the gap is below the resolution "
                         "above; `best_so_far`: best objective among the trials started up to that one")]
    blocks += [b for b in (figs.get("objective_vs_epoch"), figs.get("history")) if b is not None]
    blocks += [Block("h2", "Parameter importance"),
               Block("p", "As the searcher saw the trials: " + imp.describe() + _asha_note(exp)),
               Block("table", table=imp.table)]
    blocks += [b for b in (figs.get("importance"),) if b is not None]
    for like in exp.like_for_like_importance(evaluator=imp.evaluator or "fanova"):
        blocks += [Block("h3", f"Like for like: {like.notes[0].removeprefix('Values: ').split(';')[0]}"),
                   Block("p", like.describe()), Block("table", table=like.table)]
    blocks += [Block("h2", "Effect of each parameter"),
               Block("p", f"Statistics of the trials' scores (`{exp.objective_col}`) per value; numeric parameters in quantile "
                          "bins (`[lo, hi]`); `(not set)`: a conditional parameter that was not sampled."),
               Block("table", table=exp.effects())]
    return blocks + [b for b in (figs.get("effects"),) if b is not None]


def _compute_section(exp: Experiment) -> list[Block]:
    c = exp.compute().iloc[0]
    blocks = [Block("h2", "Compute accounting")]
    spent, full = int(c["epochs_spent"]), c["epochs_full_budget"]
    if isinstance(full, (int, float)) and not math.isnan(full) and full:
        blocks.append(Block("p", f"{spent} epochs spent of {int(full)} that {len(exp.trials)} trials at the full "
                                 f"budget of {int(c['max_t'])} epochs would cost: {int(c['epochs_saved'])} epochs "
                                 f"({c['saved_fraction']:.0%}) saved by early stopping. Training time "
                                 f"{_duration(c['train_time_s'])} (about {_duration(c['full_budget_time_s'])} "
                                 f"at the full budget); first trial start to last result {_duration(c['span_s'])}."))
    blocks.append(Block("table", table=pd.DataFrame({"quantity": list(c.index), "value": [fmt(v) for v in c.to_numpy()]})))
    return blocks


def _comparison_section(exp: Experiment, figs: Figures) -> list[Block]:
    comps = exp.comparisons()
    if not comps:
        return []
    rep = "seeds" if exp.replicates == "seeds" else "trials (no searched seed)"
    blocks = [Block("h2", "Loss comparisons at equal budget"),
              Block("p", f"Mean `{exp.metric}` per group with a 95% t-interval over {rep}, each table at one budget "
                         "(finished trials at the full budget, or every trial at the largest epoch all reached), "
                         "so trials stopped early are never averaged with finished ones. Groups with fewer than 3 "
                         "replicates list their points (`points`) instead of an interval. These are trials of a "
                         "search, not a controlled experiment: where other searched parameters differ between the "
                         "groups the table says so; an ablation with paired seeds settles the question.")]
    for i, c in enumerate(comps):
        d = c.table
        row = "pcl.cluster_schedule" if "pcl.cluster_schedule" in d.columns else None
        group = "pcl.duplicates" if c.name == "duplicates" else "loss_variant"
        title = ("ProtoNCE duplicate handling (dedupe / remap / none)" if c.name == "duplicates"
                 else "ProtoNCE vs top-K across cluster schedules")
        conf = (f"**Confounded with: {', '.join(f'`{p}`' for p in c.confounders)}**: the groups also differ in "
                "these, so a gap may come from them; see `search_spaces/loss_ablation.yaml` and "
                "`search_spaces/pcl_vs_moco.yaml` for controlled comparisons." if c.confounders
                else "No other searched parameter differs between the groups.")
        blocks += [Block("h3", f"{title}: {c.budget}"), Block("p", conf),
                   Block("table", table=_pivot_with_points(d, row, group), index=True,
                         text="trials whose loss has ProtoNCE levels (proto_nce, topk_below)"
                         if c.name == "duplicates" else ""),
                   Block("table", table=d)]
        blocks += [b for b in (figs.get(f"cmp_{i}"),) if b is not None]
    return blocks


def _pivot_with_points(d: pd.DataFrame, row: str | None, group: str) -> pd.DataFrame:
    """:func:`ci_pivot` with the points of the cells that have too few replicates for an interval."""
    wide = ci_pivot(d, row, group)
    for _, r in d[d["points"] != ""].iterrows():
        wide.loc[str(r[row]) if row else "(all)", str(r[group])] = f"points {r['points']} (n={int(r['n'])})"
    return wide


def _verdict_section(exp: Experiment) -> list[Block]:
    """First thing in the report: an ablation's paired verdicts, or the best PCL trial of a search
    against its MoCo v2 baseline."""
    if exp.space.is_ablation:
        blocks = [Block("h2", "Verdicts"),
                  Block("p", f"Each trial counts with its value at the full budget (epoch {exp.max_t}, no selection "
                             "over epochs). A comparison takes the difference per seed between two cells that differ "
                             "in one factor (the seed pairs them: same initialisation, data split and order), and "
                             "gives the mean difference with a 95 % paired-t interval; an interval that contains 0 is "
                             "'no difference resolved'. The best-cell line picks the best PCL cell on these same "
                             "runs, so it is optimistic.")]
        for metric in exp.verdict_metrics():
            res = exp.verdicts(metric)
            if res is None:
                continue
            lines = [(f"**{v.sentence()}**" if v.resolved else v.sentence())
                     for v in ([res.baseline] if res.baseline else []) + res.verdicts]
            blocks += [Block("h3", f"`{metric}`"), Block("list", items=lines),
                       Block("table", table=res.table().drop(columns=["verdict"]),
                             text="`diffs`: the paired difference for each seed"),
                       Block("table", table=res.cells, text="each cell over its seeds (mean, 95 % t-interval)")]
            if res.missing:
                blocks.append(Block("p", "Not counted (not finished): " + ", ".join(res.missing)))
        return blocks
    check = exp.baseline_check()
    if check is None:
        return [Block("h2", "PCL against MoCo v2 alone"),
                Block("p", "This search ran no MoCo v2 baseline trial (`pcl.proto_weight: 0`), so it cannot say "
                           "whether prototypes help at all here. New searches run one unless "
                           "`searcher.baseline: false`.")]
    return [Block("h2", "PCL against MoCo v2 alone"), Block("p", check.sentence())]


def _trials_section(exp: Experiment, figs: Figures, saved: list[Path]) -> list[Block]:
    blocks = []
    if figs.get("proto_levels") is not None:
        blocks += [Block("h2", "Prototype metrics per clustering level"), figs["proto_levels"]]
    if figs.get("head_temperatures") is not None:
        blocks += [Block("h2", "Projection heads: temperatures and instance accuracy"), figs["head_temperatures"]]
    t = exp.trials
    cols = ["trial_id", "status", "epochs", "best_epoch", exp.objective_col, f"last_{exp.metric}", "wall_time_s"]
    cols = [c for c in cols + exp.params + ["error"] if c in t.columns]
    blocks += [Block("h2", "All trials"), Block("table", table=t[list(dict.fromkeys(cols))])]
    if exp.warnings:
        blocks += [Block("h2", "Data problems"),
                   Block("p", "These files were damaged or missing; what could be read is included above."),
                   Block("list", items=[f"`{w}`" for w in exp.warnings])]
    return blocks + [Block("h2", "Files"), Block("list", items=[f"`{p}`" for p in saved] + [
        f"per-epoch results of each trial: `{exp.path}/trial_*/result.json`"])]


def _downstream_section(exp: Experiment) -> list[Block]:
    """``downstream.csv`` (``python -m pcl_tune.evaluate --best``), when it exists."""
    from pcl_tune.experiment_folder import DOWNSTREAM_CSV

    path = exp.path / DOWNSTREAM_CSV
    if not path.is_file():
        return []
    table = pd.read_csv(path)
    key = f"search_{exp.metric}"
    ids = [c for c in ("rank", "trial", key, "best_epoch") if c in table.columns]
    cell = table.apply(lambda r: f"{r['value']:.1f}" + (f" ± {r['ci95']:.1f}" if pd.notna(r.get("ci95")) else ""),
                       axis=1)
    # One row per trial, one column per protocol setting (kNN and the probe have one setting each).
    column = [t if t in ("knn", "linear") else f"{t} {s}" for t, s in zip(table["task"], table["setting"])]
    rows = []
    for _, g in table.assign(column=column, cell=cell).groupby("trial", sort=False):
        row = {c: g[c].iloc[0] for c in ids}
        row.update(zip(g["column"], g["cell"]))
        rows.append(row)
    wide = pd.DataFrame(rows)
    for c in ("rank", "best_epoch"):
        if c in wide.columns:
            wide[c] = wide[c].astype("Int64")
    wide = wide.astype(object).where(wide.notna(), "")  # the random-init row has no rank or search value
    split = ", ".join(sorted(set(table["split"].astype(str)))) if "split" in table.columns else "held-out"
    return [Block("h2", "Downstream evaluation of the best trials"),
            Block("p", f"From `{DOWNSTREAM_CSV}` (`python -m pcl_tune.evaluate --best {exp.path}`): each trial's "
                       f"weights at its scored ({exp.score}) epoch judged on the {split} split (accuracy or mAP in %, ± the 95 % interval "
                       "over episodes where there is one), beside a random-initialised encoder of the same "
                       "architecture."),
            Block("table", table=wide)]


def build_blocks(exp: Experiment, figures: Figures, imp: Importance, top: int, best_yaml: Path,
                 best_yaml_written: bool, saved: list[Path]) -> list[Block]:
    """The report's content (shared by the Markdown and HTML renderings)."""
    return (_header(exp) + _verdict_section(exp) + _best_section(exp, best_yaml, best_yaml_written)
            + _pbt_section(exp, figures, saved) + _downstream_section(exp)
            + _searched_section(exp) + _search_section(exp, figures, imp, top) + _compute_section(exp) + _comparison_section(exp, figures)
            + _trials_section(exp, figures, saved))


# --------------------------------------------------------------------------- files

def write_report(exp_dir: Path, *, metric: str | None = None, mode: str | None = None, top: int = 10,
                 evaluator: str = "fanova", min_trials: int = MIN_TRIALS, experiment: Experiment | None = None) -> Path:
    """Write ``report.md`` and ``report.html`` into the experiment folder; returns the HTML path.

    Also writes ``best.yaml`` when the search has not (a running or interrupted search), the tables
    (``analysis/trials.*``, ``analysis/epochs.*``, CSV and Parquet) and the PNGs (``analysis/*.png``).

    Raises:
        AnalysisError: not an experiment folder; EmptyExperimentError: no trial result yet.
    """
    exp = experiment if experiment is not None else load(exp_dir, metric=metric, mode=mode)
    exp.require_results()
    folder = exp.path / ANALYSIS_DIR
    saved = exp.save(folder) + save_pbt_tables(exp, folder)
    best_yaml = exp.best_yaml_path()
    written = not best_yaml.is_file()
    exp.write_best_yaml()
    imp = exp.importance(evaluator=evaluator, min_trials=min_trials)
    figures = make_figures(exp, imp, folder)
    blocks = build_blocks(exp, figures, imp, top, best_yaml, written, saved)
    (exp.path / REPORT_MD).write_text(render_markdown(blocks, exp.path))
    out = exp.path / REPORT_HTML
    out.write_text(render_html(blocks, f"pcl_tune experiment {exp.space.name}"))
    return out


def write_comparison(experiments: list[Experiment], out_dir: Path) -> list[Path]:
    """Side-by-side table of several experiments (:func:`analysis.compare`) as ``comparison.csv``,
    ``comparison.md`` and ``comparison.html`` in ``out_dir``; returns the paths."""
    table = compare(experiments)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "comparison.csv"
    table.to_csv(csv, index=False)
    shown = table.drop(columns=["path"])
    blocks = [Block("h1", "pcl_tune experiments side by side"),
              Block("p", "`best`: the best trial's score (its last or best epoch, as each space says); `epochs_spent`: sum of the epochs "
                         "the trials ran; `saved_fraction`: 1 - spent / (trials x max_t)."),
              Block("table", table=shown),
              Block("list", items=[f"`{e.path.name}`: `{e.path}`" for e in experiments])]
    md = out_dir / "comparison.md"
    md.write_text(render_markdown(blocks, out_dir))
    page = out_dir / "comparison.html"
    page.write_text(render_html(blocks, "pcl_tune experiments side by side"))
    return [csv, md, page]
