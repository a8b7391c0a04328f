"""Shared fixtures, and the one tiny run config of the tests (:data:`TINY_SETTINGS`).

The machine these run on has 2 cores shared with other jobs: every fixture here keeps torch (and
faiss, when present) on one thread and every run tiny. ``tiny_config`` (a fixture) and
``tiny_settings(...)`` (a function, for module-scoped fixtures, search-space files and scripts)
both start from :data:`TINY_SETTINGS`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator, Mapping
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
