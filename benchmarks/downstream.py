"""Downstream protocols on the embedded default: does the pretrained encoder beat raw pixels and the
random-initialised encoder on few-shot episodes, the linear probe and 10 % semi-supervised
fine-tuning? And what does the per-epoch few-shot metric cost?

For each of ``--seeds`` pretraining seeds: train the default config, then judge its best-epoch
weights (``best.pt``, by kNN on val) on the test split with every protocol, next to the
random-initialised encoder of the same seed and raw pixels. Prints (and saves) one table with the
mean over seeds, a 95 % t-interval over seeds, and the seconds each protocol took.

Then the cost of the per-epoch few-shot metrics: the same short run with
``eval.fewshot_episodes`` 200 and 0, alternated, in this process (``downstream_cost.md``).

    python benchmarks/downstream.py [--seeds 3] [--epochs 200] [--threads 2] [--part all|accuracy|cost]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from _env import environment_lines, publish
from scipy import stats

from pcl_tune.evaluate import (
    extract_features,
    fewshot_episodes,
    linear_probe,
    load_encoder,
    raw_pixel_features,
    semi_supervised,
)
from pcl_tune.train import BEST_FILE, CHECKPOINT_DIR, train_loop


def judge(features: dict[str, Any], labels: dict[str, np.ndarray], seed: int, episodes: int) -> list[dict[str, Any]]:
    """Few-shot (5-way 1/5-shot, logistic, test split) and the linear probe (train -> test)."""
    rows = []
    for shots in (1, 5):
        t = time.perf_counter()
        r = fewshot_episodes(features["test"], labels["test"], k_shot=shots, episodes=episodes, seed=seed)
        rows.append({"protocol": f"few-shot 5-way {shots}-shot", "value": r.mean, "seconds": time.perf_counter() - t})
    t = time.perf_counter()
    r = linear_probe(features["train"], labels["train"], features["test"], labels["test"], seed=seed)
    rows.append({"protocol": "linear probe top-1", "value": r.top1, "seconds": time.perf_counter() - t})
    return rows


def one_seed(seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    settings = {"threads": args.threads, "progress": False, "seed": seed, "epochs": args.epochs}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        train_loop(settings, out_dir=tmp, verbose=False)
        pretrain_s = time.perf_counter() - t
        best = Path(tmp) / CHECKPOINT_DIR / BEST_FILE
        for encoder in ("pretrained", "random init"):
            loaded = load_encoder(best, random_init=encoder == "random init", device="cpu")
            d = loaded.data
            feats = {s: extract_features(loaded, getattr(d, s)) for s in ("train", "test")}
            labels = {s: getattr(d, s).labels.numpy() for s in ("train", "test")}
            rows += [{"encoder": encoder, **r} for r in judge(feats, labels, seed, args.episodes)]
            t = time.perf_counter()
            semi = semi_supervised(best, fraction=0.1, epochs=args.semi_epochs, seed=seed, split_name="test",
                                   random_init=encoder == "random init", device="cpu")
            rows.append({"encoder": encoder, "protocol": "semi-supervised 10 % top-1", "value": semi.top1,
                         "seconds": time.perf_counter() - t})
        raw = {s: raw_pixel_features(getattr(d, s).images) for s in ("train", "test")}
        rows += [{"encoder": "raw pixels", **r} for r in judge(raw, labels, seed, args.episodes)]
    for r in rows:
        r.update(seed=seed, pretrain_s=pretrain_s)
    return rows


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    out = []
    for (protocol, encoder), g in df.groupby(["protocol", "encoder"], sort=False):
        v = g["value"].to_numpy()
        half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
        out.append({"protocol": protocol, "encoder": encoder, "mean %": v.mean(), "95 % CI ±": half,
                    "per seed": ", ".join(f"{x:.1f}" for x in v), "seconds (mean)": g["seconds"].mean()})
    return pd.DataFrame(out)


def fewshot_cost(args: argparse.Namespace) -> pd.DataFrame:
    """Mean seconds per epoch with the per-epoch few-shot metrics on (200 episodes) and off."""
    rows = []
    for episodes in (200, 0, 200, 0):  # interleaved: the machine's load drifts
        h = pd.DataFrame(train_loop({"threads": args.threads, "progress": False, "epochs": args.epochs,
                                     "eval.fewshot_episodes": episodes}, max_epochs=args.cost_epochs, verbose=False))
        rows.append({"fewshot_episodes": episodes, "time_eval": h["time_eval"].mean(),
                     "time_epoch": h["time_epoch"].mean()})
    df = pd.DataFrame(rows).groupby("fewshot_episodes", as_index=False).mean()
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--semi-epochs", type=int, default=30)
    ap.add_argument("--cost-epochs", type=int, default=30, help="epochs of each few-shot cost run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", choices=["all", "accuracy", "cost"], default="all")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    header = environment_lines()
    print("\n".join(header), flush=True)
    if args.part in ("all", "accuracy"):
        df = pd.DataFrame([r for s in range(args.seeds) for r in one_seed(s, args)])
        lines = [
            "# Downstream protocols on the embedded default", "", *header, "",
            f"{args.seeds} pretraining seeds x {args.epochs} epochs (default config; mean pretraining "
            f"{df['pretrain_s'].mean():.0f} s); best epoch by kNN on val; judged on the test split (digit classes "
            f"pretraining saw, on images it never saw); few-shot {args.episodes} episodes, logistic classifier; "
            f"semi-supervised: {args.semi_epochs} epochs on a class-balanced 10 % of train.",
            "", summarise(df).to_markdown(index=False, floatfmt=".2f"),
        ]
        publish("\n".join(lines), args.out, "downstream", {"downstream_runs": df})
    if args.part in ("all", "cost"):
        cost = fewshot_cost(args)
        on, off = cost.set_index("fewshot_episodes").loc[200], cost.set_index("fewshot_episodes").loc[0]
        share = (on["time_epoch"] - off["time_epoch"]) / off["time_epoch"] * 100
        lines = [
            "# Cost of the per-epoch few-shot metrics on the embedded default", "", *header, "",
            f"fewshot_5w1s and fewshot_5w5s, 200 episodes each (nearest class mean on the val split's features, "
            f"which the kNN evaluation computes anyway); {args.cost_epochs}-epoch runs of the default config, "
            "alternated on / off / on / off, means per epoch:", "", cost.to_markdown(index=False, floatfmt=".3f"), "",
            f"Extra time per epoch with them on: {on['time_epoch'] - off['time_epoch']:.3f} s = {share:.1f} % of an "
            f"epoch (evaluation {off['time_eval']:.3f} -> {on['time_eval']:.3f} s, "
            f"+{(on['time_eval'] - off['time_eval']) / off['time_epoch'] * 100:.1f} % of an epoch).",
        ]
        publish("\n".join(lines), args.out, "downstream_cost")


if __name__ == "__main__":
    main()
