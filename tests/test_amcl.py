"""The multi-head, pair-tempered InfoNCE of adaptive multi-head contrastive learning
(:func:`pcl_tune.losses.amcl_info_nce`) against a slow reference written one pair at a time, its
reduction to :func:`pcl_tune.losses.info_nce`, and the temperature penalty on a toy problem."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pcl_tune.losses import amcl_info_nce, info_nce, temperature_penalty

F64 = torch.float64


def _unit(*shape: int, seed: int, dtype: torch.dtype = F64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1).to(dtype)


def _temps(h: int, b: int, n: int, seed: int, lo: float = 0.05, hi: float = 0.5) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(h, b, n, generator=g, dtype=F64)


def ref_amcl(q: Tensor, k: Tensor, queue: Tensor, temperature: Tensor, beta: float,
             prior: float) -> tuple[float, float]:
    """One head, one row, one pair at a time, in Python floats."""
    total, acc = 0.0, 0.0
    heads, batch, _ = q.shape
    for h in range(heads):
        head_loss, head_correct, penalty, count = 0.0, 0, 0.0, 0
        for b in range(batch):
            sims = [float(q[h, b] @ k[h, b])] + [float(q[h, b] @ queue[h, j]) for j in range(queue.shape[1])]
            logits = [s / float(temperature[h, b, j]) for j, s in enumerate(sims)]
            m = max(logits)
            head_loss += m + math.log(sum(math.exp(x - m) for x in logits)) - logits[0]
            head_correct += int(logits.index(max(logits)) == 0)
            for t in temperature[h, b].tolist():
                penalty += math.log(t / prior) + prior / t - 1.0
                count += 1
        total += head_loss / batch + beta * penalty / count
        acc += head_correct / batch
    return total, acc / heads


@pytest.mark.parametrize(("heads", "beta"), [(1, 0.0), (3, 0.0), (3, 0.1), (2, 1.5)])
def test_amcl_info_nce_matches_the_reference(heads: int, beta: float) -> None:
    b, d, qlen = 6, 8, 11
    q, k, queue = _unit(heads, b, d, seed=1), _unit(heads, b, d, seed=2), _unit(heads, qlen, d, seed=3)
    k[:, :3] = F.normalize(q[:, :3] + 0.1 * k[:, :3], dim=-1)  # some positives clearly the best
    t = _temps(heads, b, 1 + qlen, seed=4)
    loss, acc = amcl_info_nce(q, k, queue, t, beta=beta, prior=0.1)
    ref_loss, ref_acc = ref_amcl(q, k, queue, t, beta, 0.1)
    assert loss.shape == () and acc.shape == ()
    assert loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-9)
    assert acc.item() == pytest.approx(ref_acc, abs=1e-6)
    assert 0.0 < ref_acc < 1.0 or heads == 1


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_one_head_a_constant_temperature_and_no_penalty_is_info_nce_bit_for_bit(dtype: torch.dtype) -> None:
    b, d, qlen, t = 9, 16, 33, 0.07
    q, k, queue = _unit(1, b, d, seed=5, dtype=dtype), _unit(1, b, d, seed=6, dtype=dtype), \
        _unit(1, qlen, d, seed=7, dtype=dtype)
    temps = torch.full((1, b, 1 + qlen), t, dtype=dtype)
    loss, acc = amcl_info_nce(q, k, queue, temps, beta=0.0)
    ref_loss, ref_acc = info_nce(q[0], k[0], queue[0], t)
    assert torch.equal(loss, ref_loss) and torch.equal(acc, ref_acc)
    # a constant temperature at the prior: the penalty is 0 whatever its weight
    at_prior, _ = amcl_info_nce(q, k, queue, temps, beta=5.0, prior=t)
    assert at_prior.item() == pytest.approx(ref_loss.item(), rel=1e-6)


def test_gradients_reach_the_embeddings_and_the_temperatures() -> None:
    q = _unit(2, 4, 8, seed=8, dtype=torch.float32).requires_grad_(True)
    k, queue = _unit(2, 4, 8, seed=9, dtype=torch.float32), _unit(2, 10, 8, seed=10, dtype=torch.float32)
    raw = torch.zeros(2, 4, 11, requires_grad=True)
    t = 0.01 + 1.99 * torch.sigmoid(raw)
    loss, _ = amcl_info_nce(q, k, queue, t, beta=0.1)
    loss.backward()
    assert q.grad is not None and raw.grad is not None
    assert q.grad.abs().sum() > 0 and raw.grad.abs().sum() > 0 and torch.isfinite(raw.grad).all()


def test_the_penalty_is_zero_at_the_prior_and_grows_on_both_sides() -> None:
    prior = 0.2
    at = temperature_penalty(torch.tensor([prior]), prior)
    assert at.item() == pytest.approx(0.0, abs=1e-7)
    values = [temperature_penalty(torch.tensor([x], dtype=F64), prior).item() for x in (1e-4, 0.02, 0.1, 0.4, 2.0, 50.0)]
    assert values[0] > values[1] > values[2] > 0 and 0 < values[3] < values[4] < values[5]
    assert values[0] > 1000  # like prior / t near 0


def test_the_penalty_keeps_learned_temperatures_off_the_bounds() -> None:
    """A toy problem: fixed embeddings, only the temperatures learn (one free logit per pair,
    through the bounded sigmoid). Without the penalty the positive pairs' temperatures run to the
    lower bound (a sharper positive always lowers the loss when it is the most similar key); with
    it they settle inside the range."""
    lo, hi = 1e-3, 2.0
    heads, b, d, qlen = 2, 8, 16, 32
    q = _unit(heads, b, d, seed=11, dtype=torch.float32)
    k = F.normalize(q + 0.3 * _unit(heads, b, d, seed=12, dtype=torch.float32), dim=-1)
    queue = _unit(heads, qlen, d, seed=13, dtype=torch.float32)

    def train(beta: float) -> Tensor:
        raw = torch.zeros(heads, b, 1 + qlen, requires_grad=True)
        opt = torch.optim.Adam([raw], lr=1.0)
        for _ in range(300):
            t = lo + (hi - lo) * torch.sigmoid(raw)
            loss, _ = amcl_info_nce(q, k, queue, t, beta=beta, prior=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (lo + (hi - lo) * torch.sigmoid(raw)).detach()

    free, penalised = train(0.0), train(1.0)
    assert free[..., 0].max() < 2 * lo  # every positive temperature at the lower bound
    assert free[..., 1:].max() > 0.99 * hi  # and some negatives' at the upper one
    assert penalised[..., 0].min() > 10 * lo and penalised.max() < 0.5 * hi  # measured: 0.069-0.118


@pytest.mark.parametrize(("change", "message"), [
    (lambda q, k, u, t: (q[0], k, u, t), "q must be a 3-d floating-point tensor"),
    (lambda q, k, u, t: (q, k[:, :2], u, t), "k must have the shape of q"),
    (lambda q, k, u, t: (q, k, u[:1], t), r"queue must have shape \(2, Q, 8\)"),
    (lambda q, k, u, t: (q, k, u, t[..., :3]), r"temperature must have shape \(2, 4, 11\)"),
    (lambda q, k, u, t: (q, k, u, -t), "every temperature must be > 0"),
])
def test_wrong_inputs_get_one_line_naming_the_argument(change: object, message: str) -> None:
    q, k, u = _unit(2, 4, 8, seed=1), _unit(2, 4, 8, seed=2), _unit(2, 10, 8, seed=3)
    t = _temps(2, 4, 11, seed=4)
    with pytest.raises(ValueError, match=message):
        amcl_info_nce(*change(q, k, u, t), beta=0.1)  # type: ignore[operator]
    with pytest.raises(ValueError, match="beta must be >= 0"):
        amcl_info_nce(q, k, u, t, beta=-1.0)


# --------------------------------------------------------------------------- the modules

def test_multi_head_gives_unit_embeddings_per_head_and_the_heads_differ() -> None:
    from pcl_tune.model import MultiHead

    torch.manual_seed(0)
    head = MultiHead("mlp", 12, 6, heads=3)
    out = head(torch.randn(5, 12))
    assert out.shape == (3, 5, 6)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3, 5), atol=1e-6)
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="heads must be >= 1"):
        MultiHead("mlp", 12, 6, heads=0)


def test_pair_temperature_starts_at_init_stays_in_range_and_learns() -> None:
    from pcl_tune.model import PairTemperature

    torch.manual_seed(0)
    lo, hi, init = 1e-5, 2.0, 0.07
    net = PairTemperature(8, 2, lo=lo, hi=hi, init=init, rank=4)
    q, k, queue = _unit(2, 5, 8, seed=1, dtype=torch.float32), _unit(2, 5, 8, seed=2, dtype=torch.float32), \
        _unit(2, 9, 8, seed=3, dtype=torch.float32)
    t = net(q, k, queue)
    assert t.shape == (2, 5, 10)
    assert torch.allclose(t, torch.full_like(t, init), rtol=1e-5)  # plain InfoNCE at the start
    with torch.no_grad():  # extreme parameters: still inside the range (the sigmoid saturates at its ends)
        net.weight.fill_(1e3)
        net.sim_weight.fill_(-1e3)
    t = net(q, k, queue)
    assert (t >= lo).all() and (t <= hi).all() and t.min() < 0.01 and t.max() > 1.0
    net = PairTemperature(8, 2, lo=lo, hi=hi, init=init, rank=4)
    q.requires_grad_(True)
    loss, _ = amcl_info_nce(q, k, queue, net(q, k, queue), beta=0.1)
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["weight"].abs().sum() > 0 and grads["bias"].abs().sum() > 0 and grads["sim_weight"].abs() > 0
    for bad in ((0.0, 1.0, 0.5), (0.5, 0.2, 0.3), (0.1, 1.0, 2.0)):
        with pytest.raises(ValueError, match="temperature"):
            PairTemperature(8, 2, lo=bad[0], hi=bad[1], init=bad[2])
