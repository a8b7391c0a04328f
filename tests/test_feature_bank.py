"""Tests of ``clustering.features: bank`` (the training steps' keys clustered instead of a pass) and of
the in-memory cache of decoded file datasets (``data.cache_mb``).

The two-rank test starts this file as a script twice (ranks 0 and 1, gloo, ``init_method=file://``),
as tests/test_distributed.py does; each rank saves what it holds and the test compares the ranks
with each other and with what one process builds from the same keys.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import math
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import record_differences, run_ranks, straight_and_resumed, tiny_settings

from pcl_tune.config import ConfigError, config_from_dict
from pcl_tune.data import FileImageDataset, cache_file_datasets, iterate_batches, load_datasets
from pcl_tune.model import FeatureBank
from pcl_tune.train import CHECKPOINT_DIR, CHECKPOINT_FILE, RunState, Trainer, embed, train_epoch, train_loop
from pcl_tune.train.embed import bank_features

pytestmark = pytest.mark.usefixtures("torch_threads")

EMBED = importlib.import_module("pcl_tune.train.embed")
EPOCH = importlib.import_module("pcl_tune.train.epoch")
LOOP = importlib.import_module("pcl_tune.train.loop")
WORLD = 2
D = 128  # model.low_dim of the tiny run (the default)
DDP_SUBSET = 37  # 4 global batches of 8: 5 images dropped every epoch, so the bank has gaps to fill


def _bank_settings(changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tiny run with a feature bank; 250 images, so each epoch drops the last 26 (batch 32)."""
    return tiny_settings({"clustering.features": "bank", "data.subset": 250, **(changes or {})})






@contextlib.contextmanager
def _recorded_steps(run: RunState) -> Iterator[list[dict[str, Any]]]:
    """Record, at every training step, the batch's dataset indices, the key encoder as it was, the
    key view it encoded and the keys it returned (``MoCo.keys`` and ``iterate_batches`` wrapped)."""
    steps: list[dict[str, Any]] = []
    original_batches, original_keys = EPOCH.iterate_batches, run.model.keys

    def batches(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for batch in original_batches(*args, **kwargs):
            steps.append({"index": batch[0].clone()})
            yield batch

    def keys(im_k: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        encoder = copy.deepcopy(run.model.encoder_k)
        out = original_keys(im_k, **kwargs)
        steps[-1].update(encoder=encoder, im_k=im_k.detach().clone(), keys=out.detach().float().clone())
        return out

    EPOCH.iterate_batches = batches  # type: ignore[attr-defined]
    run.model.keys = keys  # type: ignore[method-assign]
    try:
        yield steps
    finally:
        EPOCH.iterate_batches = original_batches  # type: ignore[attr-defined]
        del run.model.keys


# --------------------------------------------------------------------------- the bank in one process


def test_bank_holds_the_keys_each_training_step_computed() -> None:
    """After a warm-up epoch and a clustered one, the row of every image a step trained on is the key
    of its last step, recomputed slowly here from the recorded key encoder and key view; the rows of
    the images the warm-up missed were filled before the clustering."""
    trainer = Trainer(config_from_dict(_bank_settings({"epochs": 2})))
    run = trainer.run
    assert run.bank is not None and run.bank.features.shape == (250, D) and not run.bank.filled.any()
    with _recorded_steps(run) as steps:
        trainer.run_epoch(0)
        missing_after_warmup = run.bank.missing()
        trainer.run_epoch(1)  # clusters from the bank (its 26 gaps filled by a pass first), then trains
    assert len(steps) == 2 * (250 // 32)
    assert missing_after_warmup.numel() == 250 - 7 * 32
    reference = torch.zeros(250, D)
    written = torch.zeros(250, dtype=torch.bool)
    for step in steps:
        encoder = step["encoder"].train()
        with torch.no_grad():
            recomputed = encoder(step["im_k"]).float()  # bn_splits 1: the keys are encoder_k(im_k)
        torch.testing.assert_close(recomputed, step["keys"], rtol=0, atol=1e-6)
        reference[step["index"]] = recomputed
        written[step["index"]] = True
    assert run.bank.filled.all()  # the warm-up's gaps were filled before the clustering
    torch.testing.assert_close(run.bank.features[written], reference[written], rtol=0, atol=1e-6)
    # Rows the two epochs never trained on hold the eval-view pass of the first clustering epoch.
    never = (~written).nonzero().flatten()
    assert set(never.tolist()) <= set(missing_after_warmup.tolist())


def test_an_unfilled_bank_is_filled_by_a_pass_over_just_the_missing_images() -> None:
    run = RunState.build(config_from_dict(_bank_settings()))
    assert run.bank is not None
    # Empty: the clustering input is exactly the pass's (shape, order, values).
    heads, _ = embed(run, run.data.train, head=True, backbone=False)
    assert heads is not None
    assert torch.equal(bank_features(run), heads) and run.bank.filled.all()
    # Partly filled: written rows are kept, the others come from the pass, row i for image i.
    run.bank = FeatureBank(250, D)
    seen = torch.arange(0, 250, 3)
    run.bank.update(seen, torch.ones(seen.numel(), D))
    feats = bank_features(run)
    assert feats.shape == heads.shape
    assert torch.equal(feats[seen], torch.ones(seen.numel(), D))
    rest = torch.tensor([i for i in range(250) if i % 3])
    torch.testing.assert_close(feats[rest], heads[rest], rtol=0, atol=1e-6)
    assert run.bank.filled.all() and run.bank.missing().numel() == 0


def test_bank_and_pass_give_the_same_clustering_input_shape_and_order() -> None:
    """Both are (N, low_dim), unit rows, row i for train image i: after a warm-up epoch, the bank's
    key of image i is nearer the pass's embedding of image i than the pass's other rows are."""
    trainer = Trainer(config_from_dict(_bank_settings({"data.subset": 256})))
    run = trainer.run
    trainer.run_epoch(0)
    assert run.bank is not None and run.bank.filled.all()  # 256 = 8 batches of 32: nothing dropped
    from_bank = bank_features(run)
    from_pass, _ = embed(run, run.data.train, head=True, backbone=False)
    assert from_pass is not None and from_bank.shape == from_pass.shape == (256, D)
    torch.testing.assert_close(from_bank.norm(dim=1), torch.ones(256))
    # After one tiny epoch all embeddings sit in a narrow cone: compare directions about its centre.
    centred = [torch.nn.functional.normalize(x - x.mean(0), dim=1) for x in (from_bank, from_pass)]

    def nearer_own(order: torch.Tensor) -> float:
        """Share of rows i whose bank key is nearer pass row order[i] than the other rows on average."""
        sims = centred[0] @ centred[1][order].T
        own = sims.diagonal()
        return float((own > (sims.sum(1) - own) / 255).float().mean())

    assert nearer_own(torch.arange(256)) > 0.75  # 0.88 measured
    assert nearer_own(torch.roll(torch.arange(256), 1)) < 0.6  # a shifted order: chance (0.49 measured)
    # The pass computes the clustering input of epoch 1 from the same encoder: same counts, same levels.
    from pcl_tune.train import on_epoch_start

    a, b = on_epoch_start(run, 1, from_bank), on_epoch_start(run, 1, from_pass)
    assert a.counts == b.counts and [lv.assignment.shape for lv in a.levels] == [lv.assignment.shape for lv in b.levels]


def test_bank_makes_no_pass_in_epochs_that_are_not_evaluated(monkeypatch: pytest.MonkeyPatch) -> None:
    """With eval.every > 1, ``pass`` embeds the train set before each clustered epoch that follows an
    unevaluated one; ``bank`` does not (its bank is full after the warm-up epoch)."""
    calls: list[tuple[str, int, bool]] = []
    original = EMBED.embed

    def counting(run: RunState, dataset: Any, *, head: bool, backbone: bool) -> Any:
        calls.append((run.cfg.clustering.features, len(dataset), head))
        return original(run, dataset, head=head, backbone=backbone)

    monkeypatch.setattr(EMBED, "embed", counting)
    monkeypatch.setattr(LOOP, "embed", counting)
    for features in ("pass", "bank"):
        train_loop(tiny_settings({"clustering.features": features, "eval.every": 5, "epochs": 3}), verbose=False)
    head_passes = {f: [n for g, n, head in calls if g == f and head] for f in ("pass", "bank")}
    assert head_passes == {"pass": [256, 256], "bank": []}


def test_resume_with_a_bank_equals_the_straight_run(tmp_path: Path) -> None:
    """Stopped after epoch 1 (the warm-up: the bank has gaps), resumed, stopped after epoch 2 (a full
    bank, 26 rows a step behind), resumed to the end: the same records, weights and bank as four
    epochs straight. The bank is in the checkpoint; without it the resumed clustering would use a pass."""
    cfg = _bank_settings({"epochs": 4, "pcl.warmup_epochs": 1})
    straight = train_loop(cfg, out_dir=tmp_path / "straight", verbose=False)
    ckpt = tmp_path / "resumed" / CHECKPOINT_DIR
    first = train_loop(cfg, out_dir=tmp_path / "resumed", verbose=False, max_epochs=1)
    assert [m["epoch"] for m in first] == [1]
    saved = torch.load(ckpt / CHECKPOINT_FILE, weights_only=True)
    assert saved["feature_bank"]["features"].shape == (250, D)
    assert int(saved["feature_bank"]["filled"].sum()) == 7 * 32  # the warm-up dropped 26 images
    second = train_loop(cfg, out_dir=tmp_path / "resumed", verbose=False, max_epochs=1, resume_from=ckpt)
    assert [m["epoch"] for m in second] == [1, 2]
    assert torch.load(ckpt / CHECKPOINT_FILE, weights_only=True)["feature_bank"]["filled"].all()
    resumed = train_loop(cfg, out_dir=tmp_path / "resumed", verbose=False, resume_from=ckpt)
    assert [m["epoch"] for m in resumed] == [1, 2, 3, 4]
    for epoch in range(4):
        diff = record_differences(straight[epoch], resumed[epoch])
        assert diff == {}, f"epoch {epoch + 1}: {diff}"
    ends = [torch.load(tmp_path / r / CHECKPOINT_DIR / CHECKPOINT_FILE, weights_only=True) for r in ("straight", "resumed")]
    for name, value in ends[0]["model"].items():
        assert torch.equal(value, ends[1]["model"][name]), name
    for name in ("features", "filled"):
        assert torch.equal(ends[0]["feature_bank"][name], ends[1]["feature_bank"][name]), name


def test_a_checkpoint_without_a_bank_resumes_with_one_pass(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run begun with ``pass`` continues under ``bank``: the empty bank is filled by one pass. A
    bank that does not fit the run's train set is not loaded."""
    train_loop(_bank_settings({"clustering.features": "pass"}), out_dir=tmp_path, verbose=False, max_epochs=2)
    assert "feature_bank" not in torch.load(tmp_path / CHECKPOINT_DIR / CHECKPOINT_FILE, weights_only=True)
    history = train_loop(_bank_settings(), out_dir=tmp_path, verbose=False, resume_from=tmp_path / CHECKPOINT_DIR)
    assert [m["epoch"] for m in history] == [1, 2, 3] and math.isfinite(history[-1]["loss_proto"])
    # A bank of another train set (250 images) is not loaded into a run on 256: it starts empty.
    state = torch.load(tmp_path / CHECKPOINT_DIR / CHECKPOINT_FILE, weights_only=True)
    assert state["feature_bank"]["filled"].all()
    other = RunState.build(config_from_dict(_bank_settings({"data.subset": 256})))
    with caplog.at_level(logging.WARNING, logger="pcl_tune.model"):
        other.load_state_dict(state)
    assert "feature bank of shape (250, 128) does not fit this run's (256, 128)" in caplog.text
    assert other.bank is not None and not other.bank.filled.any() and other.start_epoch == 3


@pytest.mark.parametrize("value", ["banks", "Pass", "keys"])
def test_bad_clustering_features_names_key_value_and_choices(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"clustering.features": value})
    msg = str(info.value)
    assert "'clustering.features'" in msg and repr(value) in msg and "pass" in msg and "bank" in msg


def test_bad_cache_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"key 'data.cache_mb': got -1, expected a value >= 0"):
        config_from_dict({"data.cache_mb": -1})
    assert config_from_dict({}).data.cache_mb > 0 and config_from_dict({}).clustering.features in ("pass", "bank")


# --------------------------------------------------------------------------- two gloo ranks


def _ddp_settings() -> dict[str, Any]:
    return tiny_settings({
        "seed": 3, "epochs": 2, "data.subset": DDP_SUBSET, "optim.batch_size": 8, "model.width": 4,
        "model.queue_size": 64, "model.low_dim": 16, "clustering.niter": 5, "pcl.warmup_epochs": 1,
        "pcl.cluster_schedule": "3,5", "eval.batch_size": 8, "clustering.features": "bank",
    })


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    """A warm-up epoch and a clustered one on two ranks; saves the bank after each, the keys and
    indices this rank's steps computed, and the clustering input and assignments. Then three
    epochs straight and the same stopped after one and resumed; saves both histories."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        from pcl_tune.train import on_epoch_start

        run = RunState.build(config_from_dict(_ddp_settings()))
        res: dict[str, Any] = {"world": run.world}
        with _recorded_steps(run) as steps:
            train_epoch(run, 0, None)
        assert run.bank is not None
        res["steps0"] = [{"index": s["index"], "keys": s["keys"]} for s in steps]
        res["bank0"], res["filled0"] = run.bank.features.clone(), run.bank.filled.clone()
        feats = bank_features(run)  # fills the 5 images epoch 0 dropped, with a pass shared by the ranks
        res["features1"] = feats
        res["key_encoder"] = copy.deepcopy(run.model.encoder_k.state_dict())
        clusters = on_epoch_start(run, 1, feats)
        res["assignment1"] = [lv.assignment.cpu() for lv in clusters.levels]
        with _recorded_steps(run) as steps:
            train_epoch(run, 1, clusters)
        res["steps1"] = [{"index": s["index"], "keys": s["keys"]} for s in steps]
        res["bank1"], res["filled1"] = run.bank.features.clone(), run.bank.filled.clone()
        # Exact resume on two ranks: stopped after the warm-up (a bank with gaps) and resumed from rank 0's checkpoint.
        res.update(straight_and_resumed({**_ddp_settings(), "epochs": 3}, Path(out_file).parent))
        torch.save(res, out_file)
    finally:
        dist.destroy_process_group()


def _run_ranks(tmp: Path, timeout: float = 300) -> list[dict[str, Any]]:
    """Run this file as ranks 0..WORLD-1; returns what each rank saved."""
    return run_ranks(__file__, WORLD, tmp, timeout=timeout)


def _one_process_bank(ranks: list[dict[str, Any]], epoch: int, start: FeatureBank) -> FeatureBank:
    """The bank one process holding every rank's keys builds: step by step, every rank's rows."""
    bank = copy.deepcopy(start)
    for step in range(len(ranks[0][f"steps{epoch}"])):
        for r in ranks:
            bank.update(r[f"steps{epoch}"][step]["index"], r[f"steps{epoch}"][step]["keys"])
    return bank


def test_two_ranks_hold_the_same_full_bank_as_one_process(tmp_path: Path) -> None:
    ranks = _run_ranks(tmp_path)
    r0, r1 = ranks
    assert r0["world"] == r1["world"] == WORLD
    for key in ("bank0", "filled0", "features1", "bank1", "filled1"):
        assert torch.equal(r0[key], r1[key]), key
    for a, b in zip(r0["assignment1"], r1["assignment1"]):
        assert torch.equal(a, b)
    # Each rank trained on its half of every global batch; together they wrote 4 x 8 rows per epoch.
    for epoch in (0, 1):
        halves = [torch.cat([s["index"] for s in r[f"steps{epoch}"]]) for r in ranks]
        assert all(h.numel() == 16 for h in halves) and not set(halves[0].tolist()) & set(halves[1].tolist())
    # Epoch 0: exactly the rows one process builds from both ranks' keys; 5 rows never written.
    single = _one_process_bank(ranks, 0, FeatureBank(DDP_SUBSET, 16))
    assert torch.equal(r0["filled0"], single.filled) and int(single.filled.sum()) == 32
    assert torch.equal(r0["bank0"], single.features)
    # The gaps are filled with the key encoder's eval-view embeddings, as one process computes them.
    one = RunState.build(config_from_dict({**_ddp_settings(), "clustering.features": "pass"}))
    one.model.encoder_k.load_state_dict(r0["key_encoder"])
    heads, _ = embed(one, one.data.train, head=True, backbone=False)
    assert heads is not None
    gaps = (~single.filled).nonzero().flatten()
    torch.testing.assert_close(r0["features1"][gaps], heads[gaps], rtol=0, atol=1e-5)
    assert torch.equal(r0["features1"][single.filled], single.features[single.filled])
    # Epoch 1 writes over the filled bank, both ranks' rows.
    start = FeatureBank(DDP_SUBSET, 16)
    start.update(torch.arange(DDP_SUBSET), r0["features1"])
    assert torch.equal(r0["bank1"], _one_process_bank(ranks, 1, start).features) and r0["filled1"].all()
    # Resumed on two ranks after the warm-up: the straight run's records, weights and bank.
    for r in ranks:
        assert [m["epoch"] for m in r["resumed"]] == [1, 2, 3]
        for a, b in zip(r["straight"], r["resumed"]):
            assert record_differences(a, b) == {}, (r["world"], a["epoch"])
    ends = [torch.load(tmp_path / run / CHECKPOINT_DIR / CHECKPOINT_FILE, weights_only=True) for run in ("straight", "resumed")]
    for name, value in ends[0]["model"].items():
        assert torch.equal(value, ends[1]["model"][name]), name
    for name in ("features", "filled"):
        assert torch.equal(ends[0]["feature_bank"][name], ends[1]["feature_bank"][name]), name


# --------------------------------------------------------------------------- the decoded-image cache


def _write_folder(root: Path, per_class: int = 6) -> None:
    """``root/train/<class>/<i>.png``: random pixels, varied sizes (resize and crop do work)."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("a", "b", "c"):
        d = root / "train" / c
        d.mkdir(parents=True)
        for i in range(per_class):
            h, w = 14 + i % 3, 12 + 2 * (i % 4)
            Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()).save(d / f"{i}.png")


def _folder_settings(root: Path, cache_mb: int, **changes: Any) -> dict[str, Any]:
    return tiny_settings({"data.dataset": "folder", "data.root": str(root), "data.image_size": 12,
                          "data.subset": None, "data.cache_mb": cache_mb, "optim.batch_size": 4,
                          "model.queue_size": 8, "eval.knn_k": 3, "eval.fewshot_episodes": 0,
                          "pcl.cluster_schedule": "2", **changes})


def test_cached_file_batches_are_bit_identical_and_decoded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_folder(tmp_path)
    plain = load_datasets(config_from_dict(_folder_settings(tmp_path, 0)))
    cached = load_datasets(config_from_dict(_folder_settings(tmp_path, 64)))
    assert isinstance(plain.train, FileImageDataset) and isinstance(cached.train, FileImageDataset)
    assert not plain.train.cache and cached.train.cache and cached.val.cache  # type: ignore[union-attr]
    assert cached.train.decoded is None  # nothing decoded before the first read
    order = torch.randperm(len(plain.train), generator=torch.Generator().manual_seed(1))
    for workers in (0, 1):
        a = list(iterate_batches(plain.train, order, 4, num_workers=workers))
        b = list(iterate_batches(cached.train, order, 4, num_workers=workers))
        assert len(a) == len(b) == math.ceil(len(order) / 4)
        for (ia, xa, la), (ib, xb, lb) in zip(a, b):
            assert ia.dtype == ib.dtype == torch.long and torch.equal(ia, ib)
            assert xa.dtype == xb.dtype == torch.uint8 and torch.equal(xa, xb)
            assert la.dtype == lb.dtype and torch.equal(la, lb)
    assert cached.train.decoded is not None and cached.train.decoded.shape == (len(order), 3, 14, 14)
    # Decoded once: reading it again opens no file (and a subset keeps the decoded rows).
    import PIL.Image

    expected = [plain.train[3], plain.train[0]]

    def no_files(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached image was decoded again")

    monkeypatch.setattr(PIL.Image, "open", no_files)
    again = torch.cat([x for _, x, _ in iterate_batches(cached.train, order, 5)])
    assert torch.equal(again, torch.cat([x for _, x, _ in a]))
    part = cached.train.subset(torch.tensor([3, 0]))  # type: ignore[union-attr]
    assert torch.equal(part[0][1], expected[0][1]) and torch.equal(part[1][1], expected[1][1])
    assert (part[0][2], part[1][2]) == (expected[0][2], expected[1][2])


def test_the_cache_is_off_above_its_size_limit(tmp_path: Path) -> None:
    _write_folder(tmp_path, per_class=2)
    splits = load_datasets(config_from_dict(_folder_settings(tmp_path, 64)))
    size = sum(s.decoded_bytes() for s in (splits.train, splits.val))  # type: ignore[union-attr]
    assert size == 6 * 3 * 14 * 14
    assert not cache_file_datasets(splits, (size - 1) / 2**20) and not splits.train.cache  # type: ignore[union-attr]
    assert cache_file_datasets(splits, size / 2**20) and splits.train.cache  # type: ignore[union-attr]


def test_runs_with_and_without_the_cache_are_identical(tmp_path: Path) -> None:
    _write_folder(tmp_path)
    runs = [train_loop(_folder_settings(tmp_path, mb, epochs=2, **{"clustering.features": f}), verbose=False)
            for mb in (0, 64) for f in ("pass", "bank")]
    for a, b in ((runs[0], runs[2]), (runs[1], runs[3])):
        for epoch in range(2):
            assert record_differences(a[epoch], b[epoch]) == {}, epoch


if __name__ == "__main__":
    _ddp_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
