"""``python -m analysis RUN_DIR [RUN_DIR ...]``: print an experiment's summaries and write its report.

With several folders, each gets its report and a side-by-side table (best objective, trials,
epochs spent per experiment) is printed and written to the first folder (or ``--out``).

Exit codes: 0 done; 2 a folder is not an experiment, has no trial result yet, or a bad argument.

This command draws with matplotlib's Agg backend (files only, no window); importing the package
chooses no backend, so a notebook keeps its own.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd

from .errors import AnalysisError, AnalysisWarning
from .experiment import Experiment, compare, load
from .importance import EVALUATORS, MIN_TRIALS
from .tables import STATUSES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis",
                                description="Summarise pcl_tune search experiments and write their reports.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="experiment folder(s): <storage-path>/<name>, a path or a URI (s3://bucket/prefix/name)")
    p.add_argument("--metric", help="objective to analyse (default: the search's)")
    p.add_argument("--mode", choices=["min", "max"], help="direction of --metric (default: the search's for its "
                                                          "own metric, else the metric's in pcl_tune.metrics)")
    p.add_argument("--top", type=int, default=10, help="leaderboard length (default 10)")
    p.add_argument("--evaluator", choices=EVALUATORS, default="fanova",
                   help="Optuna importance evaluator (default fanova)")
    p.add_argument("--min-trials", type=int, default=MIN_TRIALS,
                   help=f"completed Optuna trials needed for its importance (default {MIN_TRIALS})")
    p.add_argument("--out", type=Path, help="folder for the comparison of several experiments "
                                            "(default: the first RUN_DIR)")
    p.add_argument("--no-report", action="store_true", help="print only; write no files")
    return p


def _show(df: pd.DataFrame, index: bool = False) -> str:
    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.max_colwidth", 40,
                           "display.float_format", "{:.4g}".format):
        return df.to_string(index=index)


def print_verdicts(exp: Experiment) -> None:
    """An ablation's paired verdicts (every metric), or a search's best PCL trial against its MoCo
    v2 baseline: what the researcher should read first."""
    if exp.space.is_ablation:
        print(f"verdicts (paired differences over seeds at the full budget, epoch {exp.max_t}; 95 % paired-t "
              "intervals):")
        for metric in exp.verdict_metrics():
            res = exp.verdicts(metric)
            if res is None:
                continue
            for v in ([res.baseline] if res.baseline else []) + res.verdicts:
                print(f"  {v.sentence()}")
            if res.missing:
                print(f"  ({metric}: not counted, not finished: {', '.join(res.missing)})")
        print()
        return
    check = exp.baseline_check()
    if check is not None:
        print(f"{check.sentence().replace('**', '')}\n")


def print_experiment(exp: Experiment, top: int, evaluator: str, min_trials: int) -> None:
    comp = exp.compute().iloc[0]
    state = "complete" if exp.complete else "still running or interrupted (partial results)"
    counts = ", ".join(f"{int(comp[s])} {s}" for s in STATUSES if comp[s])
    print(f"== {exp.path}  ({exp.space.name}; {state})")
    print_verdicts(exp)
    best = exp.best()
    print(f"trials: {len(exp.trials)} ({counts}); objective: {exp.mode} {exp.metric}")
    print(f"best {exp.metric} = {best.value:.4g} in trial {best.trial_id} ({best.status}) at epoch {best.epoch}")
    for k, v in sorted(best.params.items()):
        print(f"    {k:28s} {v!r}")
    print(f"\nleaderboard (top {top}):\n{_show(exp.leaderboard(top))}")
    print(exp.noise().describe())
    imp = exp.importance(evaluator=evaluator, min_trials=min_trials)
    print(f"\nparameter importance, as the searcher saw the trials: {imp.describe()}\n{_show(imp.table)}")
    for like in exp.like_for_like_importance(evaluator=evaluator, min_trials=min_trials):
        print(f"\nparameter importance, like for like: {like.describe()}\n{_show(like.table)}")
    print(f"\neffect of each parameter on the trials' best {exp.metric}:\n{_show(exp.effects())}")
    print(f"\ncompute: {int(comp['epochs_spent'])} epochs spent of {comp['epochs_full_budget']:.0f} at full budget "
          f"(max_t {comp['max_t']:.0f}); saved fraction {comp['saved_fraction']:.1%}")
    for c in exp.comparisons():
        conf = (f"; confounded with: {', '.join(c.confounders)} (a controlled comparison: an ablation, e.g. "
                "search_spaces/loss_ablation.yaml)") if c.confounders else ""
        print(f"\ncomparison by {c.name}, {c.budget} (mean, 95% t-interval over {exp.replicates}; fewer than 3: "
              f"the points){conf}:\n{_show(c.table)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # a command writes files; Optuna's figures go through pyplot
    if args.top < 1:
        print(f"error: --top {args.top}: expected an integer >= 1", file=sys.stderr)
        return 2
    experiments: list[Experiment] = []
    run_dirs_by_exp: dict[int, str] = {}
    for run_dir in args.run_dirs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AnalysisWarning)
            try:
                exp = load(run_dir, metric=args.metric, mode=args.mode)
            except AnalysisError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        for w in caught:
            if issubclass(w.category, AnalysisWarning):
                print(f"warning: {w.message}", file=sys.stderr)
        experiments.append(exp)
        run_dirs_by_exp[id(exp)] = str(run_dir)
    from . import report

    for exp in experiments:
        try:
            print_experiment(exp, args.top, args.evaluator, args.min_trials)
            if not args.no_report:
                path = report.write_report(exp.path, top=args.top, evaluator=args.evaluator,
                                           min_trials=args.min_trials, experiment=exp)
                print(f"\nreport: {path} (and {path.with_suffix('.md').name}); tables and plots in "
                      f"{path.parent / 'analysis'}")
                _upload_report(run_dirs_by_exp[id(exp)])
        except AnalysisError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"re-run the best trial: {exp.rerun_command()}\n")
    if len(experiments) > 1:
        table = compare(experiments)
        print(f"experiments side by side:\n{_show(table.drop(columns=['path']))}")
        if not args.no_report:
            out = args.out if args.out is not None else experiments[0].path
            paths = report.write_comparison(experiments, out)
            print(f"comparison: {', '.join(str(p) for p in paths)}")
    return 0


def _upload_report(run_dir: str) -> None:
    """A remote experiment (a URI) gets its report uploaded beside its trials."""
    from pcl_tune.experiment_folder import REPORT_FILES
    from pcl_tune.storage import StorageError, Store, is_uri

    if not is_uri(run_dir):
        return
    store = Store.of_folder(run_dir)
    try:
        store.push(*REPORT_FILES)
        print(f"uploaded the report to {store.display}")
    except StorageError as e:
        print(f"warning: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
