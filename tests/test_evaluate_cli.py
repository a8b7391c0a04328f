"""``python -m pcl_tune.evaluate`` on a tiny pretrained checkpoint: every task, its JSON, the
random-init baseline, ``--best`` over an experiment folder, and one-line errors with exit 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import tiny_settings

from pcl_tune import experiment_folder as F
from pcl_tune.evaluate import balanced_subset, load_encoder, semi_supervised
from pcl_tune.evaluate.cli import main
from pcl_tune.space import load_space
from pcl_tune.train import BEST_FILE, CHECKPOINT_DIR, CHECKPOINT_FILE, train_loop

pytestmark = pytest.mark.usefixtures("torch_threads")

QUICK = ["--episodes", "40", "--semi-epochs", "1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, torch_threads: None) -> Path:
    """Three epochs of a tiny run; the best epoch by kNN is kept as best.pt."""
    out = tmp_path_factory.mktemp("pretrained")
    train_loop(tiny_settings(), out_dir=out, verbose=False)
    return out


def test_best_checkpoint_holds_the_best_epoch(run_dir: Path) -> None:
    history = pd.read_csv(run_dir / "metrics.csv")
    best = torch.load(run_dir / CHECKPOINT_DIR / BEST_FILE, weights_only=False)
    assert best["metric"] == "knn_top1"
    assert best["epoch"] + 1 == int(history.loc[history["knn_top1"].idxmax(), "epoch"])
    assert best["value"] == pytest.approx(history["knn_top1"].max())
    loaded = load_encoder(run_dir / CHECKPOINT_DIR / BEST_FILE)
    assert loaded.epoch == best["epoch"] + 1


def test_every_task_and_its_json(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result.json"
    args = ["--checkpoint", str(run_dir / CHECKPOINT_DIR), "--task", "knn", "--task", "linear", "--task", "fewshot",
            "--task", "semi", "--split", "val", "--out", str(out), *QUICK]
    assert main(args) == 0
    rows = json.loads(out.read_text())
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
        assert r["split"] == "val" and r["checkpoint"].endswith(CHECKPOINT_FILE) and r["encoder"] == "pretrained"
        assert 0.0 <= r["value"] <= 100.0
    assert set(by_task) == {"knn", "linear", "fewshot", "semi"}
    shots = [(r["n_way"], r["k_shot"], r["episodes"]) for r in by_task["fewshot"]]
    assert shots == [(5, 1, 40), (5, 5, 40)]
    assert all(r["ci95"] > 0 for r in by_task["fewshot"])
    assert by_task["semi"][0]["fraction"] == 0.1
    assert "5-way 1-shot" in capsys.readouterr().out


def test_random_init_differs_from_pretrained(run_dir: Path) -> None:
    trained = load_encoder(run_dir / CHECKPOINT_DIR)
    random = load_encoder(run_dir / CHECKPOINT_DIR, random_init=True)
    a = dict(trained.encoder.backbone.named_parameters())
    b = dict(random.encoder.backbone.named_parameters())
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert random.epoch is None and trained.epoch == 3


def test_balanced_subset_is_balanced_and_reproducible() -> None:
    labels = torch.arange(10).repeat_interleave(torch.tensor([50, 40, 30, 20, 10, 9, 8, 7, 6, 3])).numpy()
    sub = balanced_subset(labels, 0.1, seed=0)
    counts = pd.Series(labels[sub]).value_counts().sort_index()
    assert counts.tolist() == [5, 4, 3, 2, 1, 1, 1, 1, 1, 1]  # at least one per class
    assert (sub == balanced_subset(labels, 0.1, seed=0)).all()
    assert not (sub == balanced_subset(labels, 0.1, seed=1)).all()


def test_semi_supervised_is_deterministic(run_dir: Path) -> None:
    a = semi_supervised(run_dir / CHECKPOINT_DIR, fraction=0.05, epochs=1, split_name="val")
    b = semi_supervised(run_dir / CHECKPOINT_DIR, fraction=0.05, epochs=1, split_name="val")
    assert a == b and a.labelled >= 10 and a.top5 is not None and a.top5 >= a.top1


@pytest.mark.parametrize("extra, message", [
    (["--set", "model.width=16"], "do not fit"),
    (["--task", "voc07"], "--voc-root"),
    (["--ways", "20"], "there are 10"),
    (["--set", "optim.lrr=0.1"], "did you mean 'optim.lr'"),
])
def test_wrong_input_is_one_line_and_exit_2(run_dir: Path, extra: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--checkpoint", str(run_dir / CHECKPOINT_DIR), *QUICK, *extra]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("[pcl_tune")]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_missing_and_foreign_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--checkpoint", str(tmp_path / "none")]) == 2
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    assert main(["--checkpoint", str(tmp_path / "foreign.pt")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "not a pcl_tune pretraining checkpoint" in err and "Traceback" not in err


@pytest.mark.parametrize("score", ["last", "best"])
def test_best_over_an_experiment_folder(run_dir: Path, tmp_path: Path, score: str) -> None:
    """A hand-made experiment folder: two trials with per-epoch results, a checkpoint.pt and a best.pt
    each. Trials are ranked, and judged at, the epoch the space's objective.score names."""
    import dataclasses

    exp = tmp_path / "exp"
    exp.mkdir()
    space_file = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
    F.write_space_json(exp, dataclasses.replace(load_space(space_file), score=score), {"executor": "direct"})
    for trial, best in (("trial_a", 40.0), ("trial_b", 55.0)):
        d = exp / trial / "checkpoint_000002"
        d.mkdir(parents=True)
        shutil.copyfile(run_dir / CHECKPOINT_DIR / BEST_FILE, d / BEST_FILE)
        shutil.copyfile(run_dir / CHECKPOINT_DIR / CHECKPOINT_FILE, d / CHECKPOINT_FILE)
        pd.DataFrame({"epoch": [1, 2, 3], "knn_top1": [10.0, best, best - 1]}).to_csv(exp / trial / "progress.csv")
    rc = main(["--best", str(exp), "--top", "1", "--task", "knn", "--split", "val"])
    assert rc == 0
    table = pd.read_csv(exp / "downstream.csv")
    assert table["trial"].tolist() == ["trial_b", "random init"]
    expected = (55.0, 2) if score == "best" else (54.0, 3)
    assert (table.loc[0, "search_knn_top1"], table.loc[0, "best_epoch"]) == expected
    assert table.loc[1, "encoder"] == "random init"
    assert main(["--best", str(tmp_path)]) == 2


def test_module_entry_point(subprocess_env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pcl_tune.evaluate", "--help"], capture_output=True, text=True,
                          env=subprocess_env, timeout=120)
    assert proc.returncode == 0 and "--random-init" in proc.stdout


def test_voc07_task_on_a_devkit_fixture(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_voc2007 import write_devkit

    devkit = write_devkit(tmp_path / "voc")
    out = tmp_path / "voc.json"
    base = ["--checkpoint", str(run_dir / CHECKPOINT_DIR), "--task", "voc07", "--voc-root", str(devkit)]
    with pytest.warns(UserWarning, match="left out of the mean AP"):
        assert main([*base, "--voc-shots", "", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["setting"] for r in rows] == ["full"] and 0.0 <= rows[0]["mAP"] <= 100.0
    # The fixture has a single positive image of most classes: 2-shot cannot be drawn.
    assert main([*base, "--voc-shots", "2"]) == 2
    assert "positive image(s) needed" in capsys.readouterr().err
    assert main([*base[:-1], str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
