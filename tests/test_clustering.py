"""Tests of pcl_tune.clustering: k-means backends, the PCL concentration, and cluster schedules."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import faiss
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from pcl_tune.clustering import (
    ClusteringError,
    ClusterLevel,
    ClusterSchedule,
    cluster,
    concentration,
    kmeans_torch,
    resolve_backend,
)

BACKENDS = ("faiss", "torch")


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """The arrays here are tiny: one thread is fastest, and spare OpenMP threads that spin on a
    busy 2-core machine slow every op down by orders of magnitude. Restored afterwards."""
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


# --------------------------------------------------------------------------- data


def gaussian_mixture(n: int, d: int, k: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n L2-normalised float32 points around k random unit centres (n // k each), with their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(k), n // k)
    x = centres[labels] + spread * rng.normal(size=(labels.size, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


# --------------------------------------------------------------------------- concentration reference


def ref_concentration(sq_dist: list[float], assignment: list[int], num_clusters: int, temperature: float) -> np.ndarray:
    """PCL reference (Li et al. 2021): per-cluster mean distance / log(n + 10), 0/1-member clusters get
    the max, clip to the 10th-90th percentile (numpy, linear), rescale to mean = temperature."""
    members: list[list[float]] = [[] for _ in range(num_clusters)]
    for d2, c in zip(sq_dist, assignment):
        members[c].append(math.sqrt(max(d2, 0.0)))
    phi = [0.0] * num_clusters
    for c in range(num_clusters):
        if len(members[c]) > 1:
            phi[c] = sum(members[c]) / len(members[c]) / math.log(len(members[c]) + 10)
    phi_max = max(phi)
    for c in range(num_clusters):
        if len(members[c]) <= 1:
            phi[c] = phi_max
    lo, hi = np.percentile(phi, 10), np.percentile(phi, 90)
    clipped = [min(max(p, lo), hi) for p in phi]
    mean = sum(clipped) / num_clusters
    return np.array([temperature * p / mean for p in clipped])


def test_concentration_hand_built_with_empty_and_singleton() -> None:
    # cluster: 0 two members, 1 three, 2 empty, 3 singleton, 4 four, 5 two, 6 five
    assignment = [0, 0, 1, 1, 1, 3, 4, 4, 4, 4, 5, 5, 6, 6, 6, 6, 6]
    dist = [0.2, 0.4, 0.1, 0.1, 0.4, 0.9, 0.3, 0.3, 0.5, 0.1, 0.6, 0.8, 0.05, 0.05, 0.1, 0.2, 0.1]
    sq = torch.tensor([d * d for d in dist])
    temperature = 0.2
    phi = concentration(sq, torch.tensor(assignment), 7, temperature)
    assert phi.shape == (7,) and phi.dtype == torch.float32

    # by hand, before clipping: mean distance / log(n + 10)
    raw = [0.3 / math.log(12), 0.2 / math.log(13), 0.0, 0.0, 0.3 / math.log(14), 0.7 / math.log(12),
           0.1 / math.log(15)]
    raw[2] = raw[3] = max(raw)  # empty and singleton clusters get the largest phi (= cluster 5's)
    lo, hi = np.percentile(raw, 10), np.percentile(raw, 90)
    assert lo > min(raw) and hi == pytest.approx(max(raw))  # three clusters share the max
    clipped = np.clip(raw, lo, hi)
    expected = temperature * clipped / clipped.mean()
    np.testing.assert_allclose(phi.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(phi.numpy(), ref_concentration([d * d for d in dist], assignment, 7, temperature),
                               rtol=1e-5)
    assert float(phi.double().mean()) == pytest.approx(temperature, abs=1e-6)
    assert phi[2] == phi[3] == phi[5] == phi.max()
    assert phi[6] == phi.min() and phi[6] > temperature * raw[6] / np.mean(raw)  # raised to the 10th pct.


def test_concentration_percentile_clipping_is_active() -> None:
    """A single very tight and a single very loose cluster are clipped to the percentiles."""
    assignment, sq = [], []
    spreads = [0.001, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 3.0]
    for c, s in enumerate(spreads):
        for _ in range(3):
            assignment.append(c)
            sq.append(s * s)
    phi = concentration(torch.tensor(sq, dtype=torch.float64), torch.tensor(assignment), 10, 1.0).double().numpy()
    np.testing.assert_allclose(phi, ref_concentration(sq, assignment, 10, 1.0), rtol=1e-5)
    raw = np.array(spreads) / math.log(13)
    assert phi[0] / phi[1] > raw[0] / raw[1]  # the low outlier was raised
    assert phi[9] / phi[8] < raw[9] / raw[8]  # the high outlier was lowered
    assert phi.mean() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_concentration_matches_reference_random(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(3, 25))
    n = int(rng.integers(m, 6 * m))
    assignment = rng.integers(2, m, size=n)  # clusters 0 and 1 empty ...
    assignment[0] = 1  # ... then cluster 1 a singleton
    sq = (rng.random(n) * rng.uniform(0.1, 2.0)).tolist()
    temperature = float(rng.uniform(0.05, 1.0))
    phi = concentration(torch.tensor(sq), torch.tensor(assignment), m, temperature)
    ref = ref_concentration(sq, assignment.tolist(), m, temperature)
    np.testing.assert_allclose(phi.numpy(), ref, rtol=1e-5, atol=1e-7)
    assert float(phi.double().mean()) == pytest.approx(temperature, rel=1e-5)


def test_concentration_no_spread_falls_back_to_temperature() -> None:
    """Every sample on its centroid, or every cluster a singleton: phi is the plain temperature."""
    for sq, a in (([0.0] * 6, [0, 0, 1, 1, 2, 2]), ([0.3, 0.1, 0.2], [0, 1, 2])):
        phi = concentration(torch.tensor(sq), torch.tensor(a), 4, 0.07)
        assert torch.isfinite(phi).all()
        np.testing.assert_allclose(phi.numpy(), np.full(4, 0.07, dtype=np.float32))


def test_concentration_negative_rounding_is_clamped() -> None:
    """faiss distances can be slightly negative: treated as 0, not NaN."""
    sq, a = [-1e-7, 0.04, 0.09, 0.16, 0.01, 0.0], [0, 0, 1, 1, 2, 2]
    phi = concentration(torch.tensor(sq), torch.tensor(a), 3, 0.1)
    assert torch.isfinite(phi).all()
    np.testing.assert_allclose(phi.numpy(), ref_concentration([0.0] + sq[1:], a, 3, 0.1), rtol=1e-5)


# --------------------------------------------------------------------------- cluster()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("data_seed", [0, 1])
def test_cluster_recovers_separated_blobs(backend: str, data_seed: int) -> None:
    x, labels = gaussian_mixture(400, 16, 4, 0.05, data_seed)
    levels = cluster(x, [4, 2], temperature=0.2, seed=3, backend=backend, nredo=5)
    assert len(levels) == 2
    top = levels[0]
    assert isinstance(top, ClusterLevel)
    assert top.backend == backend
    assert top.num_clusters == 4 and levels[1].num_clusters == 2
    assert top.assignment.shape == (400,) and top.assignment.dtype == torch.long
    assert top.centroids.shape == (4, 16) and top.centroids.dtype == torch.float32
    assert top.concentration.shape == (4,)
    assert adjusted_rand_score(labels, top.assignment.numpy()) >= 0.95
    for lvl in levels:
        assert int(lvl.assignment.min()) >= 0 and int(lvl.assignment.max()) < lvl.num_clusters
        torch.testing.assert_close(lvl.centroids.norm(dim=1), torch.ones(lvl.num_clusters), atol=1e-5, rtol=0)
        assert float(lvl.concentration.double().mean()) == pytest.approx(0.2, abs=1e-5)
        assert (lvl.concentration > 0).all()
        assert lvl.objective > 0
    # two clusters of four blobs cost more than four
    assert levels[1].objective > top.objective


@pytest.mark.parametrize("backend", BACKENDS)
def test_cluster_same_seed_same_output(backend: str) -> None:
    x, _ = gaussian_mixture(300, 8, 6, 0.3, 5)
    a = cluster(x, [5, 9], temperature=0.1, seed=7, backend=backend, nredo=2)
    b = cluster(torch.from_numpy(x), [5, 9], temperature=0.1, seed=7, backend=backend, nredo=2)
    for la, lb in zip(a, b):
        assert torch.equal(la.assignment, lb.assignment)
        assert torch.equal(la.centroids, lb.centroids)
        assert torch.equal(la.concentration, lb.concentration)
        assert la.objective == lb.objective
    # level i is seeded with seed + i
    shifted = cluster(x, 9, temperature=0.1, seed=8, backend=backend, nredo=2)[0]
    assert torch.equal(shifted.assignment, a[1].assignment)
    assert torch.equal(shifted.centroids, a[1].centroids)


def test_cluster_torch_seed_matters() -> None:
    x, _ = gaussian_mixture(300, 8, 6, 0.5, 6)
    runs = [cluster(x, 12, temperature=0.1, seed=s, backend="torch", nredo=1)[0].centroids for s in range(3)]
    assert not (torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cluster_mean_concentration_equals_temperature(backend: str) -> None:
    x, _ = gaussian_mixture(500, 12, 10, 0.2, 2)
    for temperature in (0.05, 0.2, 1.0):
        for lvl in cluster(x, [3, 10, 25], temperature=temperature, seed=0, backend=backend, nredo=1):
            assert float(lvl.concentration.double().mean()) == pytest.approx(temperature, abs=1e-5)
            torch.testing.assert_close(lvl.centroids.norm(dim=1), torch.ones(lvl.num_clusters), atol=1e-5, rtol=0)


def test_cluster_torch_level_is_consistent_with_kmeans_torch() -> None:
    """cluster() = kmeans_torch + concentration + normalised centroids; objective = sum of sq. distances."""
    x, _ = gaussian_mixture(240, 6, 4, 0.2, 3)
    xt = torch.from_numpy(x)
    ids, sq, cent = kmeans_torch(xt, 5, niter=20, nredo=2, seed=4, max_points_per_centroid=1000)
    lvl = cluster(x, 5, temperature=0.3, seed=4, backend="torch", nredo=2)[0]
    assert torch.equal(lvl.assignment, ids)
    torch.testing.assert_close(lvl.centroids, torch.nn.functional.normalize(cent, dim=1))
    torch.testing.assert_close(lvl.concentration, concentration(sq, ids, 5, 0.3))
    assert lvl.objective == pytest.approx(float(sq.double().sum()), rel=1e-9)
    # each sample's id is its nearest (un-normalised) centroid and sq its squared distance (loop check)
    c = cent.double().numpy()
    for i in range(0, 240, 7):
        d = [float(((x[i].astype(np.float64) - c[j]) ** 2).sum()) for j in range(5)]
        assert int(ids[i]) == int(np.argmin(d))
        assert float(sq[i]) == pytest.approx(min(d), abs=1e-5)


def test_cluster_torch_subsamples_but_assigns_everything() -> None:
    x, labels = gaussian_mixture(600, 8, 3, 0.05, 4)
    lvl = cluster(x, 3, temperature=0.1, seed=0, backend="torch", nredo=2, max_points_per_centroid=40)[0]
    assert lvl.assignment.shape == (600,)
    assert adjusted_rand_score(labels, lvl.assignment.numpy()) >= 0.95


def test_cluster_torch_objective_close_to_faiss() -> None:
    """3000 x 32 mixture of 20 gaussians: the torch k-means is as good as faiss's (within 1%)."""
    x, _ = gaussian_mixture(3000, 32, 20, 0.3, 1)
    f = cluster(x, 20, temperature=0.2, seed=0, backend="faiss", nredo=4)[0]
    t = cluster(x, 20, temperature=0.2, seed=0, backend="torch", nredo=4)[0]
    assert f.backend == "faiss" and t.backend == "torch"
    assert t.objective <= 1.01 * f.objective
    # the data discriminate: a barely-run k-means is clearly worse than 1%
    weak = cluster(x, 20, temperature=0.2, seed=0, backend="torch", nredo=1, niter=1)[0]
    assert weak.objective > 1.02 * f.objective


@pytest.mark.parametrize("backend", BACKENDS)
def test_cluster_rejects_bad_counts(backend: str) -> None:
    x, _ = gaussian_mixture(50, 4, 2, 0.1, 0)
    with pytest.raises(ValueError, match="cannot cluster 50 samples into 51"):
        cluster(x, 51, temperature=0.1, backend=backend)
    with pytest.raises(ClusteringError, match=r"clustering level 1: cannot cluster 50 samples into 100 clusters.*"
                                              r"lower that count in pcl.cluster_schedule"):
        cluster(x, [5, 100], temperature=0.1, backend=backend)
    with pytest.raises(ValueError, match="cannot cluster"):
        cluster(x, 0, temperature=0.1, backend=backend)
    assert cluster(x, 50, temperature=0.1, backend=backend, nredo=1)[0].num_clusters == 50


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 9.00 GiB")])
def test_running_out_of_memory_names_the_level_and_the_fix(backend: str, error: Exception,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import pcl_tune.clustering as C

    x, _ = gaussian_mixture(60, 4, 3, 0.1, 0)
    calls: list[int] = []

    def failing_at_the_second_level(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise error
        return original(*args, **kwargs)

    name = "_kmeans_faiss" if backend.startswith("faiss") else "kmeans_torch"
    original = getattr(C, name)
    monkeypatch.setattr(C, name, failing_at_the_second_level)
    with pytest.raises(ClusteringError) as info:
        cluster(x, [4, 12, 20], temperature=0.1, backend=backend, nredo=1)
    message = str(info.value)
    assert message.startswith(f"clustering level 1 (12 clusters of 60 x 4 features, backend {backend}) ")
    assert "ran out of memory" in message and "pcl.cluster_schedule" in message and "\n" not in message
    # Other runtime errors are not relabelled as memory.
    calls.clear()
    error_other = RuntimeError("faiss assertion failed")
    monkeypatch.setattr(C, name, lambda *a, **k: (_ for _ in ()).throw(error_other))
    with pytest.raises(RuntimeError, match="faiss assertion failed"):
        cluster(x, [4], temperature=0.1, backend=backend, nredo=1)


def test_cluster_rejects_bad_features_and_backend() -> None:
    with pytest.raises(ValueError, match="shape"):
        cluster(np.zeros(10, dtype=np.float32), 2, temperature=0.1)
    with pytest.raises(ValueError, match="backend"):
        cluster(np.zeros((10, 2), dtype=np.float32), 2, temperature=0.1, backend="sklearn")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("gpu")
    assert resolve_backend("torch") == "torch"
    assert resolve_backend("faiss") == "faiss"
    assert resolve_backend("auto") in ("faiss", "faiss-gpu", "torch")


# --------------------------------------------------------------------------- ClusterSchedule


def test_schedule_fixed_forms() -> None:
    forms = ([5, 10], (5, 10), "5,10", " 5 , 10 ", "fixed:5,10", {"fixed": [5, 10]}, {"fixed": "5,10"})
    schedules = [ClusterSchedule.parse(f) for f in forms]
    for s in schedules:
        assert s == schedules[0]
        assert s.kind == "fixed" and s.start == (5, 10) and s.num_levels == 2
        assert s.counts(0, num_epochs=10) == [5, 10]
        assert s.counts(9, num_epochs=10, warmup_epochs=3) == [5, 10]
        assert s.spec() == "5,10"
    single = ClusterSchedule.parse(7)
    assert single.start == (7,) and single.counts(3, num_epochs=5) == [7]
    assert ClusterSchedule.parse(np.int64(4)).start == (4,)
    assert ClusterSchedule.parse(schedules[0]) is schedules[0]


def test_schedule_linear_counts() -> None:
    s = ClusterSchedule.parse("linear:3,6->30,60")
    assert (s.kind, s.start, s.end, s.num_levels) == ("linear", (3, 6), (30, 60), 2)
    # no warm-up: from epoch 0 to the last epoch (9)
    assert s.counts(0, num_epochs=10) == [3, 6]
    assert s.counts(9, num_epochs=10) == [30, 60]
    assert s.counts(3, num_epochs=10) == [12, 24]  # a third of the way
    assert s.counts(25, num_epochs=10) == [30, 60]  # past the end: clamped
    # rounding to the nearest integer
    r = ClusterSchedule.parse("linear:3->10")
    assert [r.counts(e, num_epochs=4)[0] for e in range(4)] == [3, 5, 8, 10]  # 3, 5.33, 7.67, 10
    assert all(isinstance(c, int) for c in r.counts(1, num_epochs=4))


def test_schedule_warmup_is_the_default_start() -> None:
    s = ClusterSchedule.parse("linear:10->100")
    counts = [s.counts(e, num_epochs=15, warmup_epochs=5)[0] for e in range(15)]
    assert counts[:6] == [10] * 6  # warm-up epochs and the first epoch after it
    assert counts[14] == 100
    assert counts[5 + 3] == 40  # 10 + 90 * 3 / 9
    assert counts == sorted(counts)


def test_schedule_explicit_epochs_dict_form() -> None:
    s = ClusterSchedule.parse({"linear": {"start": [3], "end": [30], "from_epoch": 2, "to_epoch": 11}})
    assert (s.from_epoch, s.to_epoch) == (2, 11)
    assert s.counts(0, num_epochs=50, warmup_epochs=20) == [3]  # explicit epochs override warm-up/length
    assert s.counts(2, num_epochs=50) == [3]
    assert s.counts(5, num_epochs=50) == [12]
    assert s.counts(11, num_epochs=50) == [30]
    assert s.counts(40, num_epochs=50) == [30]
    assert s == ClusterSchedule("linear", (3,), (30,), 2, 11)
    assert ClusterSchedule.parse({"linear": {"start": "3,6", "end": [30, 60]}}) == ClusterSchedule.parse("linear:3,6->30,60")


def test_schedule_geometric_counts() -> None:
    s = ClusterSchedule.parse("geometric:4,10->64,1000")
    assert s.kind == "geometric"
    assert s.counts(0, num_epochs=11) == [4, 10]
    assert s.counts(10, num_epochs=11) == [64, 1000]
    assert s.counts(5, num_epochs=11) == [16, 100]  # midpoint = geometric mean
    lin = ClusterSchedule.parse("linear:4,10->64,1000")
    assert lin.counts(5, num_epochs=11) == [34, 505]  # differs from the linear midpoint
    g = ClusterSchedule.parse({"geometric": {"start": [3], "end": [30]}})
    assert g.counts(5, num_epochs=11) == [round(math.sqrt(90))] == [9]
    assert g.counts(1, num_epochs=11) == [round(3 * 10 ** 0.1)]


def test_schedule_max_count_clamp() -> None:
    assert ClusterSchedule.parse([5, 500]).counts(0, num_epochs=3, max_count=100) == [5, 100]
    s = ClusterSchedule.parse("linear:10,50->400,4000")
    assert s.counts(9, num_epochs=10, max_count=1000) == [400, 1000]
    assert s.counts(0, num_epochs=10, max_count=1000) == [10, 50]
    assert s.counts(0, num_epochs=10, max_count=20) == [10, 20]


def test_schedule_steps_forms() -> None:
    s = ClusterSchedule.parse("steps:0=3,6;5=30,60")
    assert s.kind == "steps" and s.num_levels == 2
    assert s.steps == ((0, (3, 6)), (5, (30, 60)))
    assert [s.counts(e, num_epochs=10) for e in (0, 4, 5, 9)] == [[3, 6], [3, 6], [30, 60], [30, 60]]
    assert ClusterSchedule.parse({"steps": {0: [3, 6], 5: "30,60"}}) == s
    assert ClusterSchedule.parse({"steps": {"5": [30, 60], "0": [3, 6]}}) == s  # sorted, string epochs
    assert ClusterSchedule.parse("steps: 5=30,60; 0=3,6") == s
    # before the first step: the first step's counts
    late = ClusterSchedule.parse("steps:2=4;8=16")
    assert [late.counts(e, num_epochs=12)[0] for e in (0, 2, 7, 8, 11)] == [4, 4, 4, 16, 16]
    assert late.counts(9, num_epochs=12, max_count=10) == [10]


@pytest.mark.parametrize(
    "spec",
    ["5,10", "7", "linear:3,6->30,60", "geometric:2,4->40,80", "steps:0=3,6;5=30,60", "steps:3=100"],
)
def test_schedule_spec_round_trip(spec: str) -> None:
    s = ClusterSchedule.parse(spec)
    assert s.spec() == spec
    assert ClusterSchedule.parse(s.spec()) == s


def test_schedule_spec_canonical_forms() -> None:
    assert ClusterSchedule.parse("fixed: 5, 10").spec() == "5,10"
    assert ClusterSchedule.parse({"steps": {5: [30, 60], 0: [3, 6]}}).spec() == "steps:0=3,6;5=30,60"
    d = ClusterSchedule.parse({"geometric": {"start": [2], "end": [40], "from_epoch": 1}})
    assert d.spec() == "geometric:2->40"


def test_schedule_extremes() -> None:
    assert ClusterSchedule.parse("linear:3,60->30,6").extremes() == (3, 60)
    assert ClusterSchedule.parse("steps:0=3,6;5=30,600").extremes() == (3, 600)
    assert ClusterSchedule.parse([8, 2, 5]).extremes() == (2, 8)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("linear:3,6->30", "start has 2 levels but end has 1"),
        ({"geometric": {"start": [3], "end": [30, 60]}}, "start has 1 levels but end has 2"),
        ("steps:0=3,6;5=30", "same number of levels"),
        ({"steps": {0: [3], 4: [5, 6]}}, "same number of levels"),
        ("0,5", "integers >= 1"),
        ([5, 0], "integers >= 1"),
        ("linear:0->5", "integers >= 1"),
        ({"fixed": [-3]}, "integers >= 1"),
        ([2.5], "integers >= 1"),
        ([True], "integers >= 1"),
        ([], "empty"),
        ("cosine:3->30", "unknown schedule kind 'cosine'"),
        ({"cosine": [3]}, "unknown schedule kind 'cosine'"),
        ("linear:3,6", "expected 'linear:START->END'"),
        ("steps:0=3;five=6", "step epoch must be an integer"),
        ({"steps": {"x": [3]}}, "step epoch must be an integer"),
        ("steps:3", "EPOCH=COUNTS"),
        ({"steps": {}}, "steps needs a mapping"),
        ("5;10", "comma-separated positive integers"),
        ("a,b", "comma-separated positive integers"),
        ({"fixed": [3], "linear": {}}, "expected one key"),
        ({"linear": [3, 30]}, "needs a mapping with 'start' and 'end'"),
        ({"linear": {"start": [3]}}, "needs a mapping with 'start' and 'end'"),
        ({"linear": {"start": [3], "end": [9], "by": 2}}, "unknown key"),
        ({"linear": {"start": [3], "end": [9], "from_epoch": -1}}, "from_epoch must be a non-negative integer"),
        ({"linear": {"start": [3], "end": [9], "to_epoch": 2.5}}, "to_epoch must be a non-negative integer"),
        (3.5, "expected a list of cluster counts"),
        (None, "expected a list of cluster counts"),
    ],
)
def test_schedule_parse_errors(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        ClusterSchedule.parse(value)
    assert str(info.value).startswith("cluster schedule:")


def test_schedule_error_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"^clusters\.low: unknown schedule kind"):
        ClusterSchedule.parse("cubic:3->9", what="clusters.low")


def test_concentration_is_never_zero_with_duplicate_points() -> None:
    """More than 10 % of the clusters made of duplicates (every member on its centroid): their phi
    would be 0 after the percentile clip, and ProtoNCE's logits v.c / phi infinite. They get the
    smallest positive phi instead; the other clusters keep the reference's values."""
    assignment, sq = [], []
    for c in range(20):
        for _ in range(3):
            assignment.append(c)
            sq.append(0.0 if c < 4 else (0.1 + 0.02 * c) ** 2)  # clusters 0-3: duplicates
    phi = concentration(torch.tensor(sq, dtype=torch.float64), torch.tensor(assignment), 20, 0.1).double()
    assert torch.isfinite(phi).all() and (phi > 0).all()
    assert torch.allclose(phi[:4], phi[4:].min().expand(4))  # the floor: the tightest real cluster's phi
    assert phi.mean().item() == pytest.approx(0.1, abs=1e-6)
    logits = torch.randn(8, 20, dtype=torch.float64).clamp(-1, 1) / phi
    assert torch.isfinite(logits).all()
    # Same result as the reference with the duplicates' clusters given that floor before clipping.
    floor = (0.1 + 0.02 * 4) / math.log(13)
    raw = [floor] * 4 + [(0.1 + 0.02 * c) / math.log(13) for c in range(4, 20)]
    lo, hi = np.percentile(raw, 10), np.percentile(raw, 90)
    clipped = np.clip(raw, lo, hi)
    np.testing.assert_allclose(phi.numpy(), 0.1 * clipped / clipped.mean(), rtol=1e-6)
