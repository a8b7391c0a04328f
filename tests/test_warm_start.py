"""Warm starts (pcl_tune/warm_start.py): what an earlier experiment folder gives a new search.

The earlier experiments are written by hand (space.json, each trial's params.json and
progress.csv, as a search leaves them), so every score is known. No Ray is started.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import yaml

from pcl_tune import experiment_folder as F
from pcl_tune.search import main as search_main
from pcl_tune.space import SearchSpace, SpaceError, load_space
from pcl_tune.warm_start import load_warm_start, seed_study

SPACE: dict[str, Any] = {
    "name": "old",
    "fixed": {"epochs": 4, "pcl": {"warmup_epochs": 1}, "data": {"digits_copies": [1, 1, 1]}},
    "search": {"optim.lr": {"loguniform": [0.01, 0.3]},
               "pcl.proto_loss": {"choice": ["proto_nce", "topk"]},
               "pcl.k": {"int": [1, 4], "when": {"pcl.proto_loss": "topk"}}},
    "objective": {"metric": "knn_top1", "mode": "max"},
    "searcher": {"seed": 0, "startup_trials": 2, "num_samples": 6},
    "asha": {"grace_period": 2, "reduction_factor": 2},
}

# (params, knn per epoch): finished trials run 4 epochs, stopped ones 2.
TRIALS: list[tuple[dict[str, Any], list[float]]] = [
    ({"optim.lr": 0.02, "pcl.proto_loss": "proto_nce"}, [10.0, 20.0, 30.0, 28.0]),            # last 28, best 30
    ({"optim.lr": 0.05, "pcl.proto_loss": "topk", "pcl.k": 2}, [12.0, 22.0, 27.0, 29.0]),     # last 29
    ({"optim.lr": 0.2, "pcl.proto_loss": "proto_nce"}, [15.0, 25.0]),                         # stopped at 2
    ({"optim.lr": 0.1, "pcl.proto_loss": "proto_nce", "pcl.proto_weight": 0.0, "arm": "moco_v2"},
     [11.0, 21.0, 31.0, 35.0]),                                                                # the baseline
]


def _space(tmp_path: Path, data: dict[str, Any], name: str = "space.yaml") -> SearchSpace:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_space(path)


def _experiment(root: Path, space: SearchSpace, trials: list[tuple[dict[str, Any], list[float]]] = TRIALS) -> Path:
    exp = root / "old"
    exp.mkdir(parents=True)
    F.write_space_json(exp, space, {"executor": "direct"})
    for i, (params, values) in enumerate(trials):
        d = exp / f"trial_{i:05d}"
        d.mkdir()
        (d / "params.json").write_text(json.dumps(params))
        pd.DataFrame({"epoch": range(1, len(values) + 1), "knn_top1": values}).to_csv(d / "progress.csv", index=False)
    return exp


@pytest.mark.parametrize("score", ["last", "best"])
def test_best_configurations_come_first_and_trials_go_to_tpe(tmp_path: Path, score: str) -> None:
    old = dataclasses.replace(_space(tmp_path, SPACE), score=score)
    exp = _experiment(tmp_path / "runs", old)
    new = _space(tmp_path, {**SPACE, "name": "new"}, "new.yaml")
    ws = load_warm_start([exp], new, top=2)
    # Finished trials first, by score: last -> 29 (topk) before 28; best -> 30 (proto_nce) before 29.
    first = {"optim.lr": 0.05, "pcl.proto_loss": "topk", "pcl.k": 2}
    second = {"optim.lr": 0.02, "pcl.proto_loss": "proto_nce"}  # pcl.k: its condition fails, left out
    assert ws.points == ([first, second] if score == "last" else [second, first])
    # Same space: every trial but the baseline is told, finished ones with their score, stopped ones pruned.
    told = {(t.params["optim.lr"], t.state, t.value) for t in ws.trials}
    assert told == {(0.02, "COMPLETE", 28.0 if score == "last" else 30.0), (0.05, "COMPLETE", 29.0),
                    (0.2, "PRUNED", 25.0)}
    assert next(t for t in ws.trials if t.state == "PRUNED").intermediate == {1: 15.0, 2: 25.0}
    assert ws.notes == [] and "2 configuration(s) evaluated first, 3 earlier trial(s)" in ws.describe()


def test_a_different_space_gives_configurations_only_with_a_note(tmp_path: Path) -> None:
    exp = _experiment(tmp_path / "runs", _space(tmp_path, SPACE))
    narrower = json.loads(json.dumps(SPACE))
    narrower["search"]["optim.lr"] = {"loguniform": [0.01, 0.03]}
    ws = load_warm_start([exp], _space(tmp_path, narrower, "new.yaml"), top=3)
    assert ws.trials == []
    assert ws.points == [{"optim.lr": 0.02, "pcl.proto_loss": "proto_nce"}]  # 0.05 is outside the new range
    assert any("left out, e.g. search.optim.lr = 0.05 is outside loguniform [0.01, 0.03]" in n for n in ws.notes)
    assert any("not told to TPE: search.optim.lr differs: loguniform [0.01, 0.3] there, loguniform [0.01, 0.03] "
               "here" in n for n in ws.notes)
    other = json.loads(json.dumps(SPACE))
    other["objective"] = {"metric": "fewshot_5w5s", "mode": "max"}
    other["fixed"]["eval"] = {"fewshot_episodes": 10}
    ws = load_warm_start([exp], _space(tmp_path, other, "other.yaml"))
    assert ws.trials == [] and any("its objective is max knn_top1, this search's max fewshot_5w5s" in n
                                   for n in ws.notes)


def test_earlier_trials_seed_the_new_study(tmp_path: Path) -> None:
    space = _space(tmp_path, SPACE)
    ws = load_warm_start([_experiment(tmp_path / "runs", space)], space)
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'new.db'}")
    assert seed_study(storage, "new", space, ws.trials) == 3
    study = optuna.load_study(study_name="new", storage=storage)
    TS = optuna.trial.TrialState
    assert sorted((t.state, t.params["optim.lr"]) for t in study.trials) == \
        sorted([(TS.COMPLETE, 0.02), (TS.COMPLETE, 0.05), (TS.PRUNED, 0.2)])
    assert study.best_value == 29.0
    # TPE samples from the seeded history (no random start-up needed once it has enough trials).
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=2)
    study = optuna.load_study(study_name="new", storage=storage, sampler=sampler)
    trial = study.ask()
    assert 0.01 <= trial.suggest_float("optim.lr", 0.01, 0.3, log=True) <= 0.3


def test_search_cli_warm_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = _space(tmp_path, SPACE)
    exp = _experiment(tmp_path / "runs", space)
    new_file = tmp_path / "new.yaml"
    new_file.write_text(yaml.safe_dump({**SPACE, "name": "new"}, sort_keys=False))
    args = ["--space", str(new_file), "--storage-path", str(tmp_path / "runs"), "--dry-run"]
    assert search_main([*args, "--warm-start", str(exp)]) == 0
    out = capsys.readouterr().out
    assert "evaluated first: optim.lr=0.05, pcl.proto_loss=topk, pcl.k=2" in out
    assert f"warm start from {exp}: 3 configuration(s) evaluated first, 3 earlier trial(s) told to TPE" in out
    assert search_main([*args, "--warm-start", str(tmp_path)]) == 2
    assert "not a pcl_tune experiment folder" in capsys.readouterr().err
    assert search_main(["--name", "old", "--storage-path", str(tmp_path / "runs"), "--resume", "--dry-run",
                        "--warm-start", str(exp)]) == 2
    assert "--warm-start goes with a new search, not --resume" in capsys.readouterr().err


def test_warm_start_refuses_a_grid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = _space(tmp_path, SPACE)
    exp = _experiment(tmp_path / "runs", space)
    grid = {**SPACE, "name": "grid", "search": {"pcl.proto_loss": {"choice": ["proto_nce", "topk"]}},
            "searcher": {"algorithm": "grid"}, "asha": {"enabled": False}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    with pytest.raises(SpaceError, match="not a pcl_tune experiment folder"):
        load_warm_start([tmp_path], space)
    assert search_main(["--space", str(path), "--storage-path", str(tmp_path / "runs"), "--dry-run",
                        "--warm-start", str(exp)]) == 2
    assert "is a grid, an ablation or a PBT search; only a TPE search is warm-started" in capsys.readouterr().err


def test_the_tuner_starts_from_the_seeded_study(tmp_path: Path) -> None:
    """build_tuner puts the earlier trials into the new search's optuna.db before TPE reads it (no
    Ray is started: a Tuner is only built)."""
    from pcl_tune.search import build_tuner, make_plan
    from pcl_tune.storage import Store

    space = _space(tmp_path, SPACE)
    ws = load_warm_start([_experiment(tmp_path / "runs", space)], space)
    exp_dir = tmp_path / "runs" / "new"
    exp_dir.mkdir()
    build_tuner(space, make_plan(space, 2, 0), Store.of_folder(str(exp_dir)), max_failures=0, restore=False, warm=ws)
    study = optuna.load_study(study_name=space.name, storage=f"sqlite:///{exp_dir / F.OPTUNA_DB}")
    finished = [t for t in study.trials if t.state.is_finished()]
    assert sorted(t.params["optim.lr"] for t in finished) == [0.02, 0.05, 0.2]
