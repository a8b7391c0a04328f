"""The PCL epoch loop: one pretraining run, in a plain process, a Tune trial or a Ray Train worker.

Per epoch ``e`` (0-based):

1. ``e >= pcl.warmup_epochs``: momentum-encoder embeddings of the whole train set (eval
   view), gathered across ranks by sample index; k-means at the counts the cluster schedule gives
   for this epoch (rank 0, broadcast); concentration per level.
2. one epoch of InfoNCE (+ the configured prototype loss per level once clusters exist).
3. evaluation: weighted kNN of the val split against the train split, NMI/AMI of each level
   against the train labels.
4. metrics -> ``metrics.csv``, checkpoint -> ``<out>/checkpoint/checkpoint.pt``, then the
   reporting callback ``callback(epoch, metrics, checkpoint_dir)``.

Command line::

    python -m pcl_tune.train --config search_spaces/demo.yaml --set optim.lr=0.1 --out runs/one
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed as dist_utils
from .augment import MoCoV2Augment, eval_transform
from .clustering import ClusterLevel, ClusterSchedule, cluster
from .config import ConfigError, TrainConfig, config_from_dict, load_config_file, merge, parse_overrides
from .data import DatasetSplits, ImageDataset, iterate_batches
from .evaluate import cluster_agreement, knn_accuracy
from .losses import LevelBatch, PrototypeLossConfig, pcl_loss
from .model import MoCo

log = logging.getLogger("pcl_tune.train")

Callback = Callable[[int, dict[str, Any], Path | None], None]
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"


EPOCH_METRICS: tuple[str, ...] = (
    "epoch", "loss", "loss_inst", "acc_inst", "loss_proto", "acc_proto", "knn_top1", "nmi", "ami", "lr",
    "images_per_s", "time_features", "time_clustering", "time_train", "time_eval", "time_epoch",
)
LEVEL_METRICS: tuple[str, ...] = ("loss_proto", "acc_proto", "nmi", "ami", "num_clusters")
# Augmentation settings a config leaves unset (None) take MoCo v2's values, or the dataset's own
# where MoCo v2's were measured to hurt it (digits: crops that cut the digit, mirrored digits).
AUGMENT_DEFAULTS: dict[str, dict[str, float]] = {
    "moco_v2": {"crop_min_scale": 0.2, "flip_p": 0.5},
    "digits": {"crop_min_scale": 0.5, "flip_p": 0.0},
}


def reported_metrics(num_levels: int) -> set[str]:
    """Numeric metric names the loop reports every epoch for a schedule with ``num_levels`` levels.

    Accuracies (acc_*, knn_top1) are in percent; proto metrics and NMI/AMI are NaN during warm-up.
    """
    return set(EPOCH_METRICS) | {f"{m}_{i}" for m in LEVEL_METRICS for i in range(num_levels)}


class TrainingDiverged(RuntimeError):
    """Raised when the loss becomes NaN or infinite; the message names the epoch and batch."""


# --------------------------------------------------------------------------- datasets

_DATA_CACHE: dict[tuple[Any, ...], DatasetSplits] = {}


def load_datasets(cfg: TrainConfig) -> DatasetSplits:
    """Build (and cache per process) the dataset splits a config asks for."""
    from . import data as D

    dc = cfg.data
    key = (dc.dataset, dc.root, dc.image_size, dc.load_size, dc.val_fraction, tuple(dc.digits_copies), cfg.seed,
           dc.download, dc.digits_clutter)
    if key in _DATA_CACHE:
        splits = _DATA_CACHE[key]
    else:
        if dc.dataset == "digits":
            splits = D.digit_scenes(seed=cfg.seed, size=dc.image_size or D.DIGITS_SIZE, copies=tuple(dc.digits_copies),  # type: ignore[arg-type]
                                    clutter=dc.digits_clutter)
        elif dc.dataset in ("cifar10", "cifar100"):
            splits = D.cifar(dc.root or ".", num_classes=10 if dc.dataset == "cifar10" else 100,
                             download=dc.download, val_fraction=dc.val_fraction, seed=cfg.seed)
        elif dc.dataset == "miniimagenet":
            size = dc.image_size or 84
            splits = D.mini_imagenet(dc.root or ".", image_size=dc.load_size or size, val_fraction=dc.val_fraction,
                                     seed=cfg.seed)
            splits.image_size = size
        else:
            size = dc.image_size or 224
            splits = D.image_folder(dc.root or ".", image_size=dc.load_size or round(size * 8 / 7),
                                    val_fraction=dc.val_fraction, seed=cfg.seed)
            splits.image_size = size
        _DATA_CACHE[key] = splits
    if dc.subset is not None and dc.subset < len(splits.train):
        splits = DatasetSplits(splits.name, splits.train.subset(np.arange(dc.subset)), splits.val, splits.test,
                               splits.num_classes, splits.image_size, splits.mean, splits.std, splits.fewshot)
    return splits


# --------------------------------------------------------------------------- the trainer

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device(f"cuda:{local % torch.cuda.device_count()}")
        return torch.device("cpu")
    return torch.device(name)


@dataclass
class EpochClusters:
    """The clustering of one epoch, on the training device."""

    levels: list[ClusterLevel]
    counts: list[int]


class Trainer:
    """Holds the model, optimiser, RNGs and data of one run; :meth:`run_epoch` does one epoch."""

    def __init__(self, cfg: TrainConfig, out_dir: str | os.PathLike[str] | None = None) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.data = load_datasets(cfg)
        self.schedule = ClusterSchedule.parse(cfg.pcl.cluster_schedule)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        m = cfg.model
        self.model = MoCo(m.backbone, m.head, m.low_dim, queue_size=m.queue_size, momentum=m.momentum,
                          width=m.width, small_stem=m.small_stem).to(self.device)
        if self.device.type == "cuda" or m.backbone == "small_cnn":
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.query_net: torch.nn.Module = self.model.encoder_q
        if self.world > 1:
            ddp_kwargs = {"device_ids": [self.device.index]} if self.device.type == "cuda" else {}
            self.query_net = torch.nn.parallel.DistributedDataParallel(self.model.encoder_q, **ddp_kwargs)
        o = cfg.optim
        self.optimizer = torch.optim.SGD(self.model.encoder_q.parameters(), lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay)
        self.augment = MoCoV2Augment(self.data.image_size, self.data.mean, self.data.std,
                                     scale=(self.augment_setting("crop_min_scale"), 1.0),
                                     flip_p=self.augment_setting("flip_p"),
                                     rotation=self.cfg.data.rotation)
        # Separate RNG streams: augmentation and negative-prototype draws. Saved in checkpoints.
        self.aug_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1 + self.rank)
        self.neg_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 2 + self.rank)
        self.proto_cfg = PrototypeLossConfig(
            kind=cfg.pcl.proto_loss,  # type: ignore[arg-type]
            topk_threshold=cfg.pcl.topk_threshold or o.batch_size,
            num_negatives=cfg.pcl.num_negatives, duplicates=cfg.pcl.duplicates,  # type: ignore[arg-type]
            k=cfg.pcl.k, lam=cfg.pcl.lam, alpha=cfg.pcl.alpha,
            weighting=cfg.pcl.weighting, push_reduction=cfg.pcl.push_reduction,  # type: ignore[arg-type]
        )
        self.start_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.amp = cfg.amp and self.device.type == "cuda"
        self._next_heads: Tensor | None = None

    def augment_setting(self, name: str) -> float:
        """A ``data.<name>`` augmentation setting; when unset, the dataset's default or MoCo v2's."""
        value = getattr(self.cfg.data, name)
        if value is not None:
            return float(value)
        return AUGMENT_DEFAULTS.get(self.cfg.data.dataset, {}).get(name, AUGMENT_DEFAULTS["moco_v2"][name])

    # ---- state

    def state_dict(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "aug_gen": self.aug_gen.get_state(),
            "neg_gen": self.neg_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.aug_gen.set_state(state["aug_gen"])
        self.neg_gen.set_state(state["neg_gen"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        self.history = list(state.get("history", []))
        self.start_epoch = int(state["epoch"]) + 1

    def save_checkpoint(self, epoch: int) -> Path | None:
        """Write ``<out>/checkpoint/checkpoint.pt`` atomically (rank 0); returns the folder."""
        if self.out_dir is None or not dist_utils.is_main():
            return None
        ckpt_dir = self.out_dir / CHECKPOINT_DIR
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_dir / (CHECKPOINT_FILE + ".tmp")
        torch.save(self.state_dict(epoch), tmp)
        os.replace(tmp, ckpt_dir / CHECKPOINT_FILE)
        return ckpt_dir

    def resume(self, path: str | os.PathLike[str]) -> None:
        """Continue from a checkpoint file or a folder holding ``checkpoint.pt``."""
        p = Path(path)
        if p.is_dir():
            p = p / CHECKPOINT_FILE
        if not p.is_file():
            raise FileNotFoundError(f"no checkpoint at {p}")
        state = torch.load(p, map_location="cpu", weights_only=False)  # RNG states must stay on CPU
        self.load_state_dict(state)
        log.info("resumed from %s at epoch %d", p, self.start_epoch)

    # ---- steps

    def lr_at(self, epoch: int) -> float:
        o = self.cfg.optim
        if o.schedule == "cosine":
            return o.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / self.cfg.epochs))
        return o.lr * (0.1 ** sum(epoch >= s for s in o.lr_steps))

    @torch.no_grad()
    def embed(self, dataset: ImageDataset, *, head: bool, backbone: bool) -> tuple[Tensor | None, Tensor | None]:
        """Eval-view embeddings of a whole dataset with the judged encoder, gathered by index.

        Returns (head embeddings of the key encoder (N, low_dim) or None, backbone features of the
        judged encoder (N, F) or None), both L2-normalised and identical on every rank.
        """
        cfg = self.cfg
        key_enc = self.model.encoder_k
        judged = key_enc if cfg.eval.encoder == "key" else self.model.encoder_q
        was_training = self.model.training
        self.model.eval()
        n = len(dataset)
        idx = dist_utils.shard(torch.arange(n), pad=True)
        heads, feats = [], []
        for _, images, _ in iterate_batches(dataset, idx, cfg.eval.batch_size, num_workers=cfg.data.num_workers):
            x = eval_transform(images.to(self.device, non_blocking=True), self.data.image_size, self.data.mean,
                               self.data.std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                if judged is key_enc:
                    f = key_enc.backbone(x)
                    if head:
                        heads.append(F.normalize(key_enc.head(f).float(), dim=1))
                    if backbone:
                        feats.append(F.normalize(f.float(), dim=1))
                else:
                    if head:
                        heads.append(key_enc(x).float())
                    if backbone:
                        feats.append(judged.features(x).float())
        self.model.train(was_training)
        idx = idx.to(self.device)
        h = dist_utils.gather_by_index(torch.cat(heads), idx, n) if head else None
        b = dist_utils.gather_by_index(torch.cat(feats), idx, n) if backbone else None
        return h, b

    def cluster_features(self, features: Tensor, epoch: int) -> EpochClusters:
        counts = self.schedule.counts(epoch, num_epochs=self.cfg.epochs, warmup_epochs=self.cfg.pcl.warmup_epochs,
                                      max_count=features.shape[0])
        c = self.cfg.clustering
        levels: list[ClusterLevel] = []
        if dist_utils.is_main():
            levels = cluster(features.float().cpu(), counts, temperature=self.cfg.pcl.proto_temperature,
                             seed=self.cfg.seed, niter=c.niter, nredo=c.nredo,
                             max_points_per_centroid=c.max_points_per_centroid,
                             min_points_per_centroid=c.min_points_per_centroid, backend=c.backend)
        out = []
        for i in range(len(counts)):
            lv = levels[i] if levels else None
            a = dist_utils.broadcast_tensor(lv.assignment.to(self.device) if lv else None, device=self.device)
            cen = dist_utils.broadcast_tensor(lv.centroids.to(self.device) if lv else None, device=self.device)
            phi = dist_utils.broadcast_tensor(lv.concentration.to(self.device) if lv else None, device=self.device)
            obj = lv.objective if lv else math.nan
            out.append(ClusterLevel(a, cen, phi, obj, lv.backend if lv else ""))
        return EpochClusters(out, counts)

    def train_epoch(self, epoch: int, clusters: EpochClusters | None) -> dict[str, float]:
        cfg = self.cfg
        self.model.train()
        lr = self.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n = len(self.data.train)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        local = dist_utils.shard(perm, pad=True)
        bs = min(cfg.optim.batch_size, local.numel())
        num_batches = local.numel() // bs  # drop the last partial batch, as MoCo does
        sums: dict[str, float] = {}
        seen = 0
        t0 = time.perf_counter()
        batches = iterate_batches(self.data.train, local[: num_batches * bs], bs, num_workers=cfg.data.num_workers)
        for b, (index, images, _) in enumerate(batches):
            images = images.to(self.device, non_blocking=True)
            im_q = self.augment(images, self.aug_gen).contiguous(memory_format=torch.channels_last)
            im_k = self.augment(images, self.aug_gen).contiguous(memory_format=torch.channels_last)
            self.model.momentum_update()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                q = F.normalize(self.query_net(im_q).float(), dim=1)
                k = self.model.keys(im_k, bn_splits=cfg.model.bn_splits, generator=self.aug_gen).float()
            levels = []
            if clusters is not None:
                index = index.to(self.device)
                levels = [LevelBatch(lv.centroids, lv.assignment[index], lv.concentration) for lv in clusters.levels]
            loss, parts = pcl_loss(q, k, self.model.queue, levels, temperature=cfg.pcl.temperature,
                                   config=self.proto_cfg, proto_weight=cfg.pcl.proto_weight, generator=self.neg_gen)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch + 1}, batch {b + 1} "
                                       f"(lr {lr:.4g}); lower optim.lr or check the temperatures")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.model.enqueue(dist_utils.all_gather_cat(k.detach()))
            for key, v in parts.items():
                sums[key] = sums.get(key, 0.0) + float(v)
            seen += images.shape[0]
            if cfg.progress and dist_utils.is_main():
                _progress(epoch, cfg.epochs, b + 1, num_batches, loss.item(), seen / (time.perf_counter() - t0))
        if cfg.progress and dist_utils.is_main():
            _progress_end()
        # Batch-norm running statistics are updated locally on every rank; make them rank 0's so
        # features, kNN and the checkpoint do not depend on which rank computed what.
        dist_utils.broadcast_buffers(self.model)
        means = {k: v / max(1, num_batches) for k, v in sums.items()}
        means = dist_utils.all_reduce_mean(means, self.device)
        for key in list(means):
            if key.startswith("acc_"):
                means[key] *= 100.0
        means["lr"] = lr
        means["images_per_s"] = seen * self.world / max(1e-9, time.perf_counter() - t0)
        return means

    def evaluate(self, train_feats: Tensor, clusters: EpochClusters | None) -> dict[str, float]:
        cfg, d = self.cfg, self.data
        out: dict[str, float] = {}
        _, val_feats = self.embed(d.val, head=False, backbone=True)
        assert val_feats is not None
        out["knn_top1"] = knn_accuracy(val_feats, d.val.labels.to(self.device), train_feats,
                                       d.train.labels.to(self.device), d.num_classes, k=cfg.eval.knn_k, t=cfg.eval.knn_t)
        if clusters is not None:
            nmis, amis = [], []
            for i, lv in enumerate(clusters.levels):
                nmi, ami = cluster_agreement(lv.assignment, d.train.labels)
                out[f"nmi_{i}"], out[f"ami_{i}"] = nmi, ami
                nmis.append(nmi)
                amis.append(ami)
            out["nmi"], out["ami"] = float(np.mean(nmis)), float(np.mean(amis))
        return out

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        """One full epoch (features, clustering, training, evaluation); returns its metrics.

        The train-set pass that builds the kNN bank at the end of an epoch also yields the key
        embeddings the next epoch clusters (the key encoder does not change in between), so an
        evaluated epoch costs one pass over the train set, not two.
        """
        cfg = self.cfg
        t_start = time.perf_counter()
        clustering_on = epoch >= cfg.pcl.warmup_epochs
        evaluate_now = (epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.epochs
        t = time.perf_counter()
        clusters = None
        heads = self._next_heads
        self._next_heads = None
        if clustering_on and heads is None:
            heads, _ = self.embed(self.data.train, head=True, backbone=False)
        t_feat = time.perf_counter() - t
        t = time.perf_counter()
        if clustering_on:
            assert heads is not None
            clusters = self.cluster_features(heads, epoch)
        t_clu = time.perf_counter() - t
        t = time.perf_counter()
        metrics: dict[str, Any] = {"epoch": epoch + 1}
        metrics.update(self.train_epoch(epoch, clusters))
        t_train = time.perf_counter() - t
        t_eval = 0.0
        if evaluate_now:
            t = time.perf_counter()
            need_heads = cfg.pcl.warmup_epochs <= epoch + 1 < cfg.epochs
            self._next_heads, train_bank = self.embed(self.data.train, head=need_heads, backbone=True)
            # The pass serves the kNN bank and, after warm-up, the next epoch's clustering: count it
            # as feature extraction whenever clustering will use it, as evaluation otherwise.
            if need_heads:
                t_feat += time.perf_counter() - t
                t = time.perf_counter()
            assert train_bank is not None
            metrics.update(self.evaluate(train_bank, clusters))
            t_eval = time.perf_counter() - t
        num_levels = self.schedule.num_levels
        counts = clusters.counts if clusters else [0] * num_levels
        for i, c in enumerate(counts):
            metrics[f"num_clusters_{i}"] = c
        metrics["clusters"] = ",".join(str(c) for c in counts) if clusters else ""
        for key in ["loss_proto", "acc_proto", "knn_top1", "nmi", "ami"] + [
            f"{m}_{i}" for m in ("loss_proto", "acc_proto", "nmi", "ami") for i in range(num_levels)
        ]:
            metrics.setdefault(key, math.nan)
        metrics.update(time_features=t_feat, time_clustering=t_clu, time_train=t_train, time_eval=t_eval,
                       time_epoch=time.perf_counter() - t_start)
        # One key order for every epoch, warm-up or not: Tune's CSV logger, resuming a trial,
        # appends to the old progress.csv under its header, but maps columns by the first new
        # result's key order; a different order put values under the wrong columns.
        first = [k for k in EPOCH_METRICS if k in metrics]
        first += [f"{m}_{i}" for m in LEVEL_METRICS for i in range(num_levels) if f"{m}_{i}" in metrics]
        return {**{k: metrics[k] for k in first}, **dict(sorted((k, v) for k, v in metrics.items() if k not in first))}


def _progress(epoch: int, epochs: int, b: int, nb: int, loss: float, ips: float) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r  epoch {epoch + 1}/{epochs}  batch {b}/{nb}  loss {loss:.3f}  {ips:.0f} img/s ")
        sys.stderr.flush()
    elif b == nb or b % max(1, nb // 4) == 0:
        sys.stderr.write(f"  epoch {epoch + 1}/{epochs}  batch {b}/{nb}  loss {loss:.3f}  {ips:.0f} img/s\n")


def _progress_end() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\n")


def format_epoch_line(m: dict[str, Any]) -> str:
    def f(key: str, fmt: str = ".3f") -> str:
        v = m.get(key, math.nan)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    return (f"epoch {m['epoch']:>3}  loss {f('loss')}  inst {f('loss_inst')}/{f('acc_inst', '.1f')}%  "
            f"proto {f('loss_proto')}/{f('acc_proto', '.1f')}%  knn {f('knn_top1', '.2f')}%  "
            f"nmi {f('nmi')}  clusters [{m.get('clusters', '')}]  {f('time_epoch', '.1f')}s "
            f"(feat {f('time_features', '.1f')} clu {f('time_clustering', '.1f')} train {f('time_train', '.1f')} "
            f"eval {f('time_eval', '.1f')})")


def write_metrics_csv(history: list[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    tmp = path.with_suffix(".csv.tmp")
    pd.DataFrame(history).to_csv(tmp, index=False)
    os.replace(tmp, path)


def train_loop(
    config: TrainConfig | dict[str, Any],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    callback: Callback | None = None,
    resume_from: str | os.PathLike[str] | None = None,
    max_epochs: int | None = None,
    verbose: bool = True,
    replay_last: bool = False,
) -> list[dict[str, Any]]:
    """Run (or continue) one pretraining run; returns the per-epoch metrics.

    Args:
        config: a :class:`TrainConfig` or a dict accepted by :func:`config_from_dict`.
        out_dir: where ``metrics.csv`` and ``checkpoint/`` go (rank 0); None keeps nothing.
        callback: called on every rank after each epoch with (epoch, metrics, checkpoint folder or
            None) - the hook Ray Tune / Ray Train reporting plugs into.
        resume_from: a checkpoint folder or file to continue from.
        max_epochs: stop after this many epochs in this call (the schedule still spans
            ``config.epochs``); used to test exact resumption.
        verbose: print one line per epoch (rank 0).
        replay_last: after resuming, first call ``callback`` again with the restored epoch's
            metrics (and no checkpoint). A search sets it: a driver killed between a trial's
            report and the write of its log loses that epoch's row, and Tune then restores the
            trial from the checkpoint of that very epoch. The row may appear twice; readers keep
            the last of each epoch.
    """
    cfg = config if isinstance(config, TrainConfig) else config_from_dict(config)
    trainer = Trainer(cfg, out_dir)
    if resume_from is not None:
        trainer.resume(resume_from)
    if verbose and dist_utils.is_main():
        print(f"[pcl_tune] {trainer.data.summary()}; device {trainer.device}; world size {trainer.world}; "
              f"cluster schedule {trainer.schedule.spec()}", flush=True)
    if replay_last and resume_from is not None and trainer.history and callback is not None:
        callback(trainer.start_epoch - 1, dict(trainer.history[-1]), None)
    end = cfg.epochs if max_epochs is None else min(cfg.epochs, trainer.start_epoch + max_epochs)
    for epoch in range(trainer.start_epoch, end):
        metrics = trainer.run_epoch(epoch)
        trainer.history.append(metrics)
        ckpt = trainer.save_checkpoint(epoch)
        if trainer.out_dir is not None and dist_utils.is_main():
            write_metrics_csv(trainer.history, trainer.out_dir / "metrics.csv")
        if verbose and dist_utils.is_main():
            print(format_epoch_line(metrics), flush=True)
        if callback is not None:
            callback(epoch, metrics, ckpt)
    return trainer.history


def build_config(config_file: str | None, overrides: list[str], epochs: int | None = None) -> TrainConfig:
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
        from .config import describe_fields

        for key, tp, default, doc in describe_fields():
            print(f"{key:32s} {tp:22s} {default!r:24s} {doc}")
        return 0
    try:
        cfg = build_config(args.config, args.overrides, args.epochs)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    out = Path(args.out or f"runs/train-{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    if ckpt.exists() and not args.resume:
        print(f"error: {out} already holds a checkpoint; pass --resume to continue it or choose another --out",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    try:
        history = train_loop(cfg, out_dir=out, resume_from=ckpt if args.resume and ckpt.exists() else None)
    except KeyboardInterrupt:
        print(f"\ninterrupted; continue with: python -m pcl_tune.train --config {out / 'config.yaml'} "
              f"--out {out} --resume", file=sys.stderr)
        return 130
    except (TrainingDiverged, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if history:
        print(f"[pcl_tune] done: knn_top1 {history[-1].get('knn_top1', math.nan):.2f}% after "
              f"{history[-1]['epoch']} epochs; metrics in {out / 'metrics.csv'}, checkpoint in {out / CHECKPOINT_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
