"""The checkpoint files a pretraining run writes, and the one reader of them.

``<out>/checkpoint/`` holds:

* ``checkpoint.pt``: the whole run state after an epoch (model, optimiser, lr schedule, RNGs,
  history, config): what resuming reads;
* ``best.pt``: the weights of the epoch with the best ``eval.best_metric`` so far (``epoch``,
  ``config``, ``model``, ``metric``, ``value``): what downstream evaluation and export read;
* ``metrics.json``: the per-epoch records up to the checkpoint's epoch, readable without the weights;
* ``lineage.json`` (checkpoints a search trial hands to Ray): one entry per epoch, ``epoch``,
  ``trial`` (the trial whose process trained it) and ``settings`` (that trial's searched settings
  then). It travels with the weights when Population Based Training clones a trial, so it says
  exactly what the model went through, however often the search was killed and resumed.

Every file is a dict with at least ``config`` (the run config as nested dicts) and ``model``
(the state dict of :class:`pcl_tune.model.MoCo`).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.pt"
CHECKPOINT_METRICS = "metrics.json"
CHECKPOINT_LINEAGE = "lineage.json"


_np_core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
_NUMPY_ARRAY_GLOBALS = [_np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
"""What unpickling ``np.random.get_state()``'s uint32 key array needs, and nothing more: checkpoints
written before the random streams were derived per epoch hold one (ignored, but it must load)."""


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
    with open(p, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # a torch.save zip file, or its legacy pickle format
        raise CheckpointError(f"{p}: not a readable checkpoint (not a torch.save file)")
    try:
        # weights_only: tensors and plain containers only, never arbitrary pickled objects; the
        # one extra type a run state holds is the numpy array of numpy's RNG state.
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        message = str(e).lower()  # torch words it "Unsupported global" or "unsupported GLOBAL ... is blocked"
        if "unsupported global" not in message and "weights only load failed" not in message:
            # not a pickle at all, or a damaged one
            raise CheckpointError(f"{p}: not a readable checkpoint (not a torch.save file)") from None
        raise CheckpointError(f"{p}: holds pickled Python objects besides tensors and plain values; pcl_tune loads "
                              "checkpoints with torch.load(weights_only=True) and will not run that code") from None
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        first = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{p}: not a readable checkpoint ({type(e).__name__}: {first})") from None
    if (not isinstance(state, dict) or not isinstance(state.get("config"), Mapping)
            or not isinstance(state.get("model"), Mapping)):
        raise CheckpointError(f"{p}: not a pcl_tune pretraining checkpoint (it needs 'config' and 'model' entries)")
    return p, state


def weights_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str | None:
    """How the state dict ``found`` fails to fit a model whose state dict is ``expected`` (a few
    missing or unexpected names, else the first shape that differs), or None when it fits."""
    def shape(v: Any) -> tuple[int, ...]:
        return tuple(getattr(v, "shape", ()))

    for what, names in (("missing", [k for k in expected if k not in found]),
                        ("unexpected", [k for k in found if k not in expected])):
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            return f"{what} {', '.join(names[:3])}{more}"
    wrong = [k for k in expected if shape(found[k]) != shape(expected[k])]
    if wrong:
        return f"{wrong[0]} has shape {shape(found[wrong[0]])}, expected {shape(expected[wrong[0]])}"
    return None


def checkpoint_history(ckpt_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-epoch metrics saved with a checkpoint folder ([] when it has none)."""
    p = Path(ckpt_dir) / CHECKPOINT_METRICS
    if not p.is_file():
        return []
    return list(json.loads(p.read_text()))


def checkpoint_lineage(ckpt_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The per-epoch lineage saved with a checkpoint folder (``[]`` when it has none or it is
    unreadable): ``{"epoch", "trial", "settings"}`` per epoch, in epoch order."""
    p = Path(ckpt_dir) / CHECKPOINT_LINEAGE
    try:
        entries = json.loads(p.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(entries, list):
        return []
    ok = [e for e in entries if isinstance(e, dict) and isinstance(e.get("epoch"), int) and "trial" in e]
    return sorted(ok, key=lambda e: e["epoch"])


def write_checkpoint_lineage(ckpt_dir: str | os.PathLike[str], entries: list[dict[str, Any]]) -> None:
    """Write ``lineage.json`` into a checkpoint folder (a temporary file renamed over it)."""
    p = Path(ckpt_dir) / CHECKPOINT_LINEAGE
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(entries, default=str))
    os.replace(tmp, p)
