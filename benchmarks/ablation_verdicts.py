"""The verdicts of ablation experiments, as one table: what `python -m analysis RUN_DIR` prints first,
for several experiments at once, with each experiment's command and wall time.

Run the ablations first (each is an ordinary search; about 25-30 minutes each on 2 CPU cores):

    python -m pcl_tune.search --space search_spaces/loss_ablation.yaml --storage-path runs
    python -m pcl_tune.search --space search_spaces/pcl_vs_moco.yaml --storage-path runs
    python benchmarks/ablation_verdicts.py runs/loss_ablation runs/pcl_vs_moco

Prints (and saves as ``results/ablation_verdicts.md`` and ``.csv``) one row per comparison and
metric: the cells' means over seeds, the mean paired difference with its 95 % paired-t interval,
the per-seed differences, and the one-line verdict; then each cell's mean and t-interval.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from _env import environment_lines, publish

import analysis


def verdict_rows(exp: analysis.Experiment) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(verdicts, cells) of one ablation experiment, one row per comparison / cell and metric."""
    rows, cells = [], []
    for metric in exp.verdict_metrics():
        res = exp.verdicts(metric)
        if res is None:
            continue
        t = res.table()
        t.insert(0, "experiment", exp.path.name)
        rows.append(t)
        c = res.cells.copy()
        c.insert(0, "metric", metric)
        c.insert(0, "experiment", exp.path.name)
        cells.append(c)
    return (pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(),
            pd.concat(cells, ignore_index=True) if cells else pd.DataFrame())


def time_per_epoch(exp: analysis.Experiment) -> pd.DataFrame:
    """Per arm: the median over its trials of each trial's median seconds per epoch (``time_epoch``,
    and its training part ``time_train``), counting only epochs after the warm-up (clustering on).
    The arms ran side by side in one search, so their ratios are comparable; the absolute times
    carry the machine's load."""
    ep = exp.epochs.merge(exp.trials[["trial_id", "arm"]], on="trial_id")
    ep = ep[ep["clusters"].astype(str).str.len() > 0] if "clusters" in ep.columns else ep
    per_trial = ep.groupby(["arm", "trial_id"])[["time_epoch", "time_train"]].median()
    out = per_trial.groupby("arm").median()
    out["trials"] = per_trial.groupby("arm").size()
    ref = exp.space.reference or next(iter(exp.space.arms), None)
    if ref in out.index:
        out["ratio_to_" + str(ref)] = out["time_epoch"] / out.loc[ref, "time_epoch"]
    return out.reset_index()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, help="ablation experiment folders")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    lines = ["# Ablation verdicts", "", *environment_lines(), ""]
    all_rows, all_cells = [], []
    for run_dir in args.run_dirs:
        exp = analysis.load(run_dir)
        if not exp.space.is_ablation:
            raise SystemExit(f"error: {run_dir}: not an ablation (its space has no `ablation` section)")
        comp = exp.compute().iloc[0]
        rows, cells = verdict_rows(exp)
        lines += [f"## {exp.path.name}", "",
                  f"Command: `{exp.run.get('command', '?')}`; {int(comp['trials'])} trials "
                  f"({int(comp['finished'])} finished), {exp.max_t} epochs each, seeds {exp.space.seeds}; "
                  f"wall time {comp['span_s'] / 60:.1f} min (first trial start to last result); "
                  f"training time {comp['train_time_s'] / 60:.1f} CPU-min.", "",
                  f"Noise: {exp.noise().describe()}", ""]
        for _, r in rows.iterrows():
            lines.append(f"- {r['verdict']}")
        shown = rows.drop(columns=["experiment", "verdict", "method"]).round(2) if len(rows) else rows
        lines += ["", shown.to_markdown(index=False), "", "Cells (mean over seeds, 95 % t-interval):", "",
                  cells.drop(columns=["experiment"]).round(2).to_markdown(index=False) if len(cells) else "", "",
                  "Seconds per epoch after the warm-up (median over each arm's trials of their medians):", "",
                  time_per_epoch(exp).round(3).to_markdown(index=False), ""]
        all_rows.append(rows)
        all_cells.append(cells)
    publish("\n".join(lines), args.out, "ablation_verdicts",
            {"ablation_verdicts": pd.concat(all_rows, ignore_index=True),
             "ablation_cells": pd.concat(all_cells, ignore_index=True)})


if __name__ == "__main__":
    main()
