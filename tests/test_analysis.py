"""The analysis package: tables, summaries, report and CLI of ``python -m analysis``.

Two kinds of experiment folders are used:

* ``search_exp`` (session fixture, marked slow): ONE tiny real search (``python -m pcl_tune.search
  --smoke --num-samples 4``, about a minute on 2 cores). Tests that damage it work on copies.
* hand-made folders in the layout the search writes (no Ray): a loss-ablation grid with known
  values, so confidence intervals and comparison tables can be checked exactly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

import analysis
from analysis import render, space_record, summaries, tune_state
from analysis.__main__ import main as cli_main
from analysis.report import write_report
from pcl_tune import experiment_folder
from pcl_tune.config import read_yaml
from pcl_tune.space import Param, SearchSpace

ROOT = Path(__file__).resolve().parents[1]
slow = pytest.mark.slow


# --------------------------------------------------------------------------- helpers

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="1",
               TUNE_MAX_PENDING_TRIALS_PG="1", RAY_memory_monitor_refresh_ms="0", MPLBACKEND="Agg")
    return env


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True, timeout=300,
                          env=_env(), cwd=cwd)


def _load_quiet(path: Path, **kw: Any) -> analysis.Experiment:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", analysis.AnalysisWarning)
        return analysis.load(path, **kw)


def _records(trial_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


def _set_state(exp: Path, trial_id: str, status: str) -> None:
    """Rewrite a trial's status in Tune's experiment state, as Tune would have saved it."""
    for f in exp.glob("experiment_state-*.json"):
        data = json.loads(f.read_text())
        for entry in data["trial_data"]:
            meta = json.loads(entry[0])
            if meta["trial_id"] == trial_id:
                meta["status"] = status
                entry[0] = json.dumps(meta)
        f.write_text(json.dumps(data))


# --------------------------------------------------------------------------- the real search

@pytest.fixture(scope="session")
def search_exp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny real search (4 trials, 3 epochs, ASHA grace 2), run once per session."""
    root = tmp_path_factory.mktemp("analysis_search")
    cmd = [sys.executable, "-m", "pcl_tune.search", "--space", str(ROOT / "search_spaces" / "demo.yaml"), "--smoke",
           "--num-samples", "4", "--num-cpus", "4", "--no-dashboard", "--no-report", "--storage-path",
           str(root / "runs"), "--name", "demo_smoke"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env(), cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = root / "runs" / "demo_smoke"
    assert (exp / "space.json").is_file() and len(list(exp.glob("trial_*"))) == 5  # 4 + the MoCo v2 baseline
    return exp


@pytest.fixture
def exp_copy(search_exp: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "demo_copy"
    shutil.copytree(search_exp, dst)
    return dst


@slow
def test_tables_of_a_real_search(search_exp: Path, tmp_path: Path) -> None:
    exp = analysis.load(search_exp)
    space = json.loads((search_exp / "space.json").read_text())
    trial_dirs = sorted(search_exp.glob("trial_*"))
    t, ep = exp.trials, exp.epochs
    assert len(t) == len(trial_dirs) == 5  # 4 + the baseline
    assert set(t["trial_id"]) == {d.name.removeprefix("trial_") for d in trial_dirs}
    # Every epoch of every trial, one row each.
    per_trial = {d.name.removeprefix("trial_"): len(_records(d)) for d in trial_dirs}
    assert len(ep) == int(t["epochs"].sum()) == sum(per_trial.values())
    assert dict(zip(t["trial_id"], t["epochs"])) == per_trial
    assert list(ep.columns[:2]) == ["trial_id", "epoch"]
    assert {"knn_top1", "loss", "acc_proto", "acc_proto_0", "loss_proto_1", "time_epoch", "done"} <= set(ep.columns)
    # Searched parameters are columns; a finished search has no running trials.
    for p in space["params"]:
        assert p["name"] in t.columns
    params = json.loads((trial_dirs[0] / "params.json").read_text())
    row = t.set_index("trial_id").loc[trial_dirs[0].name.removeprefix("trial_")]
    assert all(row[k] == v for k, v in params.items())
    max_t = space["max_t"]
    assert set(t["status"]) <= {"finished", "stopped"}
    assert ((t["status"] == "stopped") == (t["epochs"] < max_t)).all()
    # last_ / best_ of every metric agree with the per-epoch table.
    for _, r in t.iterrows():
        e = ep[ep["trial_id"] == r["trial_id"]]
        assert r["best_knn_top1"] == pytest.approx(e["knn_top1"].max())
        assert r["last_knn_top1"] == pytest.approx(e["knn_top1"].dropna().iloc[-1])
        assert r["best_loss"] == pytest.approx(e["loss"].min())
        assert r["epochs"] == e["epoch"].max()
        assert Path(r["checkpoint"]).is_dir() and r["error"] is None
        assert r["wall_time_s"] > 0
    # best() is the best trial by its score: the space's objective.score, "last" by default (as
    # Optuna was told), so the best of the finished trials' last values, and the search agrees.
    assert exp.score == "last" and exp.objective_col == "last_knn_top1"
    best = exp.best()
    finished = set(t.loc[t["epochs"] >= max_t, "trial_id"])
    lasts = ep[ep["trial_id"].isin(finished)].dropna(subset=["knn_top1"]).groupby("trial_id")["knn_top1"].last()
    assert finished and best.trial_id in finished and best.epoch == max_t
    assert best.value == pytest.approx(lasts.max())
    assert ep.loc[(ep["trial_id"] == best.trial_id) & (ep["epoch"] == best.epoch), "knn_top1"].iloc[0] == best.value
    ref = experiment_folder.best_epoch(ep, "knn_top1", "max", "last", max_t)
    assert ref is not None and (ref.trial_id, ref.epoch, ref.value) == (best.trial_id, best.epoch, best.value)
    by_best = experiment_folder.best_epoch(ep, "knn_top1", "max", "best")
    assert by_best is not None and by_best.value == pytest.approx(ep["knn_top1"].max())
    # One schema: the space is the search's SearchSpace, read back from space.json.
    searched, run = experiment_folder.read_space_json(search_exp)
    assert isinstance(exp.space, SearchSpace) and exp.space == searched and not exp.space_inferred
    assert exp.run == run and exp.run["executor"] == "direct" and exp.run["smoke"] is True
    assert all(isinstance(exp.space.param(p["name"]), Param) for p in space["params"])
    # The search's best.yaml and ours agree.
    best_yaml = search_exp / experiment_folder.BEST_YAML
    assert exp.best_config() == read_yaml(best_yaml.read_text(), str(best_yaml))
    # CSV and Parquet round trips.
    written = exp.save(tmp_path / "tables")
    assert {p.name for p in written} == {"trials.csv", "trials.parquet", "epochs.csv", "epochs.parquet"}
    assert pd.read_parquet(tmp_path / "tables" / "epochs.parquet").shape == ep.shape
    assert pd.read_csv(tmp_path / "tables" / "trials.csv").shape == t.shape
    back = pd.read_parquet(tmp_path / "tables" / "trials.parquet")
    assert list(back["trial_id"]) == list(t["trial_id"])


@slow
def test_summaries_of_a_real_search(search_exp: Path) -> None:
    exp = analysis.load(search_exp)
    t = exp.trials
    lb = exp.leaderboard(top=3)
    assert len(lb) == 3 and list(lb["rank"]) == [1, 2, 3]
    # Finished trials first (a stopped trial's score is at another budget), each part by score.
    fin = lb["status"] == "finished"
    assert list(fin) == sorted(fin, reverse=True)
    assert lb[fin][exp.objective_col].is_monotonic_decreasing and lb[~fin][exp.objective_col].is_monotonic_decreasing
    assert lb[exp.objective_col].iloc[0] == pytest.approx(exp.best().value)
    hist = exp.best_so_far()
    # The running best over every trial's score: a trial ASHA stopped can score above every finished
    # one (at a smaller budget), so the curve ends at or above the best finished trial's score.
    values = pd.to_numeric(t[exp.objective_col], errors="coerce")
    assert hist["best_so_far"].iloc[-1] == pytest.approx(values.max())
    assert hist["best_so_far"].iloc[-1] >= exp.best().value - 1e-9
    assert hist["best_so_far"].is_monotonic_increasing
    # Compute accounting: spent = sum of the epochs run; full budget = trials x max_t.
    c = exp.compute().iloc[0]
    max_t = json.loads((search_exp / "space.json").read_text())["max_t"]
    assert c["epochs_spent"] == t["epochs"].sum() == len(exp.epochs)
    assert c["epochs_full_budget"] == 5 * max_t
    assert c["epochs_saved"] == 5 * max_t - c["epochs_spent"]
    assert c["saved_fraction"] == pytest.approx(1 - c["epochs_spent"] / (5 * max_t))
    assert c["finished"] + c["stopped"] == 5
    # The baseline ran the full budget, and the parameter summaries leave it out.
    base = t[t["arm"] == "moco_v2"]
    assert len(base) == 1 and base["epochs"].iloc[0] == max_t and base["pcl.proto_weight"].iloc[0] == 0
    assert len(exp.pcl_trials) == 4 and "arm" not in exp.searched_params
    # Effects: every parameter, counts per parameter add up to the trials that set it.
    eff = exp.effects()
    for p in exp.searched_params:
        rows = eff[eff["param"] == p]
        assert rows["count"].sum() == exp.pcl_trials[exp.objective_col].notna().sum()
    # Importance: 4 trials are too few for the default -> a labelled fallback; fANOVA on request.
    simple = exp.importance()
    assert simple.fallback and "Spearman" in simple.method and "too few" in simple.describe()
    assert set(simple.table["param"]) == set(exp.searched_params)
    fan = exp.importance(min_trials=2)
    # Optuna's study holds ASHA-stopped trials as PRUNED; fANOVA reads the COMPLETE ones, and needs
    # two with different scores. How many the smoke search finishes depends on its ASHA outcome.
    done = exp.pcl_trials[exp.pcl_trials["status"] == "finished"][exp.objective_col].dropna()
    if len(done) >= 2 and done.nunique() > 1:
        assert fan.evaluator == "fanova" and "fANOVA" in fan.method
        assert fan.table["importance"].sum() == pytest.approx(1.0)
        assert set(fan.table["param"]) <= set(exp.params)
    else:
        assert fan.fallback and fan.notes, (len(done), fan.notes)


@slow
def test_report_of_a_real_search(exp_copy: Path) -> None:
    (exp_copy / "best.yaml").unlink()  # e.g. a search that has not finished: the report writes it
    path = write_report(exp_copy)
    assert path == exp_copy / "report.html"
    page = path.read_text()
    md = (exp_copy / "report.md").read_text()
    assert page.count("data:image/png;base64,") >= 4 and "<img" in page
    assert "src='analysis/" not in page  # self-contained
    cmd = f"python -m pcl_tune.train --config {exp_copy / 'best.yaml'} --out {exp_copy / 'best_rerun'}"
    assert cmd in md and cmd in page
    # A TPE search has a study: Optuna draws the history and slice plots; with 4 trials the
    # importance is the simple fallback, drawn by us.
    figures = exp_copy / "analysis"
    for png in ("objective_vs_epoch", "optuna_history", "optuna_slice", "importance", "proto_levels"):
        assert (figures / f"{png}.png").stat().st_size > 5000
        assert f"(analysis/{png}.png)" in md
    assert not (figures / "best_so_far.png").exists() and not (figures / "param_effects.png").exists()
    assert "Optimisation history (Optuna)" in md and "slice plot" in md
    # Enough trials for fANOVA: Optuna draws the importance too, with the table's evaluator.
    md = (write_report(exp_copy, min_trials=2).parent / "report.md").read_text()
    # fANOVA reads Optuna's COMPLETE trials: the finished PCL trials (the MoCo v2 baseline is not
    # in the study), and needs two of them whose scores differ; ASHA's stops depend on the load.
    finished = analysis.load(exp_copy).pcl_trials.query("status == 'finished'")["last_knn_top1"]
    if finished.nunique() > 1:
        assert (figures / "optuna_importance.png").stat().st_size > 5000
        assert "(analysis/optuna_importance.png)" in md and "Parameter importance (Optuna, fANOVA" in md
    else:
        assert not (figures / "optuna_importance.png").exists()
    best = read_yaml((exp_copy / "best.yaml").read_text(), "best.yaml")
    exp = analysis.load(exp_copy)
    assert best["epochs"] == 3 and best["data"]["subset"] == 256  # fixed settings kept
    for k, v in exp.best().params.items():
        section, key = k.split(".")
        assert best[section][key] == v
    assert "Leaderboard" in md and "Compute accounting" in md and "Parameter importance" in md
    assert f"{exp.best().value:.4g}" in md
    # The baseline verdict comes first; the noise sits by the leaderboard; importance like for like.
    assert md.index("PCL against MoCo v2 alone") < md.index("Best configuration") < md.index("Leaderboard")
    assert "validation split" in md and "not resolved" in md
    assert "Like for like: every trial's knn_top1 at the first ASHA rung (epoch 2)" in md
    assert "Like for like: finished trials' knn_top1 at the full budget (epoch 3)" in md


@slow
def test_cli_on_real_searches(search_exp: Path, exp_copy: Path, tmp_path: Path) -> None:
    proc = _cli(str(exp_copy), "--top", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "leaderboard (top 2)" in proc.stdout and "python -m pcl_tune.train --config" in proc.stdout
    assert (exp_copy / "report.html").is_file() and (exp_copy / "report.md").is_file()
    # Two experiments side by side (the real search and a hand-made grid), written to --out.
    assert cli_main([str(search_exp), str(exp_copy), "--no-report"]) == 0
    grid = make_grid_experiment(tmp_path)
    out = tmp_path / "cmp"
    proc = _cli(str(exp_copy), str(grid), "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out / "comparison.csv")
    exp = analysis.load(exp_copy)
    assert list(table["trials"]) == [5, 36]
    assert list(table["epochs_spent"]) == [exp.trials["epochs"].sum(), 144]
    assert table["best"].iloc[0] == pytest.approx(exp.best().value) and table["best"].iloc[1] == pytest.approx(61.0)
    assert "experiments side by side" in proc.stdout
    assert (out / "comparison.md").is_file() and (out / "comparison.html").is_file()
    assert (grid / "report.html").is_file()


@slow
def test_damaged_trials_are_loaded_with_warnings(exp_copy: Path) -> None:
    original = _load_quiet(exp_copy)
    dirs = sorted(exp_copy.glob("trial_*"))
    a, b, c, d = dirs[:4]
    # a: the last result line was being written when the search died; progress.csv has it.
    text = (a / "result.json").read_text()
    (a / "result.json").write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
    # b: the same, and its progress.csv is gone: one epoch is lost.
    text = (b / "result.json").read_text()
    (b / "result.json").write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])
    (b / "progress.csv").unlink()
    # c: params.json missing.
    (c / "params.json").unlink()
    # d: the trial raised.
    (d / "error.txt").write_text("Failure # 1 (occurred at 2026-01-01)\nTraceback ...\n"
                                 "pcl_tune.train.TrainingDiverged: loss is NaN at epoch 2, batch 3\n")
    _set_state(exp_copy, d.name.removeprefix("trial_"), "ERROR")
    with pytest.warns(analysis.AnalysisWarning) as record:
        exp = analysis.load(exp_copy)
    messages = [str(w.message) for w in record if issubclass(w.category, analysis.AnalysisWarning)]
    assert any(str(a / "result.json") in m and "truncated" in m for m in messages)
    assert any(str(b / "result.json") in m and "truncated" in m for m in messages)
    assert any(str(c / "params.json") in m and "recovered" in m for m in messages)
    assert not any("experiment_state" in m for m in messages)  # Tune's state read by Ray's reader
    assert exp.warnings == messages
    t = exp.trials.set_index("trial_id")
    o = original.trials.set_index("trial_id")
    ida, idb, idc, idd = (x.name.removeprefix("trial_") for x in (a, b, c, d))
    assert len(t) == 5
    assert t.loc[ida, "epochs"] == o.loc[ida, "epochs"]
    assert t.loc[idb, "epochs"] == o.loc[idb, "epochs"] - 1
    assert len(exp.epochs) == len(original.epochs) - 1 == t["epochs"].sum()
    for p in exp.params:  # recovered from the 'config' of c's results
        assert t.loc[idc, p] == o.loc[idc, p] or (pd.isna(t.loc[idc, p]) and pd.isna(o.loc[idc, p]))
    assert t.loc[idd, "status"] == "errored"
    assert t.loc[idd, "error"] == "pcl_tune.train.TrainingDiverged: loss is NaN at epoch 2, batch 3"
    assert t.loc[idd, "epochs"] == o.loc[idd, "epochs"]  # its partial data stay
    with pytest.warns(analysis.AnalysisWarning):
        path = write_report(exp_copy)
    page = path.read_text()
    assert "Data problems" in page and "TrainingDiverged" in page and "errored" in page
    proc = _cli(str(exp_copy), "--no-report", cwd=exp_copy.parent)
    assert proc.returncode == 0
    assert proc.stderr.count("warning: ") >= 3 and "Traceback" not in proc.stderr


def _break_for_ray(exp: Path) -> None:
    """Make Tune's state unreadable for Ray but not for the raw fallback: one pickled value in
    each trial entry no longer unpickles (as a state written where other classes existed)."""
    for f in exp.glob("experiment_state-*.json"):
        data = json.loads(f.read_text())
        for entry in data["trial_data"]:
            meta = json.loads(entry[0])
            meta["storage"] = {"_type": "CLOUDPICKLE_FALLBACK", "value": "00"}
            entry[0] = json.dumps(meta)
        f.write_text(json.dumps(data))


@slow
def test_tune_state_through_ray_and_the_fallback(exp_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state_file = tune_state.newest_state_file(exp_copy)
    assert state_file is not None
    by_ray = tune_state.read_with_ray(state_file)
    ids = {d.name.removeprefix("trial_") for d in exp_copy.glob("trial_*")}
    assert set(by_ray) == ids and {s.status for s in by_ray.values()} == {"TERMINATED"}
    for tid, st in by_ray.items():
        assert st.config == json.loads((exp_copy / f"trial_{tid}" / "params.json").read_text())
        assert isinstance(st.start_time, float) and st.start_time > 1e9
    assert tune_state.read_raw(state_file) == by_ray  # the two readers agree on an intact file
    # An intact folder is read by Ray alone: the raw reader is not needed.
    with monkeypatch.context() as m:
        m.setattr(tune_state, "read_raw", lambda f: pytest.fail("fallback used on an intact folder"))
        with warnings.catch_warnings():
            warnings.simplefilter("error", analysis.AnalysisWarning)
            intact = analysis.load(exp_copy)
    # A state file Ray cannot read: the fallback gives the same status table, and says so.
    _break_for_ray(exp_copy)
    with pytest.raises(Exception):  # noqa: B017 - whatever Ray raises, the fallback catches
        tune_state.read_with_ray(state_file)
    with pytest.warns(analysis.AnalysisWarning, match="ExperimentAnalysis could not read it.*raw JSON"):
        damaged = analysis.load(exp_copy)
    cols = ["trial_id", "status", "order", "start_time", "epochs", *intact.params]
    pd.testing.assert_frame_equal(damaged.trials[cols], intact.trials[cols])
    # ... and it does read the state: an ERROR there makes the trial errored.
    tid = intact.trials["trial_id"].iloc[1]
    _set_state(exp_copy, tid, "ERROR")
    st = _load_quiet(exp_copy).trials.set_index("trial_id")["status"]
    assert st[tid] == "errored" and (st.drop(tid) == intact.trials.set_index("trial_id")["status"].drop(tid)).all()
    # A truncated state file: neither reader can; statuses come from the results alone.
    state_file.write_text(state_file.read_text()[:100])
    with pytest.warns(analysis.AnalysisWarning, match="unreadable Tune state"):
        truncated = analysis.load(exp_copy)
    assert list(truncated.trials.set_index("trial_id").loc[intact.trials["trial_id"], "status"]) == \
        list(intact.trials["status"])


@slow
def test_running_search(exp_copy: Path) -> None:
    """A search still running: no trials.csv / best.yaml, a trial whose last result is not terminal."""
    (exp_copy / "trials.csv").unlink()
    (exp_copy / "best.yaml").unlink()
    trial = sorted(exp_copy.glob("trial_*"))[0]
    tid = trial.name.removeprefix("trial_")
    recs = _records(trial)[:1]
    recs[0]["done"] = False
    (trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (trial / "progress.csv").unlink()
    _set_state(exp_copy, tid, "RUNNING")
    exp = analysis.load(exp_copy)
    assert not exp.complete
    assert exp.trials.set_index("trial_id").loc[tid, "status"] == "running"
    assert exp.compute().iloc[0]["running"] == 1
    page = write_report(exp_copy).read_text()
    assert (exp_copy / "best.yaml").is_file() and "still running" in page
    assert "written by the analysis" in page


@slow
def test_experiment_without_trial_folders(exp_copy: Path, tmp_path: Path) -> None:
    for d in exp_copy.glob("trial_*"):
        shutil.rmtree(d)
    with pytest.raises(analysis.EmptyExperimentError, match="empty experiment"):
        analysis.load(exp_copy)
    exp = analysis.load(exp_copy, allow_empty=True)
    assert len(exp.trials) == 0 and len(exp.epochs) == 0
    with pytest.raises(analysis.EmptyExperimentError):
        write_report(exp_copy)
    proc = _cli(str(exp_copy), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "empty experiment" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout


# --------------------------------------------------------------------------- hand-made experiments (no Ray)

SCHEDULES = ["3,6", "5,10"]
LOSSES = ["proto_nce", "topk"]
DUPS = ["dedupe", "remap", "none"]
SEEDS = [0, 1, 2]
DUP_EFFECT = {"dedupe": 2.0, "remap": 1.0, "none": 0.0}
SEED_EFFECT = {0: -1.0, 1: 0.0, 2: 1.0}


def _knn(schedule: str, loss: str, dup: str, seed: int, epoch: int) -> float:
    """Known objective: top-K ignores the duplicate handling, as in the real loss."""
    base = 50.0 + (5.0 if schedule == "5,10" else 0.0)
    effect = 3.0 if loss == "topk" else DUP_EFFECT[dup]
    return base + effect + SEED_EFFECT[seed] + 0.5 * epoch


GRID_RUN = {"executor": "direct", "workers_per_trial": 1, "smoke": False,
            "command": "python -m pcl_tune.search --space ablation.yaml", "started": "2026-01-01 00:00:00"}


def make_grid_experiment(root: Path, epochs: int = 4, *, flat_space_json: bool = False) -> Path:
    """A loss-ablation grid folder as pcl_tune.search writes it (no optuna.db: grid search).

    ``flat_space_json`` writes ``space.json`` in the format of earlier versions (run fields at the
    top level, no ``run`` record) instead of through :func:`experiment_folder.write_space_json`.
    """
    exp = root / "ablation"
    exp.mkdir(parents=True)
    space = SearchSpace(
        path=exp / "ablation.yaml", name="ablation", description="",
        fixed={"epochs": epochs, "data": {"dataset": "digits"}, "pcl": {"warmup_epochs": 1, "k": 2}},
        params=[Param(n, "choice", choices=tuple(c)) for n, c in (
            ("pcl.cluster_schedule", SCHEDULES), ("pcl.proto_loss", LOSSES), ("pcl.duplicates", DUPS),
            ("seed", SEEDS))],
        algorithm="grid", asha=False, num_samples=1, max_t=epochs)
    if flat_space_json:
        flat = {k: v for k, v in space.to_json().items() if k != "resources"}
        (exp / "space.json").write_text(json.dumps({**flat, **GRID_RUN}))
    else:
        experiment_folder.write_space_json(exp, space, GRID_RUN)
    (exp / "search_space.yaml").write_text(yaml.safe_dump({"name": "ablation", "searcher": {"algorithm": "grid"},
                                                          "asha": {"enabled": False}}))
    i = 0
    for s in SCHEDULES:
        for loss in LOSSES:
            for dup in DUPS:
                for seed in SEEDS:
                    cfg = {"pcl.cluster_schedule": s, "pcl.proto_loss": loss, "pcl.duplicates": dup, "seed": seed}
                    tid = f"g{i:07d}"
                    d = exp / f"trial_{tid}"
                    d.mkdir()
                    (d / "params.json").write_text(json.dumps(cfg))
                    lines = []
                    for e in range(1, epochs + 1):
                        warm = e <= 1
                        lines.append(json.dumps({
                            "epoch": e, "loss": 5.0 - 0.1 * e, "knn_top1": _knn(s, loss, dup, seed, e),
                            "acc_proto": math.nan if warm else 20.0 + e, "acc_proto_0": math.nan if warm else 30.0 + e,
                            "acc_proto_1": math.nan if warm else 10.0 + e, "loss_proto_0": math.nan if warm else 2.0,
                            "loss_proto_1": math.nan if warm else 3.0, "time_epoch": 1.0, "lr": 0.06,
                            "clusters": "" if warm else s, "done": e == epochs, "training_iteration": e,
                            "trial_id": tid, "time_total_s": 5.0 + e, "timestamp": 1_800_000_000 + 10 * i + e,
                            "config": cfg}))
                    (d / "result.json").write_text("\n".join(lines) + "\n")
                    i += 1
    (exp / "trials.csv").write_text("trial_id\n")
    return exp


def test_loss_comparison_tables(tmp_path: Path) -> None:
    exp = analysis.load(make_grid_experiment(tmp_path))
    assert len(exp.trials) == 36 and len(exp.epochs) == 36 * 4
    assert set(exp.trials["status"]) == {"finished"}
    best = exp.best()
    assert best.value == pytest.approx(exp.epochs["knn_top1"].max()) == pytest.approx(50 + 5 + 3 + 1 + 2)
    comps = {c.name: c for c in exp.comparisons()}
    assert set(comps) == {"duplicates", "proto_loss"}
    # Every trial finished: one budget, the full one, and nothing else differs between groups.
    assert all(c.budget.startswith("finished trials (36) at their last epoch (4)") for c in comps.values())
    assert comps["duplicates"].confounders == [] and comps["proto_loss"].confounders == []
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} * sd 1 / sqrt(3 seeds)
    dup = comps["duplicates"].table
    assert (dup["points"] == "").all()  # 3 seeds per cell: intervals, no bare points
    # Only ProtoNCE trials use the duplicate handling; the listed order is kept.
    assert len(dup) == 2 * 3 and list(dup["pcl.duplicates"][:3]) == DUPS
    r = dup[(dup["pcl.cluster_schedule"] == "5,10") & (dup["pcl.duplicates"] == "remap")].iloc[0]
    assert r["n"] == 3 and r["n_trials"] == 3
    assert r["mean"] == pytest.approx(55 + 1 + 2) and r["std"] == pytest.approx(1.0)
    assert r["ci_half"] == pytest.approx(half) and r["ci_low"] == pytest.approx(58 - half)
    loss = comps["proto_loss"].table
    variants = list(loss[loss["pcl.cluster_schedule"] == "3,6"]["loss_variant"])
    assert variants == ["proto_nce / dedupe", "proto_nce / remap", "proto_nce / none", "topk"]
    r = loss[(loss["pcl.cluster_schedule"] == "3,6") & (loss["loss_variant"] == "topk")].iloc[0]
    # 9 top-K trials, but 3 seeds: the duplicate setting does not narrow the interval.
    assert r["n"] == 3 and r["n_trials"] == 9 and r["ci_half"] == pytest.approx(half)
    imp = exp.importance()
    assert imp.fallback and any("No Optuna study" in n for n in imp.notes)
    assert imp.table.iloc[0]["param"] == "pcl.cluster_schedule"
    c = exp.compute().iloc[0]
    assert c["epochs_spent"] == c["epochs_full_budget"] == 144 and c["saved_fraction"] == 0
    # Best-of-epochs columns follow the metric registry: min for a loss, none for a schedule value.
    t = exp.trials
    assert ((t["best_loss"] - (5.0 - 0.4)).abs() < 1e-9).all() and (t["best_time_epoch"] == 1.0).all()
    assert "best_lr" not in t.columns and (t["last_lr"] == 0.06).all()
    assert (t["best_acc_proto_0"] == 34.0).all()
    page = write_report(exp.path).read_text()
    md = (exp.path / "report.md").read_text()
    assert "ProtoNCE duplicate handling" in page and "ProtoNCE vs top-K" in page
    assert "58.00 ± 2.48 (n=3)" in page
    # Markdown tables (pandas + tabulate): the pivot's row for schedule 5,10 and the units of the best.
    assert any(line.startswith("| 5,10") and "58.00 ± 2.48 (n=3)" in line for line in md.splitlines())
    assert f"**{best.value:.4g} %**" in md
    # No Optuna study (grid search): our figures stand in for Optuna's.
    for png in ("compare_duplicates", "compare_proto_loss", "best_so_far", "param_effects", "importance"):
        assert (exp.path / "analysis" / f"{png}.png").is_file() and f"(analysis/{png}.png)" in md
    assert not list((exp.path / "analysis").glob("optuna_*.png"))


def test_status_of_stopped_and_running_trials(tmp_path: Path) -> None:
    path = make_grid_experiment(tmp_path)
    (path / "trials.csv").unlink()
    dirs = sorted(path.glob("trial_*"))
    # ASHA stopped dirs[0] after 2 epochs (its last result is terminal); dirs[1] is mid-run.
    for d, keep, done in ((dirs[0], 2, True), (dirs[1], 3, False)):
        recs = _records(d)[:keep]
        recs[-1]["done"] = done
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
    # dirs[2] and dirs[3] failed after 2 epochs. Tune's last snapshot says RUNNING for both: dirs[2]
    # was restarted after that failure (snapshot newer than error.txt), for dirs[3] the snapshot is
    # older than the failure (stale).
    state = []
    for d in dirs[2:4]:
        recs = _records(d)[:2]
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (d / "error.txt").write_text("Traceback ...\nRuntimeError: worker died\n")
        meta = {"trial_id": d.name.removeprefix("trial_"), "status": "RUNNING", "config": {}}
        state.append([json.dumps(meta), json.dumps({"start_time": "1800000000.0", "num_failures": 1})])
    snap = path / "experiment_state-2026-01-01_00-00-00.json"
    snap.write_text(json.dumps({"trial_data": state}))
    os.utime(dirs[2] / "error.txt", (1_000, 1_000))
    os.utime(snap, (2_000, 2_000))
    os.utime(dirs[3] / "error.txt", (3_000, 3_000))
    # A hand-written state file is not one Ray's reader accepts: the raw reader reads it.
    with pytest.warns(analysis.AnalysisWarning, match="raw JSON"):
        exp = analysis.load(path)
    st = exp.trials.set_index("trial_id")["status"]
    assert st[dirs[0].name.removeprefix("trial_")] == "stopped"
    assert st[dirs[1].name.removeprefix("trial_")] == "running"
    assert st[dirs[2].name.removeprefix("trial_")] == "running"
    assert st[dirs[3].name.removeprefix("trial_")] == "errored"
    assert exp.trials.set_index("trial_id").loc[dirs[2].name.removeprefix("trial_"), "error"] == \
        "RuntimeError: worker died"
    assert (st == "finished").sum() == 32 and not exp.complete
    c = exp.compute().iloc[0]
    assert c["epochs_spent"] == 32 * 4 + 2 + 3 + 2 + 2 == len(exp.epochs)
    assert c["epochs_saved"] == 7 and c["saved_fraction"] == pytest.approx(7 / 144)
    assert (c["finished"], c["stopped"], c["errored"], c["running"]) == (32, 1, 1, 2)


def test_missing_space_json_is_inferred(tmp_path: Path) -> None:
    path = make_grid_experiment(tmp_path)
    (path / "space.json").unlink()
    # The copied space file is read with the project's YAML loader: 1e-3 is a number.
    (path / "search_space.yaml").write_text("name: ablation\nfixed: {optim: {lr: 1e-3}}\n"
                                            "searcher: {algorithm: grid}\nasha: {enabled: false}\n")
    with pytest.warns(analysis.AnalysisWarning, match="space.json: missing"):
        exp = analysis.load(path)
    assert exp.space_inferred and exp.space.max_t == 4 and exp.metric == "knn_top1" and exp.run == {}
    assert set(exp.params) == {"pcl.cluster_schedule", "pcl.proto_loss", "pcl.duplicates", "seed"}
    assert exp.space.param("seed") == Param("seed", "choice", choices=(0, 1, 2))
    assert exp.space.algorithm == "grid" and not exp.space.asha and exp.rungs() == []
    assert exp.space.fixed["optim"]["lr"] == 0.001 and exp.best_config()["optim"]["lr"] == 0.001
    assert len(exp.trials) == 36
    assert exp.best_yaml_path().name == "best.yaml"
    # A range is inferred for a numeric parameter with many values.
    assert space_record.infer_param("lr", [i / 10 for i in range(1, 9)]) == Param("lr", "uniform", low=0.1, high=0.8)
    assert space_record.infer_param("k", [1, 2, 2]) == Param("k", "choice", choices=(1, 2))


def test_space_json_of_earlier_versions(tmp_path: Path) -> None:
    """The flat space.json of earlier versions (run fields at the top level) reads the same."""
    new = analysis.load(make_grid_experiment(tmp_path / "new"))
    old = analysis.load(make_grid_experiment(tmp_path / "old", flat_space_json=True))
    assert old.run == new.run == GRID_RUN
    assert old.space.params == new.space.params and old.space.algorithm == "grid" and old.max_t == 4
    assert old.best().value == new.best().value and old.comparisons()[0].table.equals(
        new.comparisons()[0].table)


def test_best_ties_go_to_the_trial_started_first(tmp_path: Path) -> None:
    path = make_grid_experiment(tmp_path)
    # Start the trials in the reverse order of their folder names.
    dirs = sorted(path.glob("trial_*"))
    for i, d in enumerate(dirs):
        recs = _records(d)
        for r in recs:
            r["timestamp"] = 1_900_000_000 - 10 * i + r["epoch"]
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
    exp = analysis.load(path)
    assert list(exp.trials["trial_id"]) == [d.name.removeprefix("trial_") for d in reversed(dirs)]
    assert exp.epochs["trial_id"].iloc[0] == exp.trials["trial_id"].iloc[0]
    # Three top-K trials (one per duplicate setting, which top-K ignores) share the best value.
    best = exp.best()
    tied = exp.trials[exp.trials[exp.objective_col] == best.value]
    assert len(tied) == 3 and best.trial_id == tied.sort_values("order")["trial_id"].iloc[0]
    assert best.trial_id != sorted(tied["trial_id"])[0]


def test_other_metric_and_mode(tmp_path: Path) -> None:
    exp = analysis.load(make_grid_experiment(tmp_path), metric="loss")
    assert exp.mode == "min" and exp.objective_col == "last_loss"  # scored by the last epoch, as the space says
    assert exp.best().value == pytest.approx(exp.epochs["loss"].min())  # the loss falls every epoch here
    assert exp.best_yaml_path().name == "best_loss_min.yaml"
    with pytest.raises(analysis.AnalysisError, match="never reported"):
        analysis.load(exp.path, metric="no_such_metric")
    assert analysis.load(exp.path, metric="acc_proto").best().value == pytest.approx(24.0)
    # Warm-up only: the prototype accuracy is NaN in every result.
    warm = make_grid_experiment(tmp_path / "warm", epochs=1)
    with pytest.raises(analysis.EmptyExperimentError, match="all NaN"):
        analysis.load(warm, metric="acc_proto")
    assert cli_main([str(warm), "--metric", "acc_proto"]) == 2


def test_importing_analysis_keeps_the_backend(tmp_path: Path) -> None:
    """A notebook's backend survives importing the package and writing a report."""
    path = make_grid_experiment(tmp_path)
    code = (
        "import sys, matplotlib\n"
        "matplotlib.use('svg')\n"
        "import analysis, analysis.plots, analysis.report, analysis.study, analysis.__main__\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "analysis.report.write_report(sys.argv[1])\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
        "print('pyplot imported:', 'matplotlib.pyplot' in sys.modules)\n"
    )
    env = {k: v for k, v in _env().items() if k != "MPLBACKEND"}
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Our figures are detached Figures: without an Optuna study pyplot is never even imported.
    assert "pyplot imported: False" in proc.stdout
    assert (path / "analysis" / "best_so_far.png").stat().st_size > 5000


def test_markdown_tables() -> None:
    df = pd.DataFrame({"a|b": ["x|y", "p\nq"], "value": [1.234567, float("nan")], "n": [3, 4]})
    lines = render.md_table(df).splitlines()
    assert len(lines) == 4 and lines[0].split() == ["|", "a\\|b", "|", "value", "|", "n", "|"]
    assert lines[2].split() == ["|", "x\\|y", "|", "1.235", "|", "3", "|"]
    assert lines[3].split() == ["|", "p", "q", "|", "NaN", "|", "4", "|"]  # one line per row
    assert render.md_table(df.set_index("n"), index=True).splitlines()[0].split()[:2] == ["|", "n"]


def test_not_an_experiment(tmp_path: Path) -> None:
    folder = tmp_path / "not_an_exp"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(analysis.AnalysisError, match="not a pcl_tune experiment"):
        analysis.load(folder)
    proc = _cli(str(folder), cwd=tmp_path)
    assert proc.returncode == 2 and not proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not a pcl_tune experiment" in lines[0]
    assert cli_main([str(tmp_path / "missing")]) == 2


def test_experiment_without_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = make_grid_experiment(tmp_path)
    for d in path.glob("trial_*"):
        (d / "result.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", analysis.AnalysisWarning)
        assert cli_main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "no trial result yet" in err[-1]


# --------------------------------------------------------------------------- pure pandas helpers

def test_mean_ci() -> None:
    ci = summaries.mean_ci([1.0, 2.0, 3.0, float("nan")])
    assert ci["n"] == 3 and ci["mean"] == 2.0 and ci["std"] == pytest.approx(1.0)
    assert ci["ci_half"] == pytest.approx(4.302652729911275 / math.sqrt(3))
    assert ci["ci_low"] == pytest.approx(2 - ci["ci_half"]) and ci["ci_high"] == pytest.approx(2 + ci["ci_half"])
    one = summaries.mean_ci([5.0])
    assert one["n"] == 1 and one["mean"] == 5.0 and math.isnan(one["ci_half"]) and math.isnan(one["ci_low"])
    assert summaries.mean_ci([])["n"] == 0
    assert summaries.mean_ci([1.0, 3.0], confidence=0.9)["ci_half"] == pytest.approx(6.313751514675043 * 1.0)


def test_ci_table_and_pivot() -> None:
    df = pd.DataFrame({
        "loss": ["a", "a", "a", "a", "b", "b", "c"],
        "dup": ["x", "y", "x", "y", "x", "x", "x"],
        "seed": [0, 0, 1, 1, 0, 1, 0],
        "obj": [10.0, 12.0, 14.0, 16.0, 1.0, 3.0, 7.0],
    })
    t = summaries.ci_table(df, ["loss"], "obj", replicate="seed", orders={"loss": ["c", "b", "a"]})
    assert list(t["loss"]) == ["c", "b", "a"]
    a = t[t["loss"] == "a"].iloc[0]
    # Seed means 11 and 15: n = 2 seeds out of 4 rows.
    assert a["n"] == 2 and a["n_trials"] == 4 and a["mean"] == 13.0 and a["best"] == 16.0
    assert a["ci_half"] == pytest.approx(12.706204736174698 * math.sqrt(8) / math.sqrt(2))
    assert math.isnan(t[t["loss"] == "c"].iloc[0]["ci_half"])
    no_rep = summaries.ci_table(df, ["loss"], "obj")
    assert no_rep[no_rep["loss"] == "a"].iloc[0]["n"] == 4
    assert summaries.ci_table(df, ["loss"], "obj", mode="min").set_index("loss").loc["a", "best"] == 10.0
    wide = summaries.ci_pivot(summaries.ci_table(df, ["loss", "dup"], "obj", replicate="seed"), "loss", "dup")
    assert wide.loc["a", "x"] == "12.00 ± 25.41 (n=2)" and wide.loc["c", "x"] == "7.00 (n=1)"
    assert wide.loc["c", "y"] == ""


def test_binning_and_effects() -> None:
    df = pd.DataFrame({"lr": [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, None],
                       "loss": ["topk", "proto_nce"] * 4 + [None],
                       "k": [1, 2, 1, 2, 1, 2, 1, 2, 1],
                       "obj": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]})
    bins = summaries.bin_values(df["lr"], bins=4)
    assert list(bins.value_counts(sort=False)) == [2, 2, 2, 2, 1]
    assert list(bins.cat.categories) == ["[0.01, 0.02]", "[0.03, 0.04]", "[0.05, 0.06]", "[0.07, 0.08]",
                                         summaries.NOT_SET]
    ints = summaries.bin_values(pd.Series(range(1, 11)), bins=3)
    assert list(ints.cat.categories) == ["[1, 4]", "[5, 7]", "[8, 10]"]
    eff = summaries.effects(df, ["lr", "loss", "k"], "obj", bins=4, orders={"loss": ["proto_nce", "topk"]})
    lr = eff[eff["param"] == "lr"]
    assert list(lr["count"]) == [2, 2, 2, 2, 1] and list(lr["mean"]) == [1.5, 3.5, 5.5, 7.5, 9.0]
    loss = eff[eff["param"] == "loss"]
    assert list(loss["value"]) == ["proto_nce", "topk", summaries.NOT_SET]
    assert list(loss["max"]) == [8.0, 7.0, 9.0]
    k = eff[eff["param"] == "k"]
    assert list(k["value"]) == ["1", "2"] and list(k["count"]) == [5, 4]
    assert eff.groupby("param")["count"].sum().eq(9).all()


def test_leaderboard_history_and_compute() -> None:
    trials = pd.DataFrame({
        "trial_id": ["a", "b", "c", "d"], "status": ["finished", "stopped", "finished", "running"],
        "order": [0, 1, 2, 3], "obj": [5.0, 7.0, float("nan"), 6.0], "best_epoch": [4, 2, float("nan"), 1],
        "epochs": [4, 2, 4, 1], "train_time_s": [4.0, 2.0, 4.0, 1.0], "wall_time_s": [5.0, 3.0, 5.0, 2.0],
        "start_time": [0.0, 1.0, 2.0, 3.0], "p": [1, 2, 3, 4]})
    lb = summaries.leaderboard(trials, "obj", "max", top=3, params=["p"])
    assert list(lb["trial_id"]) == ["b", "d", "a"] and list(lb["best_so_far"]) == [7.0, 7.0, 5.0]
    assert list(summaries.leaderboard(trials, "obj", "min", top=2)["trial_id"]) == ["a", "d"]
    h = summaries.best_so_far(trials, "obj", "max")
    assert list(h["best_so_far"]) == [5.0, 7.0, 7.0, 7.0] and list(h["new_best"]) == [True, True, False, False]
    hmin = summaries.best_so_far(trials, "obj", "min")
    assert list(hmin["best_so_far"]) == [5.0, 5.0, 5.0, 5.0]
    c = summaries.compute_accounting(trials, max_t=4).iloc[0]
    assert c["epochs_spent"] == 11 and c["epochs_full_budget"] == 16 and c["epochs_saved"] == 5
    assert c["saved_fraction"] == pytest.approx(5 / 16)
    assert (c["finished"], c["stopped"], c["errored"], c["running"]) == (2, 1, 0, 1)
    assert c["time_per_epoch_s"] == pytest.approx(1.0) and c["full_budget_time_s"] == pytest.approx(16.0)


def test_simple_importance() -> None:
    df = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "noise": [3.0, 1.0, 6.0, 2.0, 5.0, 4.0],
                       "cat": ["a", "a", "a", "b", "b", "b"], "const": ["z"] * 6,
                       "cond": [1.0, None, 2.0, None, 3.0, None],
                       "obj": [1.0, 2.0, 3.0, 10.0, 11.0, 12.0]})
    imp = summaries.simple_importance(df, {"x": True, "noise": True, "cat": False, "const": False, "cond": True},
                                      "obj")
    s = imp.set_index("param")
    assert s.loc["x", "importance"] == pytest.approx(1.0) and s.loc["x", "method"] == "|spearman|"
    assert s.loc["cat", "importance"] == pytest.approx(1 - 4.0 / (4.0 + 6 * 20.25), rel=1e-6)
    assert s.loc["cat", "method"] == "eta^2" and math.isnan(s.loc["const", "importance"])
    assert s.loc["cond", "n"] == 3 and s.loc["cond", "importance"] == pytest.approx(1.0)
    assert s["share"].sum() == pytest.approx(1.0)
    assert imp.iloc[-1]["param"] == "const"  # NaN last


@slow
def test_downstream_of_the_best_trials_in_the_report(exp_copy: Path) -> None:
    """Every trial keeps its best epoch's weights; `--best` judges them and the report shows the table."""
    from pcl_tune.evaluate.cli import main as evaluate_main

    for trial in exp_copy.glob("trial_*"):
        assert list(trial.glob("checkpoint_*/best.pt")), trial
    assert evaluate_main(["--best", str(exp_copy), "--top", "2", "--task", "knn", "--split", "val"]) == 0
    table = pd.read_csv(exp_copy / "downstream.csv")
    exp = analysis.load(exp_copy)
    # The same ranking as the leaderboard's (ties, e.g. the baseline and the default during warm-up,
    # may be broken differently): compare the values, and the trials where values differ.
    board = exp.leaderboard(2)
    col = exp.objective_col
    assert table["search_knn_top1"].tolist()[:2] == pytest.approx(board[col].tolist())
    assert table["trial"].iloc[0] == f"trial_{board['trial_id'].iloc[0]}" or board[col].iloc[0] == board[col].iloc[1]
    assert table["trial"].iloc[-1] == "random init"
    assert (table["task"] == "knn").all() and table["value"].between(0, 100).all()
    md = (write_report(exp_copy).parent / "report.md").read_text()
    assert "Downstream evaluation of the best trials" in md and "random init" in md


# --------------------------------------------------------------------------- ablations

ARM_EFFECT = {"pnce": 0.0, "topk": 3.0, "moco_v2": -2.0}
SEED_SHIFT = {0: -4.0, 1: 0.0, 2: 4.0, 3: 8.0}
JITTER = {("topk", 0): 0.2, ("topk", 1): -0.2, ("topk", 2): 0.1, ("topk", 3): -0.1}


def make_arm_ablation(root: Path, epochs: int = 3) -> Path:
    """An arms ablation (pnce, topk, and the automatic moco_v2 baseline; 4 paired seeds) with known
    values: a large seed effect shared by every arm (pairing removes it) and a +3 topk effect."""
    exp = root / "arms"
    exp.mkdir(parents=True)
    space = SearchSpace(path=exp / "arms.yaml", name="arms", description="",
                        fixed={"epochs": epochs, "pcl": {"warmup_epochs": 1}}, params=[], algorithm="grid",
                        asha=False, num_samples=1, max_t=epochs, seeds=[0, 1, 2, 3],
                        arms={"pnce": {}, "topk": {"pcl.proto_loss": "topk"}}, reference="pnce",
                        ablation_metrics=["knn_top1", "acc_inst"])
    experiment_folder.write_space_json(exp, space, GRID_RUN)
    for i, cell in enumerate(space.cells()):
        d = exp / f"trial_a{i:03d}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps(cell))
        arm, seed = cell["arm"], cell["seed"]
        final = 50 + ARM_EFFECT[arm] + SEED_SHIFT[seed] + JITTER.get((arm, seed), 0.0)
        lines = [json.dumps({"epoch": e, "knn_top1": final - (epochs - e), "acc_inst": 90.0 + SEED_SHIFT[seed],
                             "done": e == epochs, "training_iteration": e, "trial_id": f"a{i:03d}",
                             "time_total_s": float(e), "timestamp": 1_800_000_000 + 10 * i + e}) for e in
                 range(1, epochs + 1)]
        (d / "result.json").write_text("\n".join(lines) + "\n")
    (exp / "trials.csv").write_text("trial_id\n")
    return exp


def test_ablation_verdicts_come_first(tmp_path: Path) -> None:
    path = make_arm_ablation(tmp_path)
    exp = _load_quiet(path)
    assert exp.space.is_ablation and exp.verdict_metrics() == ["knn_top1", "acc_inst"]
    assert exp.comparisons() == [] and exp.like_for_like_importance() == []
    res = exp.verdicts()
    by = {v.label: v for v in res.verdicts}
    assert set(by) == {"topk − pnce", "moco_v2 − pnce"}
    topk = by["topk − pnce"]
    # Paired over the 4 seeds: differences 3 + jitter; the seed shift of 12 points cancels.
    assert topk.diffs == pytest.approx((3.2, 2.8, 3.1, 2.9)) and topk.mean == pytest.approx(3.0)
    assert topk.resolved and topk.high - topk.low < 1.0
    assert by["moco_v2 − pnce"].mean == pytest.approx(-2.0)
    assert res.baseline is not None and res.baseline.context == "best PCL cell: arm=topk"
    assert res.baseline.mean == pytest.approx(5.0) and res.baseline.resolved
    # A metric that does not differ between arms: no difference resolved.
    inst = exp.verdicts("acc_inst")
    assert all(not v.resolved and "no difference resolved" in v.sentence() for v in inst.verdicts)
    # The command prints the verdicts before anything else; the report opens with them.
    proc = _cli(str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.index("verdicts (paired differences") < out.index("trials:") < out.index("leaderboard")
    assert "topk − pnce, knn_top1: +3.0 points [" in out and "paired t, 4 seeds" in out
    assert "acc_inst: no difference resolved" in out
    md = (path / "report.md").read_text()
    assert md.index("## Verdicts") < md.index("## Best configuration")
    assert "**topk − pnce, knn_top1: +3.0 points" in md  # resolved verdicts in bold
    # An unfinished trial is left out of the pairs and named.
    victim = path / "trial_a004"  # seed 1, topk
    recs = _records(victim)[:2]
    recs[-1]["done"] = False
    (victim / "result.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (path / "trials.csv").unlink()
    part = _load_quiet(path).verdicts()
    v = {x.label: x for x in part.verdicts}["topk − pnce"]
    assert v.n == 3 and v.seeds == (0, 2, 3) and any(m.startswith("a004") for m in part.missing)


def test_comparisons_never_mix_budgets(tmp_path: Path) -> None:
    """Trials ASHA stopped at epoch 2 next to finished ones: one table on finished trials at the full
    budget, one on every trial at epoch 2, never an average over both."""
    path = make_grid_experiment(tmp_path)
    stopped = []
    for d in sorted(path.glob("trial_*"))[::4]:  # every 4th trial stopped after 2 epochs
        recs = _records(d)[:2]
        recs[-1]["done"] = True
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in recs))
        stopped.append(d.name.removeprefix("trial_"))
    exp = _load_quiet(path)
    assert set(exp.trials.loc[exp.trials["trial_id"].isin(stopped), "status"]) == {"stopped"}
    views = exp.budget_views()
    assert [label.split(" (")[0] for label, _ in views] == ["finished trials", "all 36 trials at epoch 2"]
    final, early = views[0][1], views[1][1]
    assert len(final) == 36 - len(stopped) and not set(stopped) & set(final.index)
    t = exp.trials.set_index("trial_id")
    for tid in early.index[:5]:
        r = t.loc[tid]
        assert early[tid] == pytest.approx(_knn(r["pcl.cluster_schedule"], r["pcl.proto_loss"], r["pcl.duplicates"],
                                                int(r["seed"]), 2))
    comps = exp.comparisons()
    assert {c.budget for c in comps} == {label for label, _ in views}
    dup_early = next(c for c in comps if c.name == "duplicates" and "epoch 2" in c.budget).table
    r = dup_early[(dup_early["pcl.cluster_schedule"] == "5,10") & (dup_early["pcl.duplicates"] == "remap")].iloc[0]
    assert r["mean"] == pytest.approx(55 + 1 + 1)  # epoch-2 values, every seed present
    # A cell with fewer than 3 seeds lists its points instead of an interval.
    dup_final = next(c for c in comps if c.name == "duplicates" and c.budget.startswith("finished")).table
    few = dup_final[dup_final["n"] < 3]
    assert len(few) and few["ci_half"].isna().all() and (few["points"] != "").all()


def test_last_score_ranks_finished_trials_before_stopped_ones() -> None:
    """Under objective.score: last, a trial ASHA stopped at epoch 2 is not compared with finished
    trials by its epoch-2 value (its value is at another budget; Optuna holds it as pruned)."""
    ep = pd.DataFrame({"trial_id": ["a"] * 4 + ["b"] * 2, "epoch": [1, 2, 3, 4, 1, 2],
                       "knn_top1": [10.0, 20.0, 30.0, 25.0, 15.0, 28.0]})
    finished = experiment_folder.best_epoch(ep, "knn_top1", "max", "last", max_t=4)
    assert finished is not None and (finished.trial_id, finished.epoch, finished.value) == ("a", 4, 25.0)
    anyone = experiment_folder.best_epoch(ep, "knn_top1", "max", "last")
    assert anyone is not None and (anyone.trial_id, anyone.value) == ("b", 28.0)
    none_finished = experiment_folder.best_epoch(ep, "knn_top1", "max", "last", max_t=10)  # falls back to all
    assert none_finished is not None and none_finished.trial_id == "b"
    best = experiment_folder.best_epoch(ep, "knn_top1", "max", "best", max_t=4)
    assert best is not None and (best.trial_id, best.epoch, best.value) == ("a", 3, 30.0)
