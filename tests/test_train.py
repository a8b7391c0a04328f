"""Tests of pcl_tune.model (MoCo) and pcl_tune.train (the epoch loop, checkpoints, the command line).

Runs are tiny (256 digit scenes, a width-8 CNN, one thread) so the whole file takes well under a
minute of CPU time.
"""

from __future__ import annotations

import math
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_settings

import pcl_tune.train as train_mod
from pcl_tune.config import ConfigError, config_from_dict
from pcl_tune.metrics import reported_metrics
from pcl_tune.model import Encoder, MoCo, build_backbone, build_head
from pcl_tune.train import (
    CHECKPOINT_DIR,
    CHECKPOINT_FILE,
    CheckpointError,
    RunState,
    TrainingDiverged,
    checkpoint_history,
    format_epoch_line,
    train_loop,
)

pytestmark = pytest.mark.usefixtures("torch_threads")

DOCUMENTED_KEYS = [
    "loss", "loss_inst", "loss_proto", "loss_proto_0", "acc_inst", "acc_proto", "acc_proto_0", "knn_top1",
    "nmi", "ami", "nmi_0", "num_clusters_0", "clusters", "time_features", "time_clustering", "time_train",
    "time_eval", "images_per_s", "lr",
]
PROTO_KEYS = ["loss_proto", "acc_proto", "loss_proto_0", "acc_proto_0", "loss_proto_1", "acc_proto_1",
              "nmi", "ami", "nmi_0", "ami_0", "nmi_1", "ami_1"]
NOT_REPRODUCIBLE = ("time_", "images_per_s")


def _same(a: Any, b: Any, tol: float = 1e-6) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= tol * max(1.0, abs(a))
    return bool(a == b)


def _differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    assert set(a) == set(b)
    return {k: (a[k], b[k]) for k in a if not k.startswith(NOT_REPRODUCIBLE) and not _same(a[k], b[k])}


@dataclass
class Run:
    out: Path
    history: list[dict[str, Any]]
    calls: list[tuple[int, dict[str, Any], Path | None]] = field(default_factory=list)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory, torch_threads: None) -> Run:
    """Three epochs (one of warm-up) of the tiny config, with a recording callback."""
    cfg = tiny_settings()
    out = tmp_path_factory.mktemp("straight")
    run = Run(out, [])
    run.history = train_loop(cfg, out_dir=out, verbose=False,
                             callback=lambda e, m, c: run.calls.append((e, dict(m), c)))
    return run


# --------------------------------------------------------------------------- model


def test_moco_forward_shapes_and_unit_norm() -> None:
    torch.manual_seed(0)
    model = MoCo("small_cnn", "mlp", 16, queue_size=40, width=4)
    x = torch.randn(6, 3, 32, 32)
    q, k = model(x, x + 0.1)
    assert q.shape == (6, 16) and k.shape == (6, 16)
    assert torch.allclose(q.norm(dim=1), torch.ones(6), atol=1e-5)
    assert torch.allclose(k.norm(dim=1), torch.ones(6), atol=1e-5)
    assert q.requires_grad and not k.requires_grad
    assert model.queue.shape == (40, 16)
    assert torch.allclose(model.queue.norm(dim=1), torch.ones(40), atol=1e-5)
    feats = model.encoder_q.features(x)
    assert feats.shape == (6, 32) and torch.allclose(feats.norm(dim=1), torch.ones(6), atol=1e-5)
    # Key encoder starts as a copy of the query encoder.
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(pq, pk) and not pk.requires_grad


@pytest.mark.parametrize("key_bn", ["own", "ema", "query"])
def test_moco_momentum_update_moves_key_towards_query(key_bn: str) -> None:
    torch.manual_seed(0)
    model = MoCo("small_cnn", "linear", 8, queue_size=16, width=4, momentum=0.9, key_bn=key_bn)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
        for b in model.encoder_q.buffers():
            if b.is_floating_point():
                b.add_(1.0)
            else:
                b.add_(5)
    before = [p.clone() for p in model.encoder_k.parameters()]
    query = [p.clone() for p in model.encoder_q.parameters()]
    key_buffers = [b.clone() for b in model.encoder_k.buffers()]
    model.momentum_update()
    for k0, q0, k1 in zip(before, query, model.encoder_k.parameters()):
        assert torch.allclose(k1, 0.9 * k0 + 0.1 * q0, atol=1e-6)
        assert (k1 - q0).norm() < (k0 - q0).norm() or torch.equal(k0, q0)
    # Batch-norm statistics: MoCo averages weights only ("own"); the others follow the query's.
    pairs = list(zip(key_buffers, model.encoder_q.buffers(), model.encoder_k.buffers()))
    assert any(b.is_floating_point() for b, _, _ in pairs) and any(not b.is_floating_point() for b, _, _ in pairs)
    for k0, bq, bk in pairs:
        if key_bn == "own":
            assert torch.equal(bk, k0)
        elif key_bn == "ema" and bk.is_floating_point():
            assert torch.allclose(bk, 0.9 * k0 + 0.1 * bq, atol=1e-6) and not torch.equal(bk, bq)
        else:
            assert torch.equal(bk, bq)
    # The query encoder is untouched.
    for q0, q1 in zip(query, model.encoder_q.parameters()):
        assert torch.equal(q0, q1)


def test_key_encoder_keeps_its_own_batchnorm_statistics_in_training() -> None:
    """The issue's defect: with statistics copied from the query encoder every step, the key encoder
    (which embeds the clustered images and the kNN bank in eval mode) never kept statistics of its
    own weights. Under ``own`` its running mean is the average of its own key batches."""
    torch.manual_seed(0)
    model = MoCo("small_cnn", "linear", 8, queue_size=16, width=4, momentum=0.9)
    model.train()
    bn_k = next(m for m in model.encoder_k.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn_q = next(m for m in model.encoder_q.modules() if isinstance(m, torch.nn.BatchNorm2d))
    for _ in range(3):
        with torch.no_grad():
            bn_q.running_mean.fill_(1000.0)  # statistics no key batch could produce
        model.momentum_update()
        model.keys(torch.randn(8, 3, 16, 16))
    assert int(bn_k.num_batches_tracked) == 3
    assert bn_k.running_mean.abs().max() < 100  # copied, they would be >= 900 (0.9 x 1000 + 0.1 x batch)
    with pytest.raises(ValueError, match="key_bn must be one of"):
        MoCo(width=4, key_bn="shared")


def test_moco_enqueue_wraps_around() -> None:
    model = MoCo("small_cnn", "linear", 2, queue_size=10, width=4)
    initial = model.queue.clone()

    def keys(start: int, n: int) -> torch.Tensor:
        return torch.arange(start, start + n, dtype=torch.float32)[:, None].repeat(1, 2)

    model.enqueue(keys(100, 4))
    assert int(model.queue_ptr) == 4
    assert model.queue[:4, 0].tolist() == [100, 101, 102, 103]
    assert torch.equal(model.queue[4:], initial[4:])
    model.enqueue(keys(200, 4))
    model.enqueue(keys(300, 4))  # 8, 9, then wraps to 0, 1
    assert int(model.queue_ptr) == 2
    assert model.queue[:, 0].tolist() == [302, 303, 102, 103, 200, 201, 202, 203, 300, 301]
    model.enqueue(keys(400, 3))  # 2, 3, 4
    assert int(model.queue_ptr) == 5
    assert model.queue[:, 0].tolist() == [302, 303, 400, 401, 402, 201, 202, 203, 300, 301]


def test_moco_enqueue_more_keys_than_queue_keeps_the_last() -> None:
    model = MoCo("small_cnn", "linear", 2, queue_size=5, width=4)
    model.enqueue(torch.ones(2, 2))
    keys = torch.arange(12, dtype=torch.float32)[:, None].repeat(1, 2)
    model.enqueue(keys)
    assert sorted(model.queue[:, 0].tolist()) == [7, 8, 9, 10, 11]
    model.enqueue(torch.full((1, 2), 50.0))
    # The oldest key is the one overwritten next.
    assert 7 not in model.queue[:, 0].tolist() and 50 in model.queue[:, 0].tolist()


def test_resnet18_small_stem_on_32px() -> None:
    torch.manual_seed(0)
    enc = Encoder("resnet18", "mlp", 16, small_stem=True)
    net = enc.backbone
    assert enc.feature_dim == 512
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, torch.nn.Identity) and isinstance(net.fc, torch.nn.Identity)
    out = enc(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 16) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_model_argument_errors() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg")
    with pytest.raises(ValueError, match="unknown head"):
        build_head("conv", 8, 4)
    with pytest.raises(ValueError, match="queue_size"):
        MoCo(queue_size=0, width=4)
    with pytest.raises(ValueError, match="momentum"):
        MoCo(momentum=1.0, width=4)


# --------------------------------------------------------------------------- the epoch loop


def test_metrics_csv_has_documented_keys(straight_run: Run) -> None:
    path = straight_run.out / "metrics.csv"
    assert path.is_file()
    df = pd.read_csv(path)
    missing = [k for k in DOCUMENTED_KEYS if k not in df.columns]
    assert not missing
    assert df["epoch"].tolist() == [1, 2, 3]
    assert len(straight_run.history) == 3


def test_every_epoch_reports_every_registered_metric(straight_run: Run) -> None:
    keys = [set(m) for m in straight_run.history]
    assert all(k == keys[0] for k in keys)  # epoch 1 is warm-up, epochs 2-3 use prototypes
    assert set(reported_metrics(2)) <= keys[0]
    assert set(DOCUMENTED_KEYS) <= keys[0]
    # metrics.csv columns follow the registry's order.
    columns = list(pd.read_csv(straight_run.out / "metrics.csv").columns)
    assert columns[:4] == ["epoch", "loss", "loss_inst", "acc_inst"]
    assert columns.index("knn_top1") < columns.index("time_epoch") < columns.index("loss_proto_0")


def test_tune_reporter_orders_keys_and_replays_the_restored_epoch(straight_run: Run) -> None:
    from pcl_tune.trials import tune_reporter

    sent: list[tuple[dict[str, Any], Any]] = []
    ckpt = straight_run.out / CHECKPOINT_DIR
    callback = tune_reporter(lambda m, checkpoint: sent.append((m, checkpoint)), lambda p: ("ckpt", p), ckpt)
    # The restored epoch (the run's last) is reported again first, without a checkpoint.
    assert len(sent) == 1 and sent[0][1] is None
    assert sent[0][0]["epoch"] == 3 and _differences(
        {k: v for k, v in sent[0][0].items() if k != "node_id"}, straight_run.history[2]) == {}
    # Tune's CSV logger maps a resumed trial's columns by the key order of its first new result:
    # every report has one key order, warm-up or not, whatever order the loop built the dict in.
    warm = dict(reversed(list(straight_run.history[0].items())))
    callback(0, warm, None)
    callback(2, straight_run.history[2], ckpt)
    orders = [list(m) for m, _ in sent]
    assert orders[0][:3] == ["epoch", "loss", "loss_inst"] and orders[1] == orders[0] == orders[2]
    assert sent[2][1] == ("ckpt", str(ckpt))
    # Without a checkpoint to restore from, nothing is replayed.
    sent.clear()
    tune_reporter(lambda m, checkpoint: sent.append((m, checkpoint)), lambda p: p, None)
    assert sent == []


def test_proto_metrics_nan_in_warmup_finite_after(straight_run: Run) -> None:
    df = pd.read_csv(straight_run.out / "metrics.csv")
    warm, after = df.iloc[0], df.iloc[1:]
    for key in PROTO_KEYS:
        assert math.isnan(warm[key]), key
        assert after[key].notna().all(), key
    assert warm["num_clusters_0"] == 0 and warm["num_clusters_1"] == 0
    assert after["num_clusters_0"].tolist() == [5, 5] and after["num_clusters_1"].tolist() == [10, 10]
    assert after["clusters"].tolist() == ["5,10", "5,10"]
    assert straight_run.history[0]["clusters"] == ""
    for key in ("loss", "loss_inst", "acc_inst", "knn_top1", "lr", "images_per_s", "time_train"):
        assert df[key].notna().all(), key
    # Accuracies are percentages.
    for key in ("acc_inst", "acc_proto", "acc_proto_0", "knn_top1"):
        vals = df[key].dropna()
        assert ((vals >= 0) & (vals <= 100)).all(), key
    assert (after["acc_proto_0"] > 1.0).any()  # in percent, not a 0-1 fraction
    # loss = loss_inst + proto_weight * loss_proto (means over the same batches).
    assert df["loss"].iloc[0] == pytest.approx(df["loss_inst"].iloc[0], rel=1e-6)
    for _, row in after.iterrows():
        assert row["loss"] == pytest.approx(row["loss_inst"] + row["loss_proto"], rel=1e-5)
        assert row["loss_proto"] == pytest.approx((row["loss_proto_0"] + row["loss_proto_1"]) / 2, rel=1e-5)
    # Cosine schedule over 3 epochs.
    assert df["lr"].tolist() == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)])


def test_callback_once_per_epoch_with_checkpoint(straight_run: Run) -> None:
    calls = straight_run.calls
    assert [c[0] for c in calls] == [0, 1, 2]
    for epoch, metrics, ckpt in calls:
        assert ckpt == straight_run.out / CHECKPOINT_DIR
        assert metrics["epoch"] == epoch + 1
        assert _differences(metrics, straight_run.history[epoch]) == {}
    ckpt_file = straight_run.out / CHECKPOINT_DIR / CHECKPOINT_FILE
    assert ckpt_file.is_file()
    assert not (straight_run.out / CHECKPOINT_DIR / (CHECKPOINT_FILE + ".tmp")).exists()
    state = torch.load(ckpt_file, weights_only=False)
    assert state["epoch"] == 2 and len(state["history"]) == 3
    assert state["config"]["pcl"]["cluster_schedule"] == "5,10"
    # Random streams are derived from (seed, rank, epoch), never restored from rank 0's state.
    assert not {"aug_gen", "neg_gen", "torch_rng", "numpy_rng", "python_rng"} & set(state)


def test_a_full_disk_keeps_the_previous_checkpoint(tiny_config: dict[str, Any], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while epoch 2's checkpoint is written: the error names the file, the partial
    file is gone and epoch 1's checkpoint still loads, so a resume loses nothing already finished."""
    import errno

    from pcl_tune.checkpoint import read_checkpoint

    real_save = torch.save
    saves: list[str] = []

    def filling_up(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        saves.append(str(f))
        if isinstance(obj, dict) and obj.get("epoch") == 1 and "optimizer" in obj:
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", filling_up)
    with pytest.raises(OSError, match=r"cannot write .*checkpoint\.pt: No space left on device; the previous "
                                      r"checkpoint\.pt is kept") as info:
        train_loop({**tiny_config, "epochs": 3}, out_dir=tmp_path, verbose=False)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(torch, "save", real_save)
    assert not list((tmp_path / CHECKPOINT_DIR).glob("*.tmp"))
    assert read_checkpoint(tmp_path / CHECKPOINT_DIR)[1]["epoch"] == 0
    assert pd.read_csv(tmp_path / "metrics.csv")["epoch"].tolist() == [1]
    assert len(train_loop({**tiny_config, "epochs": 3}, out_dir=tmp_path, verbose=False,
                          resume_from=tmp_path / CHECKPOINT_DIR)) == 3


def test_step_batch_sizes_split_the_global_batch() -> None:
    from pcl_tune.config import ConfigError
    from pcl_tune.train.state import step_batch_sizes

    assert step_batch_sizes(64, 1000, 1) == (64, 64)
    assert step_batch_sizes(64, 1000, 4) == (64, 16)
    assert step_batch_sizes(64, 30, 4) == (28, 7)  # a train set smaller than the batch: all of it, evenly
    with pytest.raises(ConfigError, match=r"'optim.batch_size': got 64, which does not divide by the 3 workers"):
        step_batch_sizes(64, 1000, 3)
    with pytest.raises(ConfigError, match="fewer than the 4 workers"):
        step_batch_sizes(4, 3, 4)


def test_random_streams_differ_by_rank_epoch_stream_and_seed() -> None:
    from pcl_tune.train.state import STREAMS, stream_seed

    seeds = {(s, r, e, k): stream_seed(s, r, e, k) for s in (0, 1, 2**40) for r in range(4) for e in range(3)
             for k in STREAMS}
    assert len(set(seeds.values())) == len(seeds)  # no two streams share a seed
    assert all(0 <= v < 2**63 for v in seeds.values())
    assert stream_seed(1, 2, 3, "augment") == stream_seed(1, 2, 3, "augment")  # a pure function
    with pytest.raises(ValueError, match="unknown random stream 'crops'"):
        stream_seed(0, 0, 0, "crops")


def test_exact_resume_matches_straight_run(straight_run: Run, tmp_path: Path) -> None:
    cfg = config_from_dict(torch.load(straight_run.out / CHECKPOINT_DIR / CHECKPOINT_FILE,
                                      weights_only=False)["config"])
    first = train_loop(cfg, out_dir=tmp_path, verbose=False, max_epochs=2)
    assert [m["epoch"] for m in first] == [1, 2]
    assert torch.load(tmp_path / CHECKPOINT_DIR / CHECKPOINT_FILE, weights_only=False)["epoch"] == 1
    calls: list[int] = []
    resumed = train_loop(cfg, out_dir=tmp_path, verbose=False, resume_from=tmp_path / CHECKPOINT_DIR,
                         callback=lambda e, m, c: calls.append(e))
    assert calls == [2]  # only the remaining epoch runs
    assert [m["epoch"] for m in resumed] == [1, 2, 3]
    for epoch in range(3):
        diff = _differences(straight_run.history[epoch], resumed[epoch])
        assert diff == {}, f"epoch {epoch + 1}: {diff}"
    assert len(pd.read_csv(tmp_path / "metrics.csv")) == 3
    # Resuming a finished run trains nothing more.
    done = train_loop(cfg, out_dir=tmp_path, verbose=False, resume_from=tmp_path / CHECKPOINT_DIR)
    assert len(done) == 3 and all(_differences(a, b) == {} for a, b in zip(done, resumed))
    # The checkpoint carries the history up to its epoch (what a search's reporter replays).
    assert [m["epoch"] for m in checkpoint_history(tmp_path / CHECKPOINT_DIR)] == [1, 2, 3]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    cfg = {**tiny_config, "device": "cuda", "amp": False, "epochs": 2}
    train_loop(cfg, out_dir=tmp_path, verbose=False, max_epochs=1)
    resumed = train_loop(cfg, out_dir=tmp_path, verbose=False, resume_from=tmp_path / CHECKPOINT_DIR)
    assert [m["epoch"] for m in resumed] == [1, 2]


def test_resume_from_missing_checkpoint(tmp_path: Path, tiny_config: dict[str, Any]) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_loop(tiny_config, resume_from=tmp_path / "nothing", verbose=False)


def test_duplicate_positives_cap_proto_accuracy(tiny_config: dict[str, Any]) -> None:
    """The report's failure: with fewer clusters M than the batch B, duplicates="none" labels each row
    with its own column, so at most one row per unique prototype can be right: acc <= 100 * M / B."""
    base = {**tiny_config, "optim.batch_size": 64, "epochs": 3, "pcl.warmup_epochs": 1,
            "pcl.cluster_schedule": "5,10"}
    none = train_loop({**base, "pcl.duplicates": "none"}, verbose=False)
    dedupe = train_loop({**base, "pcl.duplicates": "dedupe"}, verbose=False)
    cap_0, cap_1 = 100 * 5 / 64, 100 * 10 / 64
    for m in none[1:]:
        assert m["acc_proto_0"] <= cap_0 + 1e-9
        assert m["acc_proto_1"] <= cap_1 + 1e-9
    for m in dedupe[1:]:
        assert m["acc_proto_0"] > cap_0 + 5
        assert m["acc_proto"] > 2 * max(n["acc_proto"] for n in none[1:])


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_nan_loss_raises_training_diverged(tiny_config: dict[str, Any], tmp_path: Path) -> None:
    cfg = {**tiny_config, "optim.lr": 1e30, "pcl.warmup_epochs": 5, "epochs": 5}
    with pytest.raises(TrainingDiverged) as info:
        train_loop(cfg, out_dir=tmp_path, verbose=False)
    msg = str(info.value)
    assert "loss is nan" in msg.lower() or "loss is inf" in msg.lower()
    assert "epoch 1" in msg and "batch" in msg and "optim.lr" in msg
    assert not (tmp_path / CHECKPOINT_DIR / CHECKPOINT_FILE).exists()  # nothing saved from a diverged epoch


def test_nan_loss_from_the_loss_function(tiny_config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import pcl_tune.train.epoch as epoch_mod

    real = epoch_mod.pcl_loss
    calls = {"n": 0}

    def nan_after_two(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, parts = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] == 3 else loss), parts

    monkeypatch.setattr(epoch_mod, "pcl_loss", nan_after_two)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 1, batch 3 \(lr 0\.01\)"):
        train_loop({**tiny_config, "epochs": 2}, verbose=False)


def test_format_epoch_line_shows_dashes_for_nan(straight_run: Run) -> None:
    warm = format_epoch_line(straight_run.history[0])
    later = format_epoch_line(straight_run.history[2])
    assert warm.startswith("epoch   1") and "proto -/-%" in warm and "nmi -" in warm
    assert "clusters [5,10]" in later and "proto -/-%" not in later


# --------------------------------------------------------------------------- command line


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pcl_tune.train", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


def test_cli_end_to_end_and_refuses_existing_out(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    out = tmp_path / "run"
    sets = [f"{k}={v}" for k, v in tiny_settings({"data.subset": 128, "clustering.niter": 5},
                                                  without=("seed", "epochs", "data.dataset", "data.digits_copies")).items()]
    sets.append("data.digits_copies=[1,1,1]")
    base_args = [a for s in sets for a in ("--set", s)] + ["--out", str(out)]
    args = [*base_args, "--epochs", "2"]
    proc = _cli(args, subprocess_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(out / "metrics.csv")
    assert df["epoch"].tolist() == [1, 2]
    assert df["clusters"].tolist()[1] == "5,10"
    assert (out / CHECKPOINT_DIR / CHECKPOINT_FILE).is_file()
    assert (out / "config.yaml").is_file()
    import yaml

    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["data"]["subset"] == 128 and written["epochs"] == 2
    assert "done: knn_top1" in proc.stdout

    again = _cli(args, subprocess_env, tmp_path)
    assert again.returncode == 2
    assert again.stderr.startswith("error: ") and "--resume" in again.stderr
    assert "Traceback" not in again.stderr
    assert len(pd.read_csv(out / "metrics.csv")) == 2  # untouched

    # --resume continues the run (in this process, to save a start-up): one more epoch.
    assert train_mod.main([*base_args, "--epochs", "3", "--resume"]) == 0
    df = pd.read_csv(out / "metrics.csv")
    assert df["epoch"].tolist() == [1, 2, 3]
    assert torch.load(out / CHECKPOINT_DIR / CHECKPOINT_FILE, weights_only=False)["epoch"] == 2
    # --resume with only --out continues with the run's own config.yaml (width 8, not the default 32).
    assert train_mod.main(["--out", str(out), "--epochs", "4", "--resume"]) == 0
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2, 3, 4]


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_main_diverged_run_exits_1(tmp_path: Path, tiny_config: dict[str, Any],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    sets = [f"{k}={v}" for k, v in tiny_config.items() if k != "data.digits_copies"]
    sets += ["data.digits_copies=[1,1,1]", "optim.lr=1.0e+30", "pcl.warmup_epochs=5", "epochs=5"]
    code = train_mod.main([a for s in sets for a in ("--set", s)] + ["--out", str(tmp_path / "run")])
    assert code == 1
    err = capsys.readouterr().err
    assert "error: loss is nan" in err and "Traceback" not in err


def test_augmentation_defaults_follow_the_dataset() -> None:
    base = {"device": "cpu", "threads": 1, "progress": False, "data.subset": 64, "model.width": 8}
    digits = RunState.build(config_from_dict(base)).augment
    # Digits are not mirror-symmetric: no flips by default; crops keep at least half the scene.
    assert digits.flip_p == 0.0 and digits.scale == (0.5, 1.0) and digits.rotation == 0.0 and digits.size == 16
    custom = RunState.build(config_from_dict({**base, "data.flip_p": 0.5, "data.rotation": 0.3,
                                              "data.crop_min_scale": 0.2})).augment
    assert custom.flip_p == 0.5 and custom.rotation == 0.3 and custom.scale == (0.2, 1.0)
    with pytest.raises(ConfigError, match="data.flip_p"):
        config_from_dict({**base, "data.flip_p": 1.5})
    with pytest.raises(ConfigError, match="data.rotation"):
        config_from_dict({**base, "data.rotation": -0.1})


@pytest.mark.parametrize("schedule, expected", [
    ({"optim.schedule": "step", "optim.lr_steps": [1, 3]}, [0.1, 0.1 * 0.1, 0.1 * 0.1, 0.1 * 0.1 ** 2]),
    ({"optim.schedule": "cosine"}, [0.1 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]),
])
def test_lr_schedule_and_its_resume(schedule: dict[str, Any], expected: list[float]) -> None:
    base = {"device": "cpu", "threads": 1, "data.subset": 64, "model.width": 8, "epochs": 4, "optim.lr": 0.1,
            **schedule}
    run = RunState.build(config_from_dict(base))
    seen = []
    for _ in range(4):
        seen.append(run.lr_scheduler.get_last_lr()[0])
        assert run.optimizer.param_groups[0]["lr"] == seen[-1]
        run.optimizer.step()
        run.lr_scheduler.step()
    assert seen == pytest.approx(expected, rel=1e-12)
    # A checkpoint after epoch 1 (0-based), with or without the scheduler's state (older
    # checkpoints have none), resumes at epoch 2's learning rate.
    for drop in (False, True):
        first = RunState.build(config_from_dict(base))
        for _ in range(2):
            first.optimizer.step()
            first.lr_scheduler.step()
        state = first.state_dict(epoch=1)
        if drop:
            del state["lr_scheduler"]
        again = RunState.build(config_from_dict(base))
        again.load_state_dict(state)
        assert again.start_epoch == 2
        assert again.lr_scheduler.get_last_lr()[0] == pytest.approx(expected[2], rel=1e-12)
        assert again.optimizer.param_groups[0]["lr"] == pytest.approx(expected[2], rel=1e-12)


class _TouchesWhenUnpickled:
    """Unpickling this calls ``Path.touch(marker)``: proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def test_checkpoints_are_loaded_without_running_pickled_code(tmp_path: Path, straight_run: Run) -> None:
    from pcl_tune.checkpoint import read_checkpoint

    _, state = read_checkpoint(straight_run.out / CHECKPOINT_DIR)
    assert state["epoch"] == 2
    # Checkpoints of earlier versions also hold RNG states (NumPy's needs an allow-listed array type):
    # they load, and the states are ignored.
    old = {**state, "numpy_rng": np.random.get_state(), "aug_gen": torch.Generator().get_state(),
           "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
    torch.save(old, tmp_path / "old.pt")
    assert read_checkpoint(tmp_path / "old.pt")[1]["numpy_rng"][0] == "MT19937"
    assert len(train_loop(tiny_settings(), resume_from=tmp_path / "old.pt", verbose=False)) == 3
    marker = tmp_path / "code_ran"
    torch.save({**state, "extra": _TouchesWhenUnpickled(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        train_loop(tiny_settings(), resume_from=tmp_path / "evil.pt", verbose=False)
    assert not marker.exists()
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the unsafe load would have run it
    assert marker.exists()
