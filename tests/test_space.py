"""Search-space files: parsing, define-by-run sampling, and every validation error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from pcl_tune.config import config_from_dict, merge
from pcl_tune.search import make_plan
from pcl_tune.space import SearchSpace, SpaceError, load_space

ROOT = Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = {
    "fixed": {"epochs": 6, "pcl": {"warmup_epochs": 2}, "data": {"digits_copies": [1, 1, 1]}},
    "search": {
        "optim.lr": {"loguniform": [0.01, 0.3]},
        "pcl.cluster_schedule": {"choice": ["5,10", "linear:5,10->20,40"]},
        "pcl.proto_loss": {"choice": ["proto_nce", "topk"]},
        "pcl.k": {"int": [1, 4], "when": {"pcl.proto_loss": "topk"}},
    },
    "objective": {"metric": "knn_top1", "mode": "max"},
    "searcher": {"seed": 0, "startup_trials": 2, "num_samples": 4},
    "asha": {"grace_period": 3, "reduction_factor": 2},
}


def write(tmp_path: Path, data: dict[str, Any], name: str = "space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def patched(base: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    """A deep copy of ``base`` (default BASE) with dotted-path changes (value None deletes the key)."""
    import copy

    d = copy.deepcopy(BASE if base is None else base)
    for path, value in changes.items():
        node = d
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return d


def test_shipped_spaces_load() -> None:
    names = sorted(p.stem for p in (ROOT / "search_spaces").glob("*.yaml"))
    assert {"demo", "cifar10", "miniimagenet", "imagenet_pcl", "loss_ablation"} <= set(names)
    for p in (ROOT / "search_spaces").glob("*.yaml"):
        space = load_space(p)
        assert space.params or space.arms, p
        # Every shipped space runs the MoCo v2 baseline.
        assert space.has_baseline, p
    demo = load_space(ROOT / "search_spaces" / "demo.yaml")
    assert demo.num_samples >= 8 and demo.asha
    ablation = load_space(ROOT / "search_spaces" / "loss_ablation.yaml")
    # 3 duplicate modes x 2 schedules + the baseline, 5 paired seeds, no early stopping.
    assert ablation.is_ablation and not ablation.asha and ablation.total_trials() == (3 * 2 + 1) * 5
    arms = load_space(ROOT / "search_spaces" / "pcl_vs_moco.yaml")
    assert arms.reference == "proto_nce" and len(arms.seeds) >= 5 and not arms.params
    ref = load_space(ROOT / "search_spaces" / "imagenet_pcl.yaml")
    assert ref.points_to_evaluate[0]["pcl.cluster_schedule"] == "25000,50000,100000"


def test_demo_starts_from_the_defaults() -> None:
    # The demo's first trial is the default config: it sets ASHA's first rungs with a good run.
    from pcl_tune.config import TrainConfig

    demo = load_space(ROOT / "search_spaces" / "demo.yaml")
    defaults = TrainConfig().flat()
    first = demo.points_to_evaluate[0]
    assert set(first) == {p.name for p in demo.params if not p.when}
    for key, value in first.items():
        assert defaults[key] == value, key
    assert demo.base_config().pcl.warmup_epochs < demo.grace_period


def test_valid_space_parses(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, BASE))
    assert [p.name for p in space.params] == ["optim.lr", "pcl.cluster_schedule", "pcl.proto_loss", "pcl.k"]
    lr = space.params[0]
    assert lr.log and lr.low == 0.01
    cfg = config_from_dict(merge(space.fixed, {"optim.lr": 0.1, "pcl.k": 2}))
    assert cfg.optim.lr == 0.1 and cfg.pcl.k == 2 and cfg.epochs == 6


def test_space_json_round_trip(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, BASE))
    data = json.loads(json.dumps(space.to_json()))  # plain JSON types only
    back = SearchSpace.from_json(data)
    assert back.to_json() == data
    assert back.params == space.params and back.param("pcl.k") == space.param("pcl.k")
    assert back.params[3].when == (("pcl.proto_loss", ("topk",)),)
    assert back.resolved_max_t() == space.resolved_max_t() == 6
    assert back.rungs() == space.rungs() and back.rungs()[0] == space.grace_period
    # A space.json of an earlier version (no seed, resources, ...) still reads, with the defaults.
    old = {k: v for k, v in data.items() if k not in ("seed", "resources", "startup_trials", "path")}
    assert SearchSpace.from_json(old, path=tmp_path / "space.json").num_samples == space.num_samples
    with pytest.raises(SpaceError, match=r"params\[0\]"):
        SearchSpace.from_json({**data, "params": [{"kind": "uniform"}]})
    with pytest.raises(SpaceError, match="num_samples"):
        SearchSpace.from_json({**data, "num_samples": "many"})


def test_define_by_run_respects_conditions(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, BASE))
    fn = space.define_by_run()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), direction="maximize")
    seen_k = {"topk": 0, "proto_nce": 0}
    for _ in range(30):
        trial = study.ask()
        fn(trial)
        kind = trial.params["pcl.proto_loss"]
        if "pcl.k" in trial.params:
            assert kind == "topk"
            assert 1 <= trial.params["pcl.k"] <= 4
            seen_k[kind] += 1
        else:
            assert kind == "proto_nce"
        study.tell(trial, 0.0)
    assert seen_k["topk"] > 0
    import pickle

    assert pickle.loads(pickle.dumps(fn)).params == fn.params  # Tune checkpoints the searcher


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"bogus": 1}, "key 'bogus'"),
        ({"fixed/optim/lrr": 0.1}, "optim.lrr"),
        ({"fixed/epochs": "ten"}, "key 'epochs'"),
        ({"search/optim.lrate": {"uniform": [0, 1]}}, "search.optim.lrate"),
        ({"search/optim.lr": {"uniform": [0.3, 0.01]}}, "range is empty"),
        ({"search/optim.lr": {"uniform": ["a", 1]}}, "a number"),
        ({"search/pcl.proto_loss": {"choice": []}}, "non-empty list"),
        ({"search/optim.lr": {"gaussian": [0, 1]}}, "search.optim.lr.gaussian"),
        ({"search/pcl.k": {"int": [1, 9], "when": {"pcl.proto_loss": "topk"}}}, "smallest cluster count"),
        ({"search/pcl.cluster_schedule": {"choice": ["5,10", "5000,10000"]}}, "training images"),
        ({"asha/grace_period": 2}, "warm-up"),
        ({"objective/metric": "top5"}, "objective.metric"),
        ({"objective/mode": "maximise"}, "min or max"),
        ({"objective/metric": "fewshot_5w1s", "fixed/eval/fewshot_episodes": 0}, "eval.fewshot_episodes >= 1"),
        ({"fixed/eval/best_metric": "top5"}, "eval.best_metric"),
        ({"resources": {"executor": "k8s"}}, "resources.executor"),
        ({"searcher/algorithm": "cmaes"}, "searcher.algorithm"),
        ({"search/pcl.cluster_schedule": {"choice": [[5, 10], "5,10"]}}, "as strings"),
        ({"search/pcl.duplicates": {"choice": ["dedupe", "dedup"]}}, "pcl.duplicates"),
    ],
)
def test_validation_errors_name_key(tmp_path: Path, changes: dict[str, Any], fragment: str) -> None:
    path = write(tmp_path, patched(**changes))
    with pytest.raises(SpaceError) as err:
        load_space(path)
    msg = str(err.value)
    assert str(path) in msg
    assert fragment in msg
    assert "\n" not in msg


def test_fewshot_objective_is_accepted_when_produced(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, patched(**{"objective/metric": "fewshot_5w5s"})))
    assert space.metric == "fewshot_5w5s"


def test_condition_must_refer_to_earlier_param(tmp_path: Path) -> None:
    data = patched()
    data["search"] = {"pcl.k": {"int": [1, 3], "when": {"pcl.proto_loss": "topk"}},
                      "pcl.proto_loss": {"choice": ["proto_nce", "topk"]}}
    with pytest.raises(SpaceError, match="listed earlier"):
        load_space(write(tmp_path, data))


def test_cli_bad_space_exits_2_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, patched(**{"asha/grace_period": 1}))
    proc = subprocess.run([sys.executable, "-m", "pcl_tune.search", "--space", str(path), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "asha.grace_period" in lines[0]


def test_cli_dry_run_prints_plan(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pcl_tune.search", "--space", str(ROOT / "search_spaces/demo.yaml"),
                           "--dry-run", "--num-cpus", "4", "--workers-per-trial", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "2 DDP worker(s)" in proc.stdout and "at most 2 concurrent" in proc.stdout
    assert "evaluated first: pcl.cluster_schedule=5,10, pcl.proto_weight=1.0, pcl.proto_loss=proto_nce" in proc.stdout
    assert "baseline (MoCo v2, not told to TPE, never stopped early): pcl.cluster_schedule=5,10, pcl.proto_weight=0.0" \
        in proc.stdout


def test_plan_never_oversubscribes(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, patched(resources={"executor": "train", "workers_per_trial": 2,
                                                          "cpus_per_worker": 1})))
    plan = make_plan(space, cluster_cpus=5, cluster_gpus=0)
    assert plan.max_concurrent == 2  # 2 trials x 2 workers x 1 CPU <= 5
    assert plan.trial_resources["CPU"] == 0
    with pytest.raises(SpaceError, match="one trial needs 2 CPU"):
        make_plan(space, cluster_cpus=1, cluster_gpus=0)
    direct = load_space(write(tmp_path, patched(resources={"executor": "direct", "cpus_per_trial": 1,
                                                           "gpus_per_trial": 0.5}), "d.yaml"))
    assert make_plan(direct, cluster_cpus=8, cluster_gpus=1).max_concurrent == 2  # GPU-bound: 2 halves


def test_batch_is_global_and_must_split_evenly_across_workers(tmp_path: Path) -> None:
    train = {"executor": "train", "workers_per_trial": 3, "cpus_per_worker": 1}
    with pytest.raises(SpaceError, match=r"key 'fixed.optim.batch_size': got 64, expected a multiple of the 3 workers"):
        load_space(write(tmp_path, patched(**{"resources": train, "fixed/optim": {"batch_size": 64}})))
    searched = patched(**{"resources": {**train, "workers_per_trial": 2},
                          "search/optim.batch_size": {"choice": [32, 48, 63]}})
    with pytest.raises(SpaceError, match=r"key 'search.optim.batch_size': got 63, expected a multiple of the 2 workers"):
        load_space(write(tmp_path, searched, "s.yaml"))
    # One worker takes any batch.
    ok = load_space(write(tmp_path, patched(**{"resources": {**train, "workers_per_trial": 1},
                                               "fixed/optim": {"batch_size": 96}}), "ok.yaml"))
    assert int(ok.base_config().optim.batch_size) == 96


ABLATION: dict[str, Any] = {
    "fixed": {"epochs": 6, "pcl": {"warmup_epochs": 2}, "data": {"digits_copies": [1, 1, 1]}},
    "search": {"pcl.duplicates": {"choice": ["dedupe", "remap"]}},
    "ablation": {"seeds": 3, "arms": {"pnce": {}, "topk": {"pcl": {"proto_loss": "topk", "k": 2}}},
                 "reference": "pnce", "metrics": ["knn_top1", "fewshot_5w5s"]},
    "objective": {"metric": "knn_top1", "mode": "max"},
}


def test_ablation_cells_run_seed_by_seed_with_the_baseline(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, ABLATION))
    assert space.is_ablation and space.algorithm == "grid" and not space.asha and space.rungs() == []
    assert space.seeds == [0, 1, 2] and space.reference == "pnce"
    assert space.arms["topk"] == {"pcl.proto_loss": "topk", "pcl.k": 2}
    cells = space.cells()
    # (2 duplicate modes x 2 arms + the baseline) per seed, seed by seed.
    assert len(cells) == space.total_trials() == 5 * 3
    assert [c["seed"] for c in cells] == [0] * 5 + [1] * 5 + [2] * 5
    assert all(set(c) == set(cells[0]) for c in cells)  # Tune's preset points need equal keys
    first = cells[:5]
    assert [c["arm"] for c in first] == ["pnce", "topk", "pnce", "topk", "moco_v2"]
    # A key an arm does not set takes the fixed value; the baseline is the first cell with weight 0.
    assert first[0]["pcl.proto_loss"] == "proto_nce" and first[0]["pcl.k"] == 3
    assert first[1]["pcl.proto_loss"] == "topk" and first[1]["pcl.k"] == 2
    assert first[4]["pcl.proto_weight"] == 0.0 and first[4]["pcl.duplicates"] == "dedupe"
    assert {c["pcl.proto_weight"] for c in first[:4]} == {1.0}
    # Each cell is a valid config once the arm label is dropped.
    from pcl_tune.trials import settings_of

    for c in cells:
        assert "arm" not in settings_of(c)
        config_from_dict(merge(space.fixed, settings_of(c)))
    back = SearchSpace.from_json(json.loads(json.dumps(space.to_json())))
    assert back.cells() == cells and back.ablation_metrics == ["knn_top1", "fewshot_5w5s"]
    # An explicit seed list, and no baseline when asked for none.
    data = json.loads(json.dumps(ABLATION))
    data["ablation"]["seeds"] = [4, 9]
    data["searcher"] = {"baseline": False}
    other = load_space(write(tmp_path, data, "b.yaml"))
    assert [c["seed"] for c in other.cells()] == [4, 4, 4, 4, 9, 9, 9, 9]
    assert not any(c.get("arm") == "moco_v2" for c in other.cells())


def test_baseline_point_of_a_tpe_space(tmp_path: Path) -> None:
    data = patched(**{"searcher/points_to_evaluate": [{"optim.lr": 0.05, "pcl.proto_loss": "topk", "pcl.k": 2}]})
    space = load_space(write(tmp_path, data))
    assert space.has_baseline and space.total_trials() == space.num_samples + 1
    # The first point, with the first choice / the middle of a range for what it does not set.
    assert space.baseline_point() == {"optim.lr": 0.05, "pcl.cluster_schedule": "5,10", "pcl.proto_loss": "topk",
                                      "pcl.k": 2, "pcl.proto_weight": 0.0, "arm": "moco_v2"}
    bare = load_space(write(tmp_path, BASE, "bare.yaml")).baseline_point()
    assert bare["optim.lr"] == pytest.approx((0.01 * 0.3) ** 0.5)  # geometric middle of a log range
    assert "pcl.k" not in bare  # its condition (topk) does not hold at the first loss, proto_nce
    # No baseline: switched off, or the space is already MoCo (fixed or searched weight 0).
    assert not load_space(write(tmp_path, patched(**{"searcher/baseline": False}), "off.yaml")).has_baseline
    assert not load_space(write(tmp_path, patched(**{"fixed/pcl/proto_weight": 0.0}), "w0.yaml")).has_baseline
    searched = patched(**{"search/pcl.proto_weight": {"choice": [1.0, 0.0]}})
    assert not load_space(write(tmp_path, searched, "w.yaml")).has_baseline
    # A space.json written before the baseline existed reads as having none.
    old = {k: v for k, v in space.to_json().items() if k != "baseline"}
    assert not SearchSpace.from_json(old).has_baseline


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"ablation/seeds": 1}, "ablation.seeds"),
        ({"ablation/seeds": [1, 1]}, "ablation.seeds"),
        ({"ablation/seeds": "five"}, "ablation.seeds"),
        ({"asha": {"enabled": True}}, "asha.enabled"),
        ({"searcher": {"algorithm": "tpe"}}, "searcher.algorithm"),
        ({"searcher": {"num_samples": 3}}, "searcher.num_samples"),
        ({"fixed/seed": 3}, "fixed.seed"),
        ({"ablation/arms/topk/pcl/kk": 2}, "ablation.arms.topk.pcl.kk"),
        ({"ablation/arms/topk/pcl/duplicates": "none"}, "searched"),
        ({"ablation/arms/topk/pcl/k": 99}, "smallest cluster count"),
        ({"ablation/arms/bad name": {}}, "arm name"),
        ({"ablation/arms/moco_v2": {}}, "automatic baseline"),
        ({"ablation/reference": "nope"}, "ablation.reference"),
        ({"ablation/metrics": ["top5"]}, "ablation.metrics"),
        ({"ablation/metrics": ["fewshot_5w1s"], "fixed/eval": {"fewshot_episodes": 0}}, "fewshot_episodes"),
        ({"ablation/unknown": 1}, "ablation.unknown"),
    ],
)
def test_ablation_errors_name_key(tmp_path: Path, changes: dict[str, Any], fragment: str) -> None:
    path = write(tmp_path, patched(ABLATION, **changes))
    with pytest.raises(SpaceError) as err:
        load_space(path)
    msg = str(err.value)
    assert str(path) in msg and fragment in msg and "\n" not in msg
