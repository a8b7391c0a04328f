"""Encoders, projection heads and the MoCo v2 wrapper (momentum key encoder + queue).

* Backbones: ``small_cnn`` (4 conv blocks; trains at ~500 img/s on 2 CPU cores at 32 px),
  ``resnet18`` / ``resnet50`` from torchvision, with ``small_stem`` (3x3 stride-1 conv, no
  max-pool) for images of 32-96 px.
* Heads: ``linear`` or ``mlp`` (2 layers, as MoCo v2) to ``low_dim``, L2-normalised.
* :class:`MoCo`: query encoder, momentum key encoder, a queue of ``queue_size`` keys. The queue
  size is independent of the batch size and of the number of negative prototypes (the reference
  PCL code ties them and requires ``r % batch == 0``; we do not).
* :class:`FeatureBank`: the key embeddings the training steps computed, one row per train image
  (``clustering.features: bank``), clustered instead of a pass over the train set.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .config import TrainConfig

BACKBONES: tuple[str, ...] = ("small_cnn", "resnet18", "resnet50")
HEADS: tuple[str, ...] = ("linear", "mlp", "amcl")
KEY_BN: tuple[str, ...] = ("own", "ema", "query")

log = logging.getLogger(__name__)


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks (widths w, 2w, 4w, 8w), three 2x2 max-pools, global average pool."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.out_dim = chans[-1]

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 8w)."""
        return self.features(x).mean(dim=(2, 3))


def build_backbone(name: str, *, width: int = 32, small_stem: bool = False) -> tuple[nn.Module, int]:
    """Backbone without classifier and its output dimension."""
    if name == "small_cnn":
        net = SmallCNN(width)
        return net, net.out_dim
    if name in ("resnet18", "resnet50"):
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        if small_stem:
            net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")


def build_head(kind: str, in_dim: int, low_dim: int, hidden_dim: int | None = None) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, low_dim)
    if kind == "mlp":
        hid = hidden_dim or in_dim
        return nn.Sequential(nn.Linear(in_dim, hid), nn.ReLU(inplace=True), nn.Linear(hid, low_dim))
    raise ValueError(f"unknown head {kind!r}; expected one of {HEADS[:2]}")


class MultiHead(nn.Module):
    """``heads`` projection heads of one kind on the same backbone features; ``forward`` returns
    their L2-normalised embeddings stacked heads first, (H, B, low_dim). Each head is initialised
    on its own (the default init of its layers), so the heads start as different projections."""

    def __init__(self, kind: str, in_dim: int, low_dim: int, heads: int) -> None:
        super().__init__()
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        self.heads = nn.ModuleList(build_head(kind, in_dim, low_dim) for _ in range(heads))

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([F.normalize(h(x), dim=1) for h in self.heads])


class PairTemperature(nn.Module):
    """A temperature for every (query, key) pair of every head, inside ``[lo, hi]``.

    For head ``h``, query ``q`` and key ``k`` (embeddings of that head, D dims)::

        z = w . (relu(A q) * relu(B k)) + a * (q . k) + c_h
        t = lo + (hi - lo) * sigmoid(z)

    ``A``, ``B`` (``rank`` x D), ``w``, ``a`` are shared by the heads, ``c_h`` is one bias per
    head. This is a two-layer network on the pair whose second layer reads the elementwise
    product of the two sides' first-layer features, so every query's features meet every key's
    in one (B, rank) x (rank, 1 + Q) product: O(B Q rank) per head. A network on the
    concatenated pair would cost O(B Q D hidden), the whole encoder's budget again at Q = 4096.
    The scaled sigmoid keeps ``t`` inside the range whatever ``z`` (at the ends in floating point,
    where the sigmoid saturates: ``t >= lo > 0``, so the logits stay finite).

    ``w`` and ``a`` start at zero and ``c_h`` at the logit of ``init``, so every pair starts at
    temperature ``init`` exactly: the loss starts as plain InfoNCE at that temperature. The inputs
    are detached: the network reads the embeddings, and the encoder learns only through the
    tempered logits, not by moving embeddings to steer the temperatures.
    """

    def __init__(self, dim: int, heads: int, *, lo: float, hi: float, init: float, rank: int = 16) -> None:
        super().__init__()
        if not 0.0 < lo < hi:
            raise ValueError(f"temperature range must satisfy 0 < lo < hi, got ({lo}, {hi})")
        if not lo < init < hi:
            raise ValueError(f"initial temperature {init} must lie strictly inside ({lo}, {hi})")
        self.lo, self.hi = float(lo), float(hi)
        self.query_proj = nn.Linear(dim, rank)
        self.key_proj = nn.Linear(dim, rank)
        self.weight = nn.Parameter(torch.zeros(rank))
        self.sim_weight = nn.Parameter(torch.zeros(()))
        frac = (init - lo) / (hi - lo)
        self.bias = nn.Parameter(torch.full((heads,), math.log(frac / (1.0 - frac))))

    def forward(self, q: Tensor, k: Tensor, queue: Tensor) -> Tensor:
        """(H, B, D) queries, (H, B, D) positive keys, (H, Q, D) queues -> (H, B, 1 + Q) temperatures,
        column 0 the positive pair."""
        q, k, queue = q.detach(), k.detach(), queue.detach().to(q.dtype)
        fq = F.relu(self.query_proj(q)) * self.weight  # (H, B, r)
        z_pos = (fq * F.relu(self.key_proj(k))).sum(-1, keepdim=True) + self.sim_weight * (q * k).sum(-1, keepdim=True)
        z_neg = fq @ F.relu(self.key_proj(queue)).transpose(1, 2) + self.sim_weight * (q @ queue.transpose(1, 2))
        z = torch.cat([z_pos, z_neg], dim=2) + self.bias.view(-1, 1, 1)
        return self.lo + (self.hi - self.lo) * torch.sigmoid(z)


class Encoder(nn.Module):
    """Backbone + projection head; ``forward`` returns L2-normalised embeddings (B, low_dim), or
    (H, B, low_dim) with ``head="amcl"`` (``num_heads`` MLP heads: :class:`MultiHead`)."""

    def __init__(self, backbone: str, head: str, low_dim: int, *, width: int = 32, small_stem: bool = False,
                 num_heads: int = 1) -> None:
        super().__init__()
        self.backbone, dim = build_backbone(backbone, width=width, small_stem=small_stem)
        self.multi_head = head == "amcl"
        self.head = MultiHead("mlp", dim, low_dim, num_heads) if self.multi_head else build_head(head, dim, low_dim)
        self.feature_dim = dim

    def project(self, f: Tensor) -> Tensor:
        """L2-normalised head embeddings of backbone features ``f``: (B, D), or (H, B, D)."""
        return self.head(f) if self.multi_head else F.normalize(self.head(f), dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.backbone(x))

    def features(self, x: Tensor) -> Tensor:
        """Backbone features (B, feature_dim), L2-normalised (used for kNN and probes)."""
        return F.normalize(self.backbone(x), dim=1)


class MoCo(nn.Module):
    """MoCo v2: query encoder, momentum key encoder and a queue of negative keys.

    Args:
        backbone, head, low_dim, width, small_stem: see :class:`Encoder`.
        queue_size: Q, number of keys kept as negatives.
        momentum: key-encoder EMA momentum m.
        key_bn: where the key encoder's batch-norm running statistics come from (the key encoder
            in eval mode embeds the images that are clustered and the kNN bank):

            * ``own``: its own forward passes on the key batches (BN's usual running average);
              :meth:`momentum_update` averages parameters only, as MoCo and PCL do.
            * ``ema``: also an EMA of the query encoder's statistics at ``momentum``.
            * ``query``: the query encoder's, copied every step (this project's first behaviour).
    """

    def __init__(self, backbone: str = "small_cnn", head: str = "mlp", low_dim: int = 128, *,
                 queue_size: int = 4096, momentum: float = 0.999, width: int = 32, small_stem: bool = False,
                 key_bn: str = "own", num_heads: int = 3, temperature_range: tuple[float, float] = (1e-5, 2.0),
                 temperature: float = 0.07) -> None:
        super().__init__()
        if key_bn not in KEY_BN:
            raise ValueError(f"key_bn must be one of {KEY_BN}, got {key_bn!r}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.encoder_q = Encoder(backbone, head, low_dim, width=width, small_stem=small_stem, num_heads=num_heads)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.momentum = momentum
        self.key_bn = key_bn
        self.multi_head = self.encoder_q.multi_head
        self.num_heads = num_heads if self.multi_head else 1
        shape = (num_heads, queue_size, low_dim) if self.multi_head else (queue_size, low_dim)
        self.register_buffer("queue", F.normalize(torch.randn(*shape), dim=-1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.temperature_net: PairTemperature | None = None
        if self.multi_head:
            lo, hi = temperature_range
            self.temperature_net = PairTemperature(low_dim, num_heads, lo=lo, hi=hi, init=temperature)

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> MoCo:
        """The model a run config describes (``model.*``; ``pcl.temperature`` starts the pair
        temperatures of ``model.head: amcl``)."""
        m = cfg.model
        return cls(m.backbone, m.head, m.low_dim, queue_size=m.queue_size, momentum=m.momentum, width=m.width,
                   small_stem=m.small_stem, key_bn=m.key_bn, num_heads=m.num_heads,
                   temperature_range=(m.temperature_range[0], m.temperature_range[1]), temperature=cfg.pcl.temperature)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """Key encoder <- EMA of the query encoder's parameters; its buffers as ``key_bn`` says."""
        m = self.momentum
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.mul_(m).add_(pq.detach(), alpha=1 - m)
        if self.key_bn == "own":
            return
        for bq, bk in zip(self.encoder_q.buffers(), self.encoder_k.buffers()):
            if self.key_bn == "ema" and bk.is_floating_point():
                bk.mul_(m).add_(bq, alpha=1 - m)
            else:  # "query", and integer buffers (num_batches_tracked) under "ema"
                bk.copy_(bq)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` (n, D) into the ring buffer, wrapping around; any n works. With several
        heads, keys are (H, n, D) and each head's go into its own queue at the same positions."""
        q = self.queue.shape[-2]
        n = keys.shape[-2]
        keys = keys.detach().to(self.queue.dtype)
        if n >= q:
            self.queue.copy_(keys[..., n - q:, :])
            self.queue_ptr.zero_()
            return
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % q
        self.queue[..., idx, :] = keys
        self.queue_ptr.copy_((self.queue_ptr + n) % q)

    @torch.no_grad()
    def keys(self, im_k: Tensor, *, bn_splits: int = 1, generator: torch.Generator | None = None) -> Tensor:
        """Key embeddings (B, D) from the momentum encoder ((H, B, D) with several heads).

        With ``bn_splits > 1`` (in training mode) the batch is shuffled and encoded in that many
        sub-batches, then un-shuffled: each key's batch-norm statistics come from a different set
        of images than its query's, which removes the intra-batch shortcut MoCo's shuffle-BN fixes.
        """
        b = im_k.shape[0]
        if bn_splits <= 1 or not self.encoder_k.training or b < 2 * bn_splits:
            return self.encoder_k(im_k)
        perm = torch.randperm(b, generator=generator).to(im_k.device)
        parts = [self.encoder_k(chunk) for chunk in im_k[perm].chunk(bn_splits)]
        joined = torch.cat(parts, dim=-2)
        k = torch.empty_like(joined)
        k[..., perm, :] = joined
        return k

    def proto_view(self, z: Tensor, proto_head: int | str) -> Tensor:
        """The embeddings clustering reads, one row per image: ``z`` (B, D) itself for one head;
        of multi-head ``z`` (H, B, D), head ``proto_head``'s (B, D), or with ``"all"`` every head's
        side by side (B, H * D), which :meth:`split_heads` takes apart."""
        if not self.multi_head:
            return z
        if proto_head == "all":
            return z.transpose(0, 1).reshape(z.shape[1], -1)
        return z[int(proto_head)]

    def split_heads(self, rows: Tensor) -> list[Tensor]:
        """(N, H * D) rows of :meth:`proto_view` with ``"all"`` -> each head's (N, D)."""
        return list(rows.view(rows.shape[0], self.num_heads, -1).unbind(1))

    def forward(self, im_q: Tensor, im_k: Tensor, *, bn_splits: int = 1,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Query embeddings (with grad) and key embeddings (momentum encoder, no grad); (B, D) each.

        Call :meth:`momentum_update` before and :meth:`enqueue` after computing the loss.
        """
        q = self.encoder_q(im_q)
        k = self.keys(im_k, bn_splits=bn_splits, generator=generator)
        return q, k


class FeatureBank:
    """A memory bank of the key (momentum) encoder's head embeddings, one row per train image.

    Each training step writes the keys it computed for its images at their dataset indices (as
    DeepCluster-v2 does), so after an epoch row ``i`` holds the key embedding of image ``i``'s
    latest augmented key view (the one the queue also received), computed by the key encoder as
    it was at that step, in training mode. Rows no step has written yet are flagged as not
    ``filled``. Not a module: it is run state, checkpointed beside the model (whose weights it
    does not belong to), never exported.

    Args:
        num_images: N, the train split's size.
        dim: the embedding dimension (``model.low_dim``).
        device: where the rows live (the training device: the steps write there).
    """

    def __init__(self, num_images: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.features = torch.zeros((num_images, dim), dtype=torch.float32, device=device)
        """(N, D) L2-normalised key embeddings; zero where not filled."""
        self.filled = torch.zeros(num_images, dtype=torch.bool, device=device)
        """(N,) whether row i has been written."""

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @torch.no_grad()
    def update(self, index: Tensor, keys: Tensor) -> None:
        """Write ``keys`` (n, D) at rows ``index`` (n,) and mark them filled (indices distinct)."""
        index = index.to(self.features.device)
        self.features[index] = keys.detach().to(self.features.device, torch.float32)
        self.filled[index] = True

    def missing(self) -> Tensor:
        """The rows not filled yet, ascending (a CPU long tensor)."""
        return torch.nonzero(~self.filled).flatten().cpu()

    def state_dict(self) -> dict[str, Tensor]:
        """The rows and their flags, on the CPU (plain tensors: loads with ``weights_only``)."""
        return {"features": self.features.cpu().clone(), "filled": self.filled.cpu().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> bool:
        """Restore :meth:`state_dict`'s output; returns whether it did.

        A bank of another shape (a checkpoint of a run on another train set, e.g. another
        ``data.subset``, continued with this config) has no row for some images: it is not loaded,
        a warning names both shapes, and the bank stays empty (the next clustering fills it with a
        pass).
        """
        feats, filled = state["features"], state["filled"]
        if tuple(feats.shape) != tuple(self.features.shape) or tuple(filled.shape) != tuple(self.filled.shape):
            log.warning("feature bank of shape %s does not fit this run's %s (train images x model.low_dim): not "
                        "loaded; the next clustering embeds the train set with one pass",
                        tuple(feats.shape), tuple(self.features.shape))
            return False
        self.features.copy_(feats)
        self.filled.copy_(filled)
        return True
