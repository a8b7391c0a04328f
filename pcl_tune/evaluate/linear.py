"""Linear probe: logistic regression on frozen, L2-normalised features.

The inverse regularisation strength ``C`` is chosen on a stratified validation slice of the
training features, then the probe is refitted on all of them and scored once on the test
features, so the test split never influences a choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from .fewshot import as_array, l2_normalise

C_GRID: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class LinearProbeResult:
    """Test accuracies in percent; ``top5`` is None with fewer than 5 classes."""

    top1: float
    top5: float | None
    C: float
    val_top1: dict[float, float]
    """Validation top-1 (%) of every C tried."""


def _topk(proba: np.ndarray, classes: np.ndarray, y: np.ndarray, k: int) -> float:
    top = classes[np.argsort(-proba, axis=1)[:, :k]]
    return float((top == y[:, None]).any(1).mean() * 100.0)


def linear_probe(
    train_x: np.ndarray | Tensor, train_y: np.ndarray | Tensor, test_x: np.ndarray | Tensor,
    test_y: np.ndarray | Tensor, *, val_fraction: float = 0.1, seed: int = 0, Cs: Sequence[float] = C_GRID,
) -> LinearProbeResult:
    """Top-1 (and top-5) test accuracy of a logistic-regression probe; see the module docstring.

    Args:
        train_x, train_y: (N, D) features and (N,) labels the probe is fitted on.
        test_x, test_y: (M, D) and (M,) the probe is scored on.
        val_fraction: share of train held out (stratified) to choose ``C``.
        Cs: the values of ``C`` tried.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    xtr, ytr = l2_normalise(as_array(train_x)), as_array(train_y).astype(np.int64)
    xte, yte = l2_normalise(as_array(test_x)), as_array(test_y).astype(np.int64)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    classes = np.unique(ytr)
    if len(classes) < 2:
        raise ValueError(f"a linear probe needs at least 2 classes in train, got {len(classes)}")
    n_val = max(len(classes), int(round(val_fraction * len(ytr))))
    a_x, v_x, a_y, v_y = train_test_split(xtr, ytr, test_size=n_val, stratify=ytr, random_state=seed)
    scores: dict[float, float] = {}
    for c in Cs:
        clf = LogisticRegression(C=c, max_iter=2000)
        clf.fit(a_x, a_y)
        scores[float(c)] = float((clf.predict(v_x) == v_y).mean() * 100.0)
    best = max(scores, key=lambda c: (scores[c], -c))  # ties: the stronger regularisation
    clf = LogisticRegression(C=best, max_iter=2000).fit(xtr, ytr)
    proba = clf.predict_proba(xte)
    top5 = _topk(proba, clf.classes_, yte, 5) if len(classes) >= 5 else None
    return LinearProbeResult(top1=_topk(proba, clf.classes_, yte, 1), top5=top5, C=best, val_top1=scores)
