"""Three ways to spend the demo's compute, per searcher seed: TPE + ASHA cold, TPE + ASHA warm-started
from another seed's search, and Population Based Training.

Arms (each a full search on the embedded default, MoCo v2 baseline off, searcher seed ``s``):

* ``tpe``: ``search_spaces/demo.yaml`` as shipped (TPE + ASHA, stopped trials told to TPE as pruned);
* ``warm``: the same, started with ``--warm-start`` from the ``tpe`` search of seed ``s + 1`` (the
  next seed in the list, wrapping round): its best 3 configurations first, its trials told to TPE;
* ``pbt``: ``search_spaces/pbt_demo.yaml`` (8 trials x 60 epochs, about the demo's compute).

Measures per search, from its rows in arrival order (a row a restored trial reports again, its
restored epoch, is not compute and is left out):

* ``epochs_spent``; ``best``: the best finished score (a trial's value at its last epoch, 60);
* ``epochs_to_within_1``: epochs spent until a trial *finished* within 1 point of the ``tpe``
  search's best of the same seed (the target; NaN when never);
* ``best_at_equal_compute``: the best finished score among the results that arrived within the
  cheapest search's total epochs;
* ``wall_s``.

Then per measure and arm, the paired difference to ``tpe`` (by seed) with a 95 % t-interval.
Searches are kept in ``--keep`` (default ``runs/search_strategies``, ignored by git) and not re-run when their folder holds a finished search, so arms can be added later.

    python benchmarks/search_strategies.py [--seeds 0 1 2] [--arms tpe warm pbt] [--num-cpus 2]
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml
from _env import environment_lines, publish
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("tpe", "warm", "pbt")
DONE = "wall_s.txt"


def _space(arm: str, seed: int, folder: Path) -> Path:
    src = ROOT / "search_spaces" / ("pbt_demo.yaml" if arm == "pbt" else "demo.yaml")
    spec = yaml.safe_load(src.read_text())
    spec.setdefault("searcher", {}).update(seed=seed, baseline=False)
    path = folder / f"{arm}_{seed}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_search(arm: str, seed: int, seeds: list[int], keep: Path, num_cpus: int) -> float:
    """Run one search unless ``keep`` already holds it finished; returns its wall seconds."""
    name = f"{arm}_{seed}"
    done = keep / name / DONE
    if done.is_file():
        return float(done.read_text())
    if (keep / name).exists():
        import shutil

        shutil.rmtree(keep / name)  # an interrupted earlier attempt
    keep.mkdir(parents=True, exist_ok=True)
    extra: list[str] = []
    if arm == "warm":
        donor = seeds[(seeds.index(seed) + 1) % len(seeds)]
        extra = ["--warm-start", str(keep / f"tpe_{donor}"), "--warm-start-top", "3"]
    cmd = [sys.executable, "-m", "pcl_tune.search", "--space", str(_space(arm, seed, keep)), "--storage-path",
           str(keep), "--name", name, "--num-cpus", str(num_cpus), "--no-dashboard", "--no-report", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"search {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    done.write_text(f"{wall:.1f}")
    return wall


def rows_of(exp: Path) -> pd.DataFrame:
    """Every compute row of a search (trial, epoch, value, time), in arrival order."""
    frames = []
    for d in sorted(exp.glob("trial_*")):
        f = d / "progress.csv"
        if f.is_file() and f.stat().st_size:
            df = pd.read_csv(f)
            frames.append(df.assign(trial=d.name))
    rows = pd.concat(frames, ignore_index=True)
    replay = (rows.get("iterations_since_restore", pd.Series(0, index=rows.index)) == 1) & (rows["epoch"] > 1)
    rows = rows[~replay].sort_values(["timestamp", "time_total_s"], kind="stable").reset_index(drop=True)
    rows["epochs_spent"] = range(1, len(rows) + 1)
    return rows


def measures(rows: pd.DataFrame, metric: str, max_t: int, target: float, budget: int) -> dict[str, float]:
    finished = rows[rows["epoch"] == max_t]
    values = pd.to_numeric(finished[metric], errors="coerce")
    hit = finished.loc[values >= target - 1.0, "epochs_spent"]
    within = finished[finished["epochs_spent"] <= budget]
    return {"epochs_spent": int(len(rows)), "best": float(values.max()),
            "epochs_to_within_1": float(hit.iloc[0]) if len(hit) else math.nan,
            "best_at_equal_compute": float(pd.to_numeric(within[metric], errors="coerce").max())
            if len(within) else math.nan}


def paired(table: pd.DataFrame, measure: str, arm: str) -> dict[str, object]:
    wide = table.pivot(index="seed", columns="arm", values=measure)
    if arm not in wide.columns or "tpe" not in wide.columns:
        return {}
    wide = wide[["tpe", arm]].dropna()
    diff = wide[arm] - wide["tpe"]
    n = len(diff)
    mean = float(diff.mean()) if n else math.nan
    half = float(stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    resolved = n > 1 and math.isfinite(half) and not (mean - half <= 0 <= mean + half)
    return {"measure": measure, "arm": arm, "tpe": float(wide["tpe"].mean()) if n else math.nan,
            arm: float(wide[arm].mean()) if n else math.nan, "difference": mean, "ci_low": mean - half,
            "ci_high": mean + half, "seeds": n, "verdict": "resolved" if resolved else "not resolved",
            "per seed": ", ".join(f"{s}: {d:+.1f}" for s, d in diff.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--keep", default=str(ROOT / "runs" / "search_strategies"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    print("\n".join(environment_lines()), flush=True)
    keep = Path(args.keep)
    arms = [a for a in ARMS if a in args.arms]
    if "warm" in arms and "tpe" not in arms:
        arms.insert(0, "tpe")  # a warm search starts from the tpe searches
    walls: dict[tuple[str, int], float] = {}
    for arm in arms:  # every tpe search before the warm ones that start from them
        for seed in args.seeds:
            walls[(arm, seed)] = run_search(arm, seed, args.seeds, keep, args.num_cpus)
            print(f"{arm} seed {seed}: {walls[(arm, seed)]:.0f} s", flush=True)
    for arm in ARMS:  # searches of arms not asked for this time, kept from earlier runs
        for seed in args.seeds:
            done = keep / f"{arm}_{seed}" / DONE
            if (arm, seed) not in walls and done.is_file():
                walls[(arm, seed)] = float(done.read_text())
    demo = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    metric, max_t = demo["objective"]["metric"], int(demo["fixed"]["epochs"])
    rows = {key: rows_of(keep / f"{key[0]}_{key[1]}") for key in walls}
    targets = {}
    for seed in args.seeds:
        if ("tpe", seed) in rows:
            tpe = rows[("tpe", seed)]
            targets[seed] = float(pd.to_numeric(tpe.loc[tpe["epoch"] == max_t, metric]).max())
    budget = min(len(r) for r in rows.values())
    table = pd.DataFrame([{"arm": arm, "seed": seed, "wall_s": walls[(arm, seed)], "target": targets.get(seed),
                           **measures(rows[(arm, seed)], metric, max_t, targets.get(seed, math.nan), budget)}
                          for (arm, seed) in walls]).sort_values(["arm", "seed"])
    summary = pd.DataFrame([p for arm in ("warm", "pbt") for m in
                            ("epochs_to_within_1", "best_at_equal_compute", "best", "epochs_spent", "wall_s")
                            if (p := paired(table, m, arm))])
    text = "\n".join([
        "# TPE + ASHA cold, warm-started, and Population Based Training on the demo", "",
        *environment_lines(), "",
        f"Target of `epochs_to_within_1`: per seed, the best finished {metric} of the cold `tpe` search. Equal "
        f"compute: the first {budget} epochs of each search (the cheapest search's total). A warm search of seed s "
        "starts from the tpe search of the next seed.", "",
        "## Per search", "", table.to_markdown(index=False, floatfmt=".2f"), "",
        "## Paired by searcher seed (arm - tpe, 95 % t-interval)", "",
        summary.to_markdown(index=False, floatfmt=".2f") if len(summary) else "(no pairs yet)", ""])
    all_rows = pd.concat([r.assign(arm=a, seed=s)[["arm", "seed", "trial", "epoch", metric, "epochs_spent"]]
                          for (a, s), r in rows.items()], ignore_index=True)
    publish(text, args.out, "search_strategies", {"search_strategies_runs": table,
                                                  "search_strategies_epochs": all_rows})


if __name__ == "__main__":
    main()
