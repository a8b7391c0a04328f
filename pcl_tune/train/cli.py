"""``python -m pcl_tune.train``: pretrain one configuration from a config or space file."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from ..checkpoint import CheckpointError
from ..config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    describe_fields,
    load_config_file,
    merge,
    parse_overrides,
)
from .epoch import TrainingDiverged
from .loop import train_loop
from .state import CHECKPOINT_DIR, CHECKPOINT_FILE


def build_config(config_file: str | None, overrides: list[str], epochs: int | None = None) -> TrainConfig:
    """Defaults < the file's settings (a space file's ``fixed``) < ``--set`` overrides < ``--epochs``."""
    data: dict[str, Any] = load_config_file(config_file) if config_file else {}
    data = merge(data, parse_overrides(overrides))
    if epochs is not None:
        data = merge(data, {"epochs": epochs})
    return config_from_dict(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcl_tune.train", description="Pretrain one PCL configuration.")
    parser.add_argument("--config", help="run config or search-space YAML (its fixed settings are used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set optim.lr=0.1 (repeatable)")
    parser.add_argument("--out", default=None, help="output folder (default runs/train-<time>)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true", help="list every setting with its default")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    if args.help_config:
        for key, tp, default, doc in describe_fields():
            print(f"{key:32s} {tp:22s} {default!r:24s} {doc}")
        return 0
    try:
        cfg = build_config(args.config, args.overrides, args.epochs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import yaml

    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    out = Path(args.out or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    if ckpt.exists() and not args.resume:
        print(f"error: {out} already holds a checkpoint; pass --resume to continue it or choose another --out",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    try:
        history = train_loop(cfg, out_dir=out, resume_from=ckpt if args.resume and ckpt.exists() else None)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python -m pcl_tune.train --config {out / 'config.yaml'} "
              f"--out {out} --resume", file=sys.stderr)
        return 130
    except (TrainingDiverged, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if history:
        print(f"[pcl_tune] done: knn_top1 {history[-1].get('knn_top1', math.nan):.2f}% after "
              f"{history[-1]['epoch']} epochs; metrics in {out / 'metrics.csv'}, checkpoint in {out / CHECKPOINT_DIR}")
    return 0
