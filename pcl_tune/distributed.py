"""The few collective operations the epoch loop needs; each is a no-op in a single process.

The loop runs unchanged in a plain process, in a Ray Tune trial and in Ray Train DDP workers:
these helpers are the only place that knows about ``torch.distributed``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def shard(indices: Tensor, *, pad: bool, dim: int = 0) -> Tensor:
    """This rank's share of ``indices`` along ``dim`` (strided). With ``pad`` every rank gets the
    same count, repeating leading indices, as DistributedSampler does (needed where collectives
    follow; 1-D only)."""
    ws, r = world_size(), rank()
    if ws == 1:
        return indices
    if pad:
        n = indices.numel()
        per = -(-n // ws)
        total = per * ws
        if total > n:
            indices = torch.cat([indices, indices[: total - n]])
    return indices[(slice(None),) * dim + (slice(r, None, ws),)]


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0 (rank order)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_by_index(local: Tensor, local_index: Tensor, total: int) -> Tensor:
    """Assemble per-sample rows computed on different ranks into one (total, ...) tensor.

    Rows are placed by sample index, so samples that a padded shard computed twice are written
    once (same values), never double-counted. Every rank receives the full tensor.

    Args:
        local: (n, ...) rows this rank computed (n equal on every rank: shard with ``pad=True``).
        local_index: (n,) their sample indices.
        total: number of samples N.
    """
    feats = all_gather_cat(local)
    index = all_gather_cat(local_index.to(local.device))
    out = torch.zeros((total,) + tuple(local.shape[1:]), dtype=local.dtype, device=local.device)
    out[index] = feats
    return out


def broadcast_tensor(x: Tensor | None, *, src: int = 0, device: torch.device | None = None) -> Tensor:
    """Send a tensor of any shape/dtype from ``src`` to every rank (others may pass None)."""
    if not is_distributed():
        assert x is not None
        return x
    dev = device if device is not None else (x.device if x is not None else torch.device("cpu"))
    dtypes = [torch.float32, torch.int64, torch.float64, torch.int32, torch.bool, torch.float16, torch.bfloat16,
              torch.uint8, torch.int8, torch.int16]
    if rank() == src:
        assert x is not None
        header = torch.tensor([dtypes.index(x.dtype), x.ndim, *x.shape], dtype=torch.long, device=dev)
        size = torch.tensor([header.numel()], dtype=torch.long, device=dev)
    else:
        size = torch.zeros(1, dtype=torch.long, device=dev)
    dist.broadcast(size, src)
    if rank() != src:
        header = torch.zeros(int(size), dtype=torch.long, device=dev)
    dist.broadcast(header, src)
    dtype = dtypes[int(header[0])]
    shape = [int(v) for v in header[2:]]
    buf = x.to(dev).contiguous() if rank() == src and x is not None else torch.empty(shape, dtype=dtype, device=dev)
    dist.broadcast(buf, src)
    return buf


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def first_bad_rank(ok: bool, device: torch.device) -> int | None:
    """Every rank's verdict on a local check, agreed: the lowest rank whose ``ok`` is False, or
    None when all are fine. One small all-reduce; a single process just returns its own answer.

    A rank that stops on its own (a non-finite loss) while the others go on into DDP's gradient
    all-reduce leaves them waiting until the process-group timeout; deciding together lets every
    rank stop at the same step with the same message.
    """
    if not is_distributed():
        return None if ok else 0
    flag = torch.tensor([float(world_size()) if ok else float(rank())], dtype=torch.float64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    bad = int(flag.item())
    return None if bad >= world_size() else bad


def broadcast_buffers(module: torch.nn.Module, *, src: int = 0) -> None:
    """Copy every buffer (batch-norm statistics, the MoCo queue) of ``module`` from ``src``."""
    if not is_distributed():
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src)


def average_gradients(module: torch.nn.Module) -> None:
    """Average the gradients of ``module``'s parameters over ranks (a module DDP does not wrap)."""
    if not is_distributed():
        return
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world_size()
