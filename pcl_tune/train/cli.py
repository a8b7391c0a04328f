"""``python -m pcl_tune.train``: pretrain one configuration from a config or space file."""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..checkpoint import (
    BEST_FILE,
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    CheckpointError,
    read_checkpoint,
    weights_mismatch,
)
from ..config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    describe_fields,
    load_config_file,
    merge,
    parse_overrides,
    unwritable_reason,
)
from ..data import UnreadableImageError, load_datasets
from .epoch import TrainingDiverged
from .loop import train_loop


def build_config(config_file: str | None, overrides: list[str], epochs: int | None = None) -> TrainConfig:
    """Defaults < the file's settings (a space file's ``fixed``) < ``--set`` overrides < ``--epochs``."""
    data: dict[str, Any] = load_config_file(config_file) if config_file else {}
    data = merge(data, parse_overrides(overrides))
    if epochs is not None:
        data = merge(data, {"epochs": epochs})
    return config_from_dict(data)


def check_weights_fit(cfg: TrainConfig, state: dict[str, Any], path: Path) -> None:
    """The checkpoint's weights load into the model ``cfg`` builds (shapes compared on the meta
    device, nothing allocated); raises :class:`CheckpointError` naming the first difference."""
    import torch

    from ..model import MoCo

    m = cfg.model.__dict__
    with torch.device("meta"):
        ref = MoCo.from_config(cfg).state_dict()
    detail = weights_mismatch(ref, state["model"])
    if detail is None:
        return
    saved = state["config"].get("model") or {}
    differs = [f"model.{k}: {saved[k]!r}" for k in m if k in saved and saved[k] != m[k]]
    was = f"; the checkpoint's run had {', '.join(differs)}" if differs else ""
    raise CheckpointError(f"{path}: its weights do not fit this config's {cfg.model.backbone} (width {cfg.model.width}, "
                          f"small_stem {cfg.model.small_stem}): {detail}{was}")


def check_inputs(cfg: TrainConfig, out: Path, *, resume: bool) -> None:
    """Everything a run needs, checked before anything is written: the output folder, the
    checkpoint to continue, the dataset and the batch size. Raises ConfigError, CheckpointError or
    OSError (one line each)."""
    ckpt = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    reason = unwritable_reason(out, folder=True)
    if reason:
        raise ConfigError(f"--out {out}: {reason}")
    if ckpt.exists() and not resume:
        raise ConfigError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")
    if resume:
        if not ckpt.exists():
            raise ConfigError(f"--resume: {out} holds no checkpoint to continue (no {ckpt}); "
                              "run without --resume to start it")
        path, state = read_checkpoint(ckpt)
        lacking = [k for k in ("epoch", "optimizer") if k not in state]
        if lacking:
            raise CheckpointError(f"{path}: not a run state to continue (no {' or '.join(lacking)}; "
                                  f"a {BEST_FILE} holds weights only)")
        check_weights_fit(cfg, state, path)
    try:
        data = load_datasets(cfg)  # cached: the run reuses it
    except (OSError, ValueError) as e:
        raise ConfigError(f"key 'data.root': {(str(e).strip().splitlines() or [''])[0]}") from None
    if cfg.optim.batch_size > len(data.train):
        raise ConfigError(f"key 'optim.batch_size': got {cfg.optim.batch_size}, expected a batch size <= the "
                          f"{len(data.train)} training images of {data.name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pcl_tune.train", description="Pretrain one PCL configuration.")
    parser.add_argument("--config", help="run config or search-space YAML (its fixed settings are used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set optim.lr=0.1 (repeatable)")
    parser.add_argument("--out", default=None, help="output folder (default runs/train-<time>)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--resume", action="store_true",
                        help="continue from <out>/checkpoint (with <out>/config.yaml unless --config is given)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", action="store_true", help="list every setting with its default")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    if args.help_config:
        for key, tp, default, doc in describe_fields():
            print(f"{key:32s} {tp:22s} {default!r:24s} {doc}")
        return 0
    config = args.config
    if config is None and args.resume and args.out and (Path(args.out) / "config.yaml").is_file():
        config = str(Path(args.out) / "config.yaml")  # --resume continues the run as it was configured
    try:
        cfg = build_config(config, args.overrides, args.epochs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import yaml

    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    out = Path(args.out or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    try:
        check_inputs(cfg, out, resume=args.resume)
    except (ConfigError, CheckpointError, OSError) as e:
        print(f"error: {(str(e).strip().splitlines() or [''])[0]}", file=sys.stderr)
        return 2
    config_file = out / "config.yaml"
    created = [p for p in (out, config_file) if not p.exists()]  # removed again if the run saves nothing
    out.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    try:
        history = train_loop(cfg, out_dir=out, resume_from=ckpt if args.resume else None)
    except KeyboardInterrupt:
        again = "--resume" if ckpt.exists() else "(no epoch was saved: it starts again)"
        print(f"\ninterrupted; continue with: python -m pcl_tune.train --config {config_file} "
              f"--out {out} {again}", file=sys.stderr)
        return 130
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (UnreadableImageError, CheckpointError) as e:  # bad input met while training
        if not ckpt.exists():  # nothing was saved: leave no trace of this call
            for p in reversed(created):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        print(f"error: {(str(e).strip().splitlines() or [''])[0]}", file=sys.stderr)
        return 2
    if history:
        print(f"[pcl_tune] done: knn_top1 {history[-1].get('knn_top1', math.nan):.2f}% after "
              f"{history[-1]['epoch']} epochs; metrics in {out / 'metrics.csv'}, checkpoint in {out / CHECKPOINT_DIR}")
    return 0
