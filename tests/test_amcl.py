"""Adaptive multi-head contrastive learning (``model.head: amcl``): the pair-tempered InfoNCE
(:func:`pcl_tune.losses.amcl_info_nce`) against a slow reference written one pair at a time, its
reduction to :func:`pcl_tune.losses.info_nce`, the temperature penalty on a toy problem, the
modules, the config keys, and runs: per-head metrics, exact resume, two gloo ranks."""

from __future__ import annotations

import math
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import record_differences, run_ranks, straight_and_resumed, tiny_settings
from torch import Tensor

from pcl_tune.checkpoint import CHECKPOINT_DIR, CHECKPOINT_FILE
from pcl_tune.config import ConfigError, config_from_dict
from pcl_tune.losses import amcl_info_nce, info_nce, temperature_penalty
from pcl_tune.metrics import head_names
from pcl_tune.train import train_loop

F64 = torch.float64


def _unit(*shape: int, seed: int, dtype: torch.dtype = F64) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=F64), dim=-1).to(dtype)


def _temps(h: int, b: int, n: int, seed: int, lo: float = 0.05, hi: float = 0.5) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(h, b, n, generator=g, dtype=F64)


def ref_amcl(q: Tensor, k: Tensor, queue: Tensor, temperature: Tensor, beta: float,
             prior: float) -> tuple[float, float]:
    """One head, one row, one pair at a time, in Python floats."""
    total, acc = 0.0, 0.0
    heads, batch, _ = q.shape
    for h in range(heads):
        head_loss, head_correct, penalty, count = 0.0, 0, 0.0, 0
        for b in range(batch):
            sims = [float(q[h, b] @ k[h, b])] + [float(q[h, b] @ queue[h, j]) for j in range(queue.shape[1])]
            logits = [s / float(temperature[h, b, j]) for j, s in enumerate(sims)]
            m = max(logits)
            head_loss += m + math.log(sum(math.exp(x - m) for x in logits)) - logits[0]
            head_correct += int(logits.index(max(logits)) == 0)
            for t in temperature[h, b].tolist():
                penalty += math.log(t / prior) + prior / t - 1.0
                count += 1
        total += head_loss / batch + beta * penalty / count
        acc += head_correct / batch
    return total, acc / heads


@pytest.mark.parametrize(("heads", "beta"), [(1, 0.0), (3, 0.0), (3, 0.1), (2, 1.5)])
def test_amcl_info_nce_matches_the_reference(heads: int, beta: float) -> None:
    b, d, qlen = 6, 8, 11
    q, k, queue = _unit(heads, b, d, seed=1), _unit(heads, b, d, seed=2), _unit(heads, qlen, d, seed=3)
    k[:, :3] = F.normalize(q[:, :3] + 0.1 * k[:, :3], dim=-1)  # some positives clearly the best
    t = _temps(heads, b, 1 + qlen, seed=4)
    loss, acc = amcl_info_nce(q, k, queue, t, beta=beta, prior=0.1)
    ref_loss, ref_acc = ref_amcl(q, k, queue, t, beta, 0.1)
    assert loss.shape == () and acc.shape == ()
    assert loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-9)
    assert acc.item() == pytest.approx(ref_acc, abs=1e-6)
    assert 0.0 < ref_acc < 1.0 or heads == 1


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_one_head_a_constant_temperature_and_no_penalty_is_info_nce_bit_for_bit(dtype: torch.dtype) -> None:
    b, d, qlen, t = 9, 16, 33, 0.07
    q, k, queue = _unit(1, b, d, seed=5, dtype=dtype), _unit(1, b, d, seed=6, dtype=dtype), \
        _unit(1, qlen, d, seed=7, dtype=dtype)
    temps = torch.full((1, b, 1 + qlen), t, dtype=dtype)
    loss, acc = amcl_info_nce(q, k, queue, temps, beta=0.0)
    ref_loss, ref_acc = info_nce(q[0], k[0], queue[0], t)
    assert torch.equal(loss, ref_loss) and torch.equal(acc, ref_acc)
    # a constant temperature at the prior: the penalty is 0 whatever its weight
    at_prior, _ = amcl_info_nce(q, k, queue, temps, beta=5.0, prior=t)
    assert at_prior.item() == pytest.approx(ref_loss.item(), rel=1e-6)


def test_gradients_reach_the_embeddings_and_the_temperatures() -> None:
    q = _unit(2, 4, 8, seed=8, dtype=torch.float32).requires_grad_(True)
    k, queue = _unit(2, 4, 8, seed=9, dtype=torch.float32), _unit(2, 10, 8, seed=10, dtype=torch.float32)
    raw = torch.zeros(2, 4, 11, requires_grad=True)
    t = 0.01 + 1.99 * torch.sigmoid(raw)
    loss, _ = amcl_info_nce(q, k, queue, t, beta=0.1)
    loss.backward()
    assert q.grad is not None and raw.grad is not None
    assert q.grad.abs().sum() > 0 and raw.grad.abs().sum() > 0 and torch.isfinite(raw.grad).all()


def test_the_penalty_is_zero_at_the_prior_and_grows_on_both_sides() -> None:
    prior = 0.2
    at = temperature_penalty(torch.tensor([prior]), prior)
    assert at.item() == pytest.approx(0.0, abs=1e-7)
    values = [temperature_penalty(torch.tensor([x], dtype=F64), prior).item() for x in (1e-4, 0.02, 0.1, 0.4, 2.0, 50.0)]
    assert values[0] > values[1] > values[2] > 0 and 0 < values[3] < values[4] < values[5]
    assert values[0] > 1000  # like prior / t near 0


def test_the_penalty_keeps_learned_temperatures_off_the_bounds() -> None:
    """A toy problem: fixed embeddings, only the temperatures learn (one free logit per pair,
    through the bounded sigmoid). Without the penalty the positive pairs' temperatures run to the
    lower bound (a sharper positive always lowers the loss when it is the most similar key); with
    it they settle inside the range."""
    lo, hi = 1e-3, 2.0
    heads, b, d, qlen = 2, 8, 16, 32
    q = _unit(heads, b, d, seed=11, dtype=torch.float32)
    k = F.normalize(q + 0.3 * _unit(heads, b, d, seed=12, dtype=torch.float32), dim=-1)
    queue = _unit(heads, qlen, d, seed=13, dtype=torch.float32)

    def train(beta: float) -> Tensor:
        raw = torch.zeros(heads, b, 1 + qlen, requires_grad=True)
        opt = torch.optim.Adam([raw], lr=1.0)
        for _ in range(300):
            t = lo + (hi - lo) * torch.sigmoid(raw)
            loss, _ = amcl_info_nce(q, k, queue, t, beta=beta, prior=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (lo + (hi - lo) * torch.sigmoid(raw)).detach()

    free, penalised = train(0.0), train(1.0)
    assert free[..., 0].max() < 2 * lo  # every positive temperature at the lower bound
    assert free[..., 1:].max() > 0.99 * hi  # and some negatives' at the upper one
    assert penalised[..., 0].min() > 10 * lo and penalised.max() < 0.5 * hi  # measured: 0.069-0.118


@pytest.mark.parametrize(("change", "message"), [
    (lambda q, k, u, t: (q[0], k, u, t), "q must be a 3-d floating-point tensor"),
    (lambda q, k, u, t: (q, k[:, :2], u, t), "k must have the shape of q"),
    (lambda q, k, u, t: (q, k, u[:1], t), r"queue must have shape \(2, Q, 8\)"),
    (lambda q, k, u, t: (q, k, u, t[..., :3]), r"temperature must have shape \(2, 4, 11\)"),
    (lambda q, k, u, t: (q, k, u, -t), "every temperature must be > 0"),
])
def test_wrong_inputs_get_one_line_naming_the_argument(change: object, message: str) -> None:
    q, k, u = _unit(2, 4, 8, seed=1), _unit(2, 4, 8, seed=2), _unit(2, 10, 8, seed=3)
    t = _temps(2, 4, 11, seed=4)
    with pytest.raises(ValueError, match=message):
        amcl_info_nce(*change(q, k, u, t), beta=0.1)  # type: ignore[operator]
    with pytest.raises(ValueError, match="beta must be >= 0"):
        amcl_info_nce(q, k, u, t, beta=-1.0)


# --------------------------------------------------------------------------- the modules

def test_multi_head_gives_unit_embeddings_per_head_and_the_heads_differ() -> None:
    from pcl_tune.model import MultiHead

    torch.manual_seed(0)
    head = MultiHead("mlp", 12, 6, heads=3)
    out = head(torch.randn(5, 12))
    assert out.shape == (3, 5, 6)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3, 5), atol=1e-6)
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="heads must be >= 1"):
        MultiHead("mlp", 12, 6, heads=0)


def test_pair_temperature_starts_at_init_stays_in_range_and_learns() -> None:
    from pcl_tune.model import PairTemperature

    torch.manual_seed(0)
    lo, hi, init = 1e-5, 2.0, 0.07
    net = PairTemperature(8, 2, lo=lo, hi=hi, init=init, rank=4)
    q, k, queue = _unit(2, 5, 8, seed=1, dtype=torch.float32), _unit(2, 5, 8, seed=2, dtype=torch.float32), \
        _unit(2, 9, 8, seed=3, dtype=torch.float32)
    t = net(q, k, queue)
    assert t.shape == (2, 5, 10)
    assert torch.allclose(t, torch.full_like(t, init), rtol=1e-5)  # plain InfoNCE at the start
    with torch.no_grad():  # extreme parameters: still inside the range (the sigmoid saturates at its ends)
        net.weight.fill_(1e3)
        net.sim_weight.fill_(-1e3)
    t = net(q, k, queue)
    assert (t >= lo).all() and (t <= hi).all() and t.min() < 0.01 and t.max() > 1.0
    net = PairTemperature(8, 2, lo=lo, hi=hi, init=init, rank=4)
    q.requires_grad_(True)
    loss, _ = amcl_info_nce(q, k, queue, net(q, k, queue), beta=0.1)
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["weight"].abs().sum() > 0 and grads["bias"].abs().sum() > 0 and grads["sim_weight"].abs() > 0
    for bad in ((0.0, 1.0, 0.5), (0.5, 0.2, 0.3), (0.1, 1.0, 2.0)):
        with pytest.raises(ValueError, match="temperature"):
            PairTemperature(8, 2, lo=bad[0], hi=bad[1], init=bad[2])


# --------------------------------------------------------------------------- config

@pytest.mark.parametrize(("changes", "message"), [
    ({"model.num_heads": 0}, r"key 'model.num_heads': got 0, expected an integer >= 1"),
    ({"model.temperature_range": [0.5, 0.1]}, r"key 'model.temperature_range'.*0 < lo < hi"),
    ({"model.temperature_range": [0.0, 1.0]}, r"key 'model.temperature_range'"),
    ({"pcl.proto_head": 3}, r"key 'pcl.proto_head': got 3, expected a head index in \[0, 2\].*or 'all'"),
    ({"pcl.proto_head": "first"}, r"key 'pcl.proto_head': got 'first'"),
    ({"pcl.amcl_beta": -0.1}, r"key 'pcl.amcl_beta'"),
    ({"model.head": "amcl", "pcl.temperature": 5.0}, r"key 'pcl.temperature'.*inside model.temperature_range"),
])
def test_wrong_amcl_settings_get_one_line_naming_the_key(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        config_from_dict(changes)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- runs

def _amcl_settings(changes: dict[str, Any] | None = None) -> dict[str, Any]:
    return tiny_settings({"model.head": "amcl", "model.num_heads": 2, "pcl.warmup_epochs": 1, "epochs": 3,
                          "pcl.proto_head": 1, **(changes or {})})








def test_a_multi_head_run_reports_every_head_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    cfg = _amcl_settings()
    straight = train_loop(cfg, out_dir=tmp_path / "straight", verbose=False)
    for record in straight:
        for name in head_names(2):
            assert name in record and math.isfinite(record[name]), name
        lo, hi = 1e-5, 2.0
        for h in range(2):
            assert lo <= record[f"tau_pos_p10_head_{h}"] <= record[f"tau_pos_mean_head_{h}"] * 1.0001
            assert record[f"tau_pos_p90_head_{h}"] <= hi
        assert record["loss_inst"] == pytest.approx(record["loss_inst_head_0"] + record["loss_inst_head_1"], rel=1e-6)
    assert math.isfinite(straight[-1]["loss_proto"]) and math.isfinite(straight[-1]["nmi"])
    ckpt = tmp_path / "resumed" / CHECKPOINT_DIR
    train_loop(cfg, out_dir=tmp_path / "resumed", verbose=False, max_epochs=1)
    resumed = train_loop(cfg, out_dir=tmp_path / "resumed", verbose=False, resume_from=ckpt)
    for epoch in range(3):
        assert record_differences(straight[epoch], resumed[epoch]) == {}, epoch
    ends = [torch.load(tmp_path / r / CHECKPOINT_DIR / CHECKPOINT_FILE, weights_only=True) for r in ("straight", "resumed")]
    model = ends[0]["model"]
    assert model["queue"].shape == (2, 256, 128)  # (heads, queue_size, low_dim) of the tiny run
    assert any(k.startswith("temperature_net.") for k in model)
    for name, value in model.items():
        assert torch.equal(value, ends[1]["model"][name]), name
    # the temperature network was trained: its zero-initialised weights moved
    assert model["temperature_net.weight"].abs().sum() > 0


def test_one_head_without_the_penalty_trains_exactly_like_the_mlp_head_until_the_temperatures_move(
        tmp_path: Path) -> None:
    """Same seed, one head, beta 0: the first step's loss is InfoNCE at pcl.temperature exactly
    (every pair starts there), so epoch 1's instance loss is close to the plain run's (the
    temperature network then learns, and the two runs part)."""
    plain = train_loop(tiny_settings({"epochs": 1}), out_dir=tmp_path / "plain", verbose=False)
    one = train_loop(tiny_settings({"epochs": 1, "model.head": "amcl", "model.num_heads": 1, "pcl.amcl_beta": 0.0}),
                     out_dir=tmp_path / "one", verbose=False)
    assert one[0]["loss_inst"] == pytest.approx(plain[0]["loss_inst"], rel=0.05)
    assert one[0]["loss_inst_head_0"] == one[0]["loss_inst"]


def test_a_multi_head_checkpoint_evaluates_and_exports_its_backbone(tmp_path: Path) -> None:
    from pcl_tune.evaluate.encoder import extract_features, load_encoder
    from pcl_tune.export import load_backbone

    train_loop(_amcl_settings({"epochs": 1, "model.backbone": "resnet18", "model.small_stem": True, "data.subset": 64,
                               "model.queue_size": 32, "model.low_dim": 16}), out_dir=tmp_path, verbose=False)
    loaded = load_encoder(tmp_path / CHECKPOINT_DIR, device="cpu")
    assert loaded.encoder.multi_head and len(loaded.encoder.head.heads) == 2
    feats = extract_features(loaded, loaded.data.val)
    assert feats.shape[0] == len(loaded.data.val) and torch.isfinite(feats).all()
    backbone = load_backbone(tmp_path / CHECKPOINT_DIR, allow_small_stem=True)
    assert backbone.arch == "resnet18"


def test_all_heads_cluster_each_head_on_its_own_and_resume_bit_for_bit(tmp_path: Path) -> None:
    """``pcl.proto_head: all``: the clustering of each head equals clustering that head's
    embeddings alone (the side-by-side rows split back in order), the heads' clusterings differ,
    and a run with a feature bank resumes to the straight run's records and weights."""
    from pcl_tune.train import embed, on_epoch_start
    from pcl_tune.train.state import RunState

    cfg = _amcl_settings({"pcl.proto_head": "all", "clustering.features": "bank"})
    run = RunState.build(config_from_dict(cfg))
    side_by_side, _ = embed(run, run.data.train, head=True, backbone=False)
    assert side_by_side is not None and side_by_side.shape == (len(run.data.train), 2 * 128)
    clusters = on_epoch_start(run, 1, side_by_side)
    assert clusters.heads is not None and len(clusters.heads) == 2
    for h in range(2):
        run.cfg.pcl.proto_head = h
        alone, _ = embed(run, run.data.train, head=True, backbone=False)
        assert alone is not None
        for a, b in zip(on_epoch_start(run, 1, alone).levels, clusters.heads[h]):
            assert torch.equal(a.assignment, b.assignment) and torch.equal(a.centroids, b.centroids)
    assert not torch.equal(clusters.heads[0][0].centroids, clusters.heads[1][0].centroids)
    straight = train_loop(cfg, out_dir=tmp_path / "straight", verbose=False)
    train_loop(cfg, out_dir=tmp_path / "resumed", verbose=False, max_epochs=2)
    resumed = train_loop(cfg, out_dir=tmp_path / "resumed", verbose=False, resume_from=tmp_path / "resumed" / CHECKPOINT_DIR)
    for epoch in range(3):
        assert record_differences(straight[epoch], resumed[epoch]) == {}, epoch
    assert math.isfinite(straight[-1]["loss_proto"])


def test_the_report_plots_each_heads_temperatures_from_the_epoch_records(tmp_path: Path) -> None:
    from types import SimpleNamespace

    import pandas as pd

    from analysis import plots

    records = train_loop(_amcl_settings({"epochs": 2}), out_dir=tmp_path / "run", verbose=False)
    epochs = pd.DataFrame([{**r, "trial_id": "a"} for r in records])
    out = plots.head_temperatures(SimpleNamespace(epochs=epochs), tmp_path / "heads.png")  # type: ignore[arg-type]
    assert out is not None and out.stat().st_size > 10_000
    single = epochs.drop(columns=[c for c in epochs.columns if "_head_" in c])
    assert plots.head_temperatures(SimpleNamespace(epochs=single), tmp_path / "none.png") is None  # type: ignore[arg-type]


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        cfg = _amcl_settings({"data.subset": 64, "optim.batch_size": 16, "model.width": 4, "model.low_dim": 16,
                              "model.queue_size": 32, "clustering.niter": 5, "pcl.cluster_schedule": "3,5",
                              "eval.batch_size": 16})
        res = straight_and_resumed(cfg, Path(out_file).parent)
        res["weights"] = torch.load(Path(out_file).parent / "straight" / CHECKPOINT_DIR / CHECKPOINT_FILE,
                                    weights_only=True)["model"] if rank == 0 else None
        from pcl_tune.train.state import RunState

        run = RunState.build(config_from_dict(cfg))
        run.resume(Path(out_file).parent / "straight" / CHECKPOINT_DIR)
        res["temperature_net"] = {k: v.clone() for k, v in run.model.temperature_net.state_dict().items()}
        torch.save(res, out_file)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_agree_and_resume_exactly(tmp_path: Path) -> None:
    """Two ranks: the temperature network is outside DDP and its gradients are averaged by hand;
    had they not been, the ranks' networks would differ. Both ranks' histories are equal, and
    stopped after the warm-up and resumed they equal the straight run."""
    r0, r1 = run_ranks(__file__, 2, tmp_path, timeout=300)
    for name, value in r0["temperature_net"].items():
        assert torch.equal(value, r1["temperature_net"][name]), name
    assert r0["temperature_net"]["weight"].abs().sum() > 0
    for r in (r0, r1):
        for epoch in range(3):
            assert record_differences(r["straight"][epoch], r["resumed"][epoch]) == {}, epoch
    assert [m["loss_inst_head_0"] for m in r0["straight"]] == [m["loss_inst_head_0"] for m in r1["straight"]]


if __name__ == "__main__":
    _ddp_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
