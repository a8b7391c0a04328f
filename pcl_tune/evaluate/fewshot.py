"""N-way K-shot few-shot episodes on frozen features.

Each episode draws ``n_way`` classes, and from each class ``k_shot`` support and ``n_query``
query images, all without replacement; a classifier fitted on the support set labels the
queries. The score is the mean query accuracy over episodes with its 95 % interval
(1.96 * std / sqrt(episodes)), as few-shot papers report it.

Classifiers:

* ``"logistic"``: multinomial logistic regression on L2-normalised features, fitted per episode
  on the support set: the linear-probe protocol of Tian et al., "Rethinking Few-Shot Image
  Classification: a Good Embedding Is All You Need?" (ECCV 2020).
* ``"prototype"``: nearest class mean by cosine similarity (Snell et al., "Prototypical Networks
  for Few-shot Learning", NeurIPS 2017, without the learned metric). Vectorised over episodes:
  cheap enough to run every epoch during a search.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Classifier = Literal["logistic", "prototype"]
CLASSIFIERS: tuple[str, ...] = ("logistic", "prototype")


@dataclass(frozen=True)
class FewShotResult:
    """Accuracies in percent; ``ci95`` is the half-width of the 95 % interval of ``mean``."""

    mean: float
    ci95: float
    accuracies: np.ndarray
    n_way: int
    k_shot: int
    episodes: int
    classifier: str


def as_array(x: np.ndarray | Tensor) -> np.ndarray:
    """A float32 / int64 numpy view of a tensor or array (on CPU)."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def draw_episodes(labels: np.ndarray, *, n_way: int, per_class: int, episodes: int, seed: int) -> np.ndarray:
    """Indices of ``episodes`` episodes, shape (episodes, n_way, per_class), class by class.

    Classes with fewer than ``per_class`` images are skipped with a warning; fewer than ``n_way``
    usable classes is a ValueError that says how many there are.
    """
    classes, counts = np.unique(labels[labels >= 0], return_counts=True)
    usable = classes[counts >= per_class]
    skipped = classes[counts < per_class]
    if len(skipped):
        warnings.warn(f"few-shot: {len(skipped)} class(es) with fewer than {per_class} images (k_shot + n_query) "
                      f"skipped: {skipped.tolist()[:10]}", stacklevel=3)
    if len(usable) < n_way:
        raise ValueError(f"{n_way}-way episodes need {n_way} classes with at least {per_class} images each; "
                         f"there are {len(usable)} (of {len(classes)} classes)")
    # Vectorised over episodes (a per-episode loop of rng.choice cost ~0.1 ms a class, which made
    # the per-epoch metric 3x dearer): classes by sorting random keys, then each chosen class's
    # images by sorting random keys over its members, padding sorted last.
    members = [np.flatnonzero(labels == c) for c in usable]
    counts = np.array([len(m) for m in members])
    padded = np.full((len(usable), counts.max()), -1, dtype=np.int64)
    for i, m in enumerate(members):
        padded[i, : len(m)] = m
    rng = np.random.default_rng(seed)
    chosen = np.argsort(rng.random((episodes, len(usable))), axis=1)[:, :n_way]  # (E, n_way)
    keys = rng.random((episodes, n_way, counts.max()))
    keys[np.arange(counts.max()) >= counts[chosen][..., None]] = np.inf
    picks = np.argsort(keys, axis=2)[:, :, :per_class]  # (E, n_way, per_class) positions in the class
    return padded[chosen[..., None], picks]


def _prototype_accuracies(x: np.ndarray, idx: np.ndarray, k_shot: int, chunk: int = 256) -> np.ndarray:
    """Nearest-class-mean (cosine) accuracy of every episode, batched over episodes."""
    feats = torch.from_numpy(x)
    accs = []
    for s in range(0, len(idx), chunk):
        block = feats[torch.from_numpy(idx[s:s + chunk])]  # (E, n_way, per_class, D)
        support, query = block[:, :, :k_shot], block[:, :, k_shot:]
        protos = torch.nn.functional.normalize(support.mean(2), dim=-1)  # (E, n_way, D)
        e, n, q, d = query.shape
        scores = query.reshape(e, n * q, d) @ protos.transpose(1, 2)  # (E, n*q, n_way)
        truth = torch.arange(n).repeat_interleave(q)
        accs.append((scores.argmax(-1) == truth).float().mean(1))
    return torch.cat(accs).numpy().astype(np.float64) * 100.0


def _logistic_accuracies(x: np.ndarray, idx: np.ndarray, k_shot: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    n_way = idx.shape[1]
    accs = np.empty(len(idx))
    y_support = np.repeat(np.arange(n_way), k_shot)
    y_query = np.repeat(np.arange(n_way), idx.shape[2] - k_shot)
    for e, ep in enumerate(idx):
        clf = LogisticRegression(max_iter=1000)
        clf.fit(x[ep[:, :k_shot].reshape(-1)], y_support)
        accs[e] = (clf.predict(x[ep[:, k_shot:].reshape(-1)]) == y_query).mean() * 100.0
    return accs


def fewshot_episodes(
    features: np.ndarray | Tensor,
    labels: np.ndarray | Tensor,
    *,
    n_way: int = 5,
    k_shot: int = 1,
    n_query: int = 15,
    episodes: int = 600,
    classifier: Classifier = "logistic",
    seed: int = 0,
) -> FewShotResult:
    """Mean accuracy (%) of ``episodes`` N-way K-shot episodes over ``features`` (N, D).

    Args:
        features: frozen features, one row per image (L2-normalised here).
        labels: (N,) class ids; negative ids (unlabelled) are ignored.
        n_way, k_shot, n_query: classes per episode, support and query images per class.
        episodes: number of episodes; the interval shrinks as 1/sqrt(episodes).
        classifier: ``"logistic"`` or ``"prototype"`` (see the module docstring).
        seed: the episodes drawn depend on it alone (deterministic).
    """
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {', '.join(CLASSIFIERS)}, got {classifier!r}")
    for name, v in (("n_way", n_way), ("k_shot", k_shot), ("n_query", n_query), ("episodes", episodes)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if n_way < 2:
        raise ValueError(f"n_way must be >= 2, got {n_way}")
    x = l2_normalise(as_array(features))
    y = as_array(labels).astype(np.int64)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be (N, D) and labels (N,), got {x.shape} and {y.shape}")
    idx = draw_episodes(y, n_way=n_way, per_class=k_shot + n_query, episodes=episodes, seed=seed)
    accs = _prototype_accuracies(x, idx, k_shot) if classifier == "prototype" else _logistic_accuracies(x, idx, k_shot)
    std = float(accs.std(ddof=1)) if episodes > 1 else 0.0
    return FewShotResult(mean=float(accs.mean()), ci95=1.96 * std / math.sqrt(episodes), accuracies=accs,
                         n_way=n_way, k_shot=k_shot, episodes=episodes, classifier=classifier)
