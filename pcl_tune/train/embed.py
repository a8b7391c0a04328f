"""Embedding a whole dataset with the frozen encoders (eval view), gathered by sample index.

One pass serves two consumers: the momentum encoder's head embeddings feed the next epoch's
clustering, and the judged encoder's backbone features feed the kNN bank. Under
``clustering.features: bank`` the clustering reads the training steps' keys instead
(:func:`bank_features`), and a pass embeds only the images no step has written yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed as dist_utils
from ..augment import eval_transform
from ..data import ImageDataset, iterate_batches
from .state import RunState


@torch.no_grad()
def embed(run: RunState, dataset: ImageDataset, *, head: bool, backbone: bool) -> tuple[Tensor | None, Tensor | None]:
    """Eval-view embeddings of a whole dataset, identical on every rank.

    Returns:
        (head embeddings of the key encoder (N, low_dim; ``pcl.proto_head``'s with several
        heads), or None unless ``head``;
        backbone features of the judged encoder (``eval.encoder``) (N, F), or None unless
        ``backbone``), both L2-normalised, row i for sample i.
    """
    cfg, model = run.cfg, run.model
    key_enc = model.encoder_k
    judged = key_enc if cfg.eval.encoder == "key" else model.encoder_q
    was_training = model.training
    model.eval()
    n = len(dataset)
    idx = dist_utils.shard(torch.arange(n), pad=True)
    heads, feats = [], []
    for _, images, _ in iterate_batches(dataset, idx, cfg.eval.batch_size, num_workers=cfg.data.num_workers):
        x = eval_transform(images.to(run.device, non_blocking=True), run.data.image_size, run.data.mean,
                           run.data.std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.amp):
            if judged is key_enc:  # one backbone pass serves both outputs
                f = key_enc.backbone(x)
                if head:
                    heads.append(model.proto_view(key_enc.project(f), cfg.pcl.proto_head).float())
                if backbone:
                    feats.append(F.normalize(f.float(), dim=1))
            else:
                if head:
                    heads.append(model.proto_view(key_enc(x), cfg.pcl.proto_head).float())
                if backbone:
                    feats.append(judged.features(x).float())
    model.train(was_training)
    idx = idx.to(run.device)
    h = dist_utils.gather_by_index(torch.cat(heads), idx, n) if head else None
    b = dist_utils.gather_by_index(torch.cat(feats), idx, n) if backbone else None
    return h, b


@torch.no_grad()
def bank_features(run: RunState) -> Tensor:
    """The clustering input under ``clustering.features: bank``: a copy of ``run.bank``'s (N, D)
    rows, row i for train image i, identical on every rank (METHOD.md §2).

    Rows no training step has written (the bank of a run whose warm-up has not shown it every
    image: ``pcl.warmup_epochs`` 0, or an image dropped with the last partial batch of every epoch
    so far, or a bank missing from the checkpoint resumed) are first filled by the key encoder's
    eval-view embeddings of just those images (:func:`embed` of that subset, as ``pass`` computes
    them), and stay filled: a later step that trains on the image overwrites its row.
    """
    bank = run.bank
    assert bank is not None, "clustering.features is not 'bank'"
    missing = bank.missing()  # the same on every rank (equal banks): embed's collectives line up
    if missing.numel():
        heads, _ = embed(run, run.data.train.subset(missing), head=True, backbone=False)
        assert heads is not None
        bank.update(missing, heads)
    return bank.features.clone()
