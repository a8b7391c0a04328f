"""Overhead of running one fixed trial through the search vs plain, and where it goes.

The same configuration (the demo's fixed settings, one thread) is run several ways, each as a
fresh process as a user would: ``python -m pcl_tune.train`` (``plain``); a 1-trial
``python -m pcl_tune.search`` with the direct executor (``direct``); and with the Ray Train
executor, 1 worker (``train``). Arms may carry options after a slash:

* ``every=N``: the search's ``checkpoint_every`` (a checkpoint handed to Ray every N epochs and at
  the last; default 1, every epoch);
* ``poll=S``: Ray Train's controller poll interval, ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (train
  executor; default what :mod:`pcl_tune.trials` sets, ``poll=2`` is Ray's own default).

With ``--repeats R`` the arms run round after round, interleaved, and the tables give each arm's
median. Prints and saves the wall times, their ratios to the plain run, and the breakdown of each
search arm's time from timestamps written by the trial (``PCL_TUNE_TIMING_LOG``) and by a Tune
callback in the driver (``_overhead_timing.py``); every run's numbers go to
``search_overhead_runs.csv``.

    python benchmarks/search_overhead.py [--epochs 24] [--repeats 1] \\
        [--arms plain direct train train/poll=2 train/every=10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from _env import environment, publish
from _overhead_timing import breakdown, read_events

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent

ROWS: list[tuple[str, str]] = [
    ("wall", "wall s"),
    ("startup_driver", "start-up: process, imports, `ray.init`, dashboard -> Tuner starts"),
    ("startup_trial", "start-up: Tuner -> trial function starts"),
    ("startup_train", "start-up: `TorchTrainer.fit` -> worker function starts (controller, worker group)"),
    ("startup_run", "start-up: loop function -> epoch 1 begins (data, model)"),
    ("sum_time_epoch", "epochs: the loop's own `time_epoch`, summed"),
    ("between_epochs", "per epoch: local checkpoint + metrics.csv, summed"),
    ("report_total", "per epoch: report calls, summed"),
    ("report_plain", "  one report without a checkpoint, mean s"),
    ("report_ckpt", "  one report with a checkpoint, mean s"),
    ("n_ckpt", "  checkpoints handed to Ray"),
    ("tail", "end: last report -> process exit"),
    ("shutdown_train", "  of which last report -> `fit` returns (Train shut-down)"),
    ("other", "other (wall less the rows above)"),
    ("report_to_tune", "report call -> result at the Tune driver, mean s (overlaps training)"),
    ("snapshot_total", "driver's experiment snapshots, summed s (overlaps training)"),
    ("snapshots", "  snapshots"),
]


def parse_arm(spec: str) -> tuple[str, dict[str, str]]:
    """``train/poll=2/every=10`` -> ("train", {"poll": "2", "every": "10"})."""
    kind, *opts = spec.split("/")
    if kind not in ("plain", "direct", "train"):
        raise SystemExit(f"--arms {spec}: expected plain, direct or train, with /every=N or /poll=S")
    options = dict(o.split("=", 1) for o in opts)
    unknown = set(options) - {"every", "poll"}
    if unknown or (kind == "plain" and options) or (kind == "direct" and "poll" in options):
        raise SystemExit(f"--arms {spec}: options not understood: {sorted(options)}")
    return kind, options


def describe_arm(kind: str, options: dict[str, str]) -> str:
    if kind == "plain":
        return "plain `python -m pcl_tune.train`"
    extra = []
    if "every" in options:
        extra.append(f"checkpoint_every {options['every']}")
    if "poll" in options:
        extra.append(f"Train poll {options['poll']} s")
    return f"1-trial search, {kind} executor" + (f" ({', '.join(extra)})" if extra else "")


def run_arm(kind: str, options: dict[str, str], fixed: dict[str, Any], lr: float, work: Path,
            tag: str) -> dict[str, Any]:
    """One run of an arm as a fresh process; returns its wall time and breakdown."""
    env = dict(os.environ)
    if kind == "plain":
        (work / "config.yaml").write_text(yaml.safe_dump(fixed))
        cmd = [sys.executable, "-m", "pcl_tune.train", "--config", str(work / "config.yaml"), "--out",
               str(work / tag)]
    else:
        res = ({"executor": "direct", "cpus_per_trial": 1} if kind == "direct"
               else {"executor": "train", "workers_per_trial": 1, "cpus_per_worker": 1})
        space = {"name": f"overhead_{tag}", "fixed": {**fixed, "checkpoint_every": int(options.get("every", 1))},
                 "search": {"optim.lr": {"choice": [lr]}},
                 # One trial: no MoCo v2 baseline trial beside it (searches run one by default).
                 "searcher": {"num_samples": 1, "startup_trials": 1, "baseline": False}, "asha": {"enabled": False},
                 "resources": res}
        (work / f"{tag}.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
        cmd = [sys.executable, "-m", "pcl_tune.search", "--space", str(work / f"{tag}.yaml"),
               "--storage-path", str(work / "runs"), "--num-cpus", "2", "--no-report",
               *(["--no-dashboard"] if kind == "direct" else [])]
        env.update(PCL_TUNE_TIMING_LOG=str(work / f"{tag}.jsonl"), RAY_TUNE_CALLBACKS="_overhead_timing.TimingCallback",
                   PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        if "poll" in options:
            env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = options["poll"]
    launched = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    ended = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    if kind == "plain":
        epochs = pd.read_csv(work / tag / "metrics.csv")
        row: dict[str, Any] = {"wall": ended - launched, "sum_time_epoch": float(epochs["time_epoch"].sum())}
        row["other"] = row["wall"] - row["sum_time_epoch"]
    else:
        row = breakdown(read_events(work / f"{tag}.jsonl"), launched, ended)
    row["console_lines"] = len((proc.stdout + proc.stderr).splitlines())
    return row


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 10:
        return f"{value:.0f}"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of all arms, interleaved (medians reported)")
    ap.add_argument("--arms", nargs="+", default=["plain", "direct", "train"],
                    help="plain, direct, train, each with /every=N and (train) /poll=S; the first must be plain")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--keep", metavar="DIR", help="run in DIR and keep the runs and timing logs there")
    args = ap.parse_args()
    arms = [parse_arm(a) for a in args.arms]
    if arms[0][0] != "plain":
        raise SystemExit("--arms: the first arm must be plain (the ratios are to it)")
    env = environment()
    print(f"Environment: {env}", flush=True)
    demo = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    fixed = {**demo["fixed"], "epochs": args.epochs, "threads": 1, "progress": False}
    from pcl_tune.config import config_from_dict

    lr = config_from_dict(fixed).optim.lr  # the searched "parameter": one choice, the config's own lr
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for r in range(args.repeats):
            for i, (kind, options) in enumerate(arms):
                row = run_arm(kind, options, fixed, lr, work, f"r{r}_a{i}")
                runs.append({"round": r + 1, "arm": args.arms[i], **row})
                print(f"round {r + 1} {args.arms[i]}: {row['wall']:.1f} s", flush=True)
    frame = pd.DataFrame(runs)
    medians = {a: frame[frame["arm"] == a].median(numeric_only=True) for a in args.arms}
    plain = medians[args.arms[0]]["wall"]
    lines = [f"# One trial ({args.epochs} epochs of the demo's fixed settings, 1 thread): plain vs search", "",
             f"Environment: {env}", "",
             f"Arms run one after the other, {args.repeats} round(s), interleaved; medians over rounds.", "",
             "| how | wall s | ratio to plain | per-round ratios |", "|---|---:|---:|---|"]
    for a, (kind, options) in zip(args.arms, arms):
        walls = frame[frame["arm"] == a]["wall"].tolist()
        plains = frame[frame["arm"] == args.arms[0]]["wall"].tolist()
        per_round = ", ".join(f"{w / p:.2f}" for w, p in zip(walls, plains))
        lines.append(f"| {describe_arm(kind, options)} | {medians[a]['wall']:.1f} | {medians[a]['wall'] / plain:.2f} "
                     f"| {per_round} |")
    lines += ["", "Where the time goes (seconds; medians over rounds; `-`: not measured or not applicable):", "",
              "| | " + " | ".join(args.arms) + " |", "|---|" + "---:|" * len(args.arms)]
    for key, label in ROWS:
        cells = [_fmt(medians[a].get(key)) for a in args.arms]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    per_epoch = []
    for a in args.arms:
        m = medians[a]
        over = m["wall"] - m["sum_time_epoch"]
        per_epoch.append(f"{a}: {over:.1f} s = {over / args.epochs:.2f} s/epoch")
    lines += ["", "Wall less the loop's own epoch time: " + "; ".join(per_epoch) + "."]
    text = "\n".join(lines) + "\n"
    publish(text, args.out, "search_overhead", {"search_overhead_runs": frame})


if __name__ == "__main__":
    main()
