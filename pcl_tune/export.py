"""Hand a pretrained backbone to detection: the query encoder's ResNet weights as torchvision or
detectron2 files.

``python -m pcl_tune.export --checkpoint PATH --format torchvision|detectron2 --out FILE``

* ``torchvision``: ``torch.save`` of the backbone's plain state dict, without ``fc``. It loads into
  ``torchvision.models.resnet50()`` (or ``resnet18()``) with ``strict=True`` once ``fc`` is dropped
  (``model.fc = nn.Identity()``), or with ``strict=False`` reporting only ``fc.weight``/``fc.bias``
  missing. MMDetection's ``init_cfg=dict(type="Pretrained", checkpoint=FILE)`` reads the same keys.
* ``detectron2``: a pickle ``{"model": {name: numpy array}, "__author__": "pcl_tune",
  "matching_heuristics": True}`` with torchvision's names renamed as detectron2's own
  torchvision-conversion script does (``stem.``, ``res2..res5``, ``convK.norm``, ``shortcut``),
  ``num_batches_tracked`` dropped. detectron2 reads a checkpoint as such a pickle only when its
  name ends in ``.pkl``, so ``--out`` must. A torchvision-style ResNet puts the stride in the 3x3
  conv: use ``MODEL.RESNETS.STRIDE_IN_1X1 False``, ``INPUT.FORMAT "RGB"`` and the pretraining's
  pixel mean/std times 255 (``MODEL.PIXEL_MEAN/PIXEL_STD``); a ResNet-18 also needs
  ``MODEL.RESNETS.DEPTH 18`` and ``RES2_OUT_CHANNELS 64``.

Only ``resnet18`` and ``resnet50`` backbones exist in those libraries. A model trained with the
small stem (3x3 stride-1 ``conv1``, no max-pool) does not fit their 7x7 stem; it is refused unless
``--allow-small-stem`` is passed, and then written as it is, for a user who rebuilds that stem.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .checkpoint import CheckpointError, read_checkpoint
from .config import unwritable_reason

FORMATS: tuple[str, ...] = ("torchvision", "detectron2")
EXPORTABLE_BACKBONES: tuple[str, ...] = ("resnet18", "resnet50")
BACKBONE_PREFIX = "encoder_q.backbone."
"""Where the query encoder's backbone sits in a :class:`pcl_tune.model.MoCo` state dict."""


class ExportError(ValueError):
    """A checkpoint or request the export cannot serve; the message is one line that says why."""


@dataclass(frozen=True)
class Backbone:
    """The query encoder's backbone of a pretraining checkpoint."""

    arch: str
    """``resnet18`` or ``resnet50``."""
    small_stem: bool
    """Whether ``conv1`` is the 3x3 stride-1 stem (read from the weights, not the config)."""
    state_dict: dict[str, Tensor]
    """torchvision names (``conv1.weight``, ``layer1.0.bn1.running_mean``, ...), no ``fc``."""
    source: Path
    """The checkpoint file it came from."""


def _reference_shapes(arch: str) -> dict[str, torch.Size]:
    """Names and shapes of torchvision's ``arch`` state dict without ``fc`` (a meta-device build:
    no memory, no init cost)."""
    import torchvision

    with torch.device("meta"):
        net = getattr(torchvision.models, arch)(weights=None)
    return {k: v.shape for k, v in net.state_dict().items() if not k.startswith("fc.")}


def load_backbone(checkpoint: str | os.PathLike[str], *, allow_small_stem: bool = False) -> Backbone:
    """The query backbone of ``checkpoint``, checked against torchvision's architecture.

    Raises :class:`ExportError` for a missing or foreign file, a backbone other than
    :data:`EXPORTABLE_BACKBONES`, weights that do not match that backbone, and a small-stem model
    unless ``allow_small_stem``.
    """
    try:
        path, state = read_checkpoint(checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    model_cfg = state["config"].get("model")
    arch = model_cfg.get("backbone") if isinstance(model_cfg, Mapping) else None
    if arch is None:
        raise ExportError(f"{path}: not a pcl_tune pretraining checkpoint (its config has no model.backbone)")
    if arch not in EXPORTABLE_BACKBONES:
        raise ExportError(f"{path}: backbone {arch!r} cannot be exported; only {', '.join(EXPORTABLE_BACKBONES)} "
                          "exist in torchvision and detectron2")
    sd = {k[len(BACKBONE_PREFIX):]: v for k, v in state["model"].items() if k.startswith(BACKBONE_PREFIX)}
    if not sd:
        raise ExportError(f"{path}: its model has no {BACKBONE_PREFIX}* weights (not a pcl_tune MoCo state dict)")

    ref = _reference_shapes(arch)
    missing = sorted(set(ref) - set(sd))
    unexpected = sorted(set(sd) - set(ref))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ExportError(f"{path}: its weights do not fit torchvision's {arch}: {what}")
    # The weights decide the stem, not the config: they are what gets written.
    small_stem = tuple(sd["conv1.weight"].shape[-2:]) != tuple(ref["conv1.weight"][-2:])
    wrong = [k for k in ref if sd[k].shape != ref[k] and not (small_stem and k == "conv1.weight")]
    if wrong:
        k = wrong[0]
        raise ExportError(f"{path}: its weights do not fit torchvision's {arch}: {k} has shape "
                          f"{tuple(sd[k].shape)}, expected {tuple(ref[k])}")
    if small_stem and not allow_small_stem:
        raise ExportError(f"{path}: the {arch} was trained with the small stem (3x3 stride-1 conv1, no max-pool), "
                          "which does not load into torchvision's or detectron2's 7x7 stem; "
                          "pass --allow-small-stem to export it anyway")
    return Backbone(arch, small_stem, {k: v.detach().cpu() for k, v in sd.items()}, path)


def detectron2_name(key: str) -> str:
    """detectron2's name for a torchvision ResNet state-dict key.

    ``conv1.weight`` -> ``stem.conv1.weight``, ``bn1.running_mean`` -> ``stem.conv1.norm.running_mean``,
    ``layer1.0.bn2.weight`` -> ``res2.0.conv2.norm.weight``, ``layer3.0.downsample.0.weight`` ->
    ``res4.0.shortcut.weight``, ``layer3.0.downsample.1.bias`` -> ``res4.0.shortcut.norm.bias``.
    A key outside that scheme is an :class:`ExportError` rather than a name detectron2 would skip.
    """
    parts = key.split(".")
    if parts[0] in ("conv1", "bn1") and len(parts) == 2:
        return "stem." + ("conv1.norm" if parts[0] == "bn1" else "conv1") + "." + parts[1]
    if (len(parts) >= 4 and parts[0] in ("layer1", "layer2", "layer3", "layer4") and parts[1].isdigit()):
        stage = f"res{int(parts[0][-1]) + 1}"
        module, rest = parts[2], parts[3:]
        if module in ("conv1", "conv2", "conv3") and len(rest) == 1:
            return ".".join([stage, parts[1], module, *rest])
        if module in ("bn1", "bn2", "bn3") and len(rest) == 1:
            return ".".join([stage, parts[1], f"conv{module[-1]}", "norm", *rest])
        if module == "downsample" and len(rest) == 2 and rest[0] in ("0", "1"):
            return ".".join([stage, parts[1], "shortcut" if rest[0] == "0" else "shortcut.norm", rest[1]])
    raise ExportError(f"{key!r} is not a torchvision ResNet key detectron2 can map")


def to_detectron2(state_dict: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    """detectron2-named numpy arrays of a torchvision ResNet state dict; ``num_batches_tracked``
    (which detectron2's ``FrozenBatchNorm2d`` has no use for) is dropped, floats become float32."""
    out: dict[str, np.ndarray] = {}
    for k, v in state_dict.items():
        if k.endswith("num_batches_tracked"):
            continue
        t = v.detach().cpu()
        out[detectron2_name(k)] = (t.float() if t.is_floating_point() else t).numpy()
    return out


def _atomic_write(out: Path, write: Any) -> None:
    """Write through ``out.tmp`` and rename, so an interrupted export leaves no half file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_backbone(backbone: Backbone, *, fmt: str, out: str | os.PathLike[str]) -> int:
    """Write ``backbone`` to ``out`` in ``fmt`` (see :data:`FORMATS`); returns the number of tensors."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; name the file to write")
    if fmt == "detectron2":
        if out.suffix != ".pkl":
            raise ExportError(f"--out {out}: detectron2 reads converted weights only from a file ending in .pkl")
        payload: dict[str, Any] = {"model": to_detectron2(backbone.state_dict), "__author__": "pcl_tune",
                                   "matching_heuristics": True}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)

        _atomic_write(out, write)
        return len(payload["model"])
    sd = {k: v.clone() for k, v in backbone.state_dict.items()}  # no views into the checkpoint's storage
    _atomic_write(out, lambda tmp: torch.save(sd, tmp))
    return len(sd)


def export_backbone(checkpoint: str | os.PathLike[str], *, fmt: str, out: Path,
                    allow_small_stem: bool = False) -> Path:
    """Write the query backbone of ``checkpoint`` to ``out`` as ``fmt`` (torchvision | detectron2).

    Raises :class:`ExportError` (one-line message) for a missing or foreign checkpoint, an
    unsupported backbone, a small-stem model without ``allow_small_stem`` and a bad ``out``.
    """
    if fmt not in FORMATS:  # before loading a checkpoint that may be large
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    write_backbone(load_backbone(checkpoint, allow_small_stem=allow_small_stem), fmt=fmt, out=out)
    return Path(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pcl_tune.export",
        description="Write the query encoder's ResNet backbone of a pretraining checkpoint for torchvision "
                    "(state dict without fc) or detectron2 (.pkl with its key names).")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt / best.pt, or a folder holding checkpoint.pt")
    p.add_argument("--format", dest="fmt", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="file to write (detectron2: must end in .pkl)")
    p.add_argument("--allow-small-stem", action="store_true",
                   help="export a model with the 3x3 stride-1 stem although torchvision/detectron2 expect 7x7")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; 0 on success, 2 with one ``error: ...`` line on stderr otherwise."""
    args = build_parser().parse_args(argv)
    try:
        reason = unwritable_reason(args.out, folder=False)
        if reason:  # before loading a checkpoint that may be large
            raise ExportError(f"--out {args.out}: {reason}")
        backbone = load_backbone(args.checkpoint, allow_small_stem=args.allow_small_stem)
        n = write_backbone(backbone, fmt=args.fmt, out=args.out)
    except (ExportError, OSError) as e:
        print(f"error: {(str(e).strip().splitlines() or [''])[0]}", file=sys.stderr)
        return 2
    print(f"wrote {args.fmt} weights of the {backbone.arch} query backbone ({n} tensors) to {args.out}")
    if backbone.small_stem:
        print("note: its stem differs from torchvision's (3x3 stride-1 conv1, no max-pool): replace conv1 and "
              "maxpool of the target model before loading", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
