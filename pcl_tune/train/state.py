"""The run state of one pretraining run and its checkpoint.

:class:`RunState` holds everything an epoch reads or changes: the model (query and momentum
encoders, queue), the optimiser and its lr schedule, the augmentation and negative-sampling
RNG streams, the data and the per-epoch history. Its checkpoint restores all of it, so a resumed
run continues bit for bit where the uninterrupted run would be.

Random streams are not checkpointed: every epoch, each rank re-seeds its streams from
(seed, rank, epoch) (:meth:`RunState.seed_epoch`). A resumed rank therefore draws exactly what it
would have drawn, whichever rank wrote the checkpoint and however many times the run restarted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import distributed as dist_utils
from ..augment import MoCoV2Augment
from ..checkpoint import BEST_FILE, CHECKPOINT_DIR, CHECKPOINT_FILE, CHECKPOINT_METRICS, read_checkpoint
from ..clustering import ClusterSchedule
from ..config import ConfigError, OptimConfig, TrainConfig
from ..data import DatasetSplits, augment_setting, load_datasets
from ..losses import PrototypeLossConfig
from ..model import FeatureBank, MoCo

log = logging.getLogger("pcl_tune.train")

STREAMS: tuple[str, ...] = ("augment", "negatives", "torch", "numpy", "python")
"""The random streams of a rank's epoch, each seeded by :func:`stream_seed`."""


def stream_seed(seed: int, rank: int, epoch: int, stream: str) -> int:
    """The seed of one random ``stream`` of ``rank`` in ``epoch`` (0-based): a 63-bit hash of the four.

    NumPy's ``SeedSequence`` mixes the inputs, so neighbouring seeds, ranks and epochs give
    unrelated streams (``seed * 7919 + rank`` style sums collide across runs).
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; expected one of {STREAMS}")
    words = [int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, rank, epoch, STREAMS.index(stream)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1


def step_batch_sizes(batch_size: int, num_images: int, world: int) -> tuple[int, int]:
    """(global, per-rank) batch of a training step: ``optim.batch_size`` split over ``world`` ranks.

    A train set smaller than the batch trains on one batch of all of it (rounded down to a
    multiple of the world). Raises :class:`~pcl_tune.config.ConfigError` when the batch does not
    divide by the world, or when there are fewer images than ranks.
    """
    if batch_size % world:
        raise ConfigError(f"key 'optim.batch_size': got {batch_size}, which does not divide by the {world} workers: "
                          f"it is the global batch, split evenly across them (pick a multiple of {world})")
    global_bs = min(batch_size, num_images - num_images % world)
    if global_bs < world:
        raise ConfigError(f"the train set has {num_images} image(s), fewer than the {world} workers")
    return global_bs, global_bs // world


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's CUDA device (``LOCAL_RANK`` under DDP) when there is one, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device(f"cuda:{local % torch.cuda.device_count()}")
        return torch.device("cpu")
    return torch.device(name)


def lr_factor(optim: OptimConfig, epochs: int) -> Any:
    """The epoch -> lr multiplier of ``optim.schedule`` (cosine to 0 over ``epochs``, or x0.1 steps).

    Given to ``torch.optim.lr_scheduler.LambdaLR`` in closed form: ``CosineAnnealingLR``
    computes the same curve recursively, which drifts by ~1e-15 and so changes training bitwise.
    """
    if optim.schedule == "cosine":
        return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    steps = tuple(optim.lr_steps)
    return lambda epoch: 0.1 ** sum(epoch >= s for s in steps)


@dataclass
class RunState:
    """Model, optimiser, RNG streams, data and history of one run (on this rank)."""

    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    data: DatasetSplits
    schedule: ClusterSchedule
    model: MoCo
    query_net: torch.nn.Module
    """The query encoder as trained: wrapped in DDP when the world is larger than one."""
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    augment: MoCoV2Augment
    aug_gen: torch.Generator
    """Augmentation (and shuffle-BN) draws; re-seeded every epoch by :meth:`seed_epoch`."""
    neg_gen: torch.Generator
    """ProtoNCE negative-prototype draws; re-seeded every epoch by :meth:`seed_epoch`, the same on
    every rank (the negatives belong to the global batch, which the ranks share)."""
    proto_cfg: PrototypeLossConfig
    amp: bool
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    bank: FeatureBank | None = None
    """``clustering.features: bank``: the training steps' key embeddings of the train set, equal on
    every rank (each step writes its global batch); checkpointed, since the next clustering reads it."""

    @classmethod
    def build(cls, cfg: TrainConfig) -> RunState:
        """Seed, pick the device, load data, build the model (DDP-wrapped under DDP) and optimiser."""
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        rank, world = dist_utils.rank(), dist_utils.world_size()
        data = load_datasets(cfg)
        step_batch_sizes(cfg.optim.batch_size, len(data.train), world)  # fails here, not at the first step
        schedule = ClusterSchedule.parse(cfg.pcl.cluster_schedule)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        m = cfg.model
        model = MoCo.from_config(cfg).to(device)
        if device.type == "cuda" or m.backbone == "small_cnn":
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        query_net: torch.nn.Module = model.encoder_q
        if world > 1:
            ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
            query_net = torch.nn.parallel.DistributedDataParallel(model.encoder_q, **ddp_kwargs)
        o = cfg.optim
        trained = list(model.encoder_q.parameters())
        if model.temperature_net is not None:  # its gradients are averaged over ranks by hand (not in DDP)
            trained += list(model.temperature_net.parameters())
        optimizer = torch.optim.SGD(trained, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(o, cfg.epochs))
        augment = MoCoV2Augment(data.image_size, data.mean, data.std,
                                scale=(augment_setting(cfg, "crop_min_scale"), 1.0),
                                flip_p=augment_setting(cfg, "flip_p"), rotation=cfg.data.rotation)
        return cls(
            cfg=cfg, device=device, rank=rank, world=world, data=data, schedule=schedule, model=model,
            query_net=query_net, optimizer=optimizer, lr_scheduler=lr_scheduler, augment=augment,
            aug_gen=torch.Generator(), neg_gen=torch.Generator(),
            proto_cfg=PrototypeLossConfig.from_config(cfg.pcl, batch_size=o.batch_size),
            amp=cfg.amp and device.type == "cuda",
            bank=FeatureBank(len(data.train), m.low_dim * (model.num_heads if cfg.pcl.proto_head == "all" else 1),
                             device) if cfg.clustering.features == "bank" else None,
        )

    def seed_epoch(self, epoch: int) -> None:
        """Seed this rank's random streams for ``epoch``: the augmentation and negative-sampling
        generators and the global torch / NumPy / Python generators, from (seed, rank, epoch).

        The negative-prototype stream is rank 0's on every rank: ProtoNCE draws one set of
        negatives per step for the global batch, so a run on W ranks draws what one process does.
        """
        seed = self.cfg.seed
        self.aug_gen.manual_seed(stream_seed(seed, self.rank, epoch, "augment"))
        self.neg_gen.manual_seed(stream_seed(seed, 0, epoch, "negatives"))
        torch.manual_seed(stream_seed(seed, self.rank, epoch, "torch"))
        np.random.seed(stream_seed(seed, self.rank, epoch, "numpy") & 0xFFFFFFFF)
        random.seed(stream_seed(seed, self.rank, epoch, "python"))

    # ---- checkpoint

    def state_dict(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "history": self.history,
            **({"feature_bank": self.bank.state_dict()} if self.bank is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = int(state["epoch"]) + 1
        if "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        else:  # a checkpoint written before the loop used a torch scheduler: the epoch says where it is
            self.lr_scheduler.last_epoch = self.start_epoch - 1
            with warnings.catch_warnings():  # "step() before optimizer.step()": intended here
                warnings.simplefilter("ignore", UserWarning)
                self.lr_scheduler.step()
        # Checkpoints written before the streams were derived per epoch also hold RNG states
        # ("aug_gen", "torch_rng", ...): ignored, seed_epoch re-seeds every stream.
        self.history = list(state.get("history", []))
        if self.bank is not None and "feature_bank" in state:
            # Without one (a run started with clustering.features: pass) the bank starts empty and the
            # next clustering embeds the images with one pass (FeatureBank rows not filled).
            self.bank.load_state_dict(state["feature_bank"])
        self.apply_optim_settings()

    def apply_optim_settings(self) -> None:
        """Make the optimiser follow this run's config: lr (through the schedule), momentum, weight decay.

        A loaded optimiser state carries the settings it was saved with. They differ from the
        config when a run continues from another run's checkpoint with other settings (Population
        Based Training clones a trial and perturbs its lr); the config wins. With the same settings
        this changes nothing: the lr is the schedule's own ``base_lr * factor(epoch)``.
        """
        o = self.cfg.optim
        factor = lr_factor(o, self.cfg.epochs)(self.lr_scheduler.last_epoch)
        self.lr_scheduler.base_lrs = [o.lr for _ in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["initial_lr"] = o.lr
            g["lr"] = o.lr * factor
            g["momentum"] = o.momentum
            g["weight_decay"] = o.weight_decay
        self.lr_scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]  # what get_last_lr() reports

    def save_checkpoint(self, out_dir: Path | None, epoch: int, *, best: bool = False) -> Path | None:
        """Write ``<out>/checkpoint/checkpoint.pt`` (and its metrics) atomically on rank 0; with
        ``best``, also this epoch's weights as ``best.pt`` (what downstream evaluations load).

        Returns the folder on rank 0, None elsewhere or without ``out_dir``.
        """
        if out_dir is None or not dist_utils.is_main():
            return None
        ckpt_dir = out_dir / CHECKPOINT_DIR
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(ckpt_dir / CHECKPOINT_FILE, lambda f: torch.save(self.state_dict(epoch), f))
        if best:
            weights = {"epoch": epoch, "config": self.cfg.to_dict(), "model": self.model.state_dict(),
                       "metric": self.cfg.eval.best_metric,
                       "value": self.history[-1].get(self.cfg.eval.best_metric)}
            _write_atomically(ckpt_dir / BEST_FILE, lambda f: torch.save(weights, f))
        _write_atomically(ckpt_dir / CHECKPOINT_METRICS,
                          lambda f: f.write_text(json.dumps(self.history, default=float)))
        return ckpt_dir

    def resume(self, path: str | os.PathLike[str]) -> None:
        """Continue from a checkpoint file or a folder holding ``checkpoint.pt``."""
        p, state = read_checkpoint(path)
        self.load_state_dict(state)
        log.info("resumed from %s at epoch %d", p, self.start_epoch)


def _write_atomically(path: Path, write: Any) -> None:
    """``write(tmp)`` then rename over ``path``: a crash or a full disk leaves the previous file
    whole. On an OSError the partial file is removed and the error names the file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}; the previous {path.name} is kept") from e


def is_new_best(history: list[dict[str, Any]], metric: str) -> bool:
    """Whether the last epoch of ``history`` has the best finite ``metric`` so far (ties: the earlier)."""
    from ..metrics import direction

    values = [m.get(metric, math.nan) for m in history]
    last = values[-1] if values else math.nan
    if not isinstance(last, (int, float)) or not math.isfinite(last):
        return False
    earlier = [v for v in values[:-1] if isinstance(v, (int, float)) and math.isfinite(v)]
    if not earlier:
        return True
    return last > max(earlier) if direction(metric) == "max" else last < min(earlier)
