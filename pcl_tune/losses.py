"""Contrastive and prototype losses for PCL, as pure tensor functions.

* :func:`info_nce` - MoCo v2 instance loss (He et al. 2020, Chen et al. 2020).
* :func:`proto_nce` - ProtoNCE of PCL (Li et al., ICLR 2021), with the duplicate-positive
  bug of the reference code fixed (``duplicates="dedupe"``), the report's label remap
  (``"remap"``) and the reference behaviour (``"none"``) kept for comparison.
* :func:`topk_prototype_loss` - the researcher's top-K weighted pull + margin push loss.
* :func:`pcl_loss` - InfoNCE + mean over clustering levels of the per-level prototype loss
  (:func:`prototype_loss`).
* :func:`amcl_info_nce` - InfoNCE over several projection heads with a temperature per head and
  per pair, plus a penalty that keeps the temperatures off the trivial solution (adaptive
  multi-head contrastive learning, Wang, Koniusz, Gedeon and Zheng, ECCV 2024).

No Ray, no I/O, no global state. Shapes: ``B`` batch, ``D`` feature dim, ``Q`` queue
length, ``M`` prototypes of one clustering level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import PCLConfig

DuplicateMode = Literal["dedupe", "remap", "none"]
Weighting = Literal["inverse_distance", "uniform", "softmax"]
PushReduction = Literal["sum", "mean"]
ProtoLossKind = Literal["proto_nce", "topk", "topk_below"]

DUPLICATE_MODES: tuple[str, ...] = ("dedupe", "remap", "none")
WEIGHTINGS: tuple[str, ...] = ("inverse_distance", "uniform", "softmax")
PUSH_REDUCTIONS: tuple[str, ...] = ("sum", "mean")
PROTO_LOSS_KINDS: tuple[str, ...] = ("proto_nce", "topk", "topk_below")


def _check_features(name: str, x: Tensor, dim: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has feature dimension {x.shape[1]}, expected {dim} (the dimension of q)")


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(dim=1) == labels).float().mean()


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """MoCo InfoNCE loss.

    Args:
        q: (B, D) L2-normalised query embeddings.
        k: (B, D) L2-normalised key embeddings (momentum encoder; gradients are not needed).
        queue: (Q, D) L2-normalised negative keys.
        temperature: softmax temperature, > 0.

    Returns:
        (loss, accuracy): scalar mean cross-entropy with the positive key in column 0, and the
        fraction (0-1) of rows whose positive has the largest logit.
    """
    _check_features("q", q)
    _check_features("k", k, q.shape[1])
    _check_features("queue", queue, q.shape[1])
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    l_neg = q @ queue.to(q.dtype).T  # (B, Q)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels), _accuracy(logits.detach(), labels)


def temperature_penalty(temperature: Tensor, prior: float) -> Tensor:
    """Mean over every element of ``R(t) = log(t / prior) + prior / t - 1`` (>= 0, zero at ``t = prior``).

    ``log t + prior / t`` is, up to a constant, the negative log-density of an inverse-gamma prior
    on the temperature with scale ``prior`` and shape 0 (density proportional to exp(-prior / t) / t),
    whose mode is ``prior``. The ``1/t`` side grows without bound as a temperature goes to 0 (the
    trivial solution of a learned temperature: a tiny positive-pair temperature drives the
    InfoNCE loss to 0 whatever the features); the ``log t`` side grows as it goes up, so a large
    temperature for every negative is not free either. Subtracting the minimum (``log prior + 1``)
    makes the penalty 0 for a constant temperature equal to the prior. The form
    ``(n/2) log t + 1/t`` (inverse-gamma shape ``n/2 - 1``, scale 1, mode ``2/n``) is this one
    times ``1/prior`` with ``prior = 2/n``, up to a constant: the same minimiser, the scale
    absorbed into the weight.
    """
    if prior <= 0:
        raise ValueError(f"prior must be > 0, got {prior}")
    if not bool((temperature > 0).all()):
        raise ValueError("every temperature must be > 0")
    return (torch.log(temperature / prior) + prior / temperature - 1.0).mean()


def amcl_info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: Tensor, *, beta: float,
                  prior: float = 0.07) -> tuple[Tensor, Tensor]:
    """InfoNCE over ``H`` projection heads, each pair with its own temperature, plus a penalty on
    the temperatures (adaptive multi-head contrastive learning, Wang et al., ECCV 2024).

    For head ``h`` and query ``b``, with similarities ``s_0 = q_hb . k_hb`` (the positive) and
    ``s_j = q_hb . queue_h[j-1]`` (``j = 1..Q``) and temperatures ``t_j = temperature[h, b, j]``::

        L_h = mean_b [ -log( exp(s_0 / t_0) / sum_j exp(s_j / t_j) ) ] + beta * mean_{b,j} R(t_j)

    with ``R`` of :func:`temperature_penalty` (``prior`` its zero). The loss is ``sum_h L_h``:
    each head is its own contrastive task on its own embedding, as the heads' losses are summed
    in the method. With one head, a constant temperature ``t`` and ``beta = 0`` this is
    :func:`info_nce` exactly (same operations in the same order: a test checks the bits); with a
    constant temperature equal to ``prior`` the penalty is 0 for any ``beta``.

    Args:
        q: (H, B, D) L2-normalised query embeddings, one set per head.
        k: (H, B, D) L2-normalised keys (momentum encoder's heads).
        queue: (H, Q, D) each head's negative keys.
        temperature: (H, B, 1 + Q) positive temperatures; column 0 the positive pair, as the
            logits of :func:`info_nce`.
        beta: weight of the penalty, >= 0.
        prior: where the penalty is 0, > 0 (the plain InfoNCE temperature is a natural choice).

    Returns:
        (loss, accuracy): the summed loss, and the fraction (0-1) of rows whose positive has the
        largest tempered logit, averaged over heads.
    """
    losses, accuracies = amcl_info_nce_heads(q, k, queue, temperature, beta=beta, prior=prior)
    return losses.sum(), accuracies.mean()


def amcl_info_nce_heads(q: Tensor, k: Tensor, queue: Tensor, temperature: Tensor, *, beta: float,
                        prior: float = 0.07) -> tuple[Tensor, Tensor]:
    """:func:`amcl_info_nce` per head: ``(losses (H,), accuracies (H,))``, each head's ``L_h`` and
    accuracy (their sum and mean are :func:`amcl_info_nce`'s)."""
    _check_amcl(q, k, queue, temperature, beta)
    heads, batch, _ = q.shape
    labels = torch.zeros(batch, dtype=torch.long, device=q.device)
    losses, accuracies = [], []
    for h in range(heads):
        l_pos = (q[h] * k[h]).sum(dim=1, keepdim=True)  # (B, 1)
        l_neg = q[h] @ queue[h].to(q.dtype).T  # (B, Q)
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature[h]
        loss = F.cross_entropy(logits, labels)
        if beta:
            loss = loss + beta * temperature_penalty(temperature[h], prior)
        losses.append(loss)
        accuracies.append(_accuracy(logits.detach(), labels))
    return torch.stack(losses), torch.stack(accuracies)


def _check_amcl(q: Tensor, k: Tensor, queue: Tensor, temperature: Tensor, beta: float) -> None:
    for name, x in (("q", q), ("k", k), ("queue", queue), ("temperature", temperature)):
        if not isinstance(x, Tensor) or x.ndim != 3 or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 3-d floating-point tensor (heads first), got {shape}")
    heads, batch, dim = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if queue.shape[0] != heads or queue.shape[2] != dim:
        raise ValueError(f"queue must have shape ({heads}, Q, {dim}), got {tuple(queue.shape)}")
    if temperature.shape != (heads, batch, 1 + queue.shape[1]):
        raise ValueError(f"temperature must have shape ({heads}, {batch}, {1 + queue.shape[1]}) "
                         f"(heads, batch, 1 + queue length), got {tuple(temperature.shape)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if not bool((temperature > 0).all()):
        raise ValueError("every temperature must be > 0")


def sample_negative_prototypes(
    num_prototypes: int,
    positives: Tensor,
    num_negatives: int,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw prototype ids without replacement from those that are no positive of the batch.

    Args:
        num_prototypes: M, the number of prototypes of the level.
        positives: (U,) or (B,) ids of the batch's positive prototypes (repeats allowed).
        num_negatives: r, the number wanted; clamped to ``M - #unique(positives)``.
        generator: torch generator for reproducible draws; its device is used for the draw.

    Returns:
        (min(r, M - U),) long tensor of distinct negative ids on ``positives.device``.
    """
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    device = positives.device
    is_negative = torch.ones(num_prototypes, dtype=torch.bool, device=device)
    is_negative[positives] = False
    candidates = is_negative.nonzero(as_tuple=True)[0]  # (M - U,)
    r = min(num_negatives, candidates.numel())
    if r == 0:
        return candidates[:0]
    draw_device = generator.device if generator is not None else device
    perm = torch.randperm(candidates.numel(), generator=generator, device=draw_device)[:r]
    return candidates[perm.to(device)]


def proto_nce(
    q: Tensor,
    prototypes: Tensor,
    assignment: Tensor,
    concentration: Tensor,
    num_negatives: int,
    *,
    duplicates: DuplicateMode = "dedupe",
    generator: torch.Generator | None = None,
    batch_assignment: Tensor | None = None,
    row_offset: int = 0,
) -> tuple[Tensor, Tensor]:
    """ProtoNCE for one clustering level (PCL, Li et al. 2021, eq. 6), with duplicates handled.

    The logit of row i and prototype column j is ``q_i . mu_j / phi_j``.

    Args:
        q: (B, D) L2-normalised query embeddings.
        prototypes: (M, D) L2-normalised centroids of the level.
        assignment: (B,) integer cluster id (0..M-1) of each row.
        concentration: (M,) per-prototype temperature phi (> 0).
        num_negatives: r, negative prototypes drawn without replacement from the prototypes that
            are no positive of this batch; clamped to what exists.
        duplicates: how rows that share a positive prototype are treated:
            ``"dedupe"`` (correct) - columns are the batch's unique positives then the negatives,
            each row labelled with its own prototype's column;
            ``"remap"`` (the report's fix) - one column per row, repeats kept, rows of a repeated
            prototype labelled with its first column;
            ``"none"`` (reference code) - one column per row, labels 0..B-1.
        generator: torch generator for the negative draw.
        batch_assignment: (B_g,) cluster ids of the whole step's batch when ``q`` holds only some
            of its rows (one rank's share under DDP); ``q``'s rows are rows ``row_offset`` to
            ``row_offset + B - 1`` of it. The columns (positives and negatives) are those of the
            whole batch, so with the same ``generator`` state the ranks' mean losses average to
            the loss of one process that holds every row. Default: ``assignment`` itself.
        row_offset: see ``batch_assignment``.

    Returns:
        (loss, accuracy): mean cross-entropy over ``q``'s rows and the fraction (0-1) of them
        whose arg-max column is their label.
    """
    _check_features("q", q)
    _check_features("prototypes", prototypes, q.shape[1])
    if duplicates not in DUPLICATE_MODES:
        raise ValueError(f"duplicates must be one of {DUPLICATE_MODES}, got {duplicates!r}")
    if assignment.ndim != 1 or assignment.shape[0] != q.shape[0]:
        raise ValueError(f"assignment must have shape ({q.shape[0]},), got {tuple(assignment.shape)}")
    if assignment.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"assignment must be an integer tensor, got {assignment.dtype}")
    num_protos = prototypes.shape[0]
    if concentration.ndim != 1 or concentration.shape[0] != num_protos:
        raise ValueError(f"concentration must have shape ({num_protos},), got {tuple(concentration.shape)}")
    local = assignment.long()
    assignment = local if batch_assignment is None else batch_assignment.long()
    batch = q.shape[0]
    if batch_assignment is not None and (assignment.ndim != 1 or not 0 <= row_offset <= assignment.numel() - batch
                                         or not torch.equal(assignment[row_offset:row_offset + batch], local)):
        raise ValueError(f"batch_assignment (shape {tuple(assignment.shape)}) must hold assignment at rows "
                         f"{row_offset}..{row_offset + batch - 1}")
    if assignment.numel() and (int(assignment.min()) < 0 or int(assignment.max()) >= num_protos):
        raise ValueError(f"assignment ids must lie in [0, {num_protos}), got range "
                         f"[{int(assignment.min())}, {int(assignment.max())}]")

    unique_pos, inverse = torch.unique(assignment, sorted=True, return_inverse=True)  # (U,), (B_g,)
    negatives = sample_negative_prototypes(num_protos, unique_pos, num_negatives, generator=generator)
    full = assignment.numel()
    if duplicates == "dedupe":
        columns = torch.cat([unique_pos, negatives])
        labels = inverse
    else:
        columns = torch.cat([assignment, negatives])
        if duplicates == "remap":
            positions = torch.arange(full, device=q.device)
            first = torch.full((unique_pos.numel(),), full, dtype=torch.long, device=q.device)
            first = first.scatter_reduce(0, inverse, positions, reduce="amin")
            labels = first[inverse]
        else:
            labels = torch.arange(full, device=q.device)
    labels = labels[row_offset:row_offset + batch]
    # Scale the (U + r, D) gathered prototypes by 1/phi rather than the (B, U + r) logits, and
    # gather with index_select (several times faster than advanced indexing on CPU).
    selected = torch.index_select(prototypes, 0, columns).to(q.dtype)
    phi = torch.index_select(concentration, 0, columns).to(q.dtype)
    logits = q @ (selected / phi[:, None]).T
    with torch.no_grad():
        if duplicates == "remap":
            # Copies of a prototype have equal logits up to the last bit, so judge the prototype
            # the arg-max column holds rather than the column index.
            accuracy = (columns[logits.argmax(dim=1)] == local).float().mean()
        else:
            accuracy = _accuracy(logits, labels)
    return F.cross_entropy(logits, labels), accuracy


def squared_distances(x: Tensor, y: Tensor) -> Tensor:
    """(N, D), (M, D) -> (N, M) squared Euclidean distances, clamped at 0."""
    d = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None, :] - 2.0 * (x @ y.T)
    return d.clamp_min(0.0)


def topk_prototype_loss(
    q: Tensor,
    prototypes: Tensor,
    k: int,
    lam: float,
    alpha: float,
    *,
    weighting: Weighting = "inverse_distance",
    push_reduction: PushReduction = "sum",
    softmax_temperature: float = 0.1,
    eps: float = 1e-6,
) -> Tensor:
    """The researcher's top-K prototype loss for levels with few clusters (pcl_tune/METHOD.md §4).

    ``L_i = sum_{k<=K} w_k ||q_i - mu_k||^2 + lam * sum_{k>K} max(0, alpha - ||q_i - mu_k||^2)``
    over the K prototypes nearest to q_i; the loss is the mean of L_i over the batch.

    Args:
        q: (B, D) query embeddings (L2-normalised in PCL, so distances lie in [0, 4]).
        prototypes: (M, D) centroids of one level.
        k: number of nearest prototypes pulled, 1 <= k <= M.
        lam: weight of the push term, >= 0.
        alpha: push margin on the squared distance, > 0 (in (0, 4] for unit vectors).
        weighting: pull weights of the K nearest, treated as constants for the gradient:
            ``"inverse_distance"`` w ~ 1 / (d + eps), ``"uniform"`` 1/K,
            ``"softmax"`` softmax(-d / softmax_temperature); all normalised to sum to 1.
        push_reduction: ``"sum"`` (the report) or ``"mean"`` over the M - K pushed prototypes.
        softmax_temperature: temperature of the ``"softmax"`` weighting.
        eps: keeps inverse-distance weights finite when q sits on a prototype.

    Returns:
        scalar loss.
    """
    _check_features("q", q)
    _check_features("prototypes", prototypes, q.shape[1])
    num_protos = prototypes.shape[0]
    if not 1 <= k <= num_protos:
        raise ValueError(f"k must be in [1, M={num_protos}], got {k}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if push_reduction not in PUSH_REDUCTIONS:
        raise ValueError(f"push_reduction must be one of {PUSH_REDUCTIONS}, got {push_reduction!r}")

    dist = squared_distances(q, prototypes.to(q.dtype))  # (B, M)
    near_d, near_idx = dist.topk(k, dim=1, largest=False)  # (B, K)
    with torch.no_grad():
        if weighting == "inverse_distance":
            w = 1.0 / (near_d + eps)
        elif weighting == "uniform":
            w = torch.ones_like(near_d)
        else:
            w = torch.softmax(-near_d / softmax_temperature, dim=1)
        w = w / w.sum(dim=1, keepdim=True)
    pull = (w * near_d).sum(dim=1)  # (B,)

    if num_protos == k or lam == 0:
        return pull.mean()
    hinge = (alpha - dist).clamp_min(0.0)
    hinge = hinge.scatter(1, near_idx, 0.0)  # the K pulled prototypes are not pushed
    push = hinge.sum(dim=1)
    if push_reduction == "mean":
        push = push / (num_protos - k)
    return (pull + lam * push).mean()


def topk_accuracy_proxy(q: Tensor, prototypes: Tensor, assignment: Tensor) -> Tensor:
    """Fraction of rows whose nearest prototype is their assigned one (acc_proto for top-K levels)."""
    nearest = (q @ prototypes.to(q.dtype).T).argmax(dim=1)
    return (nearest == assignment.long()).float().mean()


@dataclass(frozen=True)
class PrototypeLossConfig:
    """Which prototype loss each clustering level uses, and its settings.

    Attributes:
        kind: ``"proto_nce"`` for every level, ``"topk"`` for every level, or ``"topk_below"``:
            top-K for levels with fewer than ``topk_threshold`` clusters, ProtoNCE otherwise.
        topk_threshold: cluster-count threshold for ``"topk_below"`` (e.g. the batch size).
        num_negatives: r of ProtoNCE.
        duplicates: ProtoNCE duplicate handling (see :func:`proto_nce`).
        k, lam, alpha, weighting, push_reduction: top-K loss settings.
    """

    # Defaults are the run config's (pcl_tune.config.PCLConfig), the one place they are set.
    kind: ProtoLossKind = PCLConfig.proto_loss  # type: ignore[assignment]
    topk_threshold: int | None = None
    num_negatives: int = PCLConfig.num_negatives
    duplicates: DuplicateMode = PCLConfig.duplicates  # type: ignore[assignment]
    k: int = PCLConfig.k
    lam: float = PCLConfig.lam
    alpha: float = PCLConfig.alpha
    weighting: Weighting = PCLConfig.weighting  # type: ignore[assignment]
    push_reduction: PushReduction = PCLConfig.push_reduction  # type: ignore[assignment]

    @classmethod
    def from_config(cls, pcl: PCLConfig, *, batch_size: int) -> PrototypeLossConfig:
        """The loss settings of a run's ``pcl`` section (``topk_threshold`` defaults to the batch size)."""
        return cls(kind=pcl.proto_loss, topk_threshold=pcl.topk_threshold or batch_size,  # type: ignore[arg-type]
                   num_negatives=pcl.num_negatives, duplicates=pcl.duplicates,  # type: ignore[arg-type]
                   k=pcl.k, lam=pcl.lam, alpha=pcl.alpha, weighting=pcl.weighting,  # type: ignore[arg-type]
                   push_reduction=pcl.push_reduction)  # type: ignore[arg-type]

    def __post_init__(self) -> None:
        if self.kind not in PROTO_LOSS_KINDS:
            raise ValueError(f"kind must be one of {PROTO_LOSS_KINDS}, got {self.kind!r}")
        if self.kind == "topk_below" and (self.topk_threshold is None or self.topk_threshold < 1):
            raise ValueError("kind='topk_below' needs topk_threshold >= 1 (e.g. the batch size)")
        if self.duplicates not in DUPLICATE_MODES:
            raise ValueError(f"duplicates must be one of {DUPLICATE_MODES}, got {self.duplicates!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.push_reduction not in PUSH_REDUCTIONS:
            raise ValueError(f"push_reduction must be one of {PUSH_REDUCTIONS}, got {self.push_reduction!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    def level_kind(self, num_clusters: int) -> Literal["proto_nce", "topk"]:
        """The loss used for a level with ``num_clusters`` prototypes."""
        if self.kind == "topk_below":
            assert self.topk_threshold is not None
            return "topk" if num_clusters < self.topk_threshold else "proto_nce"
        return self.kind  # type: ignore[return-value]


@dataclass(frozen=True)
class LevelBatch:
    """One clustering level, restricted to the rows of a batch.

    Attributes:
        prototypes: (M, D) centroids.
        assignment: (B,) cluster id of each batch row.
        concentration: (M,) per-prototype temperature.
        batch_assignment: (B_g,) cluster ids of the whole step's batch when this process holds
            only rows ``row_offset``.. of it (DDP); None: the batch is all here.
        row_offset: where this process's rows start in ``batch_assignment``.
    """

    prototypes: Tensor
    assignment: Tensor
    concentration: Tensor
    batch_assignment: Tensor | None = None
    row_offset: int = 0


def pcl_loss(
    q: Tensor,
    k: Tensor,
    queue: Tensor,
    levels: Sequence[LevelBatch],
    *,
    temperature: float,
    config: PrototypeLossConfig,
    proto_weight: float = 1.0,
    generator: torch.Generator | None = None,
    instance: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The PCL objective: InfoNCE + proto_weight * mean over levels of the level's prototype loss.

    With no levels (warm-up) the loss is InfoNCE alone, as in the reference. ``instance`` (loss,
    accuracy) replaces the InfoNCE term (the multi-head one of :func:`amcl_info_nce`; ``k`` and
    ``queue`` are then unused and ``q`` is the embedding the prototype losses read).

    Returns:
        (loss, parts): the scalar to back-propagate and detached parts: ``loss``, ``loss_inst``,
        ``acc_inst``, and when levels are given ``loss_proto``, ``acc_proto`` (means over levels)
        and ``loss_proto_{i}``, ``acc_proto_{i}`` per level i.
    """
    loss_inst, acc_inst = instance if instance is not None else info_nce(q, k, queue, temperature)
    parts: dict[str, Tensor] = {"loss_inst": loss_inst.detach(), "acc_inst": acc_inst.detach()}
    total = loss_inst
    if levels:
        loss_proto, proto_parts = prototype_loss(q, levels, config=config, generator=generator)
        parts.update(proto_parts)
        total = total + proto_weight * loss_proto
    parts["loss"] = total.detach()
    return total, parts


def prototype_loss(
    q: Tensor,
    levels: Sequence[LevelBatch],
    *,
    config: PrototypeLossConfig,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The mean over clustering levels of each level's prototype loss (ProtoNCE or top-K, as
    ``config`` says for the level's count), and its detached parts: ``loss_proto``, ``acc_proto``
    (means over levels) and ``loss_proto_{i}``, ``acc_proto_{i}`` per level ``i``."""
    if not levels:
        raise ValueError("prototype_loss needs at least one clustering level")
    parts: dict[str, Tensor] = {}
    level_losses = []
    level_accs = []
    for i, level in enumerate(levels):
        num_clusters = level.prototypes.shape[0]
        if config.level_kind(num_clusters) == "topk":
            loss_i = topk_prototype_loss(
                q, level.prototypes, min(config.k, num_clusters), config.lam, config.alpha,
                weighting=config.weighting, push_reduction=config.push_reduction,
            )
            acc_i = topk_accuracy_proxy(q.detach(), level.prototypes, level.assignment)
        else:
            loss_i, acc_i = proto_nce(
                q, level.prototypes, level.assignment, level.concentration, config.num_negatives,
                duplicates=config.duplicates, generator=generator,
                batch_assignment=level.batch_assignment, row_offset=level.row_offset,
            )
        parts[f"loss_proto_{i}"] = loss_i.detach()
        parts[f"acc_proto_{i}"] = acc_i
        level_losses.append(loss_i)
        level_accs.append(acc_i)
    loss_proto = torch.stack(level_losses).mean()
    parts["loss_proto"] = loss_proto.detach()
    parts["acc_proto"] = torch.stack(level_accs).mean()
    return loss_proto, parts
