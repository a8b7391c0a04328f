"""Overhead of running one fixed trial through the search vs plain.

The same configuration (the demo's fixed settings, one thread) is run three ways, one after the
other, each as a fresh process as a user would: ``python -m pcl_tune.train``; a 1-trial
``python -m pcl_tune.search`` with the direct executor; and with the Ray Train executor (1
worker). Prints and saves the wall times and their ratios to the plain run.

    python benchmarks/search_overhead.py [--epochs 24]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _env import environment, publish

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=24)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    env = environment()
    print(f"Environment: {env}", flush=True)
    demo = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    fixed = {**demo["fixed"], "epochs": args.epochs, "threads": 1, "progress": False}
    from pcl_tune.config import config_from_dict

    lr = config_from_dict(fixed).optim.lr  # the searched "parameter": one choice, the config's own lr
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "config.yaml").write_text(yaml.safe_dump(fixed))
        plain = timed([sys.executable, "-m", "pcl_tune.train", "--config", str(t / "config.yaml"), "--out",
                       str(t / "plain")])
        rows.append(("plain `python -m pcl_tune.train`", plain))
        for executor, res in (("direct", {"executor": "direct", "cpus_per_trial": 1}),
                              ("train", {"executor": "train", "workers_per_trial": 1, "cpus_per_worker": 1})):
            space = {"name": f"overhead_{executor}", "fixed": fixed,
                     "search": {"optim.lr": {"choice": [lr]}},
                     "searcher": {"num_samples": 1, "startup_trials": 1}, "asha": {"enabled": False},
                     "resources": res}
            (t / f"{executor}.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
            wall = timed([sys.executable, "-m", "pcl_tune.search", "--space", str(t / f"{executor}.yaml"),
                          "--storage-path", str(t / "runs"), "--num-cpus", "2", "--no-report",
                          *(["--no-dashboard"] if executor == "direct" else [])])
            rows.append((f"1-trial search, {executor} executor", wall))
    lines = [f"# One trial ({args.epochs} epochs of the demo's fixed settings, 1 thread): plain vs search", "",
             f"Environment: {env}", "",
             "| how | wall s | ratio to plain |", "|---|---:|---:|"]
    lines += [f"| {name} | {w:.1f} | {w / plain:.2f} |" for name, w in rows]
    text = "\n".join(lines) + "\n"
    publish(text, args.out, "search_overhead")


if __name__ == "__main__":
    main()
