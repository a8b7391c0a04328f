"""``python -m pcl_tune.evaluate``: judge a pretrained checkpoint (or the best trials of a search).

    python -m pcl_tune.evaluate --checkpoint runs/one/checkpoint --task fewshot [--split test]
    python -m pcl_tune.evaluate --checkpoint runs/one/checkpoint --task linear --random-init
    python -m pcl_tune.evaluate --best runs/demo --top 3 --task fewshot --task linear

The run's config comes from the checkpoint; ``--set key=value`` overrides it (a ``data.root`` on
another machine). The default split is ``test``: this command makes the final table of chosen
configurations; a search measures its objective on ``val``. Wrong input gets one line on stderr
and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ConfigError, parse_overrides, unwritable_reason
from .encoder import EvaluationError, LoadedEncoder, extract_features, load_encoder, split
from .fewshot import fewshot_episodes
from .knn import knn_accuracy
from .linear import linear_probe
from .semi import semi_supervised
from .voc07 import voc07_lowshot

TASKS: tuple[str, ...] = ("knn", "linear", "fewshot", "semi", "voc07")


def _features(loaded: LoadedEncoder, cache: dict[str, Any], name: str) -> tuple[Any, np.ndarray]:
    if name not in cache:
        ds = loaded.data.fewshot if name == "fewshot" else split(loaded, name)
        assert ds is not None
        cache[name] = (extract_features(loaded, ds), ds.labels.numpy())
    return cache[name]


def run_task(task: str, loaded: LoadedEncoder, args: argparse.Namespace, cache: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of one task: ``{"task", "setting", "value", ...fields}`` (accuracies in %)."""
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if task == "knn":
        bank, bank_y = _features(loaded, cache, "train")
        x, y = _features(loaded, cache, args.split)
        import torch

        top1 = knn_accuracy(x, torch.from_numpy(y), bank, torch.from_numpy(bank_y), loaded.data.num_classes,
                            k=loaded.cfg.eval.knn_k, t=loaded.cfg.eval.knn_t)
        rows.append({"setting": f"k={loaded.cfg.eval.knn_k}", "value": top1, "top1": top1})
    elif task == "linear":
        tx, ty = _features(loaded, cache, "train")
        x, y = _features(loaded, cache, args.split)
        res = linear_probe(tx, ty, x, y, seed=args.seed)
        rows.append({"setting": f"C={res.C:g}", "value": res.top1, "top1": res.top1, "top5": res.top5, "C": res.C})
    elif task == "fewshot":
        # mini-ImageNet: episodes over its 16 validation classes while choosing, its 20 test classes
        # for the final table; elsewhere over the split's images of the classes pretraining saw.
        name = "fewshot" if args.split == "val" and loaded.data.fewshot is not None else args.split
        x, y = _features(loaded, cache, name)
        for shots in args.shots:
            res = fewshot_episodes(x, y, n_way=args.ways, k_shot=shots, n_query=args.queries, episodes=args.episodes,
                                   classifier=args.classifier, seed=args.seed)
            rows.append({"setting": f"{res.n_way}-way {res.k_shot}-shot", "value": res.mean, "mean": res.mean,
                         "ci95": res.ci95, "n_way": res.n_way, "k_shot": res.k_shot, "episodes": res.episodes,
                         "classifier": res.classifier})
    elif task == "semi":
        for fraction in args.fractions:
            res = semi_supervised(loaded.checkpoint, fraction=fraction, epochs=args.semi_epochs, seed=args.seed,
                                  split_name=args.split, overrides=args.overrides, random_init=args.random_init)
            rows.append({"setting": f"{fraction:.0%} labels", "value": res.top1, **asdict(res)})
    elif task == "voc07":
        if not args.voc_root:
            raise EvaluationError("task voc07 needs --voc-root (a VOC2007 devkit folder: JPEGImages/, Annotations/, "
                                  "ImageSets/Main/)")
        from ..voc2007 import voc2007

        voc = voc2007(args.voc_root, image_size=loaded.data.image_size)
        train_x = extract_features(loaded, voc.trainval)
        test_x = extract_features(loaded, voc.test)
        res = voc07_lowshot(train_x, voc.trainval_targets, test_x, voc.test_targets, shots=args.voc_shots,
                            draws=args.voc_draws, seed=args.seed)
        rows += [{"setting": f"{k}-shot" if k != "full" else "full", "value": v, "mAP": v} for k, v in res.items()]
    else:
        raise EvaluationError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    seconds = time.perf_counter() - t0
    for r in rows:
        r.update(task=task, seconds=seconds / len(rows))
    return rows


def evaluate_checkpoint(checkpoint: str | Path, args: argparse.Namespace,
                        progress: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
    """Every requested task on one checkpoint; rows carry ``checkpoint``, ``split``, ``encoder``."""
    loaded = load_encoder(checkpoint, overrides=args.overrides, random_init=args.random_init)
    cache: dict[str, Any] = {}
    rows = []
    for task in args.tasks:
        progress(f"{task} on {loaded.checkpoint} ({'random init' if args.random_init else f'epoch {loaded.epoch}'})")
        if task == "fewshot" and loaded.data.fewshot is None:
            progress(f"few-shot episodes on {loaded.data.name}: images pretraining never saw, of classes it did see")
        for r in run_task(task, loaded, args, cache):
            rows.append({"checkpoint": str(loaded.checkpoint), "split": args.split,
                         "encoder": "random init" if args.random_init else "pretrained", "epoch": loaded.epoch, **r})
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    import pandas as pd

    df = pd.DataFrame(rows)
    cols = [c for c in ("trial", "encoder", "task", "setting", "value", "ci95", "seconds") if c in df.columns]
    return df[cols].to_string(index=False, float_format=lambda v: f"{v:.2f}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pcl_tune.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint folder or file (checkpoint.pt or best.pt)")
    src.add_argument("--best", metavar="RUN_DIR", help="evaluate the best --top trials of a search (a folder or an s3://... URI); writes "
                                                        "RUN_DIR/downstream.csv")
    p.add_argument("--top", type=int, default=3, help="with --best: how many trials (default 3)")
    p.add_argument("--task", dest="tasks", action="append", choices=TASKS,
                   help="repeatable; default fewshot (with --best: fewshot and linear)")
    p.add_argument("--split", choices=["val", "test"], default="test", help="held-out split (default test)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override the checkpoint's config, e.g. --set data.root=/data/cifar")
    p.add_argument("--random-init", action="store_true", help="the same evaluation of a random-initialised encoder")
    p.add_argument("--out", help="write the result as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=lambda s: [int(v) for v in s.split(",")], default=[1, 5], help="e.g. 1,5")
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--classifier", choices=["logistic", "prototype"], default="logistic")
    p.add_argument("--fractions", type=lambda s: [float(v) for v in s.split(",")], default=[0.1], help="e.g. 0.01,0.1")
    p.add_argument("--semi-epochs", type=int, default=30)
    p.add_argument("--voc-root", help="VOC2007 devkit folder for --task voc07")
    p.add_argument("--voc-shots", type=lambda s: [int(v) for v in s.split(",") if v.strip()], default=[1, 2, 4, 8, 16],
                   help="k positives per class, e.g. 1,2,4,8,16 ('' for the full train set only)")
    p.add_argument("--voc-draws", type=int, default=5)
    return p


def check_arguments(args: argparse.Namespace) -> None:
    """Numbers in their ranges and a writable ``--out``, before any work; raises :class:`EvaluationError`."""
    for name, value, low in (("--top", args.top, 1), ("--ways", args.ways, 2), ("--queries", args.queries, 1),
                             ("--episodes", args.episodes, 1), ("--semi-epochs", args.semi_epochs, 1),
                             ("--voc-draws", args.voc_draws, 1)):
        if value < low:
            raise EvaluationError(f"{name} {value}: expected an integer >= {low}")
    if not args.shots or min(args.shots) < 1:
        raise EvaluationError(f"--shots {','.join(map(str, args.shots))}: expected shots >= 1, e.g. 1,5")
    if not args.fractions or not all(0 < f <= 1 for f in args.fractions):
        raise EvaluationError(f"--fractions {','.join(f'{f:g}' for f in args.fractions)}: expected label "
                              "fractions in (0, 1], e.g. 0.01,0.1")
    if args.out:
        reason = unwritable_reason(args.out, folder=False)
        if reason:
            raise EvaluationError(f"--out {args.out}: {reason}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.overrides = parse_overrides(args.sets)
        check_arguments(args)
    except (ConfigError, EvaluationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.tasks = args.tasks or (["fewshot", "linear"] if args.best else ["fewshot"])

    def say(s: str) -> None:
        print(f"[pcl_tune.evaluate] {s}", file=sys.stderr, flush=True)

    try:
        if args.best:
            from ..storage import StorageError, Store, is_uri
            from .best import evaluate_best

            store = Store.of_folder(args.best) if is_uri(args.best) else None
            try:
                if store is not None:  # a remote experiment: its working copy, weights included
                    say(f"downloading {store.display} into {store.local}")
                    store.pull(weights=True)
                rows, path = evaluate_best(store.local if store else Path(args.best), args, progress=say)
                if store is not None:
                    store.push(path.name)
            except StorageError as e:
                raise EvaluationError(str(e)) from None
            print(f"[pcl_tune.evaluate] wrote {path}" + (f" and uploaded it to {store.display}" if store else ""),
                  file=sys.stderr)
        else:
            rows = evaluate_checkpoint(args.checkpoint, args, progress=say)
    except (EvaluationError, ValueError, OSError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2, default=_json_default))
    return 0


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return str(v)
