"""Shared fixtures, and the one tiny run config of the tests (:data:`TINY_SETTINGS`).

The machine these run on has 2 cores shared with other jobs: every fixture here keeps torch (and
faiss, when present) on one thread and every run tiny. ``tiny_config`` (a fixture) and
``tiny_settings(...)`` (a function, for module-scoped fixtures, search-space files and scripts)
both start from :data:`TINY_SETTINGS`.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch


def _faiss_threads(n: int | None) -> int | None:
    """Set faiss's OpenMP thread count (when faiss is installed); returns the previous count."""
    try:
        import faiss
    except ImportError:
        return None
    prev = int(faiss.omp_get_max_threads())
    if n is not None:
        faiss.omp_set_num_threads(n)
    return prev


@pytest.fixture(scope="session")
def torch_threads() -> Iterator[None]:
    """One torch / faiss thread for the whole session (restored at the end)."""
    prev = torch.get_num_threads()
    prev_faiss = _faiss_threads(1)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
    if prev_faiss is not None:
        _faiss_threads(prev_faiss)


# The one tiny run of the tests: a second or so per epoch on one CPU core. Tests that need another
# size say so with `tiny_settings(changes, without=...)`, so every difference from it is visible.
TINY_SETTINGS: dict[str, Any] = {
    "device": "cpu",
    "threads": 1,
    "progress": False,
    "seed": 0,
    "epochs": 3,
    "data.dataset": "digits",
    "data.digits_copies": [1, 1, 1],
    "data.subset": 256,
    "data.num_workers": 0,
    "optim.batch_size": 32,
    "model.width": 8,
    "model.queue_size": 256,
    "clustering.nredo": 1,
    "clustering.niter": 10,
    "pcl.warmup_epochs": 1,
    "pcl.cluster_schedule": "5,10",
    "eval.batch_size": 256,
}


def tiny_settings(changes: Mapping[str, Any] | None = None, *, without: Iterable[str] = ()) -> dict[str, Any]:
    """A fresh copy of :data:`TINY_SETTINGS` (dotted keys), ``changes`` applied, the keys in ``without`` dropped.

    Importable where fixtures cannot reach (a test file run as a script, e.g. the gloo workers of
    test_distributed.py): ``from conftest import tiny_settings``.
    """
    out = copy.deepcopy(TINY_SETTINGS)
    for key in without:
        if key not in out:
            raise KeyError(f"{key!r} is not a tiny setting; the keys are {sorted(out)}")
        del out[key]
    out.update(copy.deepcopy(dict(changes or {})))
    return out


@pytest.fixture
def tiny_config() -> dict[str, Any]:
    """:data:`TINY_SETTINGS`, a fresh copy per test (dotted keys, as ``train_loop`` accepts them)."""
    return tiny_settings()


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child Python processes: one thread each, this interpreter's packages."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               GLOO_SOCKET_IFNAME="lo")
    return env


def run_ranks(script: str, world: int, tmp: Path, *mode: str, timeout: float = 300) -> list[Any]:
    """Run ``script`` as gloo ranks 0..world-1, each as ``script RANK WORLD INIT_FILE OUT_FILE *mode``
    (one thread each, on the loopback interface); wait for all and return what each rank saved to
    its ``OUT_FILE`` (``torch.save``). A rank that fails fails the test with its log."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, script, str(r), str(world), str(tmp / "init"), str(tmp / f"rank{r}.pt"),
                               *mode], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def straight_and_resumed(cfg: dict[str, Any], root: Path) -> dict[str, Any]:
    """On every rank of a gloo process group: ``cfg`` run straight through, and run again stopped
    after one epoch and resumed from rank 0's checkpoint; the two histories (``straight``,
    ``resumed``)."""
    import torch.distributed as dist

    from pcl_tune.checkpoint import CHECKPOINT_DIR
    from pcl_tune.train import train_loop

    straight = train_loop(cfg, out_dir=root / "straight", verbose=False)
    train_loop(cfg, out_dir=root / "resumed", verbose=False, max_epochs=1)
    dist.barrier()  # rank 0 has written the checkpoint every rank resumes from
    resumed = train_loop(cfg, out_dir=root / "resumed", verbose=False, resume_from=root / "resumed" / CHECKPOINT_DIR)
    return {"straight": straight, "resumed": resumed}


NOT_REPRODUCIBLE = ("time_", "images_per_s")
"""Keys of an epoch's record that depend on the machine's speed, not on the computation."""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and (math.isnan(a) or math.isnan(b)):
        return math.isnan(a) and math.isnan(b)
    return bool(a == b)


def record_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The keys where two epoch records differ (NaN equals NaN; timings ignored); both must have
    the same keys."""
    assert set(a) == set(b)
    return {k: (a[k], b[k]) for k in a if not k.startswith(NOT_REPRODUCIBLE) and not _same(a[k], b[k])}

