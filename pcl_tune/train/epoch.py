"""One training epoch: MoCo v2 steps with InfoNCE plus, once clusters exist, the prototype loss."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from .. import distributed as dist_utils
from .. import faults
from ..data import iterate_batches
from ..losses import LevelBatch, amcl_info_nce_heads, pcl_loss, prototype_loss
from .prototypes import EpochClusters
from .state import RunState, step_batch_sizes


class TrainingDiverged(RuntimeError):
    """Raised when the loss becomes NaN or infinite; the message names the epoch and batch."""


def multi_head_instance(run: RunState, q: Tensor, k: Tensor) -> tuple[tuple[Tensor, Tensor], dict[str, Tensor]]:
    """The instance term of a multi-head run (``model.head: amcl``): the heads' summed tempered
    InfoNCE with the temperature penalty (:func:`~pcl_tune.losses.amcl_info_nce_heads`), its
    mean accuracy, and per-head parts: ``loss_inst_head_{h}``, ``acc_inst_head_{h}`` and the mean,
    10th and 90th percentile of the head's positive-pair temperatures."""
    model, cfg = run.model, run.cfg
    assert model.temperature_net is not None
    temps = model.temperature_net(q, k, model.queue)
    losses, accs = amcl_info_nce_heads(q, k, model.queue, temps, beta=cfg.pcl.amcl_beta, prior=cfg.pcl.temperature)
    parts: dict[str, Tensor] = {}
    pos = temps[:, :, 0].detach().float()
    quantiles = torch.quantile(pos, torch.tensor([0.1, 0.9], device=pos.device), dim=1)  # (2, H)
    for h in range(losses.shape[0]):
        parts[f"loss_inst_head_{h}"] = losses[h].detach()
        parts[f"acc_inst_head_{h}"] = accs[h]
        parts[f"tau_pos_mean_head_{h}"] = pos[h].mean()
        parts[f"tau_pos_p10_head_{h}"] = quantiles[0, h]
        parts[f"tau_pos_p90_head_{h}"] = quantiles[1, h]
    return (losses.sum(), accs.mean()), parts


def all_heads_loss(run: RunState, q: Tensor, instance: tuple[Tensor, Tensor] | None,
                   head_levels: list[list[LevelBatch]]) -> tuple[Tensor, dict[str, Tensor]]:
    """``pcl.proto_head: all``: the instance term plus ``proto_weight`` times the mean over heads of
    each head's prototype loss on its own clustering; the prototype parts are means over heads."""
    assert instance is not None
    loss_inst, acc_inst = instance
    parts: dict[str, Tensor] = {"loss_inst": loss_inst.detach(), "acc_inst": acc_inst.detach()}
    total = loss_inst
    if head_levels:
        losses, head_parts = [], []
        for h, levels in enumerate(head_levels):
            loss_h, parts_h = prototype_loss(q[h], levels, config=run.proto_cfg, generator=run.neg_gen)
            losses.append(loss_h)
            head_parts.append(parts_h)
        total = total + run.cfg.pcl.proto_weight * torch.stack(losses).mean()
        for key in head_parts[0]:
            parts[key] = torch.stack([p[key] for p in head_parts]).mean()
    parts["loss"] = total.detach()
    return total, parts


def train_epoch(run: RunState, epoch: int, clusters: EpochClusters | None) -> dict[str, float]:
    """Train ``epoch`` (0-based); returns the epoch's mean loss parts (accuracies in %), lr, throughput.

    ``optim.batch_size`` is the global batch: each step takes the next ``batch_size`` images of one
    seeded permutation of the train set (the last partial batch is dropped, as MoCo does), and
    each of the W ranks trains on a strided 1/W of them. So the images of a step, the number of
    steps, the queue and the ProtoNCE columns (drawn for the global batch) do not depend on how
    many ranks there are; only batch-norm statistics are per rank. The rank's random streams are
    seeded from (seed, rank, epoch) first (:meth:`RunState.seed_epoch`).

    With a feature bank (``clustering.features: bank``) every step writes the keys it computed
    into ``run.bank`` at its images' dataset indices: every rank writes the whole global batch (the
    keys are gathered for the queue anyway; the indices are gathered with them), so the ranks'
    banks stay equal without a gather before clustering.
    """
    cfg, model = run.cfg, run.model
    run.seed_epoch(epoch)
    model.train()
    lr = run.lr_scheduler.get_last_lr()[0]
    n = len(run.data.train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    global_bs, bs = step_batch_sizes(cfg.optim.batch_size, n, run.world)
    num_batches = n // global_bs
    local = dist_utils.shard(perm[: num_batches * global_bs].view(num_batches, global_bs), pad=False, dim=1)
    sums: dict[str, float] = {}
    seen = 0
    t0 = time.perf_counter()
    batches = iterate_batches(run.data.train, local.reshape(-1), bs, num_workers=cfg.data.num_workers)
    # A bar on a terminal only (disable=None): quiet in logs, CI and Tune trials (progress=False there).
    bar = tqdm(batches, total=num_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, unit="batch",
               disable=None if cfg.progress and dist_utils.is_main() else True)
    pausable = faults.armed()
    for b, (index, images, _) in enumerate(bar):
        if pausable:
            faults.pause_point(f"train_step/rank{run.rank}/epoch{epoch + 1}/step{b + 1}")
        images = images.to(run.device, non_blocking=True)
        im_q = run.augment(images, run.aug_gen).contiguous(memory_format=torch.channels_last)
        im_k = run.augment(images, run.aug_gen).contiguous(memory_format=torch.channels_last)
        model.momentum_update()
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
            q = F.normalize(run.query_net(im_q).float(), dim=-1)
            k = model.keys(im_k, bn_splits=cfg.model.bn_splits, generator=run.aug_gen).float()
        levels: list[LevelBatch] = []
        head_levels: list[list[LevelBatch]] = []
        step_index = None
        if clusters is not None:
            index = index.to(run.device)
            # ProtoNCE's columns belong to the global batch: every rank sees all its rows' clusters
            # (one process holds the whole batch: nothing to gather, nor to index twice).
            step_index = dist_utils.all_gather_cat(index) if run.world > 1 else None
            offset = dist_utils.rank() * index.numel()
            head_levels = [[LevelBatch(lv.centroids, lv.assignment[index], lv.concentration,
                                       batch_assignment=None if step_index is None else lv.assignment[step_index],
                                       row_offset=offset)
                            for lv in lvs]
                           for lvs in (clusters.heads or [clusters.levels])]
            levels = head_levels[0]
        instance, head_parts = None, {}
        if model.multi_head:
            instance, head_parts = multi_head_instance(run, q, k)
        if model.multi_head and cfg.pcl.proto_head == "all":
            loss, parts = all_heads_loss(run, q, instance, head_levels)
        else:
            loss, parts = pcl_loss(model.proto_view(q, cfg.pcl.proto_head), k, model.queue, levels,
                                   temperature=cfg.pcl.temperature, config=run.proto_cfg,
                                   proto_weight=cfg.pcl.proto_weight, generator=run.neg_gen, instance=instance)
        parts.update(head_parts)
        if cfg.inject_nan_epoch == epoch + 1 and run.rank == 0:  # (tests only: a run that diverges here)
            loss = loss * float("nan")
        # Every rank agrees before backward: one rank stopping alone would leave the others
        # waiting in DDP's all-reduce until the process-group timeout.
        bad = dist_utils.first_bad_rank(bool(torch.isfinite(loss)), run.device)
        if bad is not None:
            where = f" on rank {bad} of {run.world}" if run.world > 1 else ""
            value = f"{loss.item()}" if bad == dist_utils.rank() else "not finite"
            raise TrainingDiverged(f"loss is {value}{where} at epoch {epoch + 1}, batch {b + 1} "
                                   f"(lr {lr:.4g}); lower optim.lr or check the temperatures")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if model.temperature_net is not None:
            dist_utils.average_gradients(model.temperature_net)
        run.optimizer.step()
        # The global batch's keys, in rank order (several heads: gathered along the batch dimension).
        keys = (dist_utils.all_gather_cat(k.detach().transpose(0, 1).contiguous()).transpose(0, 1)
                if model.multi_head else dist_utils.all_gather_cat(k.detach()))
        model.enqueue(keys)
        if run.bank is not None:  # every rank writes the global batch's rows: the banks stay equal
            if run.world > 1:  # the global batch's indices, in rank order as the keys (gathered above with clusters)
                index = step_index if step_index is not None else dist_utils.all_gather_cat(index.to(run.device))
            run.bank.update(index, model.proto_view(keys, cfg.pcl.proto_head))
        for key, v in parts.items():
            sums[key] = sums.get(key, 0.0) + float(v)
        seen += images.shape[0]
        if not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    bar.close()
    run.lr_scheduler.step()
    # Batch-norm running statistics are updated locally on every rank; make them rank 0's so
    # features, kNN and the checkpoint do not depend on which rank computed what.
    dist_utils.broadcast_buffers(model)
    means = {k: v / max(1, num_batches) for k, v in sums.items()}
    means = dist_utils.all_reduce_mean(means, run.device)
    for key in list(means):
        if key.startswith("acc_"):
            means[key] *= 100.0
    means["lr"] = lr
    means["images_per_s"] = seen * run.world / max(1e-9, time.perf_counter() - t0)
    return means
