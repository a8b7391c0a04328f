"""Downstream evaluations on synthetic features with known structure: few-shot episodes, the
linear probe and VOC07-style low-shot SVMs, against loop references where one is obvious."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcl_tune.evaluate import fewshot_episodes, linear_probe, voc07_lowshot
from pcl_tune.evaluate.fewshot import draw_episodes
from pcl_tune.evaluate.voc07 import average_precision, lowshot_labels


def blobs(num_classes: int = 10, per_class: int = 40, dim: int = 32, spread: float = 3.0,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs: class means ``spread`` apart on average, unit noise; rows shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * spread
    y = np.repeat(np.arange(num_classes), per_class)
    x = centres[y] + rng.normal(size=(len(y), dim))
    perm = rng.permutation(len(y))
    return x[perm].astype(np.float32), y[perm]


# --------------------------------------------------------------------------- few-shot


@pytest.mark.parametrize("classifier", ["prototype", "logistic"])
def test_fewshot_separated_classes_near_perfect_and_random_at_chance(classifier: str) -> None:
    x, y = blobs()
    good = fewshot_episodes(x, y, classifier=classifier, episodes=100, seed=1)
    assert good.mean >= 95.0 and good.accuracies.shape == (100,)
    noise = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
    chance = fewshot_episodes(noise, y, classifier=classifier, episodes=400 if classifier == "prototype" else 150,
                              seed=1)
    assert abs(chance.mean - 20.0) <= 3.0, chance.mean


def test_fewshot_is_deterministic_and_accepts_tensors() -> None:
    x, y = blobs(spread=0.6)
    a = fewshot_episodes(x, y, classifier="prototype", episodes=50, seed=7)
    b = fewshot_episodes(torch.from_numpy(x), torch.from_numpy(y), classifier="prototype", episodes=50, seed=7)
    c = fewshot_episodes(x, y, classifier="prototype", episodes=50, seed=8)
    assert np.array_equal(a.accuracies, b.accuracies)
    assert not np.array_equal(a.accuracies, c.accuracies)
    assert (a.n_way, a.k_shot, a.episodes) == (5, 1, 50)


def test_fewshot_interval_shrinks_as_one_over_sqrt_episodes() -> None:
    x, y = blobs(spread=0.5)
    small = fewshot_episodes(x, y, classifier="prototype", episodes=100, seed=0)
    large = fewshot_episodes(x, y, classifier="prototype", episodes=1600, seed=0)
    assert small.ci95 == pytest.approx(1.96 * small.accuracies.std(ddof=1) / 10.0)
    assert 2.5 < small.ci95 / large.ci95 < 6.0  # sqrt(16) = 4, up to sampling noise in the std


def test_prototype_classifier_matches_a_loop_reference() -> None:
    x, y = blobs(spread=0.4, seed=2)
    res = fewshot_episodes(x, y, classifier="prototype", k_shot=3, n_query=4, episodes=20, seed=5)
    idx = draw_episodes(y, n_way=5, per_class=7, episodes=20, seed=5)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for e in range(20):
        correct = 0
        means = [xn[idx[e, j, :3]].mean(0) for j in range(5)]
        means = [m / np.linalg.norm(m) for m in means]
        for j in range(5):
            for i in idx[e, j, 3:]:
                correct += int(np.argmax([xn[i] @ m for m in means]) == j)
        assert res.accuracies[e] == pytest.approx(100.0 * correct / 20)


def test_episodes_draw_without_replacement() -> None:
    _, y = blobs()
    idx = draw_episodes(y, n_way=5, per_class=16, episodes=30, seed=0)
    for ep in idx:
        assert len(np.unique(ep)) == ep.size  # no image twice in an episode
        classes = [np.unique(y[row]) for row in ep]
        assert all(len(c) == 1 for c in classes) and len({int(c[0]) for c in classes}) == 5


def test_fewshot_skips_small_classes_and_errors_with_too_few() -> None:
    x, y = blobs(num_classes=7, per_class=20)
    y = y.copy()
    y[np.flatnonzero(y == 6)[5:]] = 5  # class 6 keeps 5 images: too few for 1 + 15
    with pytest.warns(UserWarning, match="1 class"):
        res = fewshot_episodes(x, y, classifier="prototype", episodes=10)
    assert res.mean > 50
    with pytest.raises(ValueError, match="there are 6"):
        with pytest.warns(UserWarning):
            fewshot_episodes(x, y, n_way=7, classifier="prototype", episodes=10)


# --------------------------------------------------------------------------- linear probe


def test_linear_probe_separated_vs_random() -> None:
    x, y = blobs(per_class=60)
    res = linear_probe(x[:400], y[:400], x[400:], y[400:], seed=0)
    assert res.top1 >= 95.0 and res.top5 is not None and res.top5 >= res.top1
    assert res.C in res.val_top1 and res.val_top1[res.C] == max(res.val_top1.values())
    noise = np.random.default_rng(1).normal(size=x.shape)
    chance = linear_probe(noise[:400], y[:400], noise[400:], y[400:])
    assert chance.top1 < 25.0
    two = linear_probe(x[y < 2][:60], y[y < 2][:60], x[y < 2][60:], y[y < 2][60:])
    assert two.top5 is None


# --------------------------------------------------------------------------- VOC07 low-shot


def multilabel(n: int, num_classes: int = 4, dim: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images holding 1-2 objects; the feature is the sum of their class directions plus noise."""
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(num_classes, dim)) * 2
    y = np.zeros((n, num_classes), dtype=np.int64)
    for i in range(n):
        y[i, rng.choice(num_classes, size=rng.integers(1, 3), replace=False)] = 1
    x = y @ dirs + rng.normal(size=(n, dim))
    difficult = rng.random(y.shape) < 0.05
    y[difficult & (y == 1)] = -1
    return x, y


def test_average_precision_against_a_loop_reference() -> None:
    rng = np.random.default_rng(0)
    scores, truth = rng.normal(size=50), (rng.random(50) < 0.3).astype(int)
    order = sorted(range(50), key=lambda i: -scores[i])
    precisions, hits = [], 0
    for rank, i in enumerate(order, 1):
        if truth[i]:
            hits += 1
            precisions.append(hits / rank)
    assert average_precision(scores, truth) == pytest.approx(sum(precisions) / len(precisions))
    assert average_precision(np.arange(4.0), np.array([0, 0, 1, 1])) == 1.0


def test_lowshot_labels_sample_k_positives_and_negatives() -> None:
    _, y = multilabel(200)
    out = lowshot_labels(y, 2, np.random.default_rng(0))
    assert ((out == 1).sum(0) == 2).all() and ((out == 0).sum(0) == 3 * 2).all()
    assert (y[out == 1] == 1).all() and (y[out == 0] == 0).all()  # never a difficult one
    with pytest.raises(ValueError, match="positive"):
        lowshot_labels(y, 500, np.random.default_rng(0))


def test_voc07_lowshot_map_rises_with_k_and_is_high_on_full() -> None:
    x, y = multilabel(400)
    res = voc07_lowshot(x[:300], y[:300], x[300:], y[300:], shots=(1, 8), draws=3)
    assert set(res) == {1, 8, "full"}
    assert res[1] < res[8] <= res["full"] + 2.0
    assert res["full"] > 90.0
    noise = np.random.default_rng(5).normal(size=x.shape)
    rnd = voc07_lowshot(noise[:300], y[:300], noise[300:], y[300:], shots=(), draws=1)
    assert rnd["full"] < 70.0  # chance AP is the positive rate (about 40 %)
    with pytest.raises(ValueError, match="1 \\(present\\)"):
        voc07_lowshot(x, y + 1, x, y, shots=())
