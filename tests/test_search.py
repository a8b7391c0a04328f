"""End-to-end searches on a local Ray (CPU): direct executor, Ray Train executor. (A search
joining a two-node cluster with ``--address`` runs in ``test_cluster_recipes.py``, through the
Slurm script.)

Each test starts the search as a subprocess, exactly as a user would. To make ASHA's decisions
deterministic, the ASHA tests optimise ``lr`` (reported every epoch, proportional to the searched
base learning rate) and pin the first trials with ``points_to_evaluate``: a later trial with a
lower learning rate is below the rung's cutoff and must be stopped at the grace period.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import tiny_settings

from pcl_tune.config import unflatten

pytestmark = pytest.mark.slow

# The search space's `fixed:` section: the tests' tiny config, smaller still (128 images, 4 and 8
# clusters, 16 negatives), nested as a space file writes it. Threads come from the trial's CPUs,
# and device and seed are left to the search.
TINY_FIXED: dict[str, Any] = unflatten(tiny_settings(
    {"epochs": 4, "data.subset": 128, "model.queue_size": 128, "pcl.cluster_schedule": "4,8",
     "pcl.num_negatives": 16, "clustering.niter": 5},
    without=("device", "threads", "seed"),
))


def _space(tmp_path: Path, *, lrs: list[float], num_samples: int, resources: dict[str, Any],
           epochs: int = 4, metric: str = "lr", name: str = "space.yaml", baseline: bool = False) -> Path:
    """A TPE + ASHA space over ``lrs``; the MoCo v2 baseline trial only with ``baseline`` (tests of
    resume and placement leave it out to stay short)."""
    fixed = json.loads(json.dumps(TINY_FIXED))
    fixed["epochs"] = epochs
    data = {
        "name": "t",
        "fixed": fixed,
        "search": {"optim.lr": {"choice": lrs}, "pcl.temperature": {"uniform": [0.1, 0.3]}},
        "objective": {"metric": metric, "mode": "max"},
        "searcher": {"seed": 0, "startup_trials": 1, "num_samples": num_samples,
                     "points_to_evaluate": [{"optim.lr": v} for v in lrs], "baseline": baseline},
        "asha": {"grace_period": 2, "reduction_factor": 2, "max_t": epochs},
        "resources": resources,
    }
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="1", TUNE_MAX_PENDING_TRIALS_PG="1",
               RAY_memory_monitor_refresh_ms="0")
    return env


def _run_search(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "pcl_tune.search", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env())
    if proc.returncode != 0:
        print(proc.stdout[-5000:], proc.stderr[-5000:])
    return proc


def _trials(exp: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for d in sorted(exp.glob("trial_*")):
        f = d / "progress.csv"
        if f.is_file() and f.stat().st_size > 0:
            out[d.name] = pd.read_csv(f)
    return out


def test_direct_executor_asha(tmp_path: Path) -> None:
    space = _space(tmp_path, lrs=[0.08, 0.04, 0.02, 0.01, 0.005, 0.0025], num_samples=6,
                   resources={"executor": "direct", "cpus_per_trial": 1, "max_concurrent": 1}, baseline=True)
    proc = _run_search(["--space", str(space), "--storage-path", str(tmp_path / "runs"), "--name", "direct",
                        "--num-cpus", "2", "--no-dashboard", "--no-report"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = tmp_path / "runs" / "direct"
    trials = _trials(exp)
    assert len(trials) == 7  # 6 searched + the MoCo v2 baseline
    params = {name: json.loads((exp / name / "params.json").read_text()) for name in trials}
    base = [name for name, p in params.items() if p.get("arm") == "moco_v2"]
    assert len(base) == 1 and params[base[0]]["pcl.proto_weight"] == 0.0 and params[base[0]]["optim.lr"] == 0.08
    epochs = {name: int(df["epoch"].max()) for name, df in trials.items() if name not in base}
    # Trials after the first have a lower lr than every trial before them: ASHA stops them at 2.
    assert sorted(epochs.values()) == [2, 2, 2, 2, 2, 4]
    # The baseline is never stopped early (its lr ties the first trial's: it would not be anyway,
    # the unit test below checks the exemption itself).
    assert int(trials[base[0]]["epoch"].max()) == 4
    for df in trials.values():
        assert {"knn_top1", "loss", "acc_proto", "time_train"} <= set(df.columns)
        assert list(df["epoch"]) == list(range(1, len(df) + 1))
    best = yaml.safe_load((exp / "best.yaml").read_text())
    assert best["optim"]["lr"] == 0.08 and best["epochs"] == 4
    assert (exp / "trials.csv").is_file() and (exp / "optuna.db").is_file()
    import optuna

    study = optuna.load_study(study_name="t", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert len(study.trials) == 6  # the baseline is not an Optuna trial
    assert all("pcl.proto_weight" not in t.params for t in study.trials)
    assert "Best lr" in proc.stdout


def test_train_executor_two_workers_asha(tmp_path: Path) -> None:
    space = _space(tmp_path, lrs=[0.08, 0.01], num_samples=2, epochs=3,
                   resources={"executor": "train", "workers_per_trial": 2, "cpus_per_worker": 1,
                              "max_concurrent": 1}, baseline=True)
    proc = _run_search(["--space", str(space), "--storage-path", str(tmp_path / "runs"), "--name", "ddp",
                        "--num-cpus", "4", "--no-report"], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = tmp_path / "runs" / "ddp"
    trials = _trials(exp)
    assert len(trials) == 3  # 2 searched + the MoCo v2 baseline (DDP workers too)
    # The trial with the lower lr is stopped at the grace period; the ASHA stop reached the
    # TorchTrainer, and the next trial got its workers (no leaked placement group).
    assert sorted(int(df["epoch"].max()) for df in trials.values()) == [2, 3, 3]
    base = [n for n in trials if json.loads((exp / n / "params.json").read_text()).get("arm") == "moco_v2"]
    assert len(base) == 1 and int(trials[base[0]]["epoch"].max()) == 3
    assert all(df["knn_top1"].notna().all() for df in trials.values())
    assert (exp / "train_runs").is_dir()
    # Rank 0 keeps the best epoch's weights beside the latest checkpoint; --best finds them.
    from pcl_tune.evaluate.best import best_checkpoint

    for trial_dir in exp.glob("trial_*"):
        found = best_checkpoint(exp, trial_dir)
        assert found is not None and found.name == "best.pt", trial_dir


def _wait_for(pred: Any, timeout: float) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(1.0)
    return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes() -> dict[int, tuple[int, str, bytes, str]]:
    """pid -> (parent pid, state, command line, start time) of every process on this machine (Linux
    ``/proc``; the start time tells a pid reused by a later process apart)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:  # it ended meanwhile
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (name) "; the name may hold spaces
            table[int(entry.name)] = (int(fields[1]), fields[0], cmdline, fields[19])
    return table


def _cluster_processes(roots: list[int], temp: str) -> set[int]:
    """Live processes that belong to a test cluster: those started from its nodes' processes
    (``roots``; workers rename themselves ``ray::...``), and any whose command line names its
    temporary folder. Zombies (state Z) are dead and not counted."""
    table = _processes()
    mine = {pid for pid, (_, _, cmd, _) in table.items() if temp.encode() in cmd}
    todo = [pid for pid in roots if pid in table]
    while todo:
        pid = todo.pop()
        mine.add(pid)
        todo += [child for child, (parent, _, _, _) in table.items() if parent == pid and child not in mine]
    return {pid for pid in mine if pid in table and table[pid][1] != "Z"}


def test_searcher_skips_results_of_trials_optuna_already_finished(tmp_path: Path) -> None:
    # The state a driver killed between Optuna's commit and Tune's snapshot leaves behind: Optuna's
    # study has the trial finished, the restored searcher still treats it as running.
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from pcl_tune.searcher import ResumableOptunaSearch

    def space(trial: Any) -> None:
        trial.suggest_float("optim.lr", 0.01, 0.1, log=True)

    def finished_but_running(cls: type) -> Any:
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / cls.__name__}.db")
        s = cls(space, metric="knn_top1", mode="max", storage=storage, study_name="s",
                sampler=optuna.samplers.RandomSampler(seed=0))
        assert s.suggest("t1") is not None
        s.on_trial_result("t1", {"knn_top1": 10.0, "training_iteration": 1, "epoch": 1})
        s.on_trial_complete("t1", {"knn_top1": 12.0, "training_iteration": 2, "epoch": 2})
        s._completed_trials.discard("t1")  # the older snapshot Tune restores
        return s

    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        finished_but_running(OptunaSearch).on_trial_result("t1", {"knn_top1": 13.0, "training_iteration": 3,
                                                                   "epoch": 3})
    searcher = finished_but_running(ResumableOptunaSearch)
    searcher.on_trial_result("t1", {"knn_top1": 13.0, "training_iteration": 3, "epoch": 3})  # logged, not raised
    searcher.on_trial_complete("t1", {"knn_top1": 13.0, "training_iteration": 3, "epoch": 3})  # nor this
    trial = searcher._ot_study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 12.0
    assert trial.intermediate_values == {1: 10.0}


def _searcher(tmp_path: Path, name: str, **kwargs: Any) -> Any:
    import optuna

    from pcl_tune.searcher import ResumableOptunaSearch
    from pcl_tune.space import DefineByRun, Param

    space = DefineByRun([Param("optim.lr", "loguniform", low=0.01, high=0.1, log=True)], {})
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / name}.db")
    return ResumableOptunaSearch(space, metric="knn_top1", mode="max", storage=storage, study_name="s",
                                 sampler=optuna.samplers.RandomSampler(seed=0), **kwargs)


def _run(s: Any, trial_id: str, values: list[float], *, error: bool = False) -> None:
    """Suggest ``trial_id``, report ``values`` at epochs 1, 2, ...; end it (stopped, finished or errored)."""
    assert s.suggest(trial_id) is not None
    for epoch, v in enumerate(values, 1):
        s.on_trial_result(trial_id, {"knn_top1": v, "epoch": epoch, "training_iteration": epoch})
    last = {"knn_top1": values[-1], "epoch": len(values)} if values else None
    s.on_trial_complete(trial_id, None if error else last, error=error)


@pytest.mark.parametrize("score", ["last", "best"])
def test_stopped_trials_are_told_to_optuna_as_pruned(tmp_path: Path, score: str) -> None:
    """Stock OptunaSearch tells a trial ASHA stopped at epoch 2 as COMPLETE with its epoch-2 value:
    TPE then ranks it beside finished trials. Ours tells it PRUNED with its per-epoch values, a
    finished trial COMPLETE with its score (last or best epoch), an errored one FAIL."""
    import optuna

    TS = optuna.trial.TrialState
    s = _searcher(tmp_path, f"pruned_{score}", max_t=4, score=score)
    _run(s, "finished", [20.0, 40.0, 55.0, 50.0])
    _run(s, "stopped", [30.0, 45.0])
    _run(s, "errored", [10.0], error=True)
    trials = {t.number: t for t in s._ot_study.trials}
    finished, stopped, errored = trials[0], trials[1], trials[2]
    assert finished.state == TS.COMPLETE and finished.value == (50.0 if score == "last" else 55.0)
    assert stopped.state == TS.PRUNED and stopped.value == 45.0  # Optuna keeps its last intermediate value
    assert stopped.intermediate_values == {1: 30.0, 2: 45.0}  # what TPE ranks pruned trials by
    assert errored.state == TS.FAIL
    assert s._ot_study.best_trial.number == 0  # a stopped trial never counts as the best
    # The stock rule, kept for comparisons: the stopped trial is a finished one with its last value.
    stock = _searcher(tmp_path, f"stock_{score}", max_t=4, score=score, stopped_trials="complete")
    _run(stock, "finished", [20.0, 40.0, 55.0, 50.0])
    _run(stock, "stopped", [30.0, 45.0])
    told = [(t.state, t.value) for t in stock._ot_study.trials]
    assert told == [(TS.COMPLETE, 50.0), (TS.COMPLETE, 45.0)]


def test_pruned_searcher_survives_pickling_and_a_searched_epoch_budget(tmp_path: Path) -> None:
    """Tune pickles the searcher into its snapshot and restores it on --resume: the per-epoch values
    travel with it. A trial whose own ``epochs`` (searched) is below max_t finishes, not stopped."""
    import pickle

    import optuna

    from pcl_tune.searcher import ResumableOptunaSearch
    from pcl_tune.space import DefineByRun, Param

    space = DefineByRun([Param("epochs", "choice", choices=(2, 4))], {})
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'e.db'}")
    s = ResumableOptunaSearch(space, metric="knn_top1", mode="max", storage=storage, study_name="s",
                              sampler=optuna.samplers.RandomSampler(seed=0), max_t=4,
                              points_to_evaluate=[{"epochs": 2}, {"epochs": 4}])
    assert s.suggest("short") == {"epochs": 2} and s.suggest("long") == {"epochs": 4}
    for epoch, v in ((1, 10.0), (2, 20.0)):
        s.on_trial_result("short", {"knn_top1": v, "epoch": epoch})
        s.on_trial_result("long", {"knn_top1": v + 1, "epoch": epoch})
    s.save(str(tmp_path / "searcher.pkl"))
    restored = ResumableOptunaSearch(space, metric="knn_top1", mode="max", storage=storage, study_name="s",
                                     sampler=optuna.samplers.RandomSampler(seed=0))
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert pickle.loads(pickle.dumps(restored._values)) == {"short": {1: 10.0, 2: 20.0}, "long": {1: 11.0, 2: 21.0}}
    restored.on_trial_complete("short", {"knn_top1": 20.0, "epoch": 2})  # its budget: 2 epochs
    restored.on_trial_complete("long", {"knn_top1": 21.0, "epoch": 2})  # stopped at 2 of 4
    states = [t.state for t in restored._ot_study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED]


def test_searcher_runs_the_baseline_once_beside_the_study(tmp_path: Path) -> None:
    import pickle

    import optuna

    from pcl_tune.searcher import ResumableOptunaSearch
    from pcl_tune.space import DefineByRun, Param

    space = DefineByRun([Param("optim.lr", "loguniform", low=0.01, high=0.1, log=True)], {})  # picklable
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    baseline = {"optim.lr": 0.03, "pcl.proto_weight": 0.0, "arm": "moco_v2"}
    s = ResumableOptunaSearch(space, metric="knn_top1", mode="max", storage=storage, study_name="s",
                              sampler=optuna.samplers.RandomSampler(seed=0),
                              points_to_evaluate=[{"optim.lr": 0.05}], baseline=baseline)
    first = s.suggest("t1")
    assert first == {"optim.lr": 0.05}  # the first point comes first
    assert s.suggest("t2") == baseline  # then the baseline
    third = s.suggest("t3")
    assert third is not None and "arm" not in third
    # Results and completion of the baseline never reach Optuna.
    s.on_trial_result("t2", {"knn_top1": 40.0, "training_iteration": 1})
    s.on_trial_complete("t2", {"knn_top1": 41.0, "training_iteration": 2})
    s.on_trial_complete("t1", {"knn_top1": 30.0, "training_iteration": 2})
    assert len(s._ot_study.trials) == 2 and 41.0 not in [t.value for t in s._ot_study.trials]
    # Tune pickles the searcher's state: a restored searcher does not run the baseline again.
    s.save(str(tmp_path / "searcher.pkl"))
    restored = ResumableOptunaSearch(space, metric="knn_top1", mode="max", storage=storage, study_name="s",
                                     sampler=optuna.samplers.RandomSampler(seed=0), baseline=baseline)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.suggest("t4") != baseline and "arm" not in (restored.suggest("t5") or {})
    assert pickle.loads(pickle.dumps(restored))._baseline_trials == {"t2"}


def test_asha_never_stops_the_baseline_early() -> None:
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    from pcl_tune.searcher import BaselineExemptASHA

    asha = BaselineExemptASHA(time_attr="epoch", metric="knn_top1", mode="max", max_t=8, grace_period=2,
                              reduction_factor=2)
    good = SimpleNamespace(trial_id="good", config={"optim.lr": 0.1})
    bad = SimpleNamespace(trial_id="bad", config={"optim.lr": 0.01})
    base = SimpleNamespace(trial_id="base", config={"optim.lr": 0.01, "arm": "moco_v2"})
    for t in (good, bad, base):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, good, {"epoch": 2, "knn_top1": 50.0}) == TrialScheduler.CONTINUE
    # A trial far below the rung's cutoff is stopped; the baseline with the same value is not.
    assert asha.on_trial_result(None, bad, {"epoch": 2, "knn_top1": 10.0}) == TrialScheduler.STOP
    assert asha.on_trial_result(None, base, {"epoch": 2, "knn_top1": 10.0}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, base, {"epoch": 4, "knn_top1": 10.0}) == TrialScheduler.CONTINUE
    # At the full budget it ends like every trial.
    assert asha.on_trial_result(None, base, {"epoch": 8, "knn_top1": 10.0}) == TrialScheduler.STOP


def test_ablation_runs_every_cell_with_its_seed(tmp_path: Path) -> None:
    """An ablation space: every cell (arm x seed, the baseline once per seed) runs to the end with
    its own seed and settings, and the analysis pairs them."""
    fixed = json.loads(json.dumps(TINY_FIXED))
    fixed["epochs"] = 2
    fixed["pcl"]["warmup_epochs"] = 1
    data = {"name": "abl", "fixed": fixed, "objective": {"metric": "knn_top1", "mode": "max"},
            "ablation": {"seeds": [3, 7], "arms": {"pnce": {}, "hot": {"pcl.temperature": 0.2}}},
            "resources": {"executor": "direct", "cpus_per_trial": 1, "max_concurrent": 2}}
    space = tmp_path / "abl.yaml"
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    proc = _run_search(["--space", str(space), "--storage-path", str(tmp_path / "runs"), "--num-cpus", "2",
                        "--no-dashboard"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = tmp_path / "runs" / "abl"
    trials = _trials(exp)
    assert len(trials) == 6 and all(int(df["epoch"].max()) == 2 for df in trials.values())
    cells = sorted((p["arm"], p["seed"], p["pcl.temperature"], p["pcl.proto_weight"]) for p in
                   (json.loads((exp / name / "params.json").read_text()) for name in trials))
    assert cells == [("hot", 3, 0.2, 1.0), ("hot", 7, 0.2, 1.0), ("moco_v2", 3, 0.07, 0.0),
                     ("moco_v2", 7, 0.07, 0.0), ("pnce", 3, 0.07, 1.0), ("pnce", 7, 0.07, 1.0)]
    # best.yaml is a runnable config: the arm label is not a setting.
    best = yaml.safe_load((exp / "best.yaml").read_text())
    assert "arm" not in best and best["seed"] in (3, 7)
    import analysis

    res = analysis.load(exp).verdicts()
    assert res is not None and {v.label for v in res.verdicts} == {"hot − pnce", "moco_v2 − pnce"}
    assert all(v.seeds == (3, 7) for v in res.verdicts)
    md = (exp / "report.md").read_text()
    assert md.index("## Verdicts") < md.index("## Best configuration")
