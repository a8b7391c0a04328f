"""VOC07-style low-shot classification: one linear SVM per class on frozen features, mean AP.

The protocol PCL reports, from Goyal et al., "Scaling and Benchmarking Self-Supervised Visual
Representation Learning" (ICCV 2019): labels are multi-label, (N, C) with 1 = present,
0 = absent, -1 = difficult (ignored in training and in scoring, VOC's convention). For k shots,
each class's SVM is trained on k positive images of that class and (C - 1) * k negative ones, all
drawn at random; ``draws`` independent draws are averaged. ``"full"`` trains on every labelled
train image. Features are L2-normalised; each SVM's cost is chosen by stratified
cross-validation on its own training images (not the test split) from :data:`COSTS`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from .fewshot import as_array, l2_normalise

COSTS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """AP of ``scores`` for binary ``truth`` (1 positive, 0 negative): the mean precision at each
    positive's rank (the area under the precision-recall curve, no interpolation)."""
    order = np.argsort(-scores, kind="stable")
    hits = truth[order] == 1
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def _fit_svm(x: np.ndarray, y: np.ndarray, costs: Sequence[float], seed: int) -> object:
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.svm import LinearSVC

    def make(c: float) -> LinearSVC:
        # Classes are unbalanced (k positives vs (C-1)k negatives, more in "full"): weight them.
        return LinearSVC(C=c, class_weight="balanced", max_iter=5000, random_state=seed)

    folds = min(3, int(min((y == 1).sum(), (y == 0).sum())))
    if folds >= 2 and len(costs) > 1:
        cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
        means = [cross_val_score(make(c), x, y, cv=cv, scoring="average_precision").mean() for c in costs]
        cost = costs[int(np.argmax(means))]
    else:  # one positive: nothing to cross-validate on; the middle of the list
        cost = costs[len(costs) // 2]
    return make(cost).fit(x, y)


def _map(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
         costs: Sequence[float], seed: int) -> float:
    aps = []
    for c in range(train_y.shape[1]):
        use = train_y[:, c] >= 0
        keep = test_y[:, c] >= 0
        if len(np.unique(train_y[use, c])) < 2 or not (test_y[keep, c] == 1).any():
            aps.append(float("nan"))  # no SVM to fit, or no AP to measure (a subset of VOC)
            continue
        svm = _fit_svm(train_x[use], train_y[use, c], costs, seed)
        aps.append(average_precision(svm.decision_function(test_x[keep]), test_y[keep, c]))  # type: ignore[attr-defined]
    if np.isnan(aps).all():
        raise ValueError("no class has both positive and negative train images and a positive test image")
    if np.isnan(aps).any():
        warnings.warn(f"VOC07: {int(np.isnan(aps).sum())} class(es) without positive and negative train images or "
                      "without a positive test image are left out of the mean AP", stacklevel=3)
    return float(np.nanmean(aps) * 100.0)


def lowshot_labels(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Per class, ``k`` random positives and ``(C - 1) * k`` random negatives; every other entry -1."""
    out = np.full_like(labels, -1)
    num_classes = labels.shape[1]
    for c in range(num_classes):
        for value, count in ((1, k), (0, (num_classes - 1) * k)):
            pool = np.flatnonzero(labels[:, c] == value)
            if len(pool) < count:
                raise ValueError(f"class {c}: {count} {'positive' if value else 'negative'} image(s) needed for "
                                 f"{k}-shot, {len(pool)} available")
            out[rng.choice(pool, size=count, replace=False), c] = value
    return out


def voc07_lowshot(
    train_x: np.ndarray | Tensor, train_y: np.ndarray | Tensor, test_x: np.ndarray | Tensor,
    test_y: np.ndarray | Tensor, *, shots: Sequence[int] = (1, 2, 4, 8, 16), draws: int = 5, seed: int = 0,
    costs: Sequence[float] = COSTS,
) -> dict[int | str, float]:
    """Mean AP (%) over classes for each k in ``shots`` (averaged over ``draws``) and ``"full"``.

    Args:
        train_x, test_x: (N, D), (M, D) frozen features.
        train_y, test_y: (N, C), (M, C) with 1 present, 0 absent, -1 difficult (ignored).
    """
    xtr, xte = l2_normalise(as_array(train_x)), l2_normalise(as_array(test_x))
    ytr, yte = as_array(train_y).astype(np.int64), as_array(test_y).astype(np.int64)
    if ytr.ndim != 2 or yte.ndim != 2 or ytr.shape[1] != yte.shape[1]:
        raise ValueError(f"labels must be (N, C) and (M, C) with the same C, got {ytr.shape} and {yte.shape}")
    if not set(np.unique(ytr)) <= {-1, 0, 1} or not set(np.unique(yte)) <= {-1, 0, 1}:
        raise ValueError("labels must hold 1 (present), 0 (absent) or -1 (difficult) only")
    rng = np.random.default_rng(seed)
    out: dict[int | str, float] = {}
    for k in shots:
        out[int(k)] = float(np.mean([_map(xtr, lowshot_labels(ytr, int(k), rng), xte, yte, costs, seed)
                                     for _ in range(draws)]))
    out["full"] = _map(xtr, ytr, xte, yte, costs, seed)
    return out
