"""Population Based Training (``scheduler: pbt``): the space section, bounded perturbations, the
lineage rebuilt from the log (against a forward simulation), the optimiser settings a clone takes
from its new config, and whole searches (one run, one killed and resumed)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import tiny_settings

from pcl_tune.config import config_from_dict, merge, unflatten
from pcl_tune.pbt import LINEAGE_DIR, lineage, perturb, read_lineage_log, settings_by_epoch
from pcl_tune.space import Param, SpaceError, load_space
from pcl_tune.train import train_loop
from pcl_tune.train.state import RunState, lr_factor

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- the space section

def _pbt_space(tmp_path: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "name": "p",
        "fixed": {"epochs": 12, "data": {"dataset": "digits"}, "pcl": {"warmup_epochs": 2}},
        "scheduler": "pbt",
        "search": {"optim.lr": {"loguniform": [0.001, 0.1]}, "pcl.cluster_schedule": {"choice": ["5,10", "10,20"]},
                   "model.width": {"choice": [8, 16]}},
        "pbt": {"population": 4, "interval": 3},
    }
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path = tmp_path / "pbt.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_pbt_space_defaults_mutate_what_a_running_trial_can_change(tmp_path: Path) -> None:
    space = load_space(_pbt_space(tmp_path))
    assert space.is_pbt and space.pbt is not None
    assert space.pbt.mutate == ["optim.lr", "pcl.cluster_schedule"]  # model.width would not fit the weights
    assert space.num_samples == 4 and not space.asha
    from pcl_tune.space import SearchSpace, pbt_burn_in

    assert pbt_burn_in(space) == 3  # the first multiple of the interval after the 2-epoch warm-up
    again = SearchSpace.from_json(json.loads(json.dumps(space.to_json())))
    assert again.is_pbt and again.pbt == space.pbt


@pytest.mark.parametrize(("changes", "key"), [
    ({"pbt": {"mutate": ["model.width"]}}, "pbt.mutate"),
    ({"pbt": {"mutate": ["pcl.k"]}}, "pbt.mutate"),
    ({"pbt": {"interval": 12}}, "pbt.interval"),
    ({"pbt": {"interval": 3, "burn_in": 4}}, "pbt.burn_in"),
    ({"pbt": {"interval": 3, "burn_in": 0}}, "pbt.burn_in"),
    ({"pbt": {"quantile": 0.7}}, "pbt.quantile"),
    ({"pbt": {"population": 1}}, "pbt.population"),
    ({"pbt": {"perturbation_factors": [0.8, -1]}}, "pbt.perturbation_factors"),
    ({"asha": {"grace_period": 3}}, "asha"),
    ({"searcher": {"num_samples": 5}}, "searcher.num_samples"),
    ({"resources": {"executor": "train", "workers_per_trial": 1}}, "resources.executor"),
    ({"scheduler": "hyperband"}, "scheduler"),
    ({"fixed": {"epochs": 12, "pcl": {"warmup_epochs": 2}, "checkpoint_every": 2}}, "fixed.checkpoint_every"),
    ({"scheduler": None}, "pbt"),
    ({"pbt": {"explore": "bandit"}}, "pbt.explore"),
    ({"pbt": {"explore": "pb2", "mutate": ["pcl.cluster_schedule"]}}, "pbt.explore"),
])
def test_pbt_space_errors_name_the_key(tmp_path: Path, changes: dict[str, Any], key: str) -> None:
    with pytest.raises(SpaceError) as e:
        load_space(_pbt_space(tmp_path, **changes))
    assert f"key {key!r}" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- perturbations

PARAMS = [Param("optim.lr", "loguniform", 0.001, 0.1, log=True), Param("pcl.alpha", "uniform", 0.5, 3.0),
          Param("pcl.k", "int", 1, 4), Param("pcl.cluster_schedule", "choice", choices=("5,10", "10,20", "20,40"))]


def test_perturbations_stay_in_bounds_and_move_as_documented() -> None:
    rng = np.random.default_rng(0)
    config = {"optim.lr": 0.09, "pcl.alpha": 0.55, "pcl.k": 1, "pcl.cluster_schedule": "5,10", "other": "kept"}
    ks = set()
    for _ in range(300):
        new, ops = perturb(config, PARAMS, rng, resample_probability=0.25, factors=(0.8, 1.2))
        assert new["other"] == "kept"
        for p in PARAMS:
            assert p.contains(new[p.name]), (p.name, new[p.name])
            op = ops[p.name]
            if op == "resample":
                continue
            if p.kind == "choice":
                old_i = p.choices.index(config[p.name])
                assert abs(p.choices.index(new[p.name]) - old_i) <= 1
            elif p.kind == "int":
                assert new[p.name] == min(max(config[p.name] + int(op), 1), 4)
            else:
                f = float(op.split()[1])
                assert new[p.name] == pytest.approx(min(max(config[p.name] * f, p.low), p.high))
        ks.add(new["pcl.k"])
        config = {**new, "other": "kept"}
    assert len(ks) == 4  # an integer is never stuck (stock PBT: round(2 * 1.2) == 2)
    a, _ = perturb(config, PARAMS, np.random.default_rng(7), resample_probability=0.25, factors=(0.8, 1.2))
    b, _ = perturb(config, PARAMS, np.random.default_rng(7), resample_probability=0.25, factors=(0.8, 1.2))
    assert a == b  # seeded: the same perturbations again


# --------------------------------------------------------------------------- lineage

def _simulate(events: list[dict[str, Any]], last: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    """The obvious forward simulation: every trial holds its model's per-epoch settings; a clone
    copies the donor's first ``donor_epoch`` epochs (training the donor that far with its current
    settings first) and goes on with its new settings."""
    hist: dict[str, list[dict[str, Any]]] = {}
    cur: dict[str, dict[str, Any]] = {}
    for e in sorted(events, key=lambda e: e["time"]):
        if e["event"] == "start":
            if e["trial"] not in cur:
                hist[e["trial"]], cur[e["trial"]] = [], dict(e["config"])
            continue
        d, n = e["donor"], e["donor_epoch"]
        while len(hist[d]) < n:
            hist[d].append(dict(cur[d]))
        hist[e["trial"]] = [dict(x) for x in hist[d][:n]]
        cur[e["trial"]] = dict(e["config"])
    for t, n in last.items():
        while len(hist[t]) < n:
            hist[t].append(dict(cur[t]))
        del hist[t][n:]
    return hist


def _random_events(seed: int, trials: int = 5, rounds: int = 6, interval: int = 3) -> tuple[list[dict[str, Any]], dict[str, int]]:
    rng = np.random.default_rng(seed)
    ids = [f"t{i}" for i in range(trials)]
    events: list[dict[str, Any]] = [{"event": "start", "trial": t, "config": {"x": i, "y": f"s{i}"}, "time": i * 0.01}
                                    for i, t in enumerate(ids)]
    clock, epoch = 1.0, {t: 0 for t in ids}
    for r in range(1, rounds + 1):
        for t in ids:
            epoch[t] = r * interval - int(rng.integers(0, 2))  # trials drift apart (asynchronous PBT)
        for t in rng.permutation(ids)[: int(rng.integers(1, 3))]:
            donor = str(rng.choice([d for d in ids if d != t]))
            clock += 1.0
            n = max(1, int(min(epoch[donor], epoch[t] + int(rng.integers(-2, 3)))))
            events.append({"event": "clone", "trial": str(t), "donor": donor, "donor_epoch": n,
                           "trial_epoch": epoch[t], "config": {"x": float(rng.random()), "y": f"c{r}"}, "time": clock})
            epoch[str(t)] = n
    last = {t: rounds * interval + 2 for t in ids}
    return events, last


@pytest.mark.parametrize("seed", range(6))
def test_lineage_equals_the_forward_simulation(seed: int) -> None:
    events, last = _random_events(seed)
    expected = _simulate(events, last)
    for t, n in last.items():
        rows = settings_by_epoch(lineage(events, t, n), ["x", "y"])
        assert [r["epoch"] for r in rows] == list(range(1, n + 1))
        assert [{"x": r["x"], "y": r["y"]} for r in rows] == expected[t], t


def test_lineage_log_reader_skips_a_torn_file(tmp_path: Path) -> None:
    folder = tmp_path / LINEAGE_DIR
    folder.mkdir()
    (folder / "1_start_a.json").write_text(json.dumps({"event": "start", "trial": "a", "config": {}, "time": 2.0}))
    (folder / "2_start_b.json").write_text(json.dumps({"event": "start", "trial": "b", "config": {}, "time": 1.0}))
    (folder / "3_clone_b.json").write_text('{"event": "clo')
    assert [e["trial"] for e in read_lineage_log(tmp_path)] == ["b", "a"]
    with pytest.raises(ValueError, match="no start event"):
        lineage([], "a", 3)


# --------------------------------------------------------------------------- PB2

def test_pb2_explore_is_a_pbt_setting_that_round_trips(tmp_path: Path) -> None:
    from pcl_tune.space import SearchSpace

    space = load_space(_pbt_space(tmp_path, pbt={"population": 4, "interval": 3, "explore": "pb2"}))
    assert space.pbt is not None and space.pbt.explore == "pb2"
    assert SearchSpace.from_json(json.loads(json.dumps(space.to_json()))).pbt == space.pbt
    assert load_space(_pbt_space(tmp_path)).pbt.explore == "perturb"  # type: ignore[union-attr]


def test_the_gp_axis_is_log10_for_log_ranges_and_values_come_back_clipped_and_on_the_step() -> None:
    from pcl_tune.pbt import from_gp, gp_bounds, to_gp

    lr, alpha, k = PARAMS[0], PARAMS[1], PARAMS[2]
    assert gp_bounds(lr) == pytest.approx((-3.0, -1.0)) and gp_bounds(alpha) == (0.5, 3.0)
    assert from_gp(lr, to_gp(lr, 0.02)) == pytest.approx(0.02)
    assert from_gp(lr, 0.5) == 0.1 and from_gp(alpha, -7.0) == 0.5  # clipped to the bounds
    assert from_gp(k, 2.6) == 3 and isinstance(from_gp(k, 2.6), int)
    stepped = Param("pcl.k", "int", 2, 10, step=4)
    assert [from_gp(stepped, x) for x in (2.0, 3.9, 4.1, 9.9, 12.0)] == [2, 2, 6, 10, 10]


class _Trial:
    def __init__(self, name: str, config: dict[str, Any]) -> None:
        self.name, self.config = name, config

    def __str__(self) -> str:
        return self.name


def test_pb2_picks_ranges_by_gp_ucb_inside_the_bounds_and_perturbs_choices() -> None:
    """Four trials' objectives at three perturbation points: every GP pick stays in its bounds,
    the picks of one round differ (each is remembered), the choice moves to a neighbour, and
    before the donor has two points the ranges are perturbed as PBT does."""
    from types import SimpleNamespace

    from pcl_tune.searcher import BoundedPB2

    params = [PARAMS[0], PARAMS[3]]
    pb2 = BoundedPB2(params=params, seed=0, metric="knn_top1", mode="max", time_attr="epoch",
                     perturbation_interval=2)
    lrs = [0.002, 0.01, 0.03, 0.09]
    trials = [_Trial(f"t{i}", {"optim.lr": lr, "pcl.cluster_schedule": "10,20"}) for i, lr in enumerate(lrs)]
    state = SimpleNamespace(last_score=None, last_train_time=0, last_result=None)
    pb2._save_trial_state(state, 2, {"epoch": 2, "knn_top1": 20.0}, trials[0])
    new, ops = pb2._get_new_config(trials[1], trials[0])
    assert ops["optim.lr"] != "pb2"  # one point for the donor: no GP step yet
    for epoch in (2, 4, 6):
        for i, t in enumerate(trials):
            gain = [1.0, 4.0, 2.0, 0.5][i]  # lr 0.01 gains most per epoch
            pb2._save_trial_state(state, epoch, {"epoch": epoch, "knn_top1": 10.0 + gain * epoch}, t)
    picks = []
    for _ in range(3):
        new, ops = pb2._get_new_config(trials[3], trials[1])
        assert ops["optim.lr"] == "pb2" and 0.001 <= new["optim.lr"] <= 0.1
        assert new["pcl.cluster_schedule"] in ("5,10", "20,40") or ops["pcl.cluster_schedule"] == "resample"
        picks.append(new["optim.lr"])
    assert pb2.current is not None and len(pb2.current) == 3  # one round: each pick is remembered
    assert len(set(picks)) > 1  # later picks avoid the points taken in the same round


def test_no_clone_from_a_donor_that_has_finished() -> None:
    """A donor whose latest checkpoint is its last epoch would leave the clone nothing to train
    (seen in a PB2 search: the clone ended as a copy of the donor's final model)."""
    from types import SimpleNamespace

    from pcl_tune.searcher import BoundedPBT

    pbt = BoundedPBT(params=[PARAMS[0]], seed=0, metric="knn_top1", mode="max", time_attr="epoch",
                     perturbation_interval=1, last_epoch=6)
    exploited: list[tuple[str, str]] = []
    pbt._exploit = lambda controller, trial, donor: exploited.append((trial.trial_id, donor.trial_id))  # type: ignore[method-assign]

    class Trial:  # hashable, as Tune's trials are (the scheduler keys its state by trial)
        def __init__(self, name: str, epoch: int = 0) -> None:
            latest = SimpleNamespace(checkpoint=f"ckpt_{name}", metrics={"epoch": epoch})
            self.trial_id = name
            self.run_metadata = SimpleNamespace(checkpoint_manager=SimpleNamespace(latest_checkpoint_result=latest))

    def donor(name: str, epoch: int) -> Any:
        return Trial(name, epoch)

    weak = Trial("weak")
    pbt._checkpoint_or_exploit(weak, None, [donor("done", 6)], [weak])
    assert exploited == []
    running = donor("running", 4)
    pbt._trial_state[running] = SimpleNamespace(last_checkpoint=None, last_result=None)
    pbt._checkpoint_or_exploit(weak, None, [running], [weak])
    assert exploited == [("weak", "running")]


# --------------------------------------------------------------------------- a clone's optimiser

def test_a_run_resumed_with_other_optimiser_settings_takes_them(tmp_path: Path) -> None:
    base = tiny_settings({"epochs": 4, "optim.lr": 0.02, "optim.momentum": 0.9, "optim.weight_decay": 5e-4})
    train_loop(base, out_dir=tmp_path / "a", max_epochs=2, verbose=False)
    ckpt = tmp_path / "a" / "checkpoint"
    same = RunState.build(config_from_dict(base))
    saved_groups = [dict(g) for g in torch_load_groups(ckpt)]
    same.resume(ckpt)
    assert [g["lr"] for g in same.optimizer.param_groups] == [g["lr"] for g in saved_groups]  # bit for bit
    changed = merge(base, {"optim.lr": 0.05, "optim.momentum": 0.5, "optim.weight_decay": 1e-3})
    run = RunState.build(config_from_dict(changed))
    run.resume(ckpt)
    factor = lr_factor(run.cfg.optim, 4)(2)
    for g in run.optimizer.param_groups:
        assert g["lr"] == pytest.approx(0.05 * factor) and g["momentum"] == 0.5 and g["weight_decay"] == 1e-3
    assert run.lr_scheduler.get_last_lr()[0] == pytest.approx(0.05 * factor)
    run.lr_scheduler.step()
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * lr_factor(run.cfg.optim, 4)(3))


def torch_load_groups(ckpt: Path) -> list[dict[str, Any]]:
    import torch

    state = torch.load(ckpt / "checkpoint.pt", map_location="cpu", weights_only=False)
    return list(state["optimizer"]["param_groups"])


# --------------------------------------------------------------------------- whole searches

def _smoke_space(tmp_path: Path) -> Path:
    """pbt_demo.yaml on the tests' tiny data: 4 trials of 6 epochs, compared at every epoch from the
    second to the fifth (four rounds: the chance that no trial is ever in the bottom half when it
    is compared is about (1/4)^4)."""
    spec = yaml.safe_load((ROOT / "search_spaces" / "pbt_demo.yaml").read_text())
    fixed = unflatten(tiny_settings({"epochs": 6, "data.subset": 128, "model.queue_size": 128,
                                     "pcl.num_negatives": 16, "clustering.niter": 5, "pcl.warmup_epochs": 1},
                                    without=("device", "threads", "seed")))
    spec["fixed"] = fixed
    spec["search"]["pcl.cluster_schedule"] = {"choice": ["4,8", "8,16", "16,32"]}
    spec["searcher"] = {"seed": 0, "baseline": True}
    spec["pbt"].update(population=4, interval=1, burn_in=2, quantile=0.5)
    path = tmp_path / "pbt_smoke.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="1", RAY_memory_monitor_refresh_ms="0")
    return env


def _search(space: Path, runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pcl_tune.search", "--space", str(space), "--storage-path", str(runs), "--name",
            "pbt", "--num-cpus", "2", "--no-dashboard", *extra]


def _check_population(exp_dir: Path, epochs: int = 6, *, min_clones: int = 1, log_agrees: bool = True) -> Any:
    """Every trial reached the last epoch; each trial's schedule (from the lineage its final
    checkpoint carries) matches the records that checkpoint carries (clusters and the lr each
    epoch actually used); with ``log_agrees``, the lineage log rebuilds the same segments."""
    import analysis
    from analysis import pbt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = analysis.load(exp_dir)
    assert set(exp.trials["epochs"]) == {epochs}, exp.trials[["trial_id", "epochs"]]
    events = read_lineage_log(exp_dir)
    started = {e["trial"] for e in events if e["event"] == "start"}
    assert started == set(exp.trials["trial_id"])
    clones = pbt.clones(exp)
    assert len(clones) >= min_clones
    baseline = set(exp.trials.loc[exp.trials["arm"].astype(str) == "moco_v2", "trial_id"])
    assert len(baseline) == 1 and not (set(clones["trial_id"]) | set(clones["donor"])) & baseline
    cfg = exp.space.base_config()
    for t in exp.trials["trial_id"]:
        carried = pbt.checkpoint_segments(exp, t)
        assert carried and carried[-1].last == epochs, t  # every trial's checkpoint carries its lineage
        if log_agrees:
            logged = lineage(events, t, epochs)
            assert [(s.trial, s.first, s.last) for s in carried] == [(s.trial, s.first, s.last) for s in logged], t
        sched, records = pbt.schedule(exp, t), pbt.lineage_metrics(exp, t)
        assert list(records["epoch"]) == list(range(1, epochs + 1))
        assert list(sched["clusters"]) == [c if isinstance(c, str) else "" for c in records["clusters"]], t
        for (_, s), (_, r) in zip(sched.iterrows(), records.iterrows()):
            want = s["optim.lr"] * lr_factor(cfg.optim, epochs)(int(s["epoch"]) - 1)
            assert math.isclose(r["lr"], want, rel_tol=1e-9), (t, s["epoch"], r["lr"], want)
    return exp


@pytest.mark.slow
def test_pbt_search_clones_perturbs_and_reports(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    proc = subprocess.run(_search(_smoke_space(tmp_path), runs), capture_output=True, text=True, env=_env(),
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    exp = _check_population(runs / "pbt")
    report = (runs / "pbt" / "report.md").read_text()
    assert "## Population Based Training" in report and "analysis/pbt_schedules.png" in report
    assert (runs / "pbt" / "analysis" / "pbt_schedules.png").is_file()
    assert len(exp.trials) == 5  # 4 in the population and the MoCo v2 baseline
    assert "Error handling checkpoint" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_pb2_search_finishes_with_gp_chosen_ranges(tmp_path: Path) -> None:
    space = _smoke_space(tmp_path)
    spec = yaml.safe_load(space.read_text())
    spec["pbt"]["explore"] = "pb2"
    space.write_text(yaml.safe_dump(spec, sort_keys=False))
    runs = tmp_path / "runs"
    proc = subprocess.run(_search(space, runs, "--no-report"), capture_output=True, text=True, env=_env(),
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    exp = _check_population(runs / "pbt", min_clones=1)
    ops = [e.get("operations", {}) for e in read_lineage_log(runs / "pbt") if e["event"] == "clone"]
    assert any("pb2" in o.values() for o in ops), ops  # the GP chose the ranges of some clone
    assert len(exp.trials) == 5


@pytest.mark.slow
def test_pbt_search_killed_and_resumed_finishes_every_trial(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    marker = tmp_path / "paused"
    env = _env()
    env.update(PCL_TUNE_PAUSE_AT="driver/result14", PCL_TUNE_PAUSE_FILE=str(marker),
               RAY_TUNE_CALLBACKS="fault_hooks.PauseDriver",
               PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    space = _smoke_space(tmp_path)
    driver = subprocess.Popen(_search(space, runs, "--no-report"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        for _ in range(600):
            if (marker.is_file() and marker.read_text().strip()) or driver.poll() is not None:
                break
            time.sleep(1.0)
        assert driver.poll() is None, "the search ended before the kill point:\n" + driver.communicate()[0][-4000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.communicate(timeout=60)
    proc = subprocess.run([sys.executable, "-m", "pcl_tune.search", "--name", "pbt", "--storage-path", str(runs),
                           "--resume", "--num-cpus", "2", "--no-dashboard"], capture_output=True, text=True,
                          env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # How many clones the kill left is chance; the log can hold clones made after Tune's last
    # saved state, which the resume undid, so only the checkpoints' lineage is exact here.
    _check_population(runs / "pbt", min_clones=0, log_agrees=False)
