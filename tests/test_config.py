"""Tests of pcl_tune.config: building, validating, reading and merging run configurations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pcl_tune.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    describe_fields,
    flatten,
    load_config_file,
    merge,
    parse_overrides,
    unflatten,
)


def _error(data: dict[str, Any]) -> str:
    """The message of the ConfigError that ``config_from_dict(data)`` raises."""
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return str(info.value)


def _write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --------------------------------------------------------------------------- config_from_dict


def test_empty_config_is_the_defaults() -> None:
    cfg = config_from_dict({})
    assert cfg == TrainConfig()
    assert config_from_dict(None) == TrainConfig()
    assert cfg.flat()["optim.lr"] == 0.01
    assert cfg.flat()["pcl.cluster_schedule"] == "5,10"


def test_nested_and_dotted_keys_mixed() -> None:
    cfg = config_from_dict({
        "epochs": 5,
        "optim": {"lr": 0.1, "schedule": "step", "lr_steps": [2, 4]},
        "optim.batch_size": 16,
        "pcl.k": 4,
        "pcl": {"duplicates": "remap"},
        "data": {"digits_copies": [1, 2, 3]},
        "model.head": "linear",
    })
    assert cfg.epochs == 5
    assert cfg.optim.lr == 0.1 and cfg.optim.batch_size == 16
    assert cfg.optim.schedule == "step" and cfg.optim.lr_steps == [2, 4]
    assert cfg.pcl.k == 4 and cfg.pcl.duplicates == "remap"
    assert cfg.data.digits_copies == [1, 2, 3]
    assert cfg.model.head == "linear"
    # Untouched settings keep their defaults, also inside touched sections.
    assert cfg.optim.momentum == 0.9 and cfg.pcl.temperature == 0.07 and cfg.model.low_dim == 128


@pytest.mark.parametrize("order", ["dotted_first", "nested_first"])
def test_dotted_and_nested_forms_of_one_section_combine(order: str) -> None:
    items = [("optim.batch_size", 16), ("optim", {"lr": 0.5})]
    if order == "nested_first":
        items.reverse()
    cfg = config_from_dict(dict(items))
    assert (cfg.optim.lr, cfg.optim.batch_size) == (0.5, 16)


def test_int_is_accepted_and_coerced_for_float_fields() -> None:
    cfg = config_from_dict({"optim.lr": 1, "pcl.lam": 0})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert isinstance(cfg.pcl.lam, float)


def test_flatten_unflatten_round_trip() -> None:
    cfg = config_from_dict({"optim.lr": 0.2, "pcl.cluster_schedule": {"fixed": [3, 6]}})
    flat = cfg.flat()
    assert flat["optim.lr"] == 0.2
    # A dict-valued setting is a leaf, not a section: it is not flattened further.
    assert flat["pcl.cluster_schedule"] == {"fixed": [3, 6]}
    assert unflatten(flat) == cfg.to_dict()
    assert config_from_dict(flat) == cfg
    assert flatten(cfg.to_dict()) == flat


@pytest.mark.parametrize(
    ("data", "key", "suggestion"),
    [
        ({"optim.lrr": 0.1}, "optim.lrr", "lr"),
        ({"epochz": 3}, "epochz", "epochs"),
        ({"pcl": {"temprature": 0.1}}, "pcl.temprature", "temperature"),
        ({"optimm": {"lr": 0.1}}, "optimm", "optim"),
    ],
)
def test_unknown_key_is_named_with_a_suggestion(data: dict[str, Any], key: str, suggestion: str) -> None:
    msg = _error(data)
    assert f"unknown key {key!r}" in msg
    assert "did you mean" in msg
    hint = msg.split("did you mean", 1)[1].split("?", 1)[0]
    assert suggestion in hint


def test_unknown_key_without_close_match_lists_the_keys() -> None:
    msg = _error({"optim.zzzzzz": 1})
    assert "'optim.zzzzzz'" in msg
    assert "did you mean" not in msg
    assert "optim.lr" in msg and "optim.batch_size" in msg


def test_unknown_key_suggestion_is_the_quoted_dotted_key() -> None:
    assert "did you mean 'optim.lr'?" in _error({"optim.lrr": 0.1})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("optim.lr", "fast", "expected float"),
        ("epochs", 2.5, "expected int"),
        ("epochs", True, "expected int"),
        ("progress", "yes", "expected bool"),
        ("data.digits_copies", [1, "a", 2], "expected a list of int"),
        ("data.digits_copies", 3, "expected a list of int"),
        ("data.image_size", "32", "expected int or null"),
        ("model.low_dim", None, "expected int"),
    ],
)
def test_wrong_type_names_key_value_and_expected_type(key: str, value: Any, expected: str) -> None:
    msg = _error({key: value})
    assert f"key {key!r}" in msg
    assert repr(value) in msg
    assert f"({type(value).__name__})" in msg
    assert msg.rstrip().endswith(expected)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("pcl.duplicates", "dedup", ["dedupe", "remap", "none"]),
        ("model.backbone", "resnet34", ["small_cnn", "resnet18", "resnet50"]),
        ("optim.schedule", "linear", ["cosine", "step"]),
        ("data.dataset", "imagenet", ["digits", "folder", "cifar10", "cifar100", "miniimagenet"]),
        ("eval.encoder", "momentum", ["key", "query"]),
    ],
)
def test_bad_choice_names_key_value_and_choices(key: str, value: str, allowed: list[str]) -> None:
    msg = _error({key: value})
    assert f"key {key!r}" in msg and repr(value) in msg
    for choice in allowed:
        assert choice in msg


@pytest.mark.parametrize(
    ("data", "key", "needle"),
    [
        ({"optim.lr": 0}, "optim.lr", "> 0"),
        ({"epochs": -1}, "epochs", "> 0"),
        ({"pcl.warmup_epochs": -1}, "pcl.warmup_epochs", ">= 0"),
        ({"model.momentum": 1.0}, "model.momentum", "[0, 1)"),
        ({"pcl.alpha": 5.0}, "pcl.alpha", "(0, 4]"),
        ({"data.digits_copies": [1, 1]}, "data.digits_copies", "three integers"),
        ({"data.digits_copies": [1, 0, 1]}, "data.digits_copies", "three integers"),
        ({"pcl.cluster_schedule": "5,x"}, "pcl.cluster_schedule", "5,x"),
        ({"pcl.cluster_schedule": "linear:5,10"}, "pcl.cluster_schedule", "->"),
        ({"data.dataset": "folder"}, "data.root", "root"),
    ],
)
def test_value_checks(data: dict[str, Any], key: str, needle: str) -> None:
    msg = _error(data)
    assert key in msg
    assert needle in msg


@pytest.mark.parametrize(
    ("key", "value"),
    [("data.subset", 0), ("data.val_fraction", 1.5), ("data.image_size", -4),
     ("pcl.topk_threshold", -1)],
)
def test_out_of_range_values_are_config_errors(key: str, value: Any) -> None:
    assert key in _error({key: value, "pcl.proto_loss": "topk_below"})


def test_valid_edge_values_pass() -> None:
    cfg = config_from_dict({"model.momentum": 0.0, "pcl.alpha": 4.0, "pcl.warmup_epochs": 0,
                            "pcl.cluster_schedule": {"linear": {"start": [2], "end": [8]}},
                            "data.dataset": "folder", "data.root": "/somewhere"})
    assert cfg.model.momentum == 0.0 and cfg.pcl.alpha == 4.0
    assert cfg.data.root == "/somewhere"


def test_section_given_a_value_is_rejected() -> None:
    assert "optim" in _error({"optim": 3})
    msg = _error({"epochs": 3, "epochs.x": 1})
    assert "'epochs.x'" in msg and "not a section" in msg


def test_describe_fields_covers_every_setting() -> None:
    rows = describe_fields()
    keys = [r[0] for r in rows]
    assert set(keys) == set(TrainConfig().flat())
    docs = {r[0]: r[3] for r in rows}
    assert "MoCo queue length" in docs["model.queue_size"]


# --------------------------------------------------------------------------- files


def test_load_config_file_search_space_uses_only_fixed(tmp_path: Path) -> None:
    path = _write(tmp_path / "space.yaml", {
        "fixed": {"epochs": 4, "optim": {"batch_size": 32}, "pcl.k": 5},
        "search": {"optim.lr": {"type": "loguniform", "low": 0.01, "high": 0.3},
                   "pcl.temperature": {"type": "choice", "values": [0.1, 0.2]}},
        "tune": {"num_samples": 8},
    })
    data = load_config_file(path)
    assert data == {"epochs": 4, "optim": {"batch_size": 32}, "pcl.k": 5}
    cfg = config_from_dict(data)
    assert (cfg.epochs, cfg.optim.batch_size, cfg.pcl.k) == (4, 32, 5)
    # Searched parameters keep their defaults.
    assert cfg.optim.lr == 0.01 and cfg.pcl.temperature == 0.07


def test_load_config_file_search_only_gives_no_settings(tmp_path: Path) -> None:
    path = _write(tmp_path / "space.yaml", {"search": {"optim.lr": {"type": "uniform", "low": 0.1, "high": 1}}})
    assert load_config_file(path) == {}
    path = _write(tmp_path / "space2.yaml", {"fixed": None, "search": {}})
    assert load_config_file(path) == {}


def test_load_config_file_plain_config(tmp_path: Path) -> None:
    body = {"epochs": 7, "optim": {"lr": 0.03}, "pcl": {"cluster_schedule": "steps:0=3,6;2=6,12"}}
    path = _write(tmp_path / "run.yaml", body)
    assert load_config_file(path) == body
    cfg = config_from_dict(load_config_file(str(path)))
    assert cfg.epochs == 7 and cfg.optim.lr == 0.03
    assert cfg.pcl.cluster_schedule == "steps:0=3,6;2=6,12"


def test_load_config_file_empty_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config_file(path) == {}


def test_load_config_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config_file(missing)
    assert str(missing) in str(info.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config_file(listing)


# --------------------------------------------------------------------------- overrides and merge


def test_parse_overrides_reads_values_as_yaml() -> None:
    out = parse_overrides([
        "optim.lr=0.1", "epochs=3", "progress=false", "pcl.cluster_schedule=5,10",
        "data.digits_copies=[1, 1, 1]", "data.subset=null", "data.root=", " model.head = linear",
        "data.root=a=b",
    ])
    assert out["optim.lr"] == 0.1 and out["epochs"] == 3 and out["progress"] is False
    assert out["pcl.cluster_schedule"] == "5,10"
    assert out["data.digits_copies"] == [1, 1, 1]
    assert out["data.subset"] is None
    assert out["model.head"] == "linear"
    assert out["data.root"] == "a=b"  # later items win; only the first '=' splits
    cfg = config_from_dict(out)
    assert cfg.optim.lr == 0.1 and cfg.pcl.cluster_schedule == "5,10" and cfg.data.root == "a=b"


def test_parse_overrides_empty_value_is_none() -> None:
    assert parse_overrides(["data.root="]) == {"data.root": None}
    assert parse_overrides([]) == {}


def test_parse_overrides_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match="KEY=VALUE") as info:
        parse_overrides(["optim.lr"])
    assert "'optim.lr'" in str(info.value)


def test_parse_overrides_scientific_notation_is_a_float() -> None:
    cfg = config_from_dict(parse_overrides(["optim.lr=1e-3", "optim.weight_decay=5e-4"]))
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.optim.weight_decay == pytest.approx(5e-4)


def test_merge_nested_and_dotted() -> None:
    base = {"epochs": 10, "optim": {"lr": 0.1, "batch_size": 32}, "pcl.k": 3}
    snapshot = {"epochs": 10, "optim": {"lr": 0.1, "batch_size": 32}, "pcl.k": 3}
    out = merge(base, {"optim.lr": 0.2, "pcl": {"lam": 0.5}, "epochs": 4})
    assert out == {"epochs": 4, "optim": {"lr": 0.2, "batch_size": 32}, "pcl": {"k": 3, "lam": 0.5}}
    assert base == snapshot  # inputs are not modified
    assert merge({}, {"optim.lr": 0.3}) == {"optim": {"lr": 0.3}}
    assert merge({"optim.lr": 0.3}, {}) == {"optim": {"lr": 0.3}}


def test_merge_of_file_and_overrides_builds_the_config(tmp_path: Path) -> None:
    path = _write(tmp_path / "space.yaml", {"fixed": {"optim": {"lr": 0.1, "batch_size": 32}, "epochs": 9},
                                           "search": {}})
    cfg = config_from_dict(merge(load_config_file(path), parse_overrides(["optim.lr=0.5", "pcl.k=7"])))
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.epochs, cfg.pcl.k) == (0.5, 32, 9, 7)


def test_merge_replaces_a_dict_valued_setting() -> None:
    base = {"pcl": {"cluster_schedule": {"fixed": [5, 10]}}}
    out = merge(base, {"pcl.cluster_schedule": {"steps": {0: [3, 6], 2: [6, 12]}}})
    assert out["pcl"]["cluster_schedule"] == {"steps": {0: [3, 6], 2: [6, 12]}}
    assert config_from_dict(out).pcl.cluster_schedule == {"steps": {0: [3, 6], 2: [6, 12]}}


# --------------------------------------------------------------------------- command line


def test_cli_bad_config_exits_2_with_one_line_error(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    bad = _write(tmp_path / "bad.yaml", {"epochs": 2, "optim": {"lrr": 0.1}})
    proc = subprocess.run([sys.executable, "-m", "pcl_tune.train", "--config", str(bad), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=180, env=subprocess_env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "optim.lrr" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "optim.lr"], "KEY=VALUE"),
        (["--set", "pcl.duplicates=sometimes"], "pcl.duplicates"),
        (["--epochs", "0"], "'epochs'"),
    ],
)
def test_main_bad_overrides_exit_2(args: list[str], needle: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from pcl_tune.train import main

    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_main_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pcl_tune.train import main

    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.yaml" in err


def test_main_invalid_yaml_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pcl_tune.train import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1, 2\n")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err


def test_main_print_config_resolves_file_and_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pcl_tune.train import main

    space = _write(tmp_path / "space.yaml", {"fixed": {"optim": {"batch_size": 48}}, "search": {}})
    assert main(["--config", str(space), "--set", "pcl.k=6", "--epochs", "11", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["batch_size"] == 48 and printed["pcl"]["k"] == 6 and printed["epochs"] == 11
