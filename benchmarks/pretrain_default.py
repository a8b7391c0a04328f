"""Proof that PCL pretraining learns: kNN on the held-out val split of the embedded default.

Trains the default config (``TrainConfig()``: digit scenes, small CNN) and prints, side by side,
kNN top-1 of (a) raw pixels, (b) the random-initialised encoder, (c) the trained encoder, with
the time per epoch and its breakdown (feature extraction, clustering, training, evaluation).

    python benchmarks/pretrain_default.py [--epochs N] [--threads 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from _env import environment, publish

from pcl_tune.config import config_from_dict
from pcl_tune.evaluate import knn_accuracy, raw_pixel_features
from pcl_tune.train import RunState, embed, train_loop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=None, help="default: the config's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = environment()
    print(f"Environment: {env}", flush=True)
    from pcl_tune.config import parse_overrides

    settings = {"threads": args.threads, "progress": False, **parse_overrides(args.overrides)}
    if args.epochs:
        settings["epochs"] = args.epochs
    cfg = config_from_dict(settings)
    init = RunState.build(cfg)
    d = init.data
    raw = knn_accuracy(raw_pixel_features(d.val.images), d.val.labels, raw_pixel_features(d.train.images),
                       d.train.labels, d.num_classes, k=cfg.eval.knn_k, t=cfg.eval.knn_t)
    _, bank = embed(init, d.train, head=False, backbone=True)
    _, val = embed(init, d.val, head=False, backbone=True)
    rand = knn_accuracy(val, d.val.labels, bank, d.train.labels, d.num_classes, k=cfg.eval.knn_k, t=cfg.eval.knn_t)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        hist = pd.DataFrame(train_loop(cfg, out_dir=tmp))
    wall = time.time() - t0
    last = hist.iloc[-1]
    cols = ["time_features", "time_clustering", "time_train", "time_eval", "time_epoch"]
    warm = cfg.pcl.warmup_epochs
    rows = []
    for label, part in (("all epochs", hist), (f"warm-up (1-{warm})", hist[hist["epoch"] <= warm]),
                        (f"with prototypes ({warm + 1}-{cfg.epochs})", hist[hist["epoch"] > warm])):
        if len(part):
            t = part[cols].mean()
            share = (t["time_features"] + t["time_clustering"]) / t["time_epoch"] * 100
            rows.append(f"| {label} | {t['time_features']:.3f} | {t['time_clustering']:.3f} | {t['time_train']:.3f} | "
                        f"{t['time_eval']:.3f} | {t['time_epoch']:.3f} | {share:.1f} % |")
    lines = [
        f"# Pretraining the default config ({platform.node()}, {args.threads} threads, torch {torch.__version__})",
        "",
        f"Environment: {env}",
        "",
        f"{d.summary()}; {cfg.epochs} epochs, batch {cfg.optim.batch_size}, {cfg.model.backbone} width "
        f"{cfg.model.width}, warm-up {cfg.pcl.warmup_epochs}, clusters {cfg.pcl.cluster_schedule}; wall {wall:.0f} s",
        "",
        "| encoder | kNN top-1 on val (%) |",
        "|---|---:|",
        f"| raw pixels | {raw:.1f} |",
        f"| random-initialised encoder | {rand:.1f} |",
        f"| trained encoder (epoch {int(last['epoch'])}) | {last['knn_top1']:.1f} |",
        f"| best epoch ({int(hist.loc[hist['knn_top1'].idxmax(), 'epoch'])}) | {hist['knn_top1'].max():.1f} |",
        "",
        "| mean seconds per epoch | features | clustering | training | evaluation | total | features+clustering share |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "The train-set pass at the end of an epoch builds the kNN bank and, from the last warm-up epoch on, "
        "the next epoch's clustering input; it counts as feature extraction when clustering uses it, as "
        "evaluation otherwise.",
        "",
        "Per epoch: " + ", ".join(f"{int(r.epoch)}: {r.knn_top1:.1f}" for r in hist.itertuples()),
    ]
    publish("\n".join(lines), args.out, "pretrain_default", {"pretrain_default_epochs": hist})


if __name__ == "__main__":
    main()
