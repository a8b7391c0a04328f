"""What a search survives, each fault injected at a named point (no sleeps decide where):

* the driver killed between a trial's result and the write of its log row, and between Optuna's
  commit of a finished trial and Tune's snapshot of it; then ``--resume``;
* a Ray Train worker killed in the middle of an epoch;
* a trial whose loss turns NaN;
* the dataset folder removed while the search runs.

Points are :func:`pcl_tune.faults.pause_point` names: the process that reaches the point writes
its pid to a file and blocks until the test kills it (``tests/fault_hooks.py`` adds the driver's
points through Ray Tune's ``RAY_TUNE_CALLBACKS``).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_search import _env, _space, _trials, _wait_for

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent


def _search_args(space: Path, runs: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pcl_tune.search", "--space", str(space), "--storage-path", str(runs),
            "--name", name, "--no-dashboard", "--no-report", *extra]


def _resume_args(runs: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pcl_tune.search", "--name", name, "--storage-path", str(runs), "--resume",
            "--no-dashboard", "--no-report", *extra]


def _paused_env(point: str, marker: Path, callbacks: str = "fault_hooks.PauseDriver") -> dict[str, str]:
    env = _env()
    env.update(PCL_TUNE_PAUSE_AT=point, PCL_TUNE_PAUSE_FILE=str(marker), RAY_TUNE_CALLBACKS=callbacks,
               PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _run_until_paused(args: list[str], env: dict[str, str], marker: Path, timeout: float = 420) -> None:
    """Start the driver in its own process group; once ``marker`` appears, kill the whole group
    (the driver and the Ray it started) at once."""
    driver = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                              start_new_session=True)
    try:
        reached = _wait_for(lambda: marker.is_file() and marker.read_text().strip() != "" or driver.poll() is not None,
                            timeout)
        assert reached and driver.poll() is None, (
            f"the driver {'ended' if driver.poll() is not None else 'ran on'} without reaching the point:\n"
            + (driver.communicate(timeout=30)[0][-4000:] if driver.poll() is not None else ""))
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)


def _no_gaps(trials: dict[str, pd.DataFrame], epochs: int) -> None:
    for name, df in trials.items():
        assert sorted(df["epoch"].unique()) == list(range(1, epochs + 1)), (name, df["epoch"].tolist())


def _finished_unchanged(before: dict[str, pd.DataFrame], after: dict[str, pd.DataFrame], epochs: int) -> None:
    """Trials finished before the kill are not trained again: same rows, wall times included (a
    restored finished trial replays its last epoch's row instead of training)."""
    ours = ["epoch", "loss", "loss_inst", "knn_top1", "time_epoch", "time_train"]
    finished = {n: df for n, df in before.items() if int(df["epoch"].max()) == epochs}
    assert finished, "no trial had finished before the kill"
    for n, df in finished.items():
        again = after[n].drop_duplicates("epoch", keep="last").reset_index(drop=True)
        pd.testing.assert_frame_equal(again[ours], df.drop_duplicates("epoch", keep="last")[ours]
                                      .reset_index(drop=True))


def _resume_and_check(runs: Path, name: str, before: dict[str, pd.DataFrame]) -> None:
    """``--resume`` the killed search; then all 3 trials have epochs 1-4 once, and the trials that
    had finished before the kill were not trained again."""
    proc = subprocess.run(_resume_args(runs, name, "--num-cpus", "2"), capture_output=True, text=True,
                          timeout=600, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = _trials(runs / name)
    assert len(after) == 3
    _no_gaps(after, 4)
    _finished_unchanged(before, after, 4)


def _three_trials(tmp_path: Path) -> Path:
    space = _space(tmp_path, lrs=[0.08, 0.04, 0.02], num_samples=3, epochs=4,
                   resources={"executor": "direct", "cpus_per_trial": 1, "max_concurrent": 1})
    data = yaml.safe_load(space.read_text())
    data["asha"] = {"enabled": False}
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    return space


def test_driver_killed_between_a_result_and_its_log_row_then_resumed(tmp_path: Path) -> None:
    space, runs, marker = _three_trials(tmp_path), tmp_path / "runs", tmp_path / "paused"
    exp = runs / "kill"
    # Results 1-4 are trial 1's epochs; result 6 is the second trial's epoch 2.
    _run_until_paused(_search_args(space, runs, "kill", "--num-cpus", "2"),
                      _paused_env("driver/result6", marker), marker)
    before = _trials(exp)
    assert len(before) == 2
    second = next(n for n, df in before.items() if int(df["epoch"].max()) < 4)
    # The window the fault needs: epoch 2's checkpoint is on storage, its row is not in the log.
    assert before[second]["epoch"].tolist() == [1]
    assert "checkpoint_000001" in {p.name for p in (exp / second).glob("checkpoint_*")}
    _resume_and_check(runs, "kill", before)


def test_driver_killed_between_optuna_commit_and_tune_snapshot_then_resumed(tmp_path: Path) -> None:
    space, runs, marker = _three_trials(tmp_path), tmp_path / "runs", tmp_path / "paused"
    exp = runs / "kill"
    _run_until_paused(_search_args(space, runs, "kill", "--num-cpus", "2"),
                      _paused_env("driver/complete1", marker), marker)
    # The window the fault needs: Optuna holds the first trial as finished...
    with sqlite3.connect(exp / "optuna.db") as db:
        states = [s for (s,) in db.execute("SELECT state FROM trials ORDER BY number")]
    assert states[0] == "COMPLETE"
    before = _trials(exp)
    _resume_and_check(runs, "kill", before)
    import optuna

    study = optuna.load_study(study_name="t", storage=f"sqlite:///{exp / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3  # no trial told twice or lost


def test_ray_train_worker_killed_mid_epoch_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    space = _space(tmp_path, lrs=[0.04], num_samples=1, epochs=4,
                   resources={"executor": "train", "workers_per_trial": 2, "cpus_per_worker": 1,
                              "max_concurrent": 1})
    data = yaml.safe_load(space.read_text())
    data["asha"] = {"enabled": False}
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    runs, marker = tmp_path / "runs", tmp_path / "paused"
    env = _paused_env("train_step/rank1/epoch3/step2", marker, callbacks="")
    driver = subprocess.Popen(_search_args(space, runs, "worker", "--num-cpus", "4"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    try:
        assert _wait_for(lambda: marker.is_file() and marker.read_text().strip() != "" or driver.poll() is not None,
                         480), "rank 1 never reached epoch 3"
        assert driver.poll() is None, driver.communicate(timeout=30)[0][-4000:]
        os.kill(int(marker.read_text()), signal.SIGKILL)  # rank 1 dies in the middle of epoch 3
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=60)
    assert driver.returncode == 0, out[-5000:]
    (name, df), = _trials(runs / "worker").items()
    # Restarted from the last checkpoint Ray Train had registered (epoch 2's, or epoch 1's when the
    # kill beat epoch 2's report to the controller): that epoch's row is reported again, then the
    # run goes on. One repeated row proves the restart; no epoch is missing.
    epochs = df["epoch"].tolist()
    repeated = [e for e in set(epochs) if epochs.count(e) > 1]
    assert len(epochs) == 5 and len(repeated) == 1 and repeated[0] in (1, 2), epochs
    _no_gaps({name: df}, 4)
    assert df["knn_top1"].notna().all()


def test_a_diverging_trial_errors_with_its_epoch_and_the_others_finish(tmp_path: Path) -> None:
    import analysis

    space = _three_trials(tmp_path)
    data = yaml.safe_load(space.read_text())
    data["searcher"]["points_to_evaluate"] = [{"optim.lr": 0.08}, {"optim.lr": 0.04, "inject_nan_epoch": 2},
                                              {"optim.lr": 0.02}]
    data["search"]["inject_nan_epoch"] = {"choice": [None, 2]}
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    runs = tmp_path / "runs"
    proc = subprocess.run([*_search_args(space, runs, "nan", "--num-cpus", "2", "--max-failures", "0")],
                          capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = analysis.load(runs / "nan")
    trials = exp.trials.set_index("trial_id") if "trial_id" in exp.trials else exp.trials
    errored = trials[trials["status"] == "errored"]
    assert len(errored) == 1
    assert "loss is nan at epoch 2, batch 1" in str(errored["error"].iloc[0])
    assert (trials["status"] == "finished").sum() == 2
    assert "errored" in proc.stdout and "loss is nan at epoch 2" in proc.stdout
    from analysis.report import write_report

    write_report(runs / "nan", experiment=exp)
    assert "loss is nan at epoch 2" in (runs / "nan" / "report.md").read_text()

def _folder_dataset(root: Path, classes: int = 4, per_class: int = 20) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / "train" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((16, 16, 3)) * 60 + 60 * c).astype("uint8")
            Image.fromarray(pixels).save(d / f"{i}.png")


def test_dataset_folder_removed_mid_search_errors_clearly_and_keeps_what_finished(tmp_path: Path) -> None:
    import analysis

    space = _three_trials(tmp_path)
    data = yaml.safe_load(space.read_text())
    root = tmp_path / "images"
    _folder_dataset(root)
    data["fixed"]["data"] = {"dataset": "folder", "root": str(root), "image_size": 16, "num_workers": 0,
                             "val_fraction": 0.25}
    data["fixed"]["pcl"]["cluster_schedule"] = "3,5"
    data["fixed"]["optim"]["batch_size"] = 16
    data["fixed"]["model"]["queue_size"] = 32
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    runs = tmp_path / "runs"
    env = _paused_env("", tmp_path / "unused", callbacks="fault_hooks.DeleteAfterFirstTrial")
    env["PCL_TUNE_TEST_DELETE"] = str(root)
    proc = subprocess.run(_search_args(space, runs, "gone", "--num-cpus", "2", "--max-failures", "0"),
                          capture_output=True, text=True, timeout=600, env=env)
    assert not root.exists()
    exp = analysis.load(runs / "gone")
    t = exp.trials
    assert (t["status"] == "finished").sum() == 1 and (t["status"] == "errored").sum() == 2, t[["status", "error"]]
    for message in t.loc[t["status"] == "errored", "error"]:
        assert str(root) in str(message), message  # names the folder that is gone
    finished = next(iter(_trials(runs / "gone").values()))
    assert finished["epoch"].tolist() == [1, 2, 3, 4]  # nothing of the finished trial is lost
    assert proc.returncode in (0, 1)
