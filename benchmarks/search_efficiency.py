"""Search efficiency on the demo: ASHA + TPE vs the same number of trials at full budget.

Runs ``search_spaces/demo.yaml`` twice with the same TPE seed: as shipped (ASHA on), and with
ASHA off (every trial runs all epochs). For each: epochs spent, best objective, wall time, and the
epochs spent (in the order results arrived) until a trial first came within 1 point of the best
objective seen in either run. The first run's wall time is the demo's wall time on this machine.

    python benchmarks/search_efficiency.py [--num-cpus 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

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
    ap.add_argument("--grace", type=int, help="shrink: ASHA grace period")
    ap.add_argument("--warmup", type=int, help="shrink: pcl.warmup_epochs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    spec = yaml.safe_load(Path(args.space).read_text())
    if args.epochs:
        spec["fixed"]["epochs"] = args.epochs
        spec["asha"]["max_t"] = args.epochs
    if args.grace:
        spec["asha"]["grace_period"] = args.grace
    if args.warmup is not None:
        spec["fixed"].setdefault("pcl", {})["warmup_epochs"] = args.warmup
    metric = spec["objective"]["metric"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        asha_space = t / "asha.yaml"
        asha_space.write_text(yaml.safe_dump(spec, sort_keys=False))
        full = dict(spec)
        full["asha"] = {"enabled": False}
        full_space = t / "full.yaml"
        full_space.write_text(yaml.safe_dump(full, sort_keys=False))
        for label, path in (("TPE + ASHA", asha_space), ("TPE, full budget", full_space)):
            results[label] = run(path, t / "runs", label.split()[-1].lower().replace(",", ""), args.num_cpus)
    best_overall = max(df[metric].max() for _, df in results.values())
    lines = [f"# Search efficiency: {Path(args.space).name} ({spec['fixed']['epochs']} epochs, ASHA grace "
             f"{spec['asha']['grace_period']}, reduction {spec['asha']['reduction_factor']}), objective {metric} (max), "
             f"{args.num_cpus} CPUs", "",
             f"best {metric} over both runs: {best_overall:.2f}", "",
             "| search | trials | epochs spent | best | wall s | epochs until within 1 point of the overall best |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, (wall, df) in results.items():
        ordered = df.sort_values("timestamp").reset_index(drop=True)
        hit = ordered.index[ordered[metric] >= best_overall - 1.0]
        until = str(int(hit[0]) + 1) if len(hit) else "never"
        lines.append(f"| {label} | {df['trial'].nunique()} | {len(df)} | {df[metric].max():.2f} | {wall:.0f} | {until} |")
    (_, a), (_, f) = results.values()
    lines += ["", f"ASHA spent {len(a) / len(f):.2f} of the full-budget compute (epochs)."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "search_efficiency.md").write_text(text)


if __name__ == "__main__":
    main()
