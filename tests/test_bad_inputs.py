"""The bad-input catalogue: every bad input we tried on the five commands, and what the user sees.

Each :class:`Case` below is one row of ``docs/bad_inputs.md`` (same id) and one test. A case writes
its own tiny fixture into a fresh folder, calls the command's ``main(argv)`` in this process, and
checks the rule every command follows for bad input:

* exit code 2 (argparse's own errors exit 2 as well);
* the error is ONE line: the last line on stderr, starting ``error: `` (our commands) or
  ``python -m <module>: error: `` (argparse). Only argparse's usage block and ``[...]`` progress
  lines may come before it; no traceback, no second error line;
* that line names the file / key / value and what was expected: each case lists substrings the
  line must contain;
* nothing is written or lost: every file under the case's folder (the storage path, ``--out``, the
  experiment folders, the working directory) has the same size, mtime and hash afterwards, and no
  file or folder appeared.

``python tests/test_bad_inputs.py`` runs every case the same way and prints the markdown table of
``docs/bad_inputs.md`` (the folder of each run shown as ``<tmp>``); ``--write`` puts it there.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_settings

RUN = "pretrained"
"""Folder (inside a case's folder) holding a copy of the one-epoch tiny run, when a case asks for it."""

# --------------------------------------------------------------------------- fixture writers


def _write(ws: Path, name: str, text: str) -> Path:
    p = ws / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def _space(ws: Path, changes: dict[str, Any] | None = None, *, name: str = "space.yaml") -> Path:
    """A valid tiny search space, with ``changes`` (``section/key`` paths; ``fixed/x.y`` for settings)."""
    data: dict[str, Any] = {
        "name": "bad",
        "fixed": tiny_settings({"epochs": 4}),
        "search": {"optim.lr": {"loguniform": [0.01, 0.1]}},
        "searcher": {"seed": 0, "num_samples": 2},
        "asha": {"grace_period": 2, "reduction_factor": 2},
    }
    for path, value in (changes or {}).items():
        section, _, key = path.partition("/")
        if key:
            data.setdefault(section, {})[key] = value
        else:
            data[section] = value
    return _write(ws, name, yaml.safe_dump(data, sort_keys=False))


def _tiny_config(ws: Path) -> Path:
    """The tests' tiny run config (conftest.TINY_SETTINGS) as a config file: ``tiny.yaml``."""
    return _write(ws, "tiny.yaml", yaml.safe_dump(tiny_settings(), sort_keys=False))


def _images(ws: Path, name: str, *, corrupt: bool = False, empty: bool = False) -> Path:
    """An image-folder dataset ``name/train/<class>/*.png``: two classes of six 12 px images,
    optionally one file that is not an image (``a/broken.png``), or class folders without images."""
    from PIL import Image

    root = ws / name
    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        d = root / "train" / c
        d.mkdir(parents=True)
        if empty:
            (d / "notes.txt").write_text("no images here")
            continue
        for i in range(6):
            pixels = torch.randint(0, 256, (12, 12, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(d / f"{i}.png")
    if corrupt:
        (root / "train" / "a" / "broken.png").write_bytes(b"this is not a PNG file\n" * 4)
    return root


def _folder_data(root: str) -> list[str]:
    """``--set`` options that point a tiny run at an image folder."""
    sets = {"data.dataset": "folder", "data.root": root, "data.image_size": 16, "optim.batch_size": 4,
            "model.queue_size": 8, "eval.knn_k": 3, "eval.fewshot_episodes": 0, "pcl.cluster_schedule": "2"}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def _copy_run(ws: Path, source: Path) -> Path:
    """A copy of the one-epoch tiny run (``checkpoint/``, ``config.yaml``, ``metrics.csv``) as ``ws/pretrained``."""
    dest = ws / RUN
    shutil.copytree(source, dest)
    return dest


def _doctored_checkpoint(ws: Path, source: Path, name: str, **model: Any) -> Path:
    """The tiny run's best.pt with its config's ``model`` section changed (the weights stay)."""
    state = torch.load(source / "checkpoint" / "best.pt", map_location="cpu", weights_only=False)
    state["config"]["model"].update(model)
    path = ws / name
    torch.save(state, path)
    return path


def _experiments(ws: Path) -> Path:
    """``runs/`` with ``done`` (a finished-looking experiment), ``started`` (a search that stopped
    before Tune saved its state), ``no_trials`` (space.json, no trial yet) and ``notexp`` (a folder
    of something else)."""
    from pcl_tune import experiment_folder as F
    from pcl_tune.space import load_space

    runs = ws / "runs"
    space_file = _space(ws, name="runs_space.yaml")
    space = load_space(space_file)
    for name in ("done", "started", "no_trials"):
        (runs / name).mkdir(parents=True)
        shutil.copyfile(space_file, runs / name / F.SPACE_YAML)
        F.write_space_json(runs / name, space, {"executor": "direct"})
    trial = runs / "done" / "trial_00001"
    trial.mkdir()
    (trial / F.PROGRESS_CSV).write_text("epoch,knn_top1,done\n1,40.0,False\n2,45.0,True\n")
    (runs / "done" / "tuner.pkl").write_bytes(b"")
    _write(runs, "notexp/notes.txt", "a folder of something else")
    return runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- the catalogue


@dataclass(frozen=True)
class Case:
    """One bad input. ``args`` may use ``{ws}`` (the case's folder) and ``{port}`` (a closed port)."""

    id: str
    cli: str
    """search | train | evaluate | export | analysis"""
    what: str
    """The bad input, in words (the table's first column)."""
    args: tuple[str, ...]
    expect: tuple[str, ...]
    """Substrings of the error line: the file / key / value named and what was expected."""
    setup: Callable[[Path, Path], Any] = lambda ws, run: None
    """Writes the fixture into the case's folder; ``run`` is the one-epoch tiny run to copy from."""
    root_skips: bool = False
    """Skipped as root (who may write anywhere)."""


SEARCH = ("--storage-path", "{ws}/runs")

CASES: list[Case] = [
    # ---- search-space files
    Case("search-malformed-yaml", "search", "space file that is not valid YAML (an unclosed `[`)",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "not valid YAML at line 3"),
         lambda ws, run: _write(ws, "space.yaml", "search:\n  optim.lr: {loguniform: [0.01, 0.1]\n")),
    Case("search-unknown-top-key", "search", "misspelt top-level key `serach:`",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "'serach'", "did you mean 'search'"),
         lambda ws, run: _space(ws, {"serach": {"optim.lr": {"uniform": [0.01, 0.1]}}})),
    Case("search-unknown-searched-key", "search", "searched key that is no setting (`optim.lrr`)",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "search.optim.lrr", "did you mean 'optim.lr'"),
         lambda ws, run: _space(ws, {"search": {"optim.lrr": {"loguniform": [0.01, 0.1]}}})),
    Case("search-unknown-fixed-key", "search", "fixed setting that does not exist (`pcl.temprature`)",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "pcl.temprature", "did you mean 'pcl.temperature'"),
         lambda ws, run: _space(ws, {"fixed/pcl.temprature": 0.1})),
    Case("search-wrong-type", "search", "fixed setting of the wrong type (`epochs: ten`)",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "'epochs'", "got 'ten'", "expected int"),
         lambda ws, run: _space(ws, {"fixed/epochs": "ten"})),
    Case("search-out-of-range", "search", "fixed setting out of range (`data.val_fraction: 1.5`)",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "'data.val_fraction'", "1.5", "[0, 1)"),
         lambda ws, run: _space(ws, {"fixed/data.val_fraction": 1.5})),
    Case("search-negative-epochs", "search", "negative epochs (`epochs: -4`)",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "'epochs'", "-4", "> 0"),
         lambda ws, run: _space(ws, {"fixed/epochs": -4})),
    Case("search-empty-choice", "search", "a choice with no values (`choice: []`)",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "search.pcl.proto_loss.choice", "non-empty list"),
         lambda ws, run: _space(ws, {"search/pcl.proto_loss": {"choice": []}})),
    Case("search-loguniform-low-zero", "search", "log-uniform range with low <= 0 (`[0, 0.1]`)",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "search.optim.lr.loguniform", "[0, 0.1]", "low > 0"),
         lambda ws, run: _space(ws, {"search/optim.lr": {"loguniform": [0, 0.1]}})),
    Case("search-low-not-below-high", "search", "range with low >= high (`uniform: [0.2, 0.1]`)",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "search.pcl.temperature.uniform", "low < high"),
         lambda ws, run: _space(ws, {"search/pcl.temperature": {"uniform": [0.2, 0.1]}})),
    Case("search-grace-in-warmup", "search", "ASHA grace period inside the PCL warm-up (grace 2, warm-up 2)",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "asha.grace_period", "got 2", "warm-up (2 epochs)"),
         lambda ws, run: _space(ws, {"fixed/pcl.warmup_epochs": 2})),
    Case("search-unknown-objective", "search", "objective metric no trial reports (`accuracy`)",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "objective.metric", "'accuracy'", "knn_top1"),
         lambda ws, run: _space(ws, {"objective/metric": "accuracy"})),
    Case("search-objective-not-measured", "search", "objective the configured evaluation never produces "
         "(`fewshot_5w5s` with `eval.fewshot_episodes: 0`)",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "objective.metric", "fewshot_5w5s",
                                                   "eval.fewshot_episodes >= 1"),
         lambda ws, run: _space(ws, {"objective/metric": "fewshot_5w5s", "fixed/eval.fewshot_episodes": 0})),
    Case("search-batch-over-dataset", "search", "batch size larger than the training set (512 of 256 images)",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "fixed.optim.batch_size", "got 512",
                                                   "<= the 256 training images"),
         lambda ws, run: _space(ws, {"fixed/optim.batch_size": 512})),
    Case("search-batch-not-split-evenly", "search", "batch size the DDP workers cannot split evenly "
         "(32 over `--workers-per-trial 3`)",
         ("--space", "{ws}/space.yaml", "--workers-per-trial", "3", *SEARCH),
         ("space.yaml", "fixed.optim.batch_size", "got 32", "multiple of the 3 workers"), lambda ws, run: _space(ws)),
    Case("search-space-file-missing", "search", "space file that does not exist",
         ("--space", "{ws}/nosuch.yaml", *SEARCH), ("nosuch.yaml", "search-space file not found")),
    Case("search-dataset-missing", "search", "image-folder dataset whose folder does not exist",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "'data.root'", "nodata", "train/<class>/<images>"),
         lambda ws, run: _space(ws, {"fixed/data.dataset": "folder", "fixed/data.root": str(ws / "nodata")})),
    Case("search-dataset-empty", "search", "image-folder dataset whose class folders hold no images",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "'data.root'", "empty/train", "has no images"),
         lambda ws, run: (_images(ws, "empty", empty=True),
                          _space(ws, {"fixed/data.dataset": "folder", "fixed/data.root": str(ws / "empty")}))),
    Case("search-pbt-mutates-architecture", "search", "PBT told to perturb a setting a running trial cannot "
         "change (`model.width`)", ("--space", "{ws}/space.yaml", *SEARCH),
         ("space.yaml", "'pbt.mutate'", "model.width", "between epochs"),
         lambda ws, run: _space(ws, {"scheduler": "pbt", "asha": {}, "searcher": {"seed": 0},
                                     "search": {"optim.lr": {"loguniform": [0.01, 0.1]},
                                                "model.width": {"choice": [8, 16]}},
                                     "pbt": {"population": 2, "interval": 2, "mutate": ["model.width"]}})),
    Case("search-pb2-without-ranges", "search", "PB2 asked to explore when only choices are mutated",
         ("--space", "{ws}/space.yaml", *SEARCH), ("space.yaml", "'pbt.explore'", "pb2", "numeric range"),
         lambda ws, run: _space(ws, {"scheduler": "pbt", "asha": {}, "searcher": {"seed": 0},
                                     "search": {"pcl.cluster_schedule": {"choice": ["5,10", "10,20"]}},
                                     "pbt": {"population": 2, "interval": 2, "explore": "pb2"}})),
    # ---- search command line
    Case("search-workers-negative", "search", "`--workers-per-trial -1`",
         ("--space", "{ws}/space.yaml", "--workers-per-trial", "-1", *SEARCH),
         ("--workers-per-trial -1", "0 (direct executor) or a number of DDP workers >= 1"),
         lambda ws, run: _space(ws)),
    Case("search-workers-zero-train", "search", "`--workers-per-trial 0` with `--executor train`",
         ("--space", "{ws}/space.yaml", "--workers-per-trial", "0", "--executor", "train", *SEARCH),
         ("--workers-per-trial 0 --executor train", ">= 1 for the train executor"), lambda ws, run: _space(ws)),
    Case("search-num-samples-zero", "search", "`--num-samples 0`",
         ("--space", "{ws}/space.yaml", "--num-samples", "0", *SEARCH), ("--num-samples 0", "an integer >= 1"),
         lambda ws, run: _space(ws)),
    Case("search-num-samples-not-a-number", "search", "`--num-samples ten`",
         ("--space", "{ws}/space.yaml", "--num-samples", "ten", *SEARCH),
         ("argument --num-samples", "invalid int value: 'ten'"), lambda ws, run: _space(ws)),
    Case("search-existing-experiment", "search", "a new search under the name of an existing experiment",
         ("--space", "{ws}/space.yaml", "--name", "done", *SEARCH), ("runs/done already exists", "--resume"),
         lambda ws, run: (_space(ws), _experiments(ws))),
    Case("search-name-leaves-storage", "search", "an experiment name that is a path out of `--storage-path`",
         ("--space", "{ws}/space.yaml", "--name", "../elsewhere", *SEARCH),
         ("--name: got '../elsewhere'", "expected an experiment name"), lambda ws, run: _space(ws)),
    Case("search-resume-unknown-name", "search", "`--resume` of a name that does not exist",
         ("--resume", "--name", "nosuch", *SEARCH), ("--name nosuch", "no experiment", "runs/nosuch"),
         lambda ws, run: _experiments(ws)),
    Case("search-resume-space-unknown-name", "search", "`--resume` with `--space` whose experiment does not exist",
         ("--space", "{ws}/space.yaml", "--resume", *SEARCH), ("--name bad", "no experiment", "runs/bad"),
         lambda ws, run: (_space(ws), _experiments(ws))),
    Case("search-resume-not-an-experiment", "search", "`--resume` of a folder that is not an experiment",
         ("--resume", "--name", "notexp", *SEARCH), ("runs/notexp", "not a pcl_tune experiment",
                                                      "search_space.yaml"),
         lambda ws, run: _experiments(ws)),
    Case("search-resume-before-tune-state", "search", "`--resume` of a search that stopped before Tune saved "
         "its state", ("--resume", "--name", "started", *SEARCH), ("runs/started", "Ray Tune saved no state"),
         lambda ws, run: _experiments(ws)),
    Case("search-address-unreachable", "search", "`--address` of a Ray cluster that is not there",
         ("--space", "{ws}/space.yaml", "--address", "127.0.0.1:{port}", *SEARCH),
         ("--address 127.0.0.1:", "no Ray cluster answers there", "ray start --head"), lambda ws, run: _space(ws)),
    Case("search-storage-under-a-file", "search", "`--storage-path` inside a regular file",
         ("--space", "{ws}/space.yaml", "--storage-path", "{ws}/afile/runs"),
         ("--storage-path", "afile/runs", "afile is a file, not a folder"),
         lambda ws, run: (_space(ws), _write(ws, "afile", "a file, not a folder"))),
    Case("search-storage-read-only", "search", "`--storage-path` in a read-only folder (chmod 500)",
         ("--space", "{ws}/space.yaml", "--storage-path", "{ws}/ro/runs"),
         ("--storage-path", "ro/runs", "ro is not writable"),
         lambda ws, run: (_space(ws), (ws / "ro").mkdir(mode=0o500)), root_skips=True),
    Case("search-storage-uri-with-credentials", "search", "`--storage-path` URI with a secret key in its query",
         ("--space", "{ws}/space.yaml", "--storage-path", "s3://bucket/runs?secret_key=hunter2"),
         ("--storage-path s3://bucket/runs?secret_key=***", "credentials do not belong in the URI",
          "AWS_SECRET_ACCESS_KEY"), lambda ws, run: _space(ws)),
    Case("search-optuna-storage-relative", "search", "`--optuna-storage` SQLite file by a relative path",
         ("--space", "{ws}/space.yaml", "--optuna-storage", "sqlite:///study.db", *SEARCH),
         ("--optuna-storage sqlite:///study.db", "needs an absolute path", "forks the study"),
         lambda ws, run: _space(ws)),
    Case("search-optuna-storage-file-beside-object-storage", "search", "`--optuna-storage` file on this machine "
         "with an `s3://` storage path", ("--space", "{ws}/space.yaml", "--storage-path", "s3://bucket/runs",
                                          "--optuna-storage", "sqlite:///{ws}/study.db"),
         ("--optuna-storage sqlite:///", "study.db", "forks the study when the search resumes elsewhere",
          "postgresql://"), lambda ws, run: _space(ws)),
    Case("search-optuna-storage-unknown-scheme", "search", "`--optuna-storage` URL Optuna cannot store a study in",
         ("--space", "{ws}/space.yaml", "--optuna-storage", "redis://localhost/0", *SEARCH),
         ("--optuna-storage redis://localhost/0", "expected a database URL"), lambda ws, run: _space(ws)),
    # ---- train
    Case("train-malformed-yaml", "train", "config file that is not valid YAML",
         ("--config", "{ws}/bad.yaml", "--out", "{ws}/out"), ("bad.yaml", "not valid YAML at line 3"),
         lambda ws, run: _write(ws, "bad.yaml", "optim:\n  lr: [0.1\n")),
    Case("train-config-missing", "train", "config file that does not exist",
         ("--config", "{ws}/nosuch.yaml", "--out", "{ws}/out"), ("nosuch.yaml", "does not exist")),
    Case("train-set-without-equals", "train", "`--set` with no `=`",
         ("--set", "optim.lr", "--out", "{ws}/out"), ("--set 'optim.lr'", "expected KEY=VALUE")),
    Case("train-set-unknown-key", "train", "`--set` of a setting that does not exist",
         ("--set", "optim.lrr=0.1", "--out", "{ws}/out"), ("'optim.lrr'", "did you mean 'optim.lr'")),
    Case("train-set-wrong-type", "train", "`--set` value of the wrong type (`optim.lr=fast`)",
         ("--set", "optim.lr=fast", "--out", "{ws}/out"), ("'optim.lr'", "got 'fast'", "expected float")),
    Case("train-amcl-temperature-range", "train", "multi-head temperature range that is not 0 < lo < hi",
         ("--set", "model.head=amcl", "--set", "model.temperature_range=[0.5, 0.1]", "--out", "{ws}/out"),
         ("'model.temperature_range'", "[0.5, 0.1]", "0 < lo < hi")),
    Case("train-amcl-proto-head", "train", "prototype head that does not exist (`pcl.proto_head=5` of 3 heads)",
         ("--set", "model.head=amcl", "--set", "pcl.proto_head=5", "--out", "{ws}/out"),
         ("'pcl.proto_head'", "got 5", "[0, 2]", "or 'all'")),
    Case("train-negative-epochs", "train", "`--epochs -1`",
         ("--epochs", "-1", "--out", "{ws}/out"), ("'epochs'", "got -1", "> 0")),
    Case("train-unknown-option", "train", "an option the command does not have (`--lr`)",
         ("--lr", "0.1", "--out", "{ws}/out"), ("unrecognized arguments: --lr 0.1",)),
    Case("train-batch-over-dataset", "train", "batch size larger than the training set (512 of 256 images)",
         ("--config", "{ws}/tiny.yaml", "--set", "optim.batch_size=512", "--out", "{ws}/out"),
         ("'optim.batch_size'", "got 512", "<= the 256 training images of digits"),
         lambda ws, run: _tiny_config(ws)),
    Case("train-dataset-missing", "train", "image-folder dataset whose folder does not exist",
         ("--config", "{ws}/tiny.yaml", *_folder_data("{ws}/nodata"), "--out", "{ws}/out"),
         ("'data.root'", "nodata", "expected", "train/<class>/<images>"), lambda ws, run: _tiny_config(ws)),
    Case("train-dataset-empty", "train", "image-folder dataset whose class folders hold no images",
         ("--config", "{ws}/tiny.yaml", *_folder_data("{ws}/empty"), "--out", "{ws}/out"),
         ("'data.root'", "empty/train", "has no images"),
         lambda ws, run: (_tiny_config(ws), _images(ws, "empty", empty=True))),
    Case("train-corrupt-image", "train", "image-folder dataset with a file that is not an image",
         ("--config", "{ws}/tiny.yaml", *_folder_data("{ws}/images"), "--out", "{ws}/out"),
         ("images/train/a/broken.png", "not a readable image", "UnidentifiedImageError"),
         lambda ws, run: (_tiny_config(ws), _images(ws, "images", corrupt=True))),
    Case("train-resume-other-architecture", "train", "`--resume` of a checkpoint of another width",
         ("--config", "{ws}/tiny.yaml", "--set", "model.width=16", "--out", f"{{ws}}/{RUN}", "--resume"),
         ("checkpoint.pt", "do not fit", "width 16", "model.width: 8"),
         lambda ws, run: (_tiny_config(ws), _copy_run(ws, run))),
    Case("train-resume-not-a-checkpoint", "train", "`--resume` where checkpoint.pt is not a checkpoint",
         ("--config", "{ws}/tiny.yaml", "--out", f"{{ws}}/{RUN}", "--resume"),
         ("checkpoint/checkpoint.pt", "not a readable checkpoint"),
         lambda ws, run: (_tiny_config(ws), _copy_run(ws, run),
                          _write(ws, f"{RUN}/checkpoint/checkpoint.pt", "not a checkpoint"))),
    Case("train-resume-nothing", "train", "`--resume` of an `--out` that holds no checkpoint",
         ("--config", "{ws}/tiny.yaml", "--out", "{ws}/nosuch", "--resume"),
         ("--resume", "nosuch holds no checkpoint", "without --resume"), lambda ws, run: _tiny_config(ws)),
    Case("train-out-holds-a-run", "train", "`--out` of a finished run, without `--resume`",
         ("--config", "{ws}/tiny.yaml", "--out", f"{{ws}}/{RUN}"), (RUN, "already holds a checkpoint", "--resume"),
         lambda ws, run: (_tiny_config(ws), _copy_run(ws, run))),
    Case("train-out-under-a-file", "train", "`--out` inside a regular file",
         ("--config", "{ws}/tiny.yaml", "--out", "{ws}/afile/run"), ("--out", "afile is a file, not a folder"),
         lambda ws, run: (_tiny_config(ws), _write(ws, "afile", "a file"))),
    # ---- evaluate
    Case("evaluate-checkpoint-missing", "evaluate", "`--checkpoint` that does not exist",
         ("--checkpoint", "{ws}/nosuch.pt"), ("no checkpoint at", "nosuch.pt")),
    Case("evaluate-not-a-checkpoint", "evaluate", "`--checkpoint` of a file that is not a checkpoint",
         ("--checkpoint", "{ws}/notes.pt"), ("notes.pt", "not a readable checkpoint"),
         lambda ws, run: _write(ws, "notes.pt", "some notes")),
    Case("evaluate-foreign-checkpoint", "evaluate", "`--checkpoint` of another program's torch file",
         ("--checkpoint", "{ws}/foreign.pt"), ("foreign.pt", "not a pcl_tune pretraining checkpoint", "'config'"),
         lambda ws, run: torch.save({"state_dict": {}}, ws / "foreign.pt")),
    Case("evaluate-other-architecture", "evaluate", "a checkpoint judged as another architecture "
         "(`--set model.backbone=resnet18` on a small CNN)",
         ("--checkpoint", f"{{ws}}/{RUN}/checkpoint/best.pt", "--set", "model.backbone=resnet18"),
         ("best.pt", "do not fit a resnet18"), lambda ws, run: _copy_run(ws, run)),
    Case("evaluate-unknown-task", "evaluate", "unknown `--task`",
         ("--checkpoint", f"{{ws}}/{RUN}/checkpoint", "--task", "segmentation"),
         ("argument --task", "invalid choice: 'segmentation'", "'knn'"), lambda ws, run: _copy_run(ws, run)),
    Case("evaluate-set-without-equals", "evaluate", "`--set` with no `=`",
         ("--checkpoint", f"{{ws}}/{RUN}/checkpoint", "--set", "data.root"), ("--set 'data.root'", "KEY=VALUE"),
         lambda ws, run: _copy_run(ws, run)),
    Case("evaluate-best-not-an-experiment", "evaluate", "`--best` of a folder that is not an experiment",
         ("--best", "{ws}/runs/notexp"), ("runs/notexp", "not a pcl_tune experiment folder", "space.json"),
         lambda ws, run: _experiments(ws)),
    Case("evaluate-top-zero", "evaluate", "`--best ... --top 0`",
         ("--best", "{ws}/runs/done", "--top", "0"), ("--top 0", "an integer >= 1"), lambda ws, run: _experiments(ws)),
    Case("evaluate-fraction-zero", "evaluate", "`--fractions 0,0.1` (semi-supervised with no labels)",
         ("--checkpoint", f"{{ws}}/{RUN}/checkpoint", "--task", "semi", "--fractions", "0,0.1"),
         ("--fractions 0,0.1", "(0, 1]"), lambda ws, run: _copy_run(ws, run)),
    Case("evaluate-dataset-missing", "evaluate", "`--set data.root=` a folder that does not exist",
         ("--checkpoint", f"{{ws}}/{RUN}/checkpoint", "--set", "data.dataset=folder", "--set", "data.root={ws}/nodata"),
         ("dataset 'folder'", "nodata", "train/<class>/<images>", "--set data.root="),
         lambda ws, run: _copy_run(ws, run)),
    Case("evaluate-corrupt-image", "evaluate", "image-folder dataset with a file that is not an image "
         "(decoded in a DataLoader worker)",
         ("--checkpoint", f"{{ws}}/{RUN}/checkpoint", "--task", "knn", "--split", "val", "--set", "data.dataset=folder",
          "--set", "data.root={ws}/images", "--set", "data.num_workers=1", "--set", "eval.knn_k=3"),
         ("images/train/a/broken.png", "not a readable image", "UnidentifiedImageError"),
         lambda ws, run: (_copy_run(ws, run), _images(ws, "images", corrupt=True))),
    Case("evaluate-out-under-a-file", "evaluate", "`--out` inside a regular file",
         ("--checkpoint", f"{{ws}}/{RUN}/checkpoint", "--out", "{ws}/afile/result.json"),
         ("--out", "afile is a file, not a folder"), lambda ws, run: (_copy_run(ws, run), _write(ws, "afile", "x"))),
    # ---- export
    Case("export-unknown-format", "export", "unknown `--format`",
         ("--checkpoint", "{ws}/x.pt", "--format", "onnx", "--out", "{ws}/r.onnx"),
         ("argument --format", "invalid choice: 'onnx'", "'detectron2'")),
    Case("export-not-a-checkpoint", "export", "`--checkpoint` of a file that is not a checkpoint",
         ("--checkpoint", "{ws}/notes.pt", "--format", "torchvision", "--out", "{ws}/r18.pt"),
         ("notes.pt", "not a readable checkpoint"), lambda ws, run: _write(ws, "notes.pt", "some notes")),
    Case("export-small-cnn", "export", "a checkpoint whose backbone detection libraries lack (small CNN)",
         ("--checkpoint", f"{{ws}}/{RUN}/checkpoint", "--format", "torchvision", "--out", "{ws}/r18.pt"),
         ("checkpoint.pt", "backbone 'small_cnn' cannot be exported", "resnet18, resnet50"),
         lambda ws, run: _copy_run(ws, run)),
    Case("export-other-architecture", "export", "a checkpoint whose config says resnet18 over small-CNN weights",
         ("--checkpoint", "{ws}/r18_claimed.pt", "--format", "detectron2", "--out", "{ws}/r18.pkl"),
         ("r18_claimed.pt", "do not fit torchvision's resnet18", "missing"),
         lambda ws, run: _doctored_checkpoint(ws, run, "r18_claimed.pt", backbone="resnet18")),
    Case("export-out-under-a-file", "export", "`--out` inside a regular file",
         ("--checkpoint", f"{{ws}}/{RUN}/checkpoint", "--format", "torchvision", "--out", "{ws}/afile/r18.pt"),
         ("--out", "afile is a file, not a folder"), lambda ws, run: (_copy_run(ws, run), _write(ws, "afile", "x"))),
    # ---- analysis
    Case("analysis-not-an-experiment", "analysis", "a folder that is not an experiment",
         ("{ws}/runs/notexp",), ("runs/notexp", "not a pcl_tune experiment", "space.json", "trial_*"),
         lambda ws, run: _experiments(ws)),
    Case("analysis-folder-missing", "analysis", "a folder that does not exist",
         ("{ws}/runs/nosuch",), ("runs/nosuch", "no such folder"), lambda ws, run: _experiments(ws)),
    Case("analysis-no-trials-yet", "analysis", "an experiment no trial has reported to yet",
         ("{ws}/runs/no_trials",), ("runs/no_trials", "empty experiment"), lambda ws, run: _experiments(ws)),
    Case("analysis-unknown-metric", "analysis", "`--metric` no trial reported",
         ("{ws}/runs/done", "--metric", "accuracy"), ("runs/done", "'accuracy' was never reported", "knn_top1"),
         lambda ws, run: _experiments(ws)),
    Case("analysis-top-zero", "analysis", "`--top 0`",
         ("{ws}/runs/done", "--top", "0"), ("--top 0", "an integer >= 1"), lambda ws, run: _experiments(ws)),
]


# --------------------------------------------------------------------------- running a case


def _main(cli: str) -> Callable[[list[str]], int]:
    if cli == "search":
        from pcl_tune.search import main
    elif cli == "train":
        from pcl_tune.train.cli import main
    elif cli == "evaluate":
        from pcl_tune.evaluate.cli import main
    elif cli == "export":
        from pcl_tune.export import main  # type: ignore[assignment]
    else:
        from analysis.__main__ import main
    return main  # type: ignore[return-value]


def _argv(case: Case, ws: Path, port: int) -> list[str]:
    return [a.replace("{ws}", str(ws)).replace("{port}", str(port)) for a in case.args]


@dataclass
class Outcome:
    code: int | str | None
    stdout: str
    stderr: str


def prepare(case: Case, ws: Path, run: Path) -> list[str]:
    """Write the case's fixture into ``ws``; its command line."""
    case.setup(ws, run)
    return _argv(case, ws, _free_port())


def invoke(cli: str, argv: list[str], cwd: Path) -> Outcome:
    """Call the command's ``main(argv)`` in this process with ``cwd`` as working directory."""
    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code: int | str | None = _main(cli)(argv)
            except SystemExit as e:  # argparse
                code = e.code
    finally:
        os.chdir(before)
    return Outcome(code, out.getvalue(), err.getvalue())


def error_line(stderr: str) -> str:
    """The one error line of ``stderr`` under the catalogue's rule (see the module docstring)."""
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert re.match(r"(error: |python -m [\w.]+: error: )", last), stderr
    assert sum("error:" in ln for ln in lines) == 1, stderr
    for ln in lines[:-1]:  # argparse's usage block, progress lines
        assert ln.startswith(("usage:", " ", "[")), stderr
    return last


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every file (size, mtime, hash) and folder under ``root``."""
    out: dict[str, tuple[Any, ...]] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = ("dir",)
        else:
            st = p.stat()
            out[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


# --------------------------------------------------------------------------- the tests


def make_pretrained(out: Path) -> Path:
    """One epoch of the tiny run in ``out``: checkpoint/checkpoint.pt, best.pt, config.yaml, metrics.csv."""
    from pcl_tune.train import train_loop

    train_loop(tiny_settings({"epochs": 1}), out_dir=out, verbose=False)
    (out / "config.yaml").write_text(yaml.safe_dump(tiny_settings({"epochs": 1})))
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, torch_threads: None) -> Path:
    """One epoch of the tiny run: checkpoint/checkpoint.pt, best.pt, config.yaml, metrics.csv."""
    return make_pretrained(tmp_path_factory.mktemp("pretrained"))


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """A search that got past its checks would start Ray: fail instead."""
    import pcl_tune.search as search_mod

    def refuse(*args: Any, **kwargs: Any) -> None:
        pytest.fail("the bad input got past the search's checks: Ray would start")

    monkeypatch.setattr(search_mod, "_init_ray", refuse)


def test_the_catalogue_has_enough_distinct_cases() -> None:
    assert len(CASES) >= 24
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({(c.cli, c.args, c.what) for c in CASES}) == len(CASES)
    assert {c.cli for c in CASES} == {"search", "train", "evaluate", "export", "analysis"}
    assert all(c.id.startswith(c.cli + "-") and c.expect for c in CASES)


@pytest.mark.usefixtures("torch_threads", "no_ray")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, pretrained: Path) -> None:
    if case.root_skips and os.geteuid() == 0:
        pytest.skip("root may write anywhere: see search-storage-under-a-file")
    ws = tmp_path / "ws"
    ws.mkdir()
    argv = prepare(case, ws, pretrained)
    before = snapshot(ws)
    outcome = invoke(case.cli, argv, ws)
    try:
        line = error_line(outcome.stderr)
        assert outcome.code == 2, (outcome.code, outcome.stderr)
        for part in case.expect:
            assert part in line, f"{part!r} not in {line!r}"
        assert snapshot(ws) == before, "the command wrote, changed or removed files"
    finally:
        if case.root_skips:
            for p in ws.rglob("*"):
                if p.is_dir():
                    p.chmod(0o700)


def test_address_auto_without_a_cluster_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--address auto`` is Ray's to resolve, and it would join any cluster running on this machine
    (other tests' among them), so Ray's answer when there is none is simulated: its ConnectionError
    (the message of ray._private.services) becomes one line and exit 2, and nothing is written."""
    import ray

    def no_cluster(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to by "
                              "setting `--address` flag or `RAY_ADDRESS` environment variable.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    space = _space(tmp_path)
    before = snapshot(tmp_path)
    outcome = invoke("search", ["--space", str(space), "--address", "auto", "--storage-path", str(tmp_path / "runs")],
                     tmp_path)
    line = error_line(outcome.stderr)
    assert outcome.code == 2
    assert "address 'auto': no Ray cluster to join (Could not find any running Ray instance." in line
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------- the docs table

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
BEGIN = "<!-- begin table: written by `python tests/test_bad_inputs.py --write` -->"
END = "<!-- end table -->"
NOT_RUN = "(not run: "
MODULES = {"search": "pcl_tune.search", "train": "pcl_tune.train", "evaluate": "pcl_tune.evaluate",
           "export": "pcl_tune.export", "analysis": "analysis"}


def _code(text: str) -> str:
    """A markdown code span that may itself hold backticks."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _uncode(cell: str) -> str:
    cell = cell.strip().replace("\\|", "|")
    return cell[3:-3] if cell.startswith("`` ") else cell.strip("`")


def markdown_table() -> str:
    """The table of docs/bad_inputs.md, from a real run of every case (``<tmp>``: the case's folder)."""
    torch.set_num_threads(1)
    rows = ["| id | bad input | command | what the user sees (the last line on stderr) | exit |",
            "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        run = make_pretrained(Path(tmp) / "pretrained_source")
        for i, case in enumerate(CASES):
            if case.root_skips and os.geteuid() == 0:
                line = f"{NOT_RUN}this table was written as root, who may write anywhere; the test skips as root)"
                code = "—"
            else:
                ws = Path(tmp) / f"case{i}"
                ws.mkdir()
                outcome = invoke(case.cli, prepare(case, ws, run), ws)
                lines = [ln for ln in outcome.stderr.splitlines() if ln.strip()]
                line = (lines[-1] if lines else "").replace(str(ws), "<tmp>")
                line = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line)
                code = str(outcome.code)
            args = " ".join(a.replace("{ws}/", "").replace("{port}", "PORT") for a in case.args)
            cells = [f"`{case.id}`", case.what, _code(f"python -m {MODULES[case.cli]} {args}"),
                     line if line.startswith(NOT_RUN) else _code(line), code]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def doc_rows() -> dict[str, list[str]]:
    """id -> cells of the table in docs/bad_inputs.md."""
    text = DOC.read_text()
    table = text[text.index(BEGIN) + len(BEGIN):text.index(END)]
    rows = {}
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows[_uncode(cells[0])] = cells
    return rows


def test_the_docs_table_is_the_catalogue() -> None:
    """docs/bad_inputs.md has one row per case, in order, each with the exit code and a message
    holding what the test expects (regenerate it with ``python tests/test_bad_inputs.py --write``)."""
    rows = doc_rows()
    assert list(rows) == [c.id for c in CASES]
    for case in CASES:
        cells = rows[case.id]
        assert _uncode(cells[2]).startswith(f"python -m {MODULES[case.cli]} ")
        if cells[3].startswith(NOT_RUN):
            assert case.root_skips, case.id
            continue
        assert cells[4] == "2", case.id
        message = _uncode(cells[3])
        assert message.startswith(("error: ", f"python -m {MODULES[case.cli]}: error: ")), case.id
        for part in case.expect:
            assert part in message, (case.id, part)


def write_doc() -> None:
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{markdown_table()}\n{END}{tail}")


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        write_doc()
        print(f"wrote {DOC}")
    else:
        print(markdown_table())
