"""What k-means clusters: a pass over the train set (``clustering.features: pass``) or the keys the
training steps computed (``bank``), and the decoded-image cache of file datasets (``data.cache_mb``).

Two settings, each run seed by seed with the arms interleaved (seed 0 pass, seed 0 bank, seed 1
pass, ...) so that the load of a shared machine falls on every arm alike:

(a) the embedded default with the demo's fixed settings (``search_spaces/demo.yaml``: digit scenes,
    small CNN width 32, 60 epochs, warm-up 5);
(b) an image folder of 32 px digit scenes written by this script into a temporary folder (train: the
    train glyphs rendered 3 times, 3 237 images; val: 359), the same model and augmentation, with
    the cache off (``data.cache_mb: 0``: every epoch decodes every file) and on.

Reported per arm: seconds per epoch and its split (the records' time_features, time_clustering,
time_train, time_eval), kNN top-1 and NMI at the last epoch; per setting, the paired difference
bank - pass with a 95 % t-interval over seeds ("not resolved" when it holds 0) and the ratio of the
epoch times. Every run starts from an empty per-process dataset cache, as a new process does, so a
cached run pays for its own decoding (in its first epoch).

    python benchmarks/feature_bank.py [--seeds 3] [--digits-epochs 60] [--folder-epochs 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from _env import environment, publish

REPO = Path(__file__).resolve().parent.parent
TIMES = ("time_epoch", "time_features", "time_clustering", "time_train", "time_eval")


def write_digit_folder(root: Path, *, size: int = 32, train_copies: int = 3, seed: int = 0) -> tuple[int, int]:
    """Write digit scenes as ``root/{train,val}/<digit>/<n>.png`` (ImageFolder layout); returns the counts."""
    from PIL import Image

    from pcl_tune.data import digit_scenes

    splits = digit_scenes(seed=seed, size=size, copies=(train_copies, 1, 1))
    for name, ds in (("train", splits.train), ("val", splits.val)):
        for i in range(len(ds)):
            folder = root / name / str(int(ds.labels[i]))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
    return len(splits.train), len(splits.val)


def one_run(settings: dict[str, Any]) -> dict[str, Any]:
    """Train one config from an empty dataset cache; its summary (means over epochs, last metrics)."""
    from pcl_tune import data as data_mod
    from pcl_tune.train import train_loop

    data_mod._DATA_CACHE.clear()  # as a new process: a cached run decodes its files itself
    t0 = time.perf_counter()
    hist = pd.DataFrame(train_loop(settings, verbose=False))
    wall = time.perf_counter() - t0
    warm = settings["pcl.warmup_epochs"]
    out: dict[str, Any] = {f"mean_{k}": float(hist[k].mean()) for k in TIMES}
    out["mean_time_epoch_clustered"] = float(hist.loc[hist["epoch"] > warm, "time_epoch"].mean())
    last = hist.iloc[-1]
    out.update(knn_top1=float(last["knn_top1"]), nmi=float(last["nmi"]), wall_s=wall, epochs=len(hist))
    out["history"] = hist
    return out


def t_interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and 95 % t-interval of ``values`` (NaN bounds for fewer than 2)."""
    from scipy import stats

    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half


def verdict(lo: float, hi: float, higher: str, lower: str) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 <= hi:
        return "not resolved"
    return higher if lo > 0 else lower


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--digits-epochs", type=int, default=60, help="(a): the demo's 60 by default; 0 skips (a)")
    ap.add_argument("--folder-epochs", type=int, default=5, help="(b): epochs per run (warm-up 1); 0 skips (b)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (the demo's trials use 1)")
    ap.add_argument("--eval-every", type=int, default=1,
                    help="eval.every of every run (1, the default, is what a search needs)")
    ap.add_argument("--name", default="feature_bank", help="file name of the saved table (and of its CSVs)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = environment("cpu")
    print(f"Environment: {env}", flush=True)
    from pcl_tune.config import load_config_file, merge

    demo = merge(load_config_file(REPO / "search_spaces" / "demo.yaml"),
                 {"threads": args.threads, "device": "cpu", "progress": False, "eval": {"every": args.eval_every}})
    flat = {}
    for section, values in demo.items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            flat[section] = values
    settings: list[tuple[str, str, str, dict[str, Any]]] = []  # (setting, features, cache, config) in run order
    tmp = tempfile.TemporaryDirectory(prefix="feature_bank_")
    folder_note = ""
    if args.folder_epochs:
        t = time.perf_counter()
        n_train, n_val = write_digit_folder(Path(tmp.name))
        folder_note = (f"(b) image folder: {n_train} train + {n_val} val PNGs of 32 px digit scenes (written in "
                       f"{time.perf_counter() - t:.0f} s), load size 37, {args.folder_epochs} epochs, warm-up 1")
        print(folder_note, flush=True)
    for seed in range(args.seeds):
        if args.digits_epochs:
            for features in ("pass", "bank"):
                cfg = {**flat, "seed": seed, "epochs": args.digits_epochs, "clustering.features": features}
                settings.append(("digits", features, "-", cfg))
        if args.folder_epochs:
            for cache_mb in (0, 512):
                for features in ("pass", "bank"):
                    cfg = {**flat, "seed": seed, "epochs": args.folder_epochs, "pcl.warmup_epochs": 1,
                           "data.dataset": "folder", "data.root": tmp.name, "data.image_size": 32,
                           "data.crop_min_scale": 0.5, "data.flip_p": 0.0, "data.cache_mb": cache_mb,
                           "clustering.features": features}
                    settings.append(("folder", features, "on" if cache_mb else "off", cfg))
    rows = []
    t_all = time.perf_counter()
    for i, (setting, features, cache, cfg) in enumerate(settings):
        res = one_run(cfg)
        hist = res.pop("history")
        hist.insert(0, "run", i)
        rows.append({"setting": setting, "features": features, "cache": cache, "seed": cfg["seed"], **res,
                     "history": hist})
        print(f"[{time.perf_counter() - t_all:6.0f} s] {setting} seed {cfg['seed']} {features:4s} cache {cache:3s}: "
              f"{res['mean_time_epoch']:.2f} s/epoch, kNN {res['knn_top1']:.2f}, NMI {res['nmi']:.3f}", flush=True)
    tmp.cleanup()
    runs = pd.DataFrame([{k: v for k, v in r.items() if k != "history"} for r in rows])
    epochs = pd.concat([r["history"].assign(setting=r["setting"], features=r["features"], cache=r["cache"],
                                            seed=r["seed"]) for r in rows], ignore_index=True)
    total = time.perf_counter() - t_all

    arms = ["| setting | features | cache | s / epoch | features | clustering | training | evaluation | "
            "s / epoch after warm-up | kNN top-1 % | NMI | wall s / run |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (setting, cache, features), g in runs.groupby(["setting", "cache", "features"], sort=False):
        arms.append(f"| {setting} | {features} | {cache} | {g.mean_time_epoch.mean():.2f} | {g.mean_time_features.mean():.2f} | "
                    f"{g.mean_time_clustering.mean():.3f} | {g.mean_time_train.mean():.2f} | {g.mean_time_eval.mean():.2f} | "
                    f"{g.mean_time_epoch_clustered.mean():.2f} | {g.knn_top1.mean():.2f} | {g.nmi.mean():.3f} | "
                    f"{g.wall_s.mean():.0f} |")

    paired = ["| setting | cache | metric | pass | bank | bank − pass, 95 % t | per seed | answer |",
              "|---|---|---|---:|---:|---|---|---|"]
    for (setting, cache), g in runs.groupby(["setting", "cache"], sort=False):
        a = g[g.features == "pass"].set_index("seed").sort_index()
        b = g[g.features == "bank"].set_index("seed").sort_index()
        for metric, fmt, scale in (("knn_top1", "+.2f", 1.0), ("nmi", "+.3f", 1.0)):
            d = (b[metric] - a[metric]).to_numpy() * scale
            mean, lo, hi = t_interval(d)
            paired.append(f"| {setting} | {cache} | {metric} | {a[metric].mean():{fmt[1:]}} | {b[metric].mean():{fmt[1:]}} | "
                          f"{mean:{fmt}} [{lo:{fmt}}, {hi:{fmt}}] | {', '.join(format(x, fmt) for x in d)} | "
                          f"{verdict(lo, hi, 'bank higher', 'bank lower')} |")
        for col, label in (("mean_time_epoch", "s/epoch, ratio bank / pass"),
                           ("mean_time_epoch_clustered", "s/epoch after warm-up, ratio")):
            r = (b[col] / a[col]).to_numpy()
            mean, lo, hi = t_interval(r)
            paired.append(f"| {setting} | {cache} | {label} | {a[col].mean():.2f} | {b[col].mean():.2f} | "
                          f"{mean:.3f} [{lo:.3f}, {hi:.3f}] | {', '.join(f'{x:.3f}' for x in r)} | "
                          f"{verdict(lo - 1, hi - 1, 'bank slower', 'bank faster')} |")

    cache_rows: list[str] = []
    folder = runs[runs.setting == "folder"]
    if len(folder):
        cache_rows = ["| features | s/epoch cache off | s/epoch cache on | ratio on / off, 95 % t | per seed | "
                      "kNN and NMI identical with and without the cache |", "|---|---:|---:|---|---|---|"]
        for features, g in folder.groupby("features", sort=False):
            off = g[g.cache == "off"].set_index("seed").sort_index()
            on = g[g.cache == "on"].set_index("seed").sort_index()
            r = (on.mean_time_epoch / off.mean_time_epoch).to_numpy()
            mean, lo, hi = t_interval(r)
            fe = epochs[(epochs.setting == "folder") & (epochs.features == features)]
            metric_cols = [c for c in fe.columns if c not in ("run", "cache") and not c.startswith(("time_", "images_per_s"))]
            same = [fe[fe.cache == c].sort_values(["seed", "epoch"])[metric_cols].reset_index(drop=True)
                    for c in ("off", "on")]
            same = same[0].equals(same[1])
            cache_rows.append(f"| {features} | {off.mean_time_epoch.mean():.2f} | {on.mean_time_epoch.mean():.2f} | "
                              f"{mean:.3f} [{lo:.3f}, {hi:.3f}] | {', '.join(f'{x:.3f}' for x in r)} | "
                              f"{'yes, every epoch' if same else 'NO'} |")

    lines = [
        "# Clustering input: a pass over the train set vs the training steps' keys (and the decoded-image cache)",
        "",
        f"Environment: {env}",
        "",
        f"{args.seeds} seeds per arm, interleaved seed by seed; torch threads {args.threads}; eval.every "
        f"{args.eval_every}; total {total / 60:.1f} min.",
        f"(a) digits: search_spaces/demo.yaml's fixed settings, {args.digits_epochs} epochs, warm-up 5." if args.digits_epochs
        else "(a) skipped.",
        folder_note or "(b) skipped.",
        "",
        "Seconds per epoch are means over all epochs of a run (the cache-on runs decode their files in "
        "their first epoch), then over seeds; kNN and NMI are the last epoch's.",
        "",
        *arms,
        "",
        *paired,
        "",
        *cache_rows,
    ]
    publish("\n".join(lines), args.out, args.name, {f"{args.name}_runs": runs, f"{args.name}_epochs": epochs})


if __name__ == "__main__":
    main()
