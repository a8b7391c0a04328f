"""Tests of pcl_tune.losses against slow, loop-based reference implementations.

Every reference below works row by row with Python floats / numpy (no use of the vectorised code),
so a disagreement points at the vectorised implementation (or at the reference, which is short
enough to check by eye against pcl_tune/METHOD.md §3-4 and the PCL paper).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from pcl_tune.losses import (
    DUPLICATE_MODES,
    PUSH_REDUCTIONS,
    WEIGHTINGS,
    LevelBatch,
    PrototypeLossConfig,
    info_nce,
    pcl_loss,
    proto_nce,
    sample_negative_prototypes,
    topk_accuracy_proxy,
    topk_prototype_loss,
)

TOL = 1e-5
ACC_TOL = 1e-6  # accuracies are float32 fractions
F64 = torch.float64


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """The tensors here are tiny: one thread is fastest, and spare OpenMP threads that spin on a busy
    2-core machine slow every op down by orders of magnitude. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)




def _unit(n: int, d: int, gen: torch.Generator, dtype: torch.dtype = F64) -> Tensor:
    """(n, d) random rows of unit norm."""
    return F.normalize(torch.randn(n, d, generator=gen, dtype=F64), dim=1).to(dtype)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    return float(sum(float(x) * float(y) for x, y in zip(a, b)))


def _sqdist(a: np.ndarray, b: np.ndarray) -> float:
    return float(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _first_argmax(values: list[float]) -> int:
    """Index of the first largest value (torch.argmax's tie rule)."""
    best = 0
    for j, v in enumerate(values):
        if v > values[best]:
            best = j
    return best


def _np(x: Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


# --------------------------------------------------------------------------- references


def ref_info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> tuple[float, float]:
    """MoCo InfoNCE, one row at a time: positive key in column 0, the queue after it."""
    qn, kn, un = _np(q), _np(k), _np(queue)
    total, correct = 0.0, 0
    for i in range(qn.shape[0]):
        logits = [_dot(qn[i], kn[i]) / temperature]
        logits += [_dot(qn[i], un[j]) / temperature for j in range(un.shape[0])]
        total += _logsumexp(logits) - logits[0]
        correct += _first_argmax(logits) == 0
    return total / qn.shape[0], correct / qn.shape[0]


def ref_complement(num_prototypes: int, assignment: list[int]) -> list[int]:
    """Every prototype id that is no positive of the batch."""
    pos = set(assignment)
    return [j for j in range(num_prototypes) if j not in pos]


def ref_proto_nce(
    q: Tensor,
    prototypes: Tensor,
    assignment: list[int],
    concentration: Tensor,
    negatives: list[int],
    duplicates: str,
) -> tuple[float, float]:
    """ProtoNCE for one level, row by row, with the given negative prototype ids.

    dedupe: columns = sorted unique positives + negatives, label = column of the row's prototype.
    remap:  columns = one per row (repeats kept) + negatives, label = first column of its prototype.
    none:   columns = one per row + negatives, label = the row's own column.
    """
    qn, pn, phi = _np(q), _np(prototypes), _np(concentration)
    b = len(assignment)
    if duplicates == "dedupe":
        uniq = sorted(set(assignment))
        columns = uniq + list(negatives)
        labels = [uniq.index(a) for a in assignment]
    elif duplicates == "remap":
        columns = list(assignment) + list(negatives)
        labels = [assignment.index(a) for a in assignment]  # list.index = first occurrence
    elif duplicates == "none":
        columns = list(assignment) + list(negatives)
        labels = list(range(b))
    else:
        raise AssertionError(duplicates)
    total, correct = 0.0, 0
    for i in range(b):
        logits = [_dot(qn[i], pn[c]) / float(phi[c]) for c in columns]
        total += _logsumexp(logits) - logits[labels[i]]
        correct += _first_argmax(logits) == labels[i]
    return total / b, correct / b


def _ref_weights(near_d: list[float], weighting: str, softmax_temperature: float, eps: float) -> list[float]:
    if weighting == "inverse_distance":
        raw = [1.0 / (d + eps) for d in near_d]
    elif weighting == "uniform":
        raw = [1.0 for _ in near_d]
    elif weighting == "softmax":
        m = max(-d / softmax_temperature for d in near_d)
        raw = [math.exp(-d / softmax_temperature - m) for d in near_d]
    else:
        raise AssertionError(weighting)
    s = sum(raw)
    return [r / s for r in raw]


def ref_topk(
    q: Tensor,
    prototypes: Tensor,
    k: int,
    lam: float,
    alpha: float,
    weighting: str = "inverse_distance",
    push_reduction: str = "sum",
    softmax_temperature: float = 0.1,
    eps: float = 1e-6,
) -> float:
    """pcl_tune/METHOD.md §4: pull toward the K nearest prototypes, push the others beyond alpha."""
    qn, pn = _np(q), _np(prototypes)
    b, m = qn.shape[0], pn.shape[0]
    total = 0.0
    for i in range(b):
        d = [_sqdist(qn[i], pn[j]) for j in range(m)]
        order = sorted(range(m), key=lambda j: d[j])
        near, far = order[:k], order[k:]
        w = _ref_weights([d[j] for j in near], weighting, softmax_temperature, eps)
        pull = sum(wk * d[j] for wk, j in zip(w, near))
        push = sum(max(0.0, alpha - d[j]) for j in far)
        if push_reduction == "mean" and far:
            push /= len(far)
        total += pull + lam * push
    return total / b


def ref_topk_torch(
    q: Tensor,
    prototypes: Tensor,
    k: int,
    lam: float,
    alpha: float,
    weighting: str,
    push_reduction: str,
    *,
    detach_weights: bool = True,
    softmax_temperature: float = 0.1,
    eps: float = 1e-6,
) -> Tensor:
    """The same loss built from scalar torch ops, row by row, for gradient checks.

    With ``detach_weights`` the pull weights are Python floats (constants for autograd), else they
    are built from the distances and so carry gradient.
    """
    b, m = q.shape[0], prototypes.shape[0]
    total = q.new_zeros(())
    for i in range(b):
        d = [((q[i] - prototypes[j]) ** 2).sum() for j in range(m)]
        order = sorted(range(m), key=lambda j: float(d[j].detach()))
        near, far = order[:k], order[k:]
        if detach_weights:
            w: list[Tensor | float] = list(
                _ref_weights([float(d[j].detach()) for j in near], weighting, softmax_temperature, eps)
            )
        else:
            if weighting == "inverse_distance":
                raw = [1.0 / (d[j] + eps) for j in near]
            elif weighting == "softmax":
                raw = [torch.exp(-d[j] / softmax_temperature) for j in near]
            else:
                raw = [d[j] * 0 + 1.0 for j in near]
            s = sum(raw)
            w = [r / s for r in raw]
        pull = q.new_zeros(())
        for wk, j in zip(w, near):
            pull = pull + wk * d[j]
        push = q.new_zeros(())
        for j in far:
            push = push + torch.clamp(alpha - d[j], min=0.0)
        if push_reduction == "mean" and far:
            push = push / len(far)
        total = total + pull + lam * push
    return total / b


def ref_topk_accuracy(q: Tensor, prototypes: Tensor, assignment: list[int]) -> float:
    qn, pn = _np(q), _np(prototypes)
    hits = 0
    for i in range(qn.shape[0]):
        sims = [_dot(qn[i], pn[j]) for j in range(pn.shape[0])]
        hits += _first_argmax(sims) == assignment[i]
    return hits / qn.shape[0]


def _dyadic(n: int, d: int, gen: torch.Generator) -> Tensor:
    """(n, d) float64 entries in {-1, -3/4, ..., 1}: every dot product is exact whatever the summation
    order, so a prototype repeated in several columns gets bit-identical logits (exact ties)."""
    return torch.randint(-4, 5, (n, d), generator=gen).to(F64) / 4


def _dyadic_level(m: int, b: int, d: int, gen: torch.Generator) -> LevelBatch:
    """Level with dyadic prototypes and phi in {1/8, 1/4, 1/2} (exactly representable)."""
    phi = torch.tensor([0.125, 0.25, 0.5], dtype=F64)[torch.randint(3, (m,), generator=gen)]
    return LevelBatch(prototypes=_dyadic(m, d, gen), assignment=torch.randint(m, (b,), generator=gen),
                      concentration=phi)


def _has_repeats(assignment: Tensor) -> bool:
    return len(set(assignment.tolist())) < assignment.numel()


def _level(m: int, b: int, d: int, gen: torch.Generator, *, distinct: bool = False) -> LevelBatch:
    """Random level: unit prototypes, random assignment (distinct ids if asked), positive phi."""
    protos = _unit(m, d, gen)
    if distinct:
        assignment = torch.randperm(m, generator=gen)[:b]
    else:
        assignment = torch.randint(m, (b,), generator=gen)
    phi = 0.05 + 0.2 * torch.rand(m, generator=gen, dtype=F64)
    return LevelBatch(prototypes=protos, assignment=assignment, concentration=phi)


# --------------------------------------------------------------------------- info_nce


@pytest.mark.parametrize("seed", range(4))
def test_info_nce_matches_reference(seed: int) -> None:
    g = _gen(seed)
    b, d, qlen = 7, 12, 20
    q, k, queue = _unit(b, d, g), _unit(b, d, g), _unit(qlen, d, g)
    # make some positives clearly the best so the accuracy is neither 0 nor trivially 1
    k[: b // 2] = F.normalize(q[: b // 2] + 0.1 * k[: b // 2], dim=1)
    temperature = 0.07 + 0.1 * seed
    loss, acc = info_nce(q, k, queue, temperature)
    ref_loss, ref_acc = ref_info_nce(q, k, queue, temperature)
    assert loss.shape == () and acc.shape == ()
    assert loss.item() == pytest.approx(ref_loss, abs=TOL, rel=TOL)
    assert acc.item() == pytest.approx(ref_acc, abs=ACC_TOL)
    assert ref_acc >= 3 / 7  # the rows with a nudged key are found


def test_info_nce_float32_matches_reference() -> None:
    g = _gen(11)
    q, k, queue = _unit(5, 8, g, torch.float32), _unit(5, 8, g, torch.float32), _unit(9, 8, g, torch.float32)
    loss, acc = info_nce(q, k, queue, 0.2)
    ref_loss, ref_acc = ref_info_nce(q, k, queue, 0.2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss, abs=1e-5, rel=1e-5)
    assert acc.item() == pytest.approx(ref_acc)


def test_info_nce_perfect_positive_gives_full_accuracy() -> None:
    g = _gen(3)
    q = _unit(6, 10, g)
    queue = -q.repeat(2, 1)  # every negative is the antipode of some query: clearly worse
    loss, acc = info_nce(q, q.clone(), queue, 0.1)
    assert acc.item() == 1.0
    assert loss.item() == pytest.approx(ref_info_nce(q, q, queue, 0.1)[0], abs=TOL)


def test_info_nce_gradient_finite() -> None:
    g = _gen(4)
    q = _unit(6, 8, g, torch.float32).requires_grad_(True)
    k, queue = _unit(6, 8, g, torch.float32), _unit(16, 8, g, torch.float32)
    loss, _ = info_nce(q, k, queue, 0.05)
    loss.backward()
    assert q.grad is not None
    assert torch.isfinite(q.grad).all()
    assert q.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "make",
    [
        lambda q, k, u: (q[0], k, u),  # q not 2-D
        lambda q, k, u: (q, k[:, :-1], u),  # k dim mismatch
        lambda q, k, u: (q, k, u[:, :-1]),  # queue dim mismatch
        lambda q, k, u: (q, k[:-1], u),  # batch mismatch
        lambda q, k, u: (q.long(), k, u),  # integer q
    ],
)
def test_info_nce_rejects_bad_shapes(make: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]) -> None:
    g = _gen(0)
    args = make(_unit(4, 6, g), _unit(4, 6, g), _unit(5, 6, g))
    with pytest.raises(ValueError):
        info_nce(*args, temperature=0.1)


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_info_nce_rejects_bad_temperature(temperature: float) -> None:
    g = _gen(0)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(_unit(4, 6, g), _unit(4, 6, g), _unit(5, 6, g), temperature)


def test_info_nce_rejects_non_tensor() -> None:
    g = _gen(0)
    with pytest.raises(TypeError):
        info_nce(_unit(4, 6, g).numpy(), _unit(4, 6, g), _unit(5, 6, g), 0.1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- negative sampling


@pytest.mark.parametrize("seed", range(5))
def test_sample_negatives_are_distinct_non_positive_and_reproducible(seed: int) -> None:
    g = _gen(100 + seed)
    m = 30
    positives = torch.randint(m, (12,), generator=g)  # repeats likely
    num_unique = len(set(positives.tolist()))
    for r in (0, 1, 5, m - num_unique, m - num_unique + 7, 10_000):
        neg = sample_negative_prototypes(m, positives, r, generator=_gen(seed))
        ids = neg.tolist()
        assert neg.dtype == torch.long
        assert len(ids) == min(r, m - num_unique)
        assert len(set(ids)) == len(ids), "negatives must be distinct"
        assert not set(ids) & set(positives.tolist()), "a positive was drawn as negative"
        assert all(0 <= j < m for j in ids)
        again = sample_negative_prototypes(m, positives, r, generator=_gen(seed))
        assert torch.equal(neg, again), "same generator seed must give the same draw"
        if r >= m - num_unique:
            assert sorted(ids) == ref_complement(m, positives.tolist())


def test_sample_negatives_depend_on_seed() -> None:
    positives = torch.tensor([0, 1, 1])
    draws = {tuple(sample_negative_prototypes(50, positives, 5, generator=_gen(s)).tolist()) for s in range(8)}
    assert len(draws) > 1


def test_sample_negatives_clamped_when_nothing_left() -> None:
    positives = torch.tensor([2, 0, 1, 2])
    neg = sample_negative_prototypes(3, positives, 16000, generator=_gen(0))
    assert neg.numel() == 0
    neg = sample_negative_prototypes(4, positives, 16000, generator=_gen(0))
    assert neg.tolist() == [3]


def test_sample_negatives_rejects_negative_count() -> None:
    with pytest.raises(ValueError, match="num_negatives"):
        sample_negative_prototypes(5, torch.tensor([0]), -1)


# --------------------------------------------------------------------------- proto_nce


@pytest.mark.parametrize("duplicates", DUPLICATE_MODES)
@pytest.mark.parametrize(
    ("m", "b", "distinct"),
    [(40, 8, True), (40, 12, False), (5, 12, False), (3, 9, False), (8, 8, True)],
    ids=["no-dup", "dup", "M<B", "M<<B", "M=B-perm"],
)
def test_proto_nce_matches_reference_all_negatives(duplicates: str, m: int, b: int, distinct: bool) -> None:
    """Every negative used: the loss is invariant to the column order, so compare to the complement."""
    for trial in range(3):
        g = _gen(1000 * m + 10 * b + trial)
        lvl = _level(m, b, 10, g, distinct=distinct)
        q = F.normalize(lvl.prototypes[lvl.assignment] + 0.6 * torch.randn(b, 10, generator=g, dtype=F64), dim=1)
        a = lvl.assignment.tolist()
        loss, acc = proto_nce(q, lvl.prototypes, lvl.assignment, lvl.concentration, 10 * m,
                              duplicates=duplicates, generator=_gen(trial))  # type: ignore[arg-type]
        ref_loss, ref_acc = ref_proto_nce(q, lvl.prototypes, a, lvl.concentration, ref_complement(m, a), duplicates)
        assert loss.item() == pytest.approx(ref_loss, abs=TOL, rel=TOL)
        if duplicates == "dedupe" or not _has_repeats(lvl.assignment):
            # (with repeats, "remap"/"none" have equal columns whose logits may differ in the last bit;
            # their accuracy is checked with exact arithmetic in the test below)
            assert acc.item() == pytest.approx(ref_acc, abs=ACC_TOL)


@pytest.mark.parametrize("duplicates", DUPLICATE_MODES)
@pytest.mark.parametrize(("m", "b", "r"), [(3, 12, 100), (5, 12, 1), (6, 8, 2), (20, 16, 3), (30, 6, 100)])
def test_proto_nce_matches_reference_exact_ties(duplicates: str, m: int, b: int, r: int) -> None:
    """Dyadic inputs, so repeated prototypes tie exactly: loss and accuracy of every mode, M < B too."""
    for trial in range(4):
        g = _gen(9000 + 100 * m + b + 7 * trial)
        lvl = _dyadic_level(m, b, 6, g)
        q = _dyadic(b, 6, g)
        neg = sample_negative_prototypes(m, torch.unique(lvl.assignment), r, generator=_gen(trial)).tolist()
        loss, acc = proto_nce(q, lvl.prototypes, lvl.assignment, lvl.concentration, r,
                              duplicates=duplicates, generator=_gen(trial))  # type: ignore[arg-type]
        ref_loss, ref_acc = ref_proto_nce(q, lvl.prototypes, lvl.assignment.tolist(), lvl.concentration, neg,
                                          duplicates)
        assert loss.item() == pytest.approx(ref_loss, abs=TOL, rel=TOL)
        assert acc.item() == pytest.approx(ref_acc, abs=ACC_TOL)


@pytest.mark.parametrize("duplicates", DUPLICATE_MODES)
@pytest.mark.parametrize(("m", "b", "r"), [(40, 10, 7), (25, 16, 3), (12, 6, 1)])
def test_proto_nce_matches_reference_sampled_negatives(duplicates: str, m: int, b: int, r: int) -> None:
    """A subset of negatives: reproduce the draw with an identically seeded generator."""
    for trial in range(3):
        g = _gen(7 * m + b + 31 * trial)
        lvl = _level(m, b, 8, g)
        q = _unit(b, 8, g)
        seed = 500 + trial
        neg = sample_negative_prototypes(m, torch.unique(lvl.assignment), r, generator=_gen(seed)).tolist()
        assert len(neg) == r
        loss, acc = proto_nce(q, lvl.prototypes, lvl.assignment, lvl.concentration, r,
                              duplicates=duplicates, generator=_gen(seed))  # type: ignore[arg-type]
        ref_loss, ref_acc = ref_proto_nce(q, lvl.prototypes, lvl.assignment.tolist(), lvl.concentration, neg,
                                          duplicates)
        assert loss.item() == pytest.approx(ref_loss, abs=TOL, rel=TOL)
        if duplicates == "dedupe" or not _has_repeats(lvl.assignment):
            assert acc.item() == pytest.approx(ref_acc, abs=ACC_TOL)
        # and a different subset of negatives gives a different loss (the draw matters)
        other = [j for j in ref_complement(m, lvl.assignment.tolist()) if j not in neg][:r]
        if len(other) == r:
            other_loss, _ = ref_proto_nce(q, lvl.prototypes, lvl.assignment.tolist(), lvl.concentration, other,
                                          duplicates)
            assert other_loss != pytest.approx(loss.item(), abs=1e-9)


def test_proto_nce_float32_inputs() -> None:
    g = _gen(21)
    lvl = _level(6, 10, 8, g)
    q = _unit(10, 8, g, torch.float32)
    protos, phi = lvl.prototypes.float(), lvl.concentration.float()
    loss, acc = proto_nce(q, protos, lvl.assignment, phi, 100)
    a = lvl.assignment.tolist()
    ref_loss, ref_acc = ref_proto_nce(q, protos, a, phi, ref_complement(6, a), "dedupe")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref_loss, abs=1e-5, rel=1e-5)
    assert acc.item() == pytest.approx(ref_acc)


@pytest.mark.parametrize("trial", range(6))
def test_proto_nce_remap_loss_equals_none(trial: int) -> None:
    """Same columns, and the remapped label points at a copy of the row's own column: same loss.

    Continuous inputs: equal up to rounding (equal columns may differ in the last bit of the matmul);
    dyadic inputs: bit-identical.
    """
    g = _gen(300 + trial)
    m, b = (4, 10) if trial % 2 else (30, 10)
    r = 3 + trial
    for lvl, q, tol in ((_level(m, b, 6, g), _unit(b, 6, g), 1e-12), (_dyadic_level(m, b, 6, g), _dyadic(b, 6, g), 0.0)):
        assert _has_repeats(lvl.assignment) or m >= b
        out = {
            mode: proto_nce(q, lvl.prototypes, lvl.assignment, lvl.concentration, r, duplicates=mode,
                            generator=_gen(trial))[0].item()
            for mode in ("remap", "none")
        }
        assert abs(out["remap"] - out["none"]) <= tol
        a = lvl.assignment.tolist()
        neg = sample_negative_prototypes(m, torch.unique(lvl.assignment), r, generator=_gen(trial)).tolist()
        assert out["remap"] == pytest.approx(ref_proto_nce(q, lvl.prototypes, a, lvl.concentration, neg, "remap")[0],
                                             abs=TOL)


def test_proto_nce_remap_accuracy_differs_from_none_with_repeats() -> None:
    """One-hot prototypes, queries on their prototype: exact ties among a repeated prototype's columns.

    remap labels every row of a repeated prototype with the first column (= torch.argmax's choice),
    "none" labels each with its own column, so only the first of each group counts as correct.
    """
    protos = torch.eye(4, dtype=F64)
    assignment = torch.tensor([2, 2, 2, 1])
    q = protos[assignment].clone()
    phi = torch.full((4,), 0.1, dtype=F64)
    res = {mode: proto_nce(q, protos, assignment, phi, 100, duplicates=mode, generator=_gen(0))
           for mode in DUPLICATE_MODES}
    assert res["remap"][1].item() == 1.0
    assert res["none"][1].item() == 0.5
    assert res["dedupe"][1].item() == 1.0
    assert res["remap"][0].item() == res["none"][0].item()
    # with repeats the remap loss keeps the duplicate columns: it cannot fall below log(3) for those rows
    assert res["dedupe"][0].item() < res["remap"][0].item()
    for mode in DUPLICATE_MODES:
        ref_loss, ref_acc = ref_proto_nce(q, protos, assignment.tolist(), phi, [0, 3], mode)
        assert res[mode][0].item() == pytest.approx(ref_loss, abs=TOL)
        assert res[mode][1].item() == pytest.approx(ref_acc)
    assert res["remap"][0].item() > 3 / 4 * math.log(3)


def test_proto_nce_remap_accuracy_not_decided_by_rounding() -> None:
    """Continuous inputs where every row is nearest to its own prototype: remap's accuracy must be that of
    dedupe (in exact arithmetic argmax picks the first of the tied copies, which is the remap label)."""
    for trial in range(10):
        g = _gen(trial)
        m, b, d = 3, 9, 10
        protos = _unit(m, d, g)
        a = torch.randint(m, (b,), generator=g)
        phi = torch.full((m,), 0.1, dtype=F64)
        q = F.normalize(protos[a] + 0.3 * torch.randn(b, d, generator=g, dtype=F64), dim=1)
        _, acc_d = proto_nce(q, protos, a, phi, 100, duplicates="dedupe")
        _, acc_r = proto_nce(q, protos, a, phi, 100, duplicates="remap")
        assert acc_r.item() == pytest.approx(acc_d.item(), abs=ACC_TOL), f"trial {trial}, assignment {a.tolist()}"


def test_proto_nce_dedupe_loss_not_above_remap() -> None:
    strictly_lower = 0
    for trial in range(60):
        g = _gen(4000 + trial)
        m = int(torch.randint(2, 30, (1,), generator=g))
        b = int(torch.randint(1, 16, (1,), generator=g))
        lvl = _level(m, b, 5, g)
        q = _unit(b, 5, g)
        r = int(torch.randint(0, m + 1, (1,), generator=g))
        loss_d, _ = proto_nce(q, lvl.prototypes, lvl.assignment, lvl.concentration, r, duplicates="dedupe",
                              generator=_gen(trial))
        loss_r, _ = proto_nce(q, lvl.prototypes, lvl.assignment, lvl.concentration, r, duplicates="remap",
                              generator=_gen(trial))
        assert loss_d.item() <= loss_r.item() + 1e-12
        if len(set(lvl.assignment.tolist())) < b:
            assert loss_d.item() < loss_r.item()
            strictly_lower += 1
    assert strictly_lower > 10  # the draw produced enough repeated positives to be meaningful


@pytest.mark.parametrize("trial", range(5))
def test_proto_nce_modes_agree_without_repeats(trial: int) -> None:
    g = _gen(800 + trial)
    m, b = 20, 9
    lvl = _level(m, b, 7, g, distinct=True)
    q = F.normalize(lvl.prototypes[lvl.assignment] + 0.8 * torch.randn(b, 7, generator=g, dtype=F64), dim=1)
    res = {mode: proto_nce(q, lvl.prototypes, lvl.assignment, lvl.concentration, m, duplicates=mode,
                           generator=_gen(trial))
           for mode in DUPLICATE_MODES}
    for mode in ("remap", "none"):
        assert res[mode][0].item() == pytest.approx(res["dedupe"][0].item(), abs=1e-10)
        assert res[mode][1].item() == res["dedupe"][1].item()


def test_proto_nce_clamps_negatives_without_error() -> None:
    """Fewer clusters than num_negatives remain (even none): no error, same as the reference."""
    g = _gen(9)
    q = _dyadic(6, 5, g)
    protos = _dyadic(4, 5, g)
    phi = torch.tensor([0.125, 0.25, 0.5, 0.25], dtype=F64)
    for assignment in ([0, 0, 1, 2, 2, 2], [0, 1, 2, 3, 3, 0]):
        a = torch.tensor(assignment)
        for mode in DUPLICATE_MODES:
            loss, acc = proto_nce(q, protos, a, phi, 16000, duplicates=mode, generator=_gen(1))
            ref_loss, ref_acc = ref_proto_nce(q, protos, assignment, phi, ref_complement(4, assignment), mode)
            assert loss.item() == pytest.approx(ref_loss, abs=TOL)
            assert acc.item() == pytest.approx(ref_acc, abs=ACC_TOL)


def test_proto_nce_single_cluster_dedupe_is_zero() -> None:
    """All rows in the only cluster: dedupe has one column, so the loss is 0 and accuracy 1."""
    g = _gen(2)
    q = _unit(5, 4, g)
    loss, acc = proto_nce(q, _unit(1, 4, g), torch.zeros(5, dtype=torch.long), torch.ones(1, dtype=F64), 10)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert acc.item() == 1.0
    loss_none, _ = proto_nce(q, _unit(1, 4, g), torch.zeros(5, dtype=torch.long), torch.ones(1, dtype=F64), 10,
                             duplicates="none")
    assert loss_none.item() == pytest.approx(math.log(5), abs=1e-9)


def test_proto_nce_same_seed_same_result() -> None:
    g = _gen(5)
    lvl = _level(50, 8, 6, g)
    q = _unit(8, 6, g)
    a = proto_nce(q, lvl.prototypes, lvl.assignment, lvl.concentration, 5, generator=_gen(42))
    b = proto_nce(q, lvl.prototypes, lvl.assignment, lvl.concentration, 5, generator=_gen(42))
    assert a[0].item() == b[0].item() and a[1].item() == b[1].item()
    others = {proto_nce(q, lvl.prototypes, lvl.assignment, lvl.concentration, 5, generator=_gen(s))[0].item()
              for s in range(6)}
    assert len(others) > 1


@pytest.mark.parametrize("duplicates", DUPLICATE_MODES)
def test_proto_nce_gradient_finite(duplicates: str) -> None:
    g = _gen(6)
    lvl = _level(4, 10, 8, g)
    q = _unit(10, 8, g, torch.float32).requires_grad_(True)
    protos = lvl.prototypes.float().requires_grad_(True)
    loss, _ = proto_nce(q, protos, lvl.assignment, lvl.concentration.float(), 3,
                        duplicates=duplicates, generator=_gen(0))  # type: ignore[arg-type]
    loss.backward()
    for t in (q, protos):
        assert t.grad is not None
        assert torch.isfinite(t.grad).all()
        assert t.grad.abs().sum() > 0


def test_proto_nce_gradient_matches_reference_autograd() -> None:
    """Gradient of the vectorised loss equals that of a row-by-row torch loop (dedupe, all negatives)."""
    g = _gen(8)
    m, b, d = 5, 7, 4
    lvl = _level(m, b, d, g)
    q1 = _unit(b, d, g).requires_grad_(True)
    q2 = q1.detach().clone().requires_grad_(True)
    loss, _ = proto_nce(q1, lvl.prototypes, lvl.assignment, lvl.concentration, 100)
    loss.backward()
    a = lvl.assignment.tolist()
    uniq = sorted(set(a))
    columns = uniq + ref_complement(m, a)
    total = q2.new_zeros(())
    for i in range(b):
        logits = torch.stack([(q2[i] * lvl.prototypes[c]).sum() / lvl.concentration[c] for c in columns])
        total = total + torch.logsumexp(logits, 0) - logits[uniq.index(a[i])]
    (total / b).backward()
    assert q1.grad is not None and q2.grad is not None
    torch.testing.assert_close(q1.grad, q2.grad, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("duplicates", DUPLICATE_MODES)
@pytest.mark.parametrize("parts", [2, 4])
def test_proto_nce_split_across_ranks_equals_one_process(duplicates: str, parts: int) -> None:
    """Under DDP each rank holds 1/W of the step's rows but the columns of the whole batch
    (``batch_assignment``): the mean of the ranks' losses, and of their gradients (what DDP's
    all-reduce takes), equal one process holding every row, with the same negatives drawn."""
    for trial in range(3):
        g = _gen(4242 + 10 * parts + trial)
        lvl = _level(20, 16, 8, g)  # 16 rows, 20 prototypes: repeated positives
        assert _has_repeats(lvl.assignment)
        q_full = _unit(16, 8, g).requires_grad_(True)
        loss, acc = proto_nce(q_full, lvl.prototypes, lvl.assignment, lvl.concentration, 5,
                              duplicates=duplicates, generator=_gen(trial))  # type: ignore[arg-type]
        loss.backward()
        q_parts = [q.detach().clone().requires_grad_(True) for q in q_full.detach().chunk(parts)]
        losses, accs = [], []
        rows = 16 // parts
        for r, q in enumerate(q_parts):
            lr_, ar = proto_nce(q, lvl.prototypes, lvl.assignment[r * rows:(r + 1) * rows], lvl.concentration, 5,
                                duplicates=duplicates, generator=_gen(trial),  # type: ignore[arg-type]
                                batch_assignment=lvl.assignment, row_offset=r * rows)
            (lr_ / parts).backward()
            losses.append(lr_.item())
            accs.append(ar.item())
        assert sum(losses) / parts == pytest.approx(loss.item(), abs=1e-12)
        assert sum(accs) / parts == pytest.approx(acc.item(), abs=1e-12)
        grads = torch.cat([q.grad for q in q_parts])  # type: ignore[misc]
        torch.testing.assert_close(grads, q_full.grad, atol=1e-12, rtol=1e-9)
        # Without the batch's assignment a rank excludes only its own positives: other columns.
        alone, _ = proto_nce(q_parts[0].detach(), lvl.prototypes, lvl.assignment[:rows], lvl.concentration, 5,
                             duplicates=duplicates, generator=_gen(trial))  # type: ignore[arg-type]
        assert alone.item() != pytest.approx(losses[0], abs=1e-9)


def test_proto_nce_rejects_a_batch_assignment_that_does_not_hold_the_rows() -> None:
    g = _gen(3)
    q, protos = _unit(4, 6, g), _unit(5, 6, g)
    batch = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    phi = torch.ones(5, dtype=F64)
    proto_nce(q, protos, batch[4:], phi, 2, batch_assignment=batch, row_offset=4)  # valid
    for offset in (2, 5, -1):
        with pytest.raises(ValueError, match="must hold assignment at rows"):
            proto_nce(q, protos, batch[4:], phi, 2, batch_assignment=batch, row_offset=offset)


def test_proto_nce_rejects_bad_input() -> None:
    g = _gen(0)
    q, protos = _unit(4, 6, g), _unit(5, 6, g)
    a = torch.tensor([0, 1, 2, 3])
    phi = torch.ones(5, dtype=F64)
    proto_nce(q, protos, a, phi, 2)  # the valid call works
    bad_calls = [
        dict(assignment=a[:3]),  # wrong length
        dict(assignment=a[None, :]),  # wrong ndim
        dict(assignment=a.double()),  # non-integer
        dict(assignment=a.bool()),  # bool is no cluster id
        dict(assignment=torch.tensor([0, 1, 2, 5])),  # id out of range
        dict(assignment=torch.tensor([0, -1, 2, 3])),  # negative id
        dict(concentration=phi[:4]),  # one phi per prototype
        dict(prototypes=_unit(5, 7, g)),  # feature dim mismatch
        dict(q=q[0]),  # q not 2-D
        dict(duplicates="first"),  # unknown mode
    ]
    for bad in bad_calls:
        kwargs = dict(q=q, prototypes=protos, assignment=a, concentration=phi, num_negatives=2)
        kwargs.update(bad)
        with pytest.raises(ValueError):
            proto_nce(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_negatives"):
        proto_nce(q, protos, a, phi, -1)


# --------------------------------------------------------------------------- top-K loss


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("push_reduction", PUSH_REDUCTIONS)
@pytest.mark.parametrize(("m", "k"), [(6, 1), (6, 3), (9, 2), (4, 4), (3, 2)])
def test_topk_matches_reference(weighting: str, push_reduction: str, m: int, k: int) -> None:
    for trial in range(2):
        g = _gen(17 * m + k + 101 * trial)
        q = _unit(8, 5, g)
        protos = _unit(m, 5, g)
        lam, alpha = (0.3, 2.0) if trial == 0 else (1.7, 3.5)
        loss = topk_prototype_loss(q, protos, k, lam, alpha, weighting=weighting,  # type: ignore[arg-type]
                                   push_reduction=push_reduction)  # type: ignore[arg-type]
        ref = ref_topk(q, protos, k, lam, alpha, weighting, push_reduction)
        assert loss.shape == ()
        assert loss.item() == pytest.approx(ref, abs=TOL, rel=TOL)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_topk_non_unit_inputs_and_options(weighting: str) -> None:
    """Un-normalised vectors, lam = 0, a non-default softmax temperature and eps."""
    g = _gen(77)
    q = torch.randn(6, 4, generator=g, dtype=F64)
    protos = torch.randn(7, 4, generator=g, dtype=F64)
    for lam in (0.0, 0.5):
        loss = topk_prototype_loss(q, protos, 3, lam, 5.0, weighting=weighting,  # type: ignore[arg-type]
                                   softmax_temperature=0.7, eps=1e-3)
        ref = ref_topk(q, protos, 3, lam, 5.0, weighting, "sum", softmax_temperature=0.7, eps=1e-3)
        assert loss.item() == pytest.approx(ref, abs=TOL, rel=TOL)


def test_topk_push_reduction_mean_is_sum_over_m_minus_k() -> None:
    g = _gen(12)
    q, protos = _unit(5, 6, g), _unit(10, 6, g)
    pull = topk_prototype_loss(q, protos, 3, 0.0, 3.0)
    s = topk_prototype_loss(q, protos, 3, 1.0, 3.0, push_reduction="sum")
    mn = topk_prototype_loss(q, protos, 3, 1.0, 3.0, push_reduction="mean")
    assert (s - pull).item() > 0
    assert (mn - pull).item() == pytest.approx((s - pull).item() / 7, rel=1e-9)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("push_reduction", PUSH_REDUCTIONS)
def test_topk_zero_when_on_prototype_and_others_beyond_alpha(weighting: str, push_reduction: str) -> None:
    protos = torch.eye(5, dtype=F64)  # pairwise squared distance 2
    q = protos[[0, 3, 3, 4]].clone()
    loss = topk_prototype_loss(q, protos, 1, 0.8, 1.5, weighting=weighting,  # type: ignore[arg-type]
                               push_reduction=push_reduction)  # type: ignore[arg-type]
    assert loss.item() == 0.0
    # the same points with the margin beyond the other prototypes are pushed: loss > 0
    pushed = topk_prototype_loss(q, protos, 1, 0.8, 2.5, weighting=weighting,  # type: ignore[arg-type]
                                 push_reduction=push_reduction)  # type: ignore[arg-type]
    expected = 0.8 * 0.5 * (4 if push_reduction == "sum" else 1)
    assert pushed.item() == pytest.approx(expected, abs=1e-9)


def test_topk_zero_loss_float32() -> None:
    protos = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    q = protos[[2, 0]].clone()
    assert topk_prototype_loss(q, protos, 1, 1.0, 1.0).item() == 0.0


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("push_reduction", PUSH_REDUCTIONS)
def test_topk_gradient_uses_constant_weights(weighting: str, push_reduction: str) -> None:
    g = _gen(31)
    b, m, d, k = 5, 6, 4, 3
    q0, p0 = _unit(b, d, g), _unit(m, d, g)
    lam, alpha = 0.4, 2.5

    q1, p1 = q0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
    loss = topk_prototype_loss(q1, p1, k, lam, alpha, weighting=weighting,  # type: ignore[arg-type]
                               push_reduction=push_reduction)  # type: ignore[arg-type]
    loss.backward()

    q2, p2 = q0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
    ref = ref_topk_torch(q2, p2, k, lam, alpha, weighting, push_reduction, detach_weights=True)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=TOL)
    assert q1.grad is not None and q2.grad is not None and p1.grad is not None and p2.grad is not None
    torch.testing.assert_close(q1.grad, q2.grad, atol=TOL, rtol=TOL)
    torch.testing.assert_close(p1.grad, p2.grad, atol=TOL, rtol=TOL)
    assert torch.isfinite(q1.grad).all() and torch.isfinite(p1.grad).all()

    if weighting != "uniform":
        # a version whose weights carry gradient has the same value but a different gradient
        q3, p3 = q0.clone().requires_grad_(True), p0.clone().requires_grad_(True)
        attached = ref_topk_torch(q3, p3, k, lam, alpha, weighting, push_reduction, detach_weights=False)
        attached.backward()
        assert attached.item() == pytest.approx(ref.item(), abs=TOL)
        assert q3.grad is not None
        assert (q3.grad - q1.grad).abs().max().item() > 1e-4


def test_topk_gradient_finite_on_prototype() -> None:
    """q exactly on a prototype (distance 0) with inverse-distance weights: finite gradient."""
    protos = _unit(4, 3, _gen(1), torch.float32)
    q = protos[[1, 2]].clone().requires_grad_(True)
    loss = topk_prototype_loss(q, protos, 2, 1.0, 4.0)
    loss.backward()
    assert q.grad is not None
    assert torch.isfinite(q.grad).all()
    assert torch.isfinite(loss)


def test_topk_rejects_bad_arguments() -> None:
    g = _gen(0)
    q, protos = _unit(4, 6, g), _unit(5, 6, g)
    topk_prototype_loss(q, protos, 5, 0.1, 1.0)  # k = M is allowed
    with pytest.raises(ValueError, match="k must"):
        topk_prototype_loss(q, protos, 0, 0.1, 1.0)
    with pytest.raises(ValueError, match="k must"):
        topk_prototype_loss(q, protos, 6, 0.1, 1.0)
    with pytest.raises(ValueError, match="lam"):
        topk_prototype_loss(q, protos, 2, -0.1, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        topk_prototype_loss(q, protos, 2, 0.1, 0.0)
    with pytest.raises(ValueError, match="weighting"):
        topk_prototype_loss(q, protos, 2, 0.1, 1.0, weighting="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="push_reduction"):
        topk_prototype_loss(q, protos, 2, 0.1, 1.0, push_reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        topk_prototype_loss(q, _unit(5, 7, g), 2, 0.1, 1.0)
    with pytest.raises(ValueError):
        topk_prototype_loss(q[0], protos, 2, 0.1, 1.0)


def test_topk_accuracy_proxy_matches_reference() -> None:
    g = _gen(3)
    q, protos = _unit(20, 5, g), _unit(4, 5, g)
    a = torch.randint(4, (20,), generator=g)
    assert topk_accuracy_proxy(q, protos, a).item() == pytest.approx(ref_topk_accuracy(q, protos, a.tolist()))
    nearest = torch.tensor([_first_argmax([_dot(r, p) for p in _np(protos)]) for r in _np(q)])
    assert topk_accuracy_proxy(q, protos, nearest).item() == 1.0


# --------------------------------------------------------------------------- pcl_loss


def _batch(b: int, d: int, qlen: int, seed: int, dtype: torch.dtype = F64) -> tuple[Tensor, Tensor, Tensor]:
    g = _gen(seed)
    return _unit(b, d, g, dtype), _unit(b, d, g, dtype), _unit(qlen, d, g, dtype)


def test_pcl_loss_without_levels_is_info_nce() -> None:
    q, k, queue = _batch(6, 8, 12, 0)
    for levels in ([], ()):
        loss, parts = pcl_loss(q, k, queue, levels, temperature=0.2, config=PrototypeLossConfig())
        ref_loss, ref_acc = ref_info_nce(q, k, queue, 0.2)
        assert loss.item() == pytest.approx(ref_loss, abs=TOL)
        assert parts["loss"].item() == pytest.approx(ref_loss, abs=TOL)
        assert parts["loss_inst"].item() == pytest.approx(ref_loss, abs=TOL)
        assert parts["acc_inst"].item() == pytest.approx(ref_acc, abs=ACC_TOL)
        assert "loss_proto" not in parts and "acc_proto" not in parts
        assert not any(key.startswith("loss_proto_") for key in parts)


@pytest.mark.parametrize("duplicates", DUPLICATE_MODES)
@pytest.mark.parametrize("proto_weight", [1.0, 0.25])
def test_pcl_loss_with_proto_nce_levels(duplicates: str, proto_weight: float) -> None:
    b, d = 10, 8
    _, k, queue = _batch(b, d, 15, 1)
    g = _gen(2)
    q = _dyadic(b, d, g)  # exact ties among repeated columns: every mode's accuracy is well defined
    levels = [_dyadic_level(3, b, d, g), _dyadic_level(7, b, d, g), _dyadic_level(25, b, d, g)]
    config = PrototypeLossConfig(kind="proto_nce", num_negatives=1000, duplicates=duplicates)  # type: ignore[arg-type]
    loss, parts = pcl_loss(q, k, queue, levels, temperature=0.1, config=config, proto_weight=proto_weight,
                           generator=_gen(3))
    inst, inst_acc = ref_info_nce(q, k, queue, 0.1)
    per_level = []
    for i, lvl in enumerate(levels):
        a = lvl.assignment.tolist()
        m = lvl.prototypes.shape[0]
        li, ai = ref_proto_nce(q, lvl.prototypes, a, lvl.concentration, ref_complement(m, a), duplicates)
        assert parts[f"loss_proto_{i}"].item() == pytest.approx(li, abs=TOL)
        assert parts[f"acc_proto_{i}"].item() == pytest.approx(ai, abs=ACC_TOL)
        per_level.append((li, ai))
    mean_loss = sum(x for x, _ in per_level) / len(levels)
    mean_acc = sum(y for _, y in per_level) / len(levels)
    assert loss.item() == pytest.approx(inst + proto_weight * mean_loss, abs=TOL)
    assert parts["loss"].item() == pytest.approx(loss.item(), abs=1e-12)
    assert parts["loss_inst"].item() == pytest.approx(inst, abs=TOL)
    assert parts["acc_inst"].item() == pytest.approx(inst_acc, abs=ACC_TOL)
    assert parts["loss_proto"].item() == pytest.approx(mean_loss, abs=TOL)
    assert parts["acc_proto"].item() == pytest.approx(mean_acc, abs=ACC_TOL)
    assert "loss_proto_3" not in parts
    for value in parts.values():
        assert not value.requires_grad


def test_pcl_loss_sampled_negatives_follow_generator() -> None:
    b, d = 6, 5
    q, k, queue = _batch(b, d, 8, 4)
    lvl = _level(30, b, d, _gen(5))
    config = PrototypeLossConfig(num_negatives=4)
    _, parts = pcl_loss(q, k, queue, [lvl], temperature=0.1, config=config, generator=_gen(9))
    neg = sample_negative_prototypes(30, torch.unique(lvl.assignment), 4, generator=_gen(9)).tolist()
    ref, _ = ref_proto_nce(q, lvl.prototypes, lvl.assignment.tolist(), lvl.concentration, neg, "dedupe")
    assert parts["loss_proto_0"].item() == pytest.approx(ref, abs=TOL)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_pcl_loss_topk_below_threshold(weighting: str) -> None:
    b, d = 8, 6
    q, k, queue = _batch(b, d, 10, 6)
    g = _gen(7)
    # 3 and 7 clusters < threshold 8 -> top-K; 8 (not fewer) and 20 -> ProtoNCE
    levels = [_level(3, b, d, g), _level(20, b, d, g), _level(7, b, d, g), _level(8, b, d, g)]
    config = PrototypeLossConfig(kind="topk_below", topk_threshold=8, num_negatives=1000, k=4, lam=0.3,
                                 alpha=2.0, weighting=weighting, push_reduction="mean")  # type: ignore[arg-type]
    assert [config.level_kind(lvl.prototypes.shape[0]) for lvl in levels] == ["topk", "proto_nce", "topk", "proto_nce"]
    loss, parts = pcl_loss(q, k, queue, levels, temperature=0.15, config=config, generator=_gen(0))
    expected = []
    for i, lvl in enumerate(levels):
        m = lvl.prototypes.shape[0]
        a = lvl.assignment.tolist()
        if m < 8:
            li = ref_topk(q, lvl.prototypes, min(4, m), 0.3, 2.0, weighting, "mean")
            ai = ref_topk_accuracy(q, lvl.prototypes, a)
            wrong, _ = ref_proto_nce(q, lvl.prototypes, a, lvl.concentration, ref_complement(m, a), "dedupe")
            assert wrong != pytest.approx(li, abs=1e-3)  # the two losses are distinguishable here
        else:
            li, ai = ref_proto_nce(q, lvl.prototypes, a, lvl.concentration, ref_complement(m, a), "dedupe")
            wrong = ref_topk(q, lvl.prototypes, 4, 0.3, 2.0, weighting, "mean")
            assert wrong != pytest.approx(li, abs=1e-3)
        assert parts[f"loss_proto_{i}"].item() == pytest.approx(li, abs=TOL)
        assert parts[f"acc_proto_{i}"].item() == pytest.approx(ai, abs=ACC_TOL)
        expected.append(li)
    inst, _ = ref_info_nce(q, k, queue, 0.15)
    assert loss.item() == pytest.approx(inst + sum(expected) / len(expected), abs=TOL)


def test_pcl_loss_topk_kind_for_every_level() -> None:
    b, d = 5, 4
    q, k, queue = _batch(b, d, 6, 8)
    g = _gen(9)
    levels = [_level(2, b, d, g), _level(12, b, d, g)]
    config = PrototypeLossConfig(kind="topk", k=3, lam=0.5, alpha=1.5)
    _, parts = pcl_loss(q, k, queue, levels, temperature=0.1, config=config)
    assert parts["loss_proto_0"].item() == pytest.approx(ref_topk(q, levels[0].prototypes, 2, 0.5, 1.5), abs=TOL)
    assert parts["loss_proto_1"].item() == pytest.approx(ref_topk(q, levels[1].prototypes, 3, 0.5, 1.5), abs=TOL)


@pytest.mark.parametrize("kind", ["proto_nce", "topk", "topk_below"])
def test_pcl_loss_gradient_finite(kind: str) -> None:
    b, d = 8, 6
    q0, k, queue = _batch(b, d, 10, 10, torch.float32)
    q = q0.clone().requires_grad_(True)
    g = _gen(11)
    levels = []
    for m in (3, 12):
        lvl = _level(m, b, d, g)
        levels.append(LevelBatch(lvl.prototypes.float(), lvl.assignment, lvl.concentration.float()))
    config = PrototypeLossConfig(kind=kind, topk_threshold=8, num_negatives=5)  # type: ignore[arg-type]
    loss, _ = pcl_loss(q, k, queue, levels, temperature=0.1, config=config, generator=_gen(0))
    loss.backward()
    assert q.grad is not None
    assert torch.isfinite(q.grad).all()
    assert q.grad.abs().sum() > 0


def test_prototype_loss_config_validation() -> None:
    PrototypeLossConfig(kind="topk_below", topk_threshold=1)
    with pytest.raises(ValueError, match="kind"):
        PrototypeLossConfig(kind="mixed")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="topk_threshold"):
        PrototypeLossConfig(kind="topk_below")
    with pytest.raises(ValueError, match="topk_threshold"):
        PrototypeLossConfig(kind="topk_below", topk_threshold=0)
    with pytest.raises(ValueError, match="duplicates"):
        PrototypeLossConfig(duplicates="first")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weighting"):
        PrototypeLossConfig(weighting="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="push_reduction"):
        PrototypeLossConfig(push_reduction="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must"):
        PrototypeLossConfig(k=0)


def test_level_kind() -> None:
    below = PrototypeLossConfig(kind="topk_below", topk_threshold=256)
    assert below.level_kind(255) == "topk"
    assert below.level_kind(256) == "proto_nce"
    assert below.level_kind(1000) == "proto_nce"
    assert PrototypeLossConfig(kind="topk").level_kind(10_000) == "topk"
    assert PrototypeLossConfig(kind="proto_nce").level_kind(2) == "proto_nce"
