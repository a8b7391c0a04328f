"""Search efficiency on the demo: ASHA + TPE vs the same number of trials at full budget.

Runs ``search_spaces/demo.yaml`` twice with the same TPE seed: as shipped (ASHA on), and with
ASHA off (every trial runs all epochs). For each: epochs spent, best objective, wall time, and the
epochs spent (in the order results arrived) until a trial first came within 1 point of the best
objective seen in any run. ``--reuse`` adds the searches of earlier runs (their per-epoch CSV) and
skips re-running those, e.g. to try another reduction factor against the same full-budget search.

    python benchmarks/search_efficiency.py [--num-cpus 2] [--reduction-factor 4] [--reuse results/x.csv]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from _env import environment, publish

ROOT = Path(__file__).resolve().parents[1]


def run(space: Path, runs: Path, name: str, num_cpus: int) -> tuple[float, pd.DataFrame]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pcl_tune.search", "--space", str(space), "--storage-path",
                           str(runs), "--name", name, "--num-cpus", str(num_cpus), "--no-dashboard", "--no-report"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"search {name} failed:\n{proc.stderr[-3000:]}")
    frames = []
    for d in sorted((runs / name).glob("trial_*")):
        f = d / "progress.csv"
        if f.is_file():
            df = pd.read_csv(f)
            df["trial"] = d.name
            frames.append(df)
    return wall, pd.concat(frames, ignore_index=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--space", default=str(ROOT / "search_spaces" / "demo.yaml"))
    ap.add_argument("--epochs", type=int, help="shrink: epochs (and ASHA max_t) of every trial")
    ap.add_argument("--grace", type=int, help="ASHA grace period (default: the space's)")
    ap.add_argument("--reduction-factor", type=int, help="ASHA reduction factor (default: the space's)")
    ap.add_argument("--warmup", type=int, help="shrink: pcl.warmup_epochs")
    ap.add_argument("--reuse", nargs="*", default=[], metavar="CSV",
                    help="per-epoch tables of earlier runs of this script (search_efficiency_epochs.csv): their "
                         "searches are shown again and not re-run when the label matches (the full-budget search "
                         "does not depend on the ASHA settings)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    env = environment()
    print(f"Environment: {env}", flush=True)
    spec = yaml.safe_load(Path(args.space).read_text())
    if args.epochs:
        spec["fixed"]["epochs"] = args.epochs
        spec["asha"]["max_t"] = args.epochs
    if args.grace:
        spec["asha"]["grace_period"] = args.grace
    if args.reduction_factor:
        spec["asha"]["reduction_factor"] = args.reduction_factor
    if args.warmup is not None:
        spec["fixed"].setdefault("pcl", {})["warmup_epochs"] = args.warmup
    metric = spec["objective"]["metric"]
    epochs = spec["fixed"]["epochs"]
    asha = spec["asha"]
    asha_label = f"TPE + ASHA (grace {asha['grace_period']}, reduction {asha['reduction_factor']})"
    full_label = "TPE, full budget"
    results: dict[str, tuple[float, pd.DataFrame]] = {}
    for csv in args.reuse:
        old = pd.read_csv(csv)
        for label, df in old.groupby("search", sort=False):
            results[str(label)] = (float(df["wall_s"].iloc[0]), df.drop(columns=["search", "wall_s"]))
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        full = dict(spec)
        full["asha"] = {"enabled": False}
        for label, sp, name in ((asha_label, spec, "asha"), (full_label, full, "budget")):
            if label in results:
                print(f"reusing {label!r} from {args.reuse}")
                continue
            path = t / f"{name}.yaml"
            path.write_text(yaml.safe_dump(sp, sort_keys=False))
            wall, df = run(path, t / "runs", name, args.num_cpus)
            results[label] = (wall, df[["trial", "training_iteration", metric, "timestamp"]])
    if full_label not in results:
        raise SystemExit("no full-budget search to compare with")
    best_overall = max(df[metric].max() for _, df in results.values())
    lines = [f"# Search efficiency: {Path(args.space).name}, {epochs} epochs per trial, objective {metric} (max), "
             f"{args.num_cpus} CPUs, TPE seed {spec['searcher'].get('seed')}", "",
             f"Environment: {env}", "",
             f"best {metric} over all searches: {best_overall:.2f}", "",
             "| search | trials | stopped early | epochs spent | share of full budget | best | wall s | "
             "epochs until within 1 point of the overall best |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    until: dict[str, float] = {}
    full_epochs = len(results[full_label][1])
    full_best = results[full_label][1][metric].max()
    frames = []
    for label, (wall, df) in results.items():
        ordered = df.sort_values(["timestamp", "trial", "training_iteration"]).reset_index(drop=True)
        hit = ordered.index[ordered[metric] >= best_overall - 1.0]
        until[label] = float(hit[0] + 1) if len(hit) else math.inf
        last = df.groupby("trial")["training_iteration"].max()
        stopped = int((last < epochs).sum())
        shown = "never" if math.isinf(until[label]) else str(int(until[label]))
        lines.append(f"| {label} | {df['trial'].nunique()} | {stopped} | {len(df)} | {len(df) / full_epochs:.2f} | "
                     f"{df[metric].max():.2f} | {wall:.0f} | {shown} |")
        frames.append(df.assign(search=label, wall_s=wall))
    lines.append("")
    for label, (_, df) in results.items():
        if label == full_label:
            continue
        gap = full_best - df[metric].max()
        lines.append(f"* {label}: **{len(df) / full_epochs:.2f}** of the full-budget compute ({len(df)} of "
                     f"{full_epochs} epochs); its best is {gap:.2f} points below the full-budget best "
                     f"({'within' if gap <= 1.0 else 'NOT within'} 1 point). It first came within 1 point of the "
                     f"overall best after {until[label]:.0f} epochs ({until[label] / full_epochs:.2f} of the full "
                     f"budget; the full-budget search needed {until[full_label]:.0f}).")
    text = "\n".join(lines) + "\n"
    publish(text, args.out, "search_efficiency", {"search_efficiency_epochs": pd.concat(frames, ignore_index=True)})


if __name__ == "__main__":
    main()
