"""The checkpoint files a pretraining run writes, and the one reader of them.

``<out>/checkpoint/`` holds:

* ``checkpoint.pt``: the whole run state after an epoch (model, optimiser, lr schedule, RNGs,
  history, config): what resuming reads;
* ``best.pt``: the weights of the epoch with the best ``eval.best_metric`` so far (``epoch``,
  ``config``, ``model``, ``metric``, ``value``): what downstream evaluation and export read;
* ``metrics.json``: the per-epoch records up to the checkpoint's epoch, readable without the weights.

Every file is a dict with at least ``config`` (the run config as nested dicts) and ``model``
(the state dict of :class:`pcl_tune.model.MoCo`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
CHECKPOINT_METRICS = "metrics.json"


class CheckpointError(ValueError):
    """A missing, unreadable or foreign checkpoint; the message is one line naming the file."""


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """(file, state) of a ``checkpoint.pt`` / ``best.pt`` file, or of a folder holding ``checkpoint.pt``.

    Loaded on the CPU (RNG states must stay there). Raises :class:`CheckpointError`.
    """
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_FILE
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{p}: not a readable checkpoint ({type(e).__name__}: {first})") from None
    if (not isinstance(state, dict) or not isinstance(state.get("config"), Mapping)
            or not isinstance(state.get("model"), Mapping)):
        raise CheckpointError(f"{p}: not a pcl_tune pretraining checkpoint (it needs 'config' and 'model' entries)")
    return p, state


def checkpoint_history(ckpt_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-epoch metrics saved with a checkpoint folder ([] when it has none)."""
    p = Path(ckpt_dir) / CHECKPOINT_METRICS
    if not p.is_file():
        return []
    return list(json.loads(p.read_text()))
