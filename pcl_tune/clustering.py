"""Per-epoch k-means of momentum-encoder features, PCL concentration, and cluster schedules.

:func:`cluster` follows the reference PCL procedure (Li et al. 2021, official code): k-means on
L2-normalised features (20 iterations, ``nredo`` restarts, level ``i`` seeded with ``seed + i``,
at most 1000 points per centroid used for training), assignment of every sample to its nearest
centroid, the concentration ``phi`` of each cluster (:func:`concentration`), and centroids
L2-normalised after.

Backends: faiss on GPU when faiss sees a GPU; else, when torch sees a GPU, the k-means written in
torch below (faiss's GPU wheels are hard to come by); else faiss on CPU. ``backend=`` forces one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import ClusteringConfig

log = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("auto", "faiss", "faiss-gpu", "torch")
_announced: set[str] = set()


@dataclass
class ClusterLevel:
    """The k-means result of one granularity.

    Attributes:
        assignment: (N,) long, cluster id of every sample.
        centroids: (M, D) float32, L2-normalised centroids (the prototypes).
        concentration: (M,) float32, per-cluster temperature phi (mean = the given temperature).
        objective: k-means objective, the sum over samples of the squared distance to the
            (un-normalised) centroid.
        backend: which implementation produced it.
    """

    assignment: Tensor
    centroids: Tensor
    concentration: Tensor
    objective: float
    backend: str = ""

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])


def concentration(
    sq_dist: Tensor, assignment: Tensor, num_clusters: int, temperature: float
) -> Tensor:
    """PCL concentration phi of every cluster (Li et al. 2021, eq. 12, reference code).

    ``phi_c = mean_{v in c} ||v - c|| / log(n_c + 10)`` for clusters with more than one member;
    clusters with 0 or 1 member get the largest phi; clusters with phi 0 (every member on the
    centroid) get the smallest positive phi (not in the reference, where they would keep 0 and make
    the logits infinite once they are more than 10 % of the clusters); then phi is clipped to its
    10th-90th percentile and rescaled so that its mean equals ``temperature``.

    Args:
        sq_dist: (N,) squared distance of each sample to its centroid.
        assignment: (N,) cluster id of each sample.
        num_clusters: M.
        temperature: the target mean of phi.

    Returns:
        (M,) float32 concentration.
    """
    d = sq_dist.double().clamp_min(0).sqrt().cpu()
    a = assignment.long().cpu()
    counts = torch.bincount(a, minlength=num_clusters).double()
    sums = torch.zeros(num_clusters, dtype=torch.float64).index_add_(0, a, d)
    multi = counts > 1
    phi = torch.where(multi, sums / counts.clamp_min(1) / torch.log(counts + 10), torch.zeros_like(sums))
    phi_max = phi.max() if multi.any() else torch.tensor(0.0, dtype=torch.float64)
    phi = torch.where(multi, phi, phi_max)
    # Floor: a cluster whose members all sit on its centroid (duplicate images, collapsed features)
    # has phi 0; when more than 10 % of the clusters are such, the 10th-percentile clip keeps the 0,
    # and ProtoNCE's logits v.c / phi become infinite. Such clusters take the smallest positive phi
    # (about what the clip raises them to when they are few); runs without them are unchanged.
    positive = phi > 0
    if positive.any() and not positive.all():
        phi = torch.where(positive, phi, phi[positive].min())
    lo, hi = torch.quantile(phi, 0.1), torch.quantile(phi, 0.9)
    phi = phi.clamp(lo, hi)
    mean = phi.mean()
    if not torch.isfinite(mean) or mean <= 0:
        # Every sample sits on its centroid: no spread to measure, use the plain temperature.
        return torch.full((num_clusters,), float(temperature), dtype=torch.float32)
    return (temperature * phi / mean).float()


def faiss_gpu_count() -> int:
    """Number of GPUs faiss can use (0 for the CPU build or when faiss is missing)."""
    try:
        import faiss
    except ImportError:
        return 0
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def resolve_backend(backend: str = "auto") -> str:
    """Turn ``"auto"`` into the backend that will run: faiss-gpu, torch (on CUDA) or faiss (CPU)."""
    if backend not in BACKENDS:
        raise ValueError(f"clustering backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if faiss_gpu_count() > 0:
        return "faiss-gpu"
    if torch.cuda.is_available():
        return "torch"
    try:
        import faiss  # noqa: F401
    except ImportError:
        if "nofaiss" not in _announced:
            _announced.add("nofaiss")
            log.warning("faiss is not installed: clustering falls back to the torch k-means on CPU "
                        "(pip install faiss-cpu for the reference implementation)")
        return "torch"
    return "faiss"


def _announce(backend: str, device: str) -> None:
    key = f"{backend}@{device}"
    if key not in _announced:
        _announced.add(key)
        log.info("clustering backend: %s on %s", backend, device)


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _announced:
        _announced.add(key)
        log.warning(message, *args)


def _kmeans_faiss(
    x: np.ndarray, k: int, *, niter: int, nredo: int, seed: int, max_ppc: int, min_ppc: int, gpu: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import faiss

    n, d = x.shape
    clus = faiss.Clustering(d, k)
    clus.verbose = False
    clus.niter = niter
    clus.nredo = nredo
    clus.seed = seed
    clus.max_points_per_centroid = max_ppc
    if n < k * min_ppc:
        # faiss only warns here (on stderr, every call: once per level per epoch per trial in a
        # search's console); say it once per (points, clusters) and let faiss run quietly.
        _warn_once(f"few@{n}/{k}", "clustering %d points into %d clusters: fewer than %d points per cluster "
                   "(clustering.min_points_per_centroid); the centroids are noisy", n, k, min_ppc)
        min_ppc = max(1, n // k)
    clus.min_points_per_centroid = min_ppc
    if gpu:
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = False
        cfg.device = 0
        index = faiss.GpuIndexFlatL2(res, d, cfg)
    else:
        index = faiss.IndexFlatL2(d)
    clus.train(x, index)
    sq_dist, ids = index.search(x, 1)
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d)
    return ids[:, 0].astype(np.int64), sq_dist[:, 0], centroids


def _nearest(x: Tensor, c: Tensor, chunk_elems: int = 1 << 26) -> tuple[Tensor, Tensor]:
    """(N, D), (M, D) -> nearest centroid id (N,) and squared distance (N,), in row chunks."""
    c_sq = (c * c).sum(1)
    rows = max(1, chunk_elems // max(1, c.shape[0]))
    ids, dists = [], []
    for start in range(0, x.shape[0], rows):
        xb = x[start:start + rows]
        d = (xb * xb).sum(1, keepdim=True) + c_sq[None, :] - 2.0 * (xb @ c.T)
        best, idx = d.min(dim=1)
        ids.append(idx)
        dists.append(best.clamp_min(0))
    return torch.cat(ids), torch.cat(dists)


def _init_centroids(x: Tensor, k: int, gen: torch.Generator, plus_plus_max_k: int = 1024) -> Tensor:
    """k-means++ seeding (on at most 64k points) for k <= plus_plus_max_k; k distinct random points above.

    k-means++ costs k sequential passes, too slow for the 25 000+ clusters of ImageNet runs, where
    random seeding (faiss's choice) is good enough because clusters are many and small.
    """
    n = x.shape[0]
    if k > plus_plus_max_k:
        return x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()
    pool = x if n <= 65536 else x[torch.randperm(n, generator=gen)[:65536].to(x.device)]
    first = int(torch.randint(pool.shape[0], (1,), generator=gen))
    centers = [pool[first]]
    d = ((pool - pool[first]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d.double().cpu()
        total = float(probs.sum())
        if total <= 0:
            idx = int(torch.randint(pool.shape[0], (1,), generator=gen))
        else:
            idx = int(torch.multinomial(probs / total, 1, generator=gen))
        centers.append(pool[idx])
        d = torch.minimum(d, ((pool - pool[idx]) ** 2).sum(1))
    return torch.stack(centers).clone()


def kmeans_torch(
    x: Tensor, k: int, *, niter: int = 20, nredo: int = 1, seed: int = 0, max_points_per_centroid: int = 1000
) -> tuple[Tensor, Tensor, Tensor]:
    """Lloyd's k-means in torch, on ``x``'s device (the GPU backend where faiss has no GPU).

    Like faiss: training on a random subsample of at most ``k * max_points_per_centroid`` points and
    ``nredo`` runs keeping the lowest objective; seeding by k-means++ for k <= 1024, else by ``k``
    distinct random points.
    An empty cluster is re-seeded with the training point farthest from its centroid.

    Args:
        x: (N, D) float features.

    Returns:
        (assignment (N,) long, squared distance (N,), centroids (M, D)) on ``x``'s device.
    """
    n = x.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = x.float()
    if n > k * max_points_per_centroid:
        sub = torch.randperm(n, generator=gen)[: k * max_points_per_centroid].to(x.device)
        xt = x[sub]
    else:
        xt = x
    best_c, best_obj = None, math.inf
    for _ in range(max(1, nredo)):
        c = _init_centroids(xt, k, gen)
        for _ in range(niter):
            ids, dist = _nearest(xt, c)
            counts = torch.bincount(ids, minlength=k)
            sums = torch.zeros_like(c).index_add_(0, ids, xt)
            empty = counts == 0
            c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None].to(c.dtype))
            num_empty = int(empty.sum())
            if num_empty:
                far = dist.topk(num_empty).indices
                c[empty] = xt[far]
        _, dist = _nearest(xt, c)
        obj = float(dist.sum())
        if obj < best_obj:
            best_obj, best_c = obj, c
    assert best_c is not None
    ids, dist = _nearest(x, best_c)
    return ids, dist, best_c


def cluster(
    features: Tensor | np.ndarray,
    num_clusters: int | Sequence[int],
    *,
    temperature: float,
    seed: int = 0,
    niter: int = ClusteringConfig.niter,
    nredo: int = ClusteringConfig.nredo,
    max_points_per_centroid: int = ClusteringConfig.max_points_per_centroid,
    min_points_per_centroid: int = ClusteringConfig.min_points_per_centroid,
    backend: str = ClusteringConfig.backend,
) -> list[ClusterLevel]:
    """k-means of ``features`` at every granularity in ``num_clusters`` (PCL's per-epoch step).

    Args:
        features: (N, D) features (L2-normalised by PCL; used as given).
        num_clusters: one count or a list of counts, one level each.
        temperature: mean concentration of every level.
        seed: level ``i`` is seeded with ``seed + i``.
        niter, nredo, max_points_per_centroid, min_points_per_centroid: k-means settings; the
            defaults are the run config's (``clustering.*``; the reference PCL code uses nredo 5).
        backend: ``"auto"``, ``"faiss"``, ``"faiss-gpu"`` or ``"torch"``.

    Returns:
        one :class:`ClusterLevel` per count, on CPU.
    """
    counts = [int(num_clusters)] if isinstance(num_clusters, (int, np.integer)) else [int(c) for c in num_clusters]
    feats = torch.as_tensor(features)
    if feats.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {tuple(feats.shape)}")
    n = feats.shape[0]
    for i, c in enumerate(counts):
        if not 1 <= c <= n:
            raise ClusteringError(f"clustering level {i}: cannot cluster {n} samples into {c} clusters: each count "
                                  f"must lie in [1, {n}]; lower that count in pcl.cluster_schedule")
    name = resolve_backend(backend)
    levels: list[ClusterLevel] = []
    if name in ("faiss", "faiss-gpu"):
        _announce(name, "cuda:0" if name == "faiss-gpu" else "cpu")
        x = np.ascontiguousarray(feats.detach().float().cpu().numpy())
        for i, k in enumerate(counts):
            with _level_errors(i, k, tuple(x.shape), name):
                ids, sq, cent = _kmeans_faiss(
                    x, k, niter=niter, nredo=nredo, seed=seed + i, max_ppc=max_points_per_centroid,
                    min_ppc=min_points_per_centroid, gpu=name == "faiss-gpu",
                )
            levels.append(_make_level(torch.from_numpy(ids), torch.from_numpy(sq), torch.from_numpy(cent),
                                      temperature, name))
    else:
        device = torch.device("cuda") if torch.cuda.is_available() else feats.device
        _announce(name, str(device))
        x = feats.detach().float().to(device)
        for i, k in enumerate(counts):
            with _level_errors(i, k, tuple(x.shape), name):
                ids, sq, cent = kmeans_torch(x, k, niter=niter, nredo=nredo, seed=seed + i,
                                             max_points_per_centroid=max_points_per_centroid)
            levels.append(_make_level(ids.cpu(), sq.cpu(), cent.cpu(), temperature, name))
    return levels


class ClusteringError(ValueError):
    """k-means of one level failed; the message names the level, its count and what to change."""


@contextlib.contextmanager
def _level_errors(level: int, k: int, shape: tuple[int, ...], backend: str) -> Iterator[None]:
    """Turn running out of memory while clustering one level into a :class:`ClusteringError` that
    names the level and says what to change (the raw error names neither)."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, MemoryError) and "out of memory" not in text.lower():
            raise
        n, d = shape[0], shape[1] if len(shape) > 1 else 1
        cpu = "" if backend == "faiss" else ", or use clustering.backend: faiss (CPU memory)"
        raise ClusteringError(
            f"clustering level {level} ({k} clusters of {n} x {d} features, backend {backend}) ran out of memory "
            f"({text}); lower that count in pcl.cluster_schedule or cluster a sample with a smaller "
            f"clustering.max_points_per_centroid{cpu}") from e


def _make_level(ids: Tensor, sq: Tensor, cent: Tensor, temperature: float, backend: str) -> ClusterLevel:
    k = cent.shape[0]
    phi = concentration(sq, ids, k, temperature)
    centroids = torch.nn.functional.normalize(cent.float(), dim=1)
    return ClusterLevel(assignment=ids.long(), centroids=centroids, concentration=phi,
                        objective=float(sq.double().sum()), backend=backend)


# --------------------------------------------------------------------------- cluster schedules

SCHEDULE_KINDS: tuple[str, ...] = ("fixed", "linear", "geometric", "steps")
_COUNTS_RE = re.compile(r"^\s*\d+(\s*,\s*\d+)*\s*$")


def _parse_counts(text: Any, what: str) -> tuple[int, ...]:
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        vals: list[Any] = [text]
    elif isinstance(text, str):
        if not _COUNTS_RE.match(text):
            raise ValueError(f"{what}: expected comma-separated positive integers like '5,10,20', got {text!r}")
        vals = [int(v) for v in text.split(",")]
    elif isinstance(text, (list, tuple)):
        vals = list(text)
    else:
        raise ValueError(f"{what}: expected a list of cluster counts, got {text!r}")
    if not vals:
        raise ValueError(f"{what}: the list of cluster counts is empty")
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{what}: cluster counts must be integers >= 1, got {v!r}")
        out.append(int(v))
    return tuple(out)


@dataclass(frozen=True)
class ClusterSchedule:
    """Cluster counts per level as a function of the epoch.

    Kinds (YAML value -> meaning):

    * ``[5, 10]`` or ``"5,10"`` or ``{fixed: [5, 10]}``: the same counts every epoch.
    * ``"linear:3,6,15->60,120,240"`` or ``{linear: {start: [...], end: [...]}}``: each level's
      count interpolated linearly from ``start`` (at ``from_epoch``, default: the first epoch
      after warm-up) to ``end`` (at ``to_epoch``, default: the last epoch).
    * ``"geometric:..."``: the same, interpolating in log space.
    * ``"steps:0=3,6,15;25=60,120,240"`` or ``{steps: {0: [...], 25: [...]}}``: piecewise constant.

    Counts are rounded to integers and clamped to [1, number of samples].
    """

    kind: str
    start: tuple[int, ...]
    end: tuple[int, ...] = ()
    from_epoch: int | None = None
    to_epoch: int | None = None
    steps: tuple[tuple[int, tuple[int, ...]], ...] = field(default_factory=tuple)

    @property
    def num_levels(self) -> int:
        return len(self.start)

    @classmethod
    def parse(cls, value: Any, *, what: str = "cluster schedule") -> ClusterSchedule:
        """Build a schedule from its YAML value (see the class docstring)."""
        if isinstance(value, ClusterSchedule):
            return value
        if isinstance(value, str) and ":" in value:
            kind, _, rest = value.partition(":")
            kind = kind.strip()
            if kind == "fixed":
                return cls("fixed", _parse_counts(rest, what))
            if kind in ("linear", "geometric"):
                if "->" not in rest:
                    raise ValueError(f"{what}: expected '{kind}:START->END' like '{kind}:3,6->30,60', got {value!r}")
                a, b = rest.split("->", 1)
                return cls._interp(kind, _parse_counts(a, what), _parse_counts(b, what), None, None, what)
            if kind == "steps":
                steps: dict[Any, Any] = {}
                for part in rest.split(";"):
                    if "=" not in part:
                        raise ValueError(f"{what}: expected 'steps:EPOCH=COUNTS;...' like 'steps:0=3,6;20=30,60', got {value!r}")
                    e, c = part.split("=", 1)
                    if not e.strip().isdigit():
                        raise ValueError(f"{what}: step epoch must be an integer, got {e!r} in {value!r}")
                    steps[int(e)] = c
                return cls._steps(steps, what)
            raise ValueError(f"{what}: unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")
        if isinstance(value, dict):
            if len(value) != 1:
                raise ValueError(f"{what}: expected one key among {SCHEDULE_KINDS}, got {sorted(value)}")
            ((kind, body),) = value.items()
            if kind == "fixed":
                return cls("fixed", _parse_counts(body, what))
            if kind in ("linear", "geometric"):
                if not isinstance(body, dict) or "start" not in body or "end" not in body:
                    raise ValueError(f"{what}: {kind} needs a mapping with 'start' and 'end' counts")
                unknown = set(body) - {"start", "end", "from_epoch", "to_epoch"}
                if unknown:
                    raise ValueError(f"{what}: unknown key(s) {sorted(unknown)} in {kind}; expected start, end, from_epoch, to_epoch")
                return cls._interp(kind, _parse_counts(body["start"], what), _parse_counts(body["end"], what),
                                   body.get("from_epoch"), body.get("to_epoch"), what)
            if kind == "steps":
                if not isinstance(body, dict) or not body:
                    raise ValueError(f"{what}: steps needs a mapping epoch -> counts")
                return cls._steps(body, what)
            raise ValueError(f"{what}: unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")
        return cls("fixed", _parse_counts(value, what))

    @classmethod
    def _interp(cls, kind: str, start: tuple[int, ...], end: tuple[int, ...], e0: Any, e1: Any, what: str) -> ClusterSchedule:
        if len(start) != len(end):
            raise ValueError(f"{what}: start has {len(start)} levels but end has {len(end)}")
        for name, e in (("from_epoch", e0), ("to_epoch", e1)):
            if e is not None and (not isinstance(e, int) or e < 0):
                raise ValueError(f"{what}: {name} must be a non-negative integer, got {e!r}")
        return cls(kind, start, end, e0, e1)

    @classmethod
    def _steps(cls, body: dict[Any, Any], what: str) -> ClusterSchedule:
        items = []
        for e, c in body.items():
            try:
                epoch = int(e)
            except (TypeError, ValueError):
                raise ValueError(f"{what}: step epoch must be an integer, got {e!r}") from None
            items.append((epoch, _parse_counts(c, what)))
        items.sort()
        if len({len(c) for _, c in items}) != 1:
            raise ValueError(f"{what}: every step must have the same number of levels")
        return cls("steps", items[0][1], steps=tuple(items))

    def counts(self, epoch: int, *, num_epochs: int, warmup_epochs: int = 0, max_count: int | None = None) -> list[int]:
        """Cluster count of every level at ``epoch`` (0-based) of a ``num_epochs`` run."""
        if self.kind == "fixed":
            raw = [float(c) for c in self.start]
        elif self.kind == "steps":
            chosen = self.steps[0][1]
            for e, c in self.steps:
                if epoch >= e:
                    chosen = c
            raw = [float(c) for c in chosen]
        else:
            e0 = self.from_epoch if self.from_epoch is not None else warmup_epochs
            e1 = self.to_epoch if self.to_epoch is not None else num_epochs - 1
            t = (0.0 if epoch < e0 else 1.0) if e1 <= e0 else min(1.0, max(0.0, (epoch - e0) / (e1 - e0)))
            if self.kind == "linear":
                raw = [s + t * (e - s) for s, e in zip(self.start, self.end)]
            else:
                raw = [s * (e / s) ** t for s, e in zip(self.start, self.end)]
        out = [max(1, int(round(v))) for v in raw]
        if max_count is not None:
            out = [min(c, max_count) for c in out]
        return out

    def extremes(self) -> tuple[int, int]:
        """Smallest and largest count any level reaches at any epoch (before clamping)."""
        vals = list(self.start) + list(self.end) + [c for _, cs in self.steps for c in cs]
        return min(vals), max(vals)

    def spec(self) -> str:
        """Canonical short string (from_epoch/to_epoch are not part of it)."""
        fmt = ",".join
        if self.kind == "fixed":
            return fmt(str(c) for c in self.start)
        if self.kind == "steps":
            return "steps:" + ";".join(f"{e}=" + fmt(str(c) for c in cs) for e, cs in self.steps)
        return f"{self.kind}:" + fmt(str(c) for c in self.start) + "->" + fmt(str(c) for c in self.end)
