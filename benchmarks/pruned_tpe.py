"""Stopped trials told to TPE as pruned vs as complete (stock Ray Tune), on the demo search.

Runs ``search_spaces/demo.yaml`` (TPE + ASHA, no MoCo baseline) with ``searcher.stopped_trials``
``complete`` (what Ray's ``OptunaSearch`` does) and ``pruned`` (this project's searcher), for each
searcher seed, interleaved (seed 0 stock, seed 0 pruned, seed 1 stock, ...), so both arms see the
same machine load. Per search, in the order results arrived:

* ``epochs_to_within_1``: epochs spent until any trial first reported a value within 1 point of
  the best value either search of the same seed reached (the first run of this script took the
  best of all searches, which only one seed reached: its other seeds had no value);
* ``best_at_equal_compute``: the best score (a finished trial's last epoch) once every search has
  spent as many epochs as the cheapest of them spent in all;
* ``best``, ``epochs_spent``, ``wall_s``.

Then, per measure, the mean of each arm and the paired (by seed) difference pruned - stock with a
95 % t-interval. Saves ``results/pruned_tpe.md``, ``results/pruned_tpe_runs.csv`` and every
search's per-epoch rows (``results/pruned_tpe_epochs.csv``), so the measures can be recomputed.

    python benchmarks/pruned_tpe.py [--seeds 0 1 2] [--num-cpus 2]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from _env import environment_lines, publish
from scipy import stats
from search_efficiency import run

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("complete", "pruned")


def run_search(space: Path, runs: Path, name: str, num_cpus: int) -> tuple[float, pd.DataFrame]:
    """Run one search; returns (wall seconds, every result row with its trial, in arrival order)."""
    wall, rows = run(space, runs, name, num_cpus)
    rows = rows.sort_values("timestamp", kind="stable").reset_index(drop=True)
    rows["epochs_spent"] = range(1, len(rows) + 1)
    return wall, rows


def measures(rows: pd.DataFrame, metric: str, max_t: int, target: float, budget: int) -> dict[str, float]:
    """The per-search measures (see the module docstring)."""
    values = pd.to_numeric(rows[metric], errors="coerce")
    reached = rows.loc[values >= target - 1.0, "epochs_spent"]
    finished = rows[(rows["epoch"] == max_t) & (rows["epochs_spent"] <= budget)]
    return {"best": float(values.max()), "epochs_spent": int(len(rows)),
            "epochs_to_within_1": float(reached.iloc[0]) if len(reached) else math.nan,
            "best_at_equal_compute": float(pd.to_numeric(finished[metric], errors="coerce").max())
            if len(finished) else math.nan}


def paired(table: pd.DataFrame, measure: str) -> dict[str, object]:
    """Mean per arm and the paired difference pruned - complete with its 95 % t-interval."""
    wide = table.pivot(index="seed", columns="stopped_trials", values=measure).dropna()
    diff = wide["pruned"] - wide["complete"]
    n = len(diff)
    mean = float(diff.mean()) if n else math.nan
    half = float(stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    resolved = n > 1 and not (mean - half <= 0 <= mean + half)
    return {"measure": measure, "stock (complete)": float(wide["complete"].mean()) if n else math.nan,
            "pruned": float(wide["pruned"].mean()) if n else math.nan, "pruned - stock": mean,
            "ci_low": mean - half, "ci_high": mean + half, "seeds": n,
            "verdict": "resolved" if resolved else "not resolved",
            "per seed": ", ".join(f"{s}: {d:+.1f}" for s, d in diff.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--space", default=str(ROOT / "search_spaces" / "demo.yaml"))
    ap.add_argument("--smoke", action="store_true", help="a tiny version (4 trials of 4 epochs) to check the script")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    print("\n".join(environment_lines()), flush=True)
    spec = yaml.safe_load(Path(args.space).read_text())
    if args.smoke:
        spec["fixed"].update(epochs=4, data={**spec["fixed"].get("data", {}), "subset": 256})
        spec["fixed"].setdefault("pcl", {})["warmup_epochs"] = 1
        spec["searcher"].update(num_samples=4, startup_trials=2)
        spec["asha"].update(grace_period=2, reduction_factor=2, max_t=4)
    metric = spec["objective"]["metric"]
    max_t = int(spec.get("asha", {}).get("max_t") or spec["fixed"]["epochs"])
    searches: dict[tuple[int, str], tuple[float, pd.DataFrame]] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pruned_tpe_") as tmp:
        for seed in args.seeds:
            for arm in ARMS:
                s = yaml.safe_load(yaml.safe_dump(spec, sort_keys=False))
                s.setdefault("searcher", {}).update(seed=seed, stopped_trials=arm, baseline=False)
                path = Path(tmp) / f"{arm}_{seed}.yaml"
                path.write_text(yaml.safe_dump(s, sort_keys=False))
                wall, rows = run_search(path, Path(tmp) / "runs", f"{arm}_{seed}", args.num_cpus)
                searches[(seed, arm)] = (wall, rows)
                print(f"seed {seed} {arm:8s}: {len(rows)} epochs, best {pd.to_numeric(rows[metric]).max():.2f}, "
                      f"{wall:.0f} s", flush=True)
    targets = {seed: max(float(pd.to_numeric(searches[(seed, arm)][1][metric], errors="coerce").max())
                         for arm in ARMS) for seed in args.seeds}
    budget = min(len(r) for _, r in searches.values())
    table = pd.DataFrame([{"seed": seed, "stopped_trials": arm, "wall_s": wall, "target": targets[seed],
                           **measures(rows, metric, max_t, targets[seed], budget)}
                          for (seed, arm), (wall, rows) in searches.items()])
    rows_all = pd.concat([r.assign(seed=seed, stopped_trials=arm) for (seed, arm), (_, r) in searches.items()],
                         ignore_index=True)
    summary = pd.DataFrame([paired(table, m) for m in ("epochs_to_within_1", "best_at_equal_compute", "best",
                                                        "epochs_spent", "wall_s")])
    text = "\n".join([
        "# Stopped trials told to TPE as pruned vs as complete (stock), demo search", "",
        *environment_lines(), "",
        f"Target for `epochs_to_within_1`: per seed, the best {metric} either of its searches reached, - 1 point. "
        f"Equal compute: the first {budget} epochs of each search (the cheapest search's total). "
        f"Total wall time {time.perf_counter() - t_all:.0f} s.", "",
        "## Per search", "", table.to_markdown(index=False, floatfmt=".2f"), "",
        "## Paired by searcher seed (pruned - stock, 95 % t-interval)", "",
        summary.to_markdown(index=False, floatfmt=".2f"), ""])
    publish(text, args.out, "pruned_tpe", {"pruned_tpe_runs": table, "pruned_tpe_epochs": rows_all})


if __name__ == "__main__":
    main()
