"""The experiment report: ``report.md`` and a self-contained ``report.html`` (PNGs embedded as
base64) in the experiment folder, with the tables (CSV + Parquet) and PNGs in ``<exp>/analysis/``.

``pcl_tune.search`` calls :func:`write_report` at the end of a search.
"""

from __future__ import annotations

import base64
import html
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from . import plots
from .experiment import ANALYSIS_DIR, Experiment, compare, load
from .importance import MIN_TRIALS, Importance
from .loader import metric_label
from .summaries import ci_pivot, loss_variant_order

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
MAX_EFFECT_PLOTS = 6


# --------------------------------------------------------------------------- blocks

@dataclass
class Block:
    """One element of a report, rendered to Markdown and HTML alike."""

    kind: str  # h1 | h2 | h3 | p | code | table | img | list
    text: str = ""
    table: pd.DataFrame | None = None
    index: bool = False
    items: Sequence[str] = ()
    path: Path | None = None


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    try:
        if pd.isna(v):
            return "NaN"
    except (TypeError, ValueError):
        pass
    return str(v)


def md_table(df: pd.DataFrame, index: bool = False) -> str:
    """A GitHub-flavoured Markdown table (floats to 4 significant digits, NaN shown as ``NaN``)."""
    d = df.reset_index() if index else df
    if not len(d.columns):
        return ""
    header = [str(c) for c in d.columns]

    def cell(v: Any) -> str:
        return _fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(h.replace("|", "\\|") for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    for row in d.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    """Escape, then render `code` spans and **bold**."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def render_markdown(blocks: Sequence[Block], base: Path) -> str:
    out = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append("#" * int(b.kind[1]) + " " + b.text)
        elif b.kind == "p":
            out.append(b.text)
        elif b.kind == "code":
            out.append("```bash\n" + b.text + "\n```")
        elif b.kind == "table" and b.table is not None:
            if b.text:
                out.append(f"*{b.text}*")
            out.append(md_table(b.table, b.index) if len(b.table) else "(empty)")
        elif b.kind == "img" and b.path is not None:
            out.append(f"![{b.text}]({b.path.relative_to(base).as_posix()})")
        elif b.kind == "list":
            out.append("\n".join(f"- {i}" for i in b.items))
    return "\n\n".join(out) + "\n"


CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1200px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; } h2 { border-bottom: 1px solid #eee; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.85em; display: block; overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; } tr:nth-child(even) td { background: #fafafa; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; border-radius: 4px; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 3px; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.caption { color: #555; font-style: italic; margin-bottom: 0; }
"""


def render_html(blocks: Sequence[Block], title: str) -> str:
    body = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            body.append(f"<{b.kind}>{_inline_html(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append(f"<p>{_inline_html(b.text)}</p>")
        elif b.kind == "code":
            body.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif b.kind == "table" and b.table is not None:
            if b.text:
                body.append(f"<p class='caption'>{_inline_html(b.text)}</p>")
            if len(b.table):
                shown = b.table.apply(lambda col: col.map(_fmt)) if len(b.table.columns) else b.table
                body.append(shown.to_html(index=b.index, border=0, escape=True))
            else:
                body.append("<p>(empty)</p>")
        elif b.kind == "img" and b.path is not None:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            body.append(f"<figure><img alt='{html.escape(b.text)}' src='data:image/png;base64,{data}'>"
                        f"<figcaption class='caption'>{html.escape(b.text)}</figcaption></figure>")
        elif b.kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# --------------------------------------------------------------------------- content

def _space_table(exp: Experiment) -> pd.DataFrame:
    rows = []
    for p in exp.space.params:
        values = exp.trials[p.name] if p.name in exp.trials.columns else pd.Series(dtype=object)
        rows.append({"parameter": p.name, "distribution": p.describe(), "trials that set it": int(values.notna().sum())})
    return pd.DataFrame(rows)


def _fixed_table(exp: Experiment) -> pd.DataFrame:
    from pcl_tune.config import flatten, unflatten

    flat = flatten(unflatten(exp.space.fixed))
    return pd.DataFrame({"setting": list(flat), "value": [str(v) for v in flat.values()]})


def _trials_overview(exp: Experiment) -> pd.DataFrame:
    t = exp.trials
    cols = ["trial_id", "status", "epochs", "best_epoch", exp.objective_col, f"last_{exp.metric}", "wall_time_s"]
    cols = [c for c in cols if c in t.columns] + [p for p in exp.params] + ["error"]
    return t[[c for c in cols if c in t.columns]]


def _important_params(exp: Experiment, imp: Importance) -> list[str]:
    ranked = [p for p in imp.table["param"] if p in exp.params]
    ranked += [p for p in exp.params if p not in ranked]
    return ranked[:MAX_EFFECT_PLOTS]


def _duration(s: float) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "NaN"
    if s < 120:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def build_blocks(exp: Experiment, figures: dict[str, Path | None], imp: Importance, top: int,
                 best_yaml: Path, best_yaml_written: bool, saved: list[Path]) -> list[Block]:
    """The report's content (shared by the Markdown and HTML renderings)."""
    sp, t = exp.space, exp.trials
    best = exp.best()
    comp = exp.compute().iloc[0]
    B: list[Block] = [Block("h1", f"pcl_tune experiment `{sp.name}`")]
    state = "complete" if exp.complete else "**still running or interrupted** (no `trials.csv` yet): partial results"
    counts = ", ".join(f"{int(comp[s])} {s}" for s in ("finished", "stopped", "errored", "running") if comp[s])
    B.append(Block("list", items=[
        f"Folder: `{exp.path}`",
        f"Search: {state}; {len(t)} trials ({counts})" + (f" of {sp.num_samples} sample(s)" if sp.num_samples else ""),
        f"Objective: **{sp.mode} `{sp.metric}`** (validation split; per trial, the best epoch counts)",
        f"Searcher: {sp.algorithm}" + (f"; ASHA on the epoch: grace period {sp.grace_period}, reduction factor "
                                       f"{sp.reduction_factor}, max_t {sp.max_t}" if sp.asha else
                                       f"; no early stopping, max_t {sp.max_t}")
        + (f"; executor {sp.executor}" if sp.executor else "") + ("; smoke run" if sp.smoke else ""),
        f"Started: {sp.started or 'unknown'}; report written {time.strftime('%Y-%m-%d %H:%M:%S')}",
    ]))
    if sp.description:
        B.append(Block("p", sp.description))
    if sp.command:
        B += [Block("p", "Search command:"), Block("code", sp.command)]

    B.append(Block("h2", "Best configuration"))
    B.append(Block("p", f"Best `{best.metric}` = **{best.value:.4g}**{' %' if best.metric.startswith(('acc', 'knn')) else ''}"
                        f" in trial `{best.trial_id}` ({best.status}) at epoch {best.epoch}."))
    B.append(Block("table", table=pd.DataFrame({"parameter": list(best.params),
                                                 "value": [str(v) for v in best.params.values()]})))
    ck = best.checkpoint or "none kept"
    B.append(Block("list", items=[
        f"Latest checkpoint of that trial: `{ck}` (Tune keeps the latest only; it may be later than the best epoch)",
        f"Full config: `{best_yaml}`" + (" (written by the analysis from space.json's fixed settings and the "
                                          "trial's parameters: the search had not written it)" if best_yaml_written
                                          else ""),
    ]))
    B += [Block("p", "Re-run the best configuration from scratch:"), Block("code", exp.rerun_command())]

    B.append(Block("h2", "What was searched"))
    B.append(Block("table", table=_space_table(exp)))
    B.append(Block("table", table=_fixed_table(exp), text="Fixed settings (space.json `fixed`)"))

    B.append(Block("h2", f"Leaderboard (top {min(top, len(t))} of {len(t)})"))
    B.append(Block("table", table=exp.leaderboard(top),
                   text=f"`{exp.objective_col}`: the trial's best {metric_label(sp.metric)} over its epochs; "
                        "`best_so_far`: best objective among the trials started up to that one"))
    if figures.get("objective_vs_epoch"):
        B.append(Block("img", "Objective per epoch of every trial; marker at each trial's last epoch "
                              "(red X: stopped early by ASHA)", path=figures["objective_vs_epoch"]))
    if figures.get("best_so_far"):
        B.append(Block("img", "Search progress: each trial's objective in start order and the best so far",
                       path=figures["best_so_far"]))

    B.append(Block("h2", "Parameter importance"))
    B.append(Block("p", imp.describe()))
    B.append(Block("table", table=imp.table))
    if figures.get("importance"):
        B.append(Block("img", "Parameter importance", path=figures["importance"]))

    B.append(Block("h2", "Effect of each parameter"))
    B.append(Block("p", f"Statistics of the trials' best `{sp.metric}` per value; numeric parameters in quantile "
                        "bins (`[lo, hi]`); `(not set)`: a conditional parameter that was not sampled."))
    B.append(Block("table", table=exp.effects()))
    if figures.get("param_effects"):
        B.append(Block("img", "Objective against the most important parameters", path=figures["param_effects"]))

    B.append(Block("h2", "Compute accounting"))
    spent, full = int(comp["epochs_spent"]), comp["epochs_full_budget"]
    if isinstance(full, (int, float)) and not math.isnan(full) and full:
        B.append(Block("p", f"{spent} epochs spent of {int(full)} that {len(t)} trials at the full budget of "
                            f"{int(comp['max_t'])} epochs would cost: {int(comp['epochs_saved'])} epochs "
                            f"({comp['saved_fraction']:.0%}) saved by early stopping. Training time "
                            f"{_duration(comp['train_time_s'])} (about {_duration(comp['full_budget_time_s'])} "
                            f"at the full budget); first trial start to last result {_duration(comp['span_s'])}."))
    c = exp.compute().iloc[0]
    B.append(Block("table", table=pd.DataFrame({"quantity": list(c.index), "value": [_fmt(v) for v in c.to_numpy()]})))

    comps = exp.comparisons()
    if comps:
        B.append(Block("h2", "Loss comparisons"))
        rep = "seeds" if exp.replicates == "seeds" else "trials (no searched seed)"
        B.append(Block("p", f"Mean of the trials' best `{sp.metric}` with a 95% t-interval over {rep}; n = 1 "
                            "gives no interval (NaN)."))
        row = "pcl.cluster_schedule" if "pcl.cluster_schedule" in comps.get("proto_loss", comps.get(
            "duplicates", pd.DataFrame())).columns else None
        if "duplicates" in comps:
            d = comps["duplicates"]
            B.append(Block("h3", "ProtoNCE duplicate handling (dedupe / remap / none)"))
            B.append(Block("table", table=ci_pivot(d, row, "pcl.duplicates"), index=True,
                           text="trials whose loss has ProtoNCE levels (proto_nce, topk_below)"))
            B.append(Block("table", table=d))
            if figures.get("cmp_duplicates"):
                B.append(Block("img", "Duplicate handling", path=figures["cmp_duplicates"]))
        if "proto_loss" in comps:
            d = comps["proto_loss"]
            B.append(Block("h3", "ProtoNCE vs top-K across cluster schedules"))
            B.append(Block("table", table=ci_pivot(d, row, "loss_variant"), index=True))
            B.append(Block("table", table=d))
            if figures.get("cmp_proto_loss"):
                B.append(Block("img", "Prototype loss", path=figures["cmp_proto_loss"]))

    if figures.get("proto_levels"):
        B.append(Block("h2", "Prototype metrics per clustering level"))
        B.append(Block("img", "acc_proto_i (%) and loss_proto_i per level over epochs", path=figures["proto_levels"]))

    B.append(Block("h2", "All trials"))
    B.append(Block("table", table=_trials_overview(exp)))
    if exp.warnings:
        B.append(Block("h2", "Data problems"))
        B.append(Block("p", "These files were damaged or missing; what could be read is included above."))
        B.append(Block("list", items=[f"`{w}`" for w in exp.warnings]))
    B.append(Block("h2", "Files"))
    B.append(Block("list", items=[f"`{p}`" for p in saved]
                   + [f"per-epoch results of each trial: `{exp.path}/trial_*/result.json`"]))
    return B


def make_figures(exp: Experiment, imp: Importance, folder: Path) -> dict[str, Path | None]:
    """Draw every figure of the report into ``folder``; missing ones (nothing to draw) are None."""
    figs: dict[str, Path | None] = {
        "objective_vs_epoch": plots.objective_vs_epoch(exp, folder / "objective_vs_epoch.png"),
        "best_so_far": plots.best_so_far(exp, folder / "best_so_far.png"),
        "importance": plots.importance_bars(imp, folder / "importance.png"),
        "param_effects": plots.param_effects(exp, _important_params(exp, imp), folder / "param_effects.png"),
        "proto_levels": plots.proto_levels(exp, folder / "proto_levels.png"),
    }
    comps = exp.comparisons()
    orders = exp.choice_orders()
    for name, group in (("duplicates", "pcl.duplicates"), ("proto_loss", "loss_variant")):
        if name in comps:
            d = comps[name]
            row = "pcl.cluster_schedule" if "pcl.cluster_schedule" in d.columns else None
            title = "ProtoNCE duplicate handling" if name == "duplicates" else "prototype loss"
            figs[f"cmp_{name}"] = plots.comparison(d, group, row, exp.metric, folder / f"compare_{name}.png", title,
                                                   groups=loss_variant_order(d[group], orders) if group ==
                                                   "loss_variant" else orders.get(group), replicates=exp.replicates)
    return figs


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
    saved = exp.save(folder)
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
              Block("p", "`best`: best objective over all epochs of all trials; `epochs_spent`: sum of the epochs "
                         "the trials ran; `saved_fraction`: 1 - spent / (trials x max_t)."),
              Block("table", table=shown),
              Block("list", items=[f"`{e.path.name}`: `{e.path}`" for e in experiments])]
    md = out_dir / "comparison.md"
    md.write_text(render_markdown(blocks, out_dir))
    page = out_dir / "comparison.html"
    page.write_text(render_html(blocks, "pcl_tune experiments side by side"))
    return [csv, md, page]
