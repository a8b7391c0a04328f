"""A frozen encoder from a pretraining checkpoint (or its random initialisation), and its features.

The evaluations judge the backbone of the encoder the run was judged by (``eval.encoder``: the
momentum encoder by default, as MoCo and PCL report), on the eval view of a dataset split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..augment import eval_transform
from ..checkpoint import CheckpointError, read_checkpoint, weights_mismatch
from ..config import ConfigError, TrainConfig, config_from_dict, merge
from ..data import DatasetSplits, ImageDataset, iterate_batches, load_datasets
from ..model import Encoder, MoCo


class EvaluationError(ValueError):
    """A request the evaluation cannot serve; the message is one line that says what to change."""


@dataclass
class LoadedEncoder:
    """The judged encoder of a checkpoint, with the run's config and data."""

    cfg: TrainConfig
    encoder: Encoder
    data: DatasetSplits
    device: torch.device
    checkpoint: Path
    epoch: int | None
    """The checkpoint's epoch (1-based); None for a random initialisation."""


def load_encoder(checkpoint: str | os.PathLike[str], *, overrides: dict[str, Any] | None = None,
                 random_init: bool = False, device: str | None = None) -> LoadedEncoder:
    """The judged encoder of ``checkpoint``; ``overrides`` (dotted keys) change its config, e.g. a
    ``data.root`` on another machine. ``random_init`` keeps the architecture and the run's seed but
    not the weights: the baseline every table needs."""
    try:
        path, state = read_checkpoint(checkpoint)
    except CheckpointError as e:
        raise EvaluationError(str(e)) from None
    try:
        cfg = config_from_dict(merge(state["config"], overrides or {}))
    except ConfigError as e:
        raise EvaluationError(f"{path}: {e}") from None
    dev = torch.device(device) if device else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    m = cfg.model
    torch.manual_seed(cfg.seed)
    model = MoCo.from_config(cfg)
    if not random_init:
        detail = weights_mismatch(model.state_dict(), state["model"])
        if detail is None:
            try:
                model.load_state_dict(state["model"])
            except RuntimeError as e:
                lines = str(e).strip().splitlines()
                detail = (lines[1].strip() if len(lines) > 1 else lines[0])[:300]
        if detail is not None:
            raise EvaluationError(f"{path}: its weights do not fit a {m.backbone} (width {m.width}, "
                                  f"small_stem {m.small_stem}) encoder: {detail}")
    encoder = model.encoder_k if cfg.eval.encoder == "key" else model.encoder_q
    encoder = encoder.to(dev).eval()
    try:
        data = load_datasets(cfg)
    except (OSError, ValueError) as e:
        raise EvaluationError(f"dataset {cfg.data.dataset!r} of {path} cannot be loaded: {e} "
                              "(pass --set data.root=... on this machine)") from None
    epoch = None if random_init else int(state.get("epoch", -1)) + 1
    return LoadedEncoder(cfg, encoder, data, dev, path, epoch)


@torch.no_grad()
def extract_features(loaded: LoadedEncoder, dataset: ImageDataset, *, batch_size: int | None = None) -> Tensor:
    """(N, F) L2-normalised backbone features of ``dataset``'s eval view, on CPU, row i = sample i."""
    d = loaded.data
    bs = batch_size or loaded.cfg.eval.batch_size
    out = []
    for _, images, _ in iterate_batches(dataset, None, bs, num_workers=loaded.cfg.data.num_workers):
        x = eval_transform(images.to(loaded.device), d.image_size, d.mean, d.std)
        out.append(F.normalize(loaded.encoder.features(x).float(), dim=1).cpu())
    return torch.cat(out)


def split(loaded: LoadedEncoder, name: str) -> ImageDataset:
    """The ``train``, ``val`` or ``test`` split; a missing test split is an EvaluationError."""
    if name not in ("train", "val", "test"):
        raise EvaluationError(f"split must be train, val or test, got {name!r}")
    ds = getattr(loaded.data, name)
    if ds is None:
        raise EvaluationError(f"dataset {loaded.data.name!r} has no {name} split")
    return ds
