"""Tests of pcl_tune.distributed: the single-process no-op paths, and two gloo processes on CPU.

The two-process test starts this file as a script twice (ranks 0 and 1, ``init_method=file://``);
each rank writes what it computed to a ``.pt`` file and the test compares those with what one
process computes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_ranks, straight_and_resumed, tiny_settings

from pcl_tune import distributed as D

pytestmark = pytest.mark.usefixtures("torch_threads")

WORLD = 2
SIZES = (7, 10, 1)  # 7: not divisible by the world size; 1: fewer samples than ranks
EMBED_SUBSET = 37  # odd, so the padded shards repeat a sample

# --------------------------------------------------------------------------- shared helpers


def _features(index: torch.Tensor) -> torch.Tensor:
    """Per-sample rows that depend only on the sample index (a seeded layer of seeded inputs)."""
    gen = torch.Generator().manual_seed(123)
    inputs = torch.randn(64, 5, generator=gen)
    weight = torch.randn(5, 3, generator=gen)
    return torch.tanh(inputs[index] @ weight)


def _broadcast_payloads() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {
        "float32_3d": torch.randn(2, 3, 4, generator=gen),
        "int64_1d": torch.arange(11) * 7 - 30,
        "float64_2d": torch.randn(5, 2, generator=gen, dtype=torch.float64),
        "int32_4d": torch.randint(-100, 100, (1, 2, 3, 2), generator=gen, dtype=torch.int32),
        "bool_2d": torch.rand(3, 3, generator=gen) > 0.5,
        "float16": torch.randn(6, generator=gen).half(),
        "bfloat16": torch.randn(2, 5, generator=gen).bfloat16(),
        "scalar": torch.tensor(3.5),
        "noncontiguous": torch.arange(12.0).view(3, 4).T,
    }


def _embed_config() -> dict[str, Any]:
    """The tiny config shrunk further: a few images per rank, an odd count, clustering from epoch 0."""
    return tiny_settings({
        "seed": 3, "epochs": 2, "data.subset": EMBED_SUBSET, "optim.batch_size": 8, "model.width": 4,
        "model.queue_size": 64, "model.low_dim": 16, "clustering.niter": 5, "pcl.warmup_epochs": 0,
        "pcl.cluster_schedule": "3,5", "eval.batch_size": 8,
    })


@contextlib.contextmanager
def _recorded_batches() -> Iterator[list[torch.Tensor]]:
    """Record the sample indices of every training step (what ``train_epoch`` iterates over)."""
    import pcl_tune.train.epoch as epoch_mod

    seen: list[torch.Tensor] = []
    original = epoch_mod.iterate_batches

    def recording(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for batch in original(*args, **kwargs):
            seen.append(batch[0].clone())
            yield batch

    epoch_mod.iterate_batches = recording  # type: ignore[assignment]
    try:
        yield seen
    finally:
        epoch_mod.iterate_batches = original  # type: ignore[assignment]


# --------------------------------------------------------------------------- the worker (run as a script)


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        res: dict[str, Any] = {"rank": D.rank(), "world": D.world_size(), "is_main": D.is_main(),
                               "distributed": D.is_distributed()}
        for n in SIZES:
            local = D.shard(torch.arange(n), pad=True)
            res[f"shard_{n}"] = local
            res[f"shard_nopad_{n}"] = D.shard(torch.arange(n), pad=False)
            res[f"gather_{n}"] = D.gather_by_index(_features(local), local, n)
        res["all_gather"] = D.all_gather_cat(torch.full((2, 3), float(rank)))
        res["reduce"] = D.all_reduce_mean({"a": float(rank), "b": 2.0 * rank + 1}, torch.device("cpu"))
        payloads = _broadcast_payloads()
        res["broadcast"] = {k: D.broadcast_tensor(v if rank == 0 else None) for k, v in payloads.items()}
        res["broadcast_from_1"] = D.broadcast_tensor(torch.arange(4) + 100 if rank == 1 else None, src=1)

        from pcl_tune.config import config_from_dict
        from pcl_tune.train import RunState, embed, on_epoch_start, train_epoch

        trainer = RunState.build(config_from_dict(_embed_config()))
        res["trainer_world"] = trainer.world
        res["ddp"] = isinstance(trainer.query_net, torch.nn.parallel.DistributedDataParallel)
        heads, feats = embed(trainer, trainer.data.train, head=True, backbone=True)
        res["embed_heads"], res["embed_feats"] = heads, feats
        # Clustering runs on rank 0 and is broadcast; then one DDP epoch on the shards.
        assert heads is not None
        clusters = on_epoch_start(trainer, 0, heads)
        res["cluster_assignment"] = [lv.assignment.cpu() for lv in clusters.levels]
        res["cluster_centroids"] = [lv.centroids.cpu() for lv in clusters.levels]
        res["cluster_concentration"] = [lv.concentration.cpu() for lv in clusters.levels]
        with _recorded_batches() as batches:
            res["epoch_metrics"] = train_epoch(trainer, 0, clusters)
        res["batches"] = batches
        res["params_q"] = [p.detach().clone() for p in trainer.model.encoder_q.parameters()]
        res["params_k"] = [p.detach().clone() for p in trainer.model.encoder_k.parameters()]
        res["buffers_q"] = [b.detach().clone() for b in trainer.model.encoder_q.buffers()]
        res["buffers_k"] = [b.detach().clone() for b in trainer.model.encoder_k.buffers()]
        res["queue"] = trainer.model.queue.clone()
        torch.save(res, out_file)
    finally:
        dist.destroy_process_group()


def _run_ranks(tmp: Path, *mode: str, timeout: float = 300) -> list[dict[str, Any]]:
    """Run this file as ranks 0..WORLD-1 (``mode`` picks the worker); returns what each rank saved."""
    return run_ranks(__file__, WORLD, tmp, *mode, timeout=timeout)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Run the worker as ranks 0 and 1; returns what each rank saved."""
    return _run_ranks(tmp_path_factory.mktemp("gloo"))


# --------------------------------------------------------------------------- single process


def test_single_process_helpers_are_no_ops() -> None:
    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1 and D.is_main()
    idx = torch.tensor([4, 1, 3])
    assert D.shard(idx, pad=True) is idx and D.shard(idx, pad=False) is idx
    x = torch.randn(3, 2)
    assert D.all_gather_cat(x) is x
    assert D.broadcast_tensor(x) is x
    assert D.all_reduce_mean({"a": 1.5}, torch.device("cpu")) == {"a": 1.5}
    out = D.gather_by_index(x, idx, 5)  # rows placed by sample index
    assert out.shape == (5, 2)
    assert torch.equal(out[idx], x) and torch.equal(out[[0, 2]], torch.zeros(2, 2))


# --------------------------------------------------------------------------- two gloo processes


def test_ranks_see_the_group(two_ranks: list[dict[str, Any]]) -> None:
    assert [r["rank"] for r in two_ranks] == [0, 1]
    assert all(r["world"] == WORLD and r["distributed"] for r in two_ranks)
    assert [r["is_main"] for r in two_ranks] == [True, False]


@pytest.mark.parametrize("n", SIZES)
def test_padded_shards_cover_every_sample_with_equal_counts(two_ranks: list[dict[str, Any]], n: int) -> None:
    shards = [r[f"shard_{n}"] for r in two_ranks]
    per = -(-n // WORLD)
    assert all(s.numel() == per for s in shards)
    assert set(torch.cat(shards).tolist()) == set(range(n))
    unpadded = [r[f"shard_nopad_{n}"] for r in two_ranks]
    assert sorted(torch.cat(unpadded).tolist()) == list(range(n))  # without padding: each sample exactly once


@pytest.mark.parametrize("n", SIZES)
def test_gather_by_index_equals_single_process(two_ranks: list[dict[str, Any]], n: int) -> None:
    expected = _features(torch.arange(n))
    for r in two_ranks:
        assert r[f"gather_{n}"].shape == expected.shape
        assert torch.allclose(r[f"gather_{n}"], expected, atol=1e-6), r["rank"]


def test_all_gather_and_all_reduce(two_ranks: list[dict[str, Any]]) -> None:
    expected = torch.cat([torch.zeros(2, 3), torch.ones(2, 3)])
    for r in two_ranks:
        assert torch.equal(r["all_gather"], expected)
        assert r["reduce"] == pytest.approx({"a": 0.5, "b": 2.0})


def test_broadcast_tensor_any_shape_and_dtype(two_ranks: list[dict[str, Any]]) -> None:
    payloads = _broadcast_payloads()
    for r in two_ranks:
        for key, sent in payloads.items():
            got = r["broadcast"][key]
            assert got.dtype == sent.dtype and got.shape == sent.shape, (r["rank"], key)
            assert torch.equal(got, sent), (r["rank"], key)
        assert torch.equal(r["broadcast_from_1"], torch.arange(4) + 100)


def test_trainer_embed_two_ranks_equals_one_process(two_ranks: list[dict[str, Any]]) -> None:
    from pcl_tune.config import config_from_dict
    from pcl_tune.train import RunState, embed

    single = RunState.build(config_from_dict(_embed_config()))
    assert single.world == 1
    heads, feats = embed(single, single.data.train, head=True, backbone=True)
    assert heads is not None and feats is not None
    assert heads.shape == (EMBED_SUBSET, 16) and feats.shape == (EMBED_SUBSET, 32)
    for r in two_ranks:
        assert r["trainer_world"] == WORLD and r["ddp"]
        assert torch.allclose(r["embed_heads"], heads, atol=1e-5), r["rank"]
        assert torch.allclose(r["embed_feats"], feats, atol=1e-5), r["rank"]


def test_clusters_broadcast_from_rank_0(two_ranks: list[dict[str, Any]]) -> None:
    r0, r1 = two_ranks
    assert [a.numel() for a in r0["cluster_assignment"]] == [EMBED_SUBSET, EMBED_SUBSET]
    assert [c.shape[0] for c in r0["cluster_centroids"]] == [3, 5]
    for key in ("cluster_assignment", "cluster_centroids", "cluster_concentration"):
        for a, b in zip(r0[key], r1[key]):
            assert torch.equal(a, b), key


def test_ddp_epoch_keeps_ranks_in_sync(two_ranks: list[dict[str, Any]]) -> None:
    r0, r1 = two_ranks
    # Gradients are averaged: identical query (and hence key) weights; keys gathered: identical queue.
    for a, b in zip(r0["params_q"], r1["params_q"]):
        assert torch.equal(a, b)
    for a, b in zip(r0["params_k"], r1["params_k"]):
        assert torch.equal(a, b)
    assert torch.equal(r0["queue"], r1["queue"])
    # Metrics are averaged over ranks.
    m0, m1 = r0["epoch_metrics"], r1["epoch_metrics"]
    for key in ("loss", "loss_inst", "acc_inst", "loss_proto", "acc_proto_0", "lr"):
        assert m0[key] == pytest.approx(m1[key], rel=1e-9), key
    assert all(torch.isfinite(torch.tensor(m0[k])) for k in ("loss", "loss_proto"))


def test_two_ranks_train_on_one_process_global_batches(two_ranks: list[dict[str, Any]]) -> None:
    """``optim.batch_size`` is the global batch: at every step the ranks' halves together are the
    batch one process trains on, in as many steps (before, each rank took a whole batch per step:
    two ranks trained at twice the batch, in half the steps)."""
    from pcl_tune.config import config_from_dict
    from pcl_tune.train import RunState, train_epoch

    single = RunState.build(config_from_dict(_embed_config()))
    with _recorded_batches() as batches:
        train_epoch(single, 0, None)
    global_bs = _embed_config()["optim.batch_size"]
    assert [b.numel() for b in batches] == [global_bs] * (EMBED_SUBSET // global_bs)
    per_rank = [r["batches"] for r in two_ranks]
    assert all(len(steps) == len(batches) for steps in per_rank)
    for step, batch in enumerate(batches):
        halves = [steps[step] for steps in per_rank]
        assert all(h.numel() == global_bs // WORLD for h in halves)
        assert sorted(torch.cat(halves).tolist()) == sorted(batch.tolist()), step


def test_ddp_epoch_keeps_batchnorm_buffers_in_sync(two_ranks: list[dict[str, Any]]) -> None:
    r0, r1 = two_ranks
    for key in ("buffers_q", "buffers_k"):
        for a, b in zip(r0[key], r1[key]):
            assert torch.equal(a, b), key


def test_broadcast_tensor_uint8_on_the_source_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[torch.Tensor] = []
    monkeypatch.setattr(D, "is_distributed", lambda: True)
    monkeypatch.setattr(D, "rank", lambda: 0)
    monkeypatch.setattr(D.dist, "broadcast", lambda t, src: sent.append(t.clone()))
    x = torch.arange(6, dtype=torch.uint8).view(2, 3)
    out = D.broadcast_tensor(x)
    assert torch.equal(out, x) and len(sent) == 3


def _nan_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    """One DDP epoch in which rank 1's loss is NaN from the first batch (a NaN weight on rank 1 only,
    set after DDP's initial broadcast); saves what each rank raised and how long it took."""
    import time

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))
    try:
        from pcl_tune.config import config_from_dict
        from pcl_tune.train import RunState, TrainingDiverged, train_epoch

        trainer = RunState.build(config_from_dict(_embed_config()))
        if rank == 1:
            with torch.no_grad():
                weight = next(trainer.model.encoder_q.parameters())
                weight[(0,) * weight.dim()] = float("nan")
        t0 = time.perf_counter()
        res: dict[str, Any] = {"error": None}
        try:
            train_epoch(trainer, 0, None)
        except TrainingDiverged as e:
            res["error"] = str(e)
        res["seconds"] = time.perf_counter() - t0
        torch.save(res, out_file)
    finally:
        dist.destroy_process_group()


def _resume_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    """Three DDP epochs straight, and the same run stopped after epoch 1 and resumed from rank 0's
    checkpoint (as a Ray Train restart or a Tune restore does); saves both histories (rank 0 writes
    both final checkpoints)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        torch.save(straight_and_resumed({**_embed_config(), "epochs": 3}, Path(out_file).parent), out_file)
    finally:
        dist.destroy_process_group()


def test_nonfinite_loss_on_one_rank_stops_every_rank_at_once(tmp_path: Path) -> None:
    """Before the ranks agreed, rank 1 raised alone and rank 0 went on into DDP's gradient all-reduce.
    There it waits for the process-group timeout while rank 1's process lives on (a Ray Train worker),
    or dies of a gloo "connection closed" error when it exits (this test, before the fix): neither
    says why. Now both raise TrainingDiverged at the same step, naming the rank, within seconds."""
    results = _run_ranks(tmp_path, "nan", timeout=240)
    for r, res in enumerate(results):
        assert res["error"] is not None, r
        assert "on rank 1 of 2 at epoch 1, batch 1" in res["error"], res["error"]
        assert res["seconds"] < 30, res  # seconds, not the 90 s timeout
    assert "loss is nan" in results[1]["error"] and "loss is not finite" in results[0]["error"]


def test_resumed_ddp_run_equals_the_straight_run(tmp_path: Path) -> None:
    """Before each rank's random streams were derived from (seed, rank, epoch), only rank 0's stream
    state was checkpointed and every rank loaded it: after a restart both ranks drew rank 0's crops
    and negatives, and the resumed run left the straight one from the first resumed epoch."""
    from pcl_tune.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FILE, read_checkpoint

    results = _run_ranks(tmp_path, "resume", timeout=300)
    for r, res in enumerate(results):
        straight, resumed = res["straight"], res["resumed"]
        assert [m["epoch"] for m in resumed] == [1, 2, 3], r
        for a, b in zip(straight, resumed):
            for key in ("loss", "loss_inst", "loss_proto", "acc_inst", "knn_top1"):
                assert a[key] == b[key] or (a[key] != a[key] and b[key] != b[key]), (r, a["epoch"], key, a[key], b[key])
    weights = [read_checkpoint(tmp_path / run / CHECKPOINT_DIR / CHECKPOINT_FILE)[1]["model"]
               for run in ("straight", "resumed")]
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name


if __name__ == "__main__":
    if len(sys.argv) > 5 and sys.argv[5] == "nan":
        _nan_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    elif len(sys.argv) > 5 and sys.argv[5] == "resume":
        _resume_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])

