"""Timing and quality of pcl_tune's k-means (faiss and torch backends) vs scikit-learn's KMeans.

Data: N x D features drawn from a mixture of gaussians (``--components`` random centres on the
unit sphere, unequal weights, isotropic noise), L2-normalised as PCL's features are. Each
method clusters them into each of ``--clusters`` counts with 20 Lloyd iterations and a single
run (``nredo=1`` / ``n_init=1``):

* ``faiss``: ``pcl_tune.clustering.cluster(..., backend="faiss")`` (faiss.Clustering on CPU,
  seeded with k random points, always runs all 20 iterations).
* ``torch``: ``pcl_tune.clustering.cluster(..., backend="torch")`` (k-means++ seeding for
  k <= 1024, then Lloyd in torch).
* ``sklearn``: ``sklearn.cluster.KMeans(init="k-means++", n_init=1, max_iter=20, tol=0,
  algorithm="lloyd")``; it may stop early when no label changes.

Reported: the median (and best) wall time over ``--repeats`` runs (seeds 0, 1, ...; the methods
interleaved run by run), and the objective (sum over all N points of the squared distance to
the nearest final, un-normalised centroid) of each run's median. The wall time of ``cluster``
includes its concentration and centroid normalisation, which are negligible.

Run ``python benchmarks/clustering.py`` (writes benchmarks/results/clustering.md) or
``--quick`` for a small smoke run that writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _env import environment

from pcl_tune.clustering import cluster

RESULTS = Path(__file__).resolve().parent / "results"
METHODS: tuple[str, ...] = ("faiss", "torch", "sklearn")


def mixture_of_gaussians(n: int, dim: int, components: int, noise: float, seed: int) -> np.ndarray:
    """(n, dim) float32 L2-normalised samples of a gaussian mixture with centres on the sphere."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((components, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.dirichlet(np.full(components, 2.0))
    comp = rng.choice(components, size=n, p=weights)
    x = centres[comp] + noise * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def run_pcl(x: np.ndarray, k: int, seed: int, backend: str, niter: int) -> tuple[float, float, int]:
    """One pcl_tune.clustering.cluster run: (objective, seconds, iterations)."""
    t0 = time.perf_counter()
    (level,) = cluster(x, k, temperature=0.2, seed=seed, niter=niter, nredo=1, backend=backend)
    return level.objective, time.perf_counter() - t0, niter


def run_sklearn(x: np.ndarray, k: int, seed: int, niter: int) -> tuple[float, float, int]:
    """One scikit-learn KMeans run: (objective, seconds, iterations actually run)."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd",
                random_state=seed)
    t0 = time.perf_counter()
    km.fit(x)
    dt = time.perf_counter() - t0
    return float(km.inertia_), dt, int(km.n_iter_)


def format_table(rows: list[dict[str, float]]) -> str:
    head = ["k", "faiss s (best)", "torch s (best)", "sklearn s (best)", "faiss/sklearn time",
            "torch/sklearn time", "faiss objective", "torch objective", "sklearn objective", "sklearn iters"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" for _ in head) + "|"]
    for r in rows:
        cells = [f"{int(r['k'])}", *(f"{r[m + '_s']:.3f} ({r[m + '_best']:.3f})" for m in METHODS),
                 f"{r['faiss_s'] / r['sklearn_s']:.2f}x", f"{r['torch_s'] / r['sklearn_s']:.2f}x",
                 f"{r['faiss_obj']:.2f}", f"{r['torch_obj']:.2f}", f"{r['sklearn_obj']:.2f}",
                 f"{int(r['sklearn_iters'])}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 4000 x 32 points, k=10,50, one repeat")
    p.add_argument("--n", type=int, default=None, help="number of points (default 20000)")
    p.add_argument("--dim", type=int, default=None, help="feature dimension (default 128)")
    p.add_argument("--clusters", default=None, help="comma-separated k values (default 100,1000)")
    p.add_argument("--components", type=int, default=100, help="gaussians in the mixture")
    p.add_argument("--noise", type=float, default=0.06, help="per-coordinate noise std")
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--repeats", type=int, default=None, help="runs per method and k (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="markdown file (default benchmarks/results/clustering.md; "
                   "none with --quick)")
    args = p.parse_args(argv)

    import faiss
    from threadpoolctl import threadpool_limits

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    n = args.n or (4000 if args.quick else 20000)
    dim = args.dim or (32 if args.quick else 128)
    ks = [int(s) for s in args.clusters.split(",")] if args.clusters else ([10, 50] if args.quick else [100, 1000])
    repeats = args.repeats or (1 if args.quick else 3)
    out = Path(args.out) if args.out else (None if args.quick else RESULTS / "clustering.md")

    x = mixture_of_gaussians(n, dim, args.components, args.noise, args.seed)
    env = environment()
    setup = (f"{n} x {dim} float32 points, mixture of {args.components} gaussians (noise {args.noise}), "
             f"L2-normalised; {args.niter} iterations, nredo=1 / n_init=1; median wall time of {repeats} "
             f"run(s), seeds {args.seed}..{args.seed + repeats - 1}, methods interleaved")
    print(f"Environment: {env}\nSetup: {setup}", flush=True)

    runners: dict[str, Callable[[int, int], tuple[float, float, int]]] = {
        "faiss": lambda k, s: run_pcl(x, k, s, "faiss", args.niter),
        "torch": lambda k, s: run_pcl(x, k, s, "torch", args.niter),
        "sklearn": lambda k, s: run_sklearn(x, k, s, args.niter),
    }
    rows: list[dict[str, float]] = []
    with threadpool_limits(limits=args.threads):
        runners["faiss"](min(ks), args.seed)  # warm-up: imports, thread pools
        for k in ks:
            res: dict[str, list[tuple[float, float, int]]] = {m: [] for m in METHODS}
            for rep in range(repeats):
                for m in METHODS:
                    res[m].append(runners[m](k, args.seed + rep))
                    obj, dt, it = res[m][-1]
                    print(f"k={k:>5} seed={args.seed + rep} {m:<8} {dt:8.3f} s  objective {obj:.2f}  iters {it}",
                          flush=True)
            row: dict[str, float] = {"k": k}
            for m in METHODS:
                row[f"{m}_s"] = statistics.median(r[1] for r in res[m])
                row[f"{m}_best"] = min(r[1] for r in res[m])
                row[f"{m}_obj"] = statistics.median(r[0] for r in res[m])
            row["sklearn_iters"] = statistics.median(r[2] for r in res["sklearn"])
            rows.append(row)

    table = format_table(rows)
    notes = ("Objective: sum over all points of the squared distance to the nearest final centroid "
             "(pcl_tune's ClusterLevel.objective, sklearn's inertia_), median over the runs; lower is better. "
             "Times in seconds: median (best) of the runs; the time ratios are of the medians, < 1 means "
             "faster than scikit-learn.")
    print(f"\n{table}\n\n{notes}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join([f"Environment: {env}", "", f"Setup: {setup}", "", table, "", notes, ""]))
        print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
