"""Shared fixtures for the data / config / train / distributed tests.

The machine these run on has 2 cores shared with other jobs: every fixture here keeps torch (and
faiss, when present) on one thread and every run tiny.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture
def tiny_config() -> dict[str, Any]:
    """Dotted-key settings of a run that takes about a second per epoch on one CPU core."""
    return {
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


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child Python processes: one thread each, this interpreter's packages."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               GLOO_SOCKET_IFNAME="lo")
    return env
