"""Export of the query backbone for torchvision and detectron2 (``pcl_tune.export``)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

from pcl_tune.export import (
    BACKBONE_PREFIX,
    ExportError,
    detectron2_name,
    export_backbone,
    load_backbone,
    main,
    to_detectron2,
    write_backbone,
)
from pcl_tune.model import MoCo, build_backbone

REPO = Path(__file__).resolve().parents[1]


def _moco(backbone: str, *, small_stem: bool = False, seed: int = 0) -> MoCo:
    """A MoCo whose query backbone differs from any fresh init, BN statistics included."""
    torch.manual_seed(seed)
    moco = MoCo(backbone, "mlp", 16, queue_size=32, small_stem=small_stem)
    with torch.no_grad():
        for name, buf in moco.encoder_q.backbone.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
            elif name.endswith("num_batches_tracked"):
                buf.fill_(7)
        for name, p in moco.encoder_q.backbone.named_parameters():
            if ".bn" in name or name.startswith("bn") or "downsample.1" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return moco.eval()


def _save(tmp_path: Path, moco: MoCo, backbone: str, *, small_stem: bool = False, name: str = "checkpoint.pt") -> Path:
    path = tmp_path / name
    cfg: dict[str, Any] = {"model": {"backbone": backbone, "small_stem": small_stem, "head": "mlp", "low_dim": 16}}
    torch.save({"config": cfg, "model": moco.state_dict(), "epoch": 0}, path)
    return path


def _source_backbone(moco: MoCo) -> dict[str, torch.Tensor]:
    return {k[len(BACKBONE_PREFIX):]: v for k, v in moco.state_dict().items() if k.startswith(BACKBONE_PREFIX)}


@pytest.fixture(scope="module")
def r18(tmp_path_factory: pytest.TempPathFactory) -> tuple[MoCo, Path]:
    moco = _moco("resnet18")
    return moco, _save(tmp_path_factory.mktemp("r18"), moco, "resnet18")


def _d2_reference(key: str) -> str:
    """detectron2's torchvision-conversion rules written as plain string replacements, independent of
    the parser in ``detectron2_name``."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def test_torchvision_export_loads_strict_and_gives_the_same_features(r18: tuple[MoCo, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    moco, ckpt = r18
    out = tmp_path / "r18.pth"
    assert main(["--checkpoint", str(ckpt), "--format", "torchvision", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    src = _source_backbone(moco)
    assert f"({len(src)} tensors)" in stdout and str(out) in stdout and "torchvision" in stdout

    sd = torch.load(out, weights_only=True)  # a plain state dict: loadable without pickle trust
    assert not any(k.startswith("fc.") for k in sd)
    torch.manual_seed(123)
    net = torchvision.models.resnet18()
    report = net.load_state_dict(sd, strict=False)
    assert sorted(report.missing_keys) == ["fc.bias", "fc.weight"] and report.unexpected_keys == []
    net = torchvision.models.resnet18()
    net.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = moco.encoder_q.backbone(x)
        assert not torch.allclose(net.eval()(x), expected, atol=1e-3)  # a fresh net differs: the load matters
        net.load_state_dict(sd, strict=True)
        assert torch.allclose(net.eval()(x), expected, atol=1e-5)
    assert int(sd["bn1.num_batches_tracked"]) == 7


def test_a_checkpoint_folder_is_read_through_its_checkpoint_file(r18: tuple[MoCo, Path], tmp_path: Path) -> None:
    moco, ckpt = r18
    out = export_backbone(ckpt.parent, fmt="torchvision", out=tmp_path / "sub" / "w.pth")
    assert out == tmp_path / "sub" / "w.pth"
    sd = torch.load(out, weights_only=True)
    src = _source_backbone(moco)
    assert sd.keys() == src.keys() and all(torch.equal(sd[k], src[k]) for k in src)
    assert not (tmp_path / "sub" / "w.pth.tmp").exists()


def test_detectron2_export_follows_the_renaming_rules(r18: tuple[MoCo, Path], tmp_path: Path) -> None:
    moco, ckpt = r18
    out = export_backbone(ckpt, fmt="detectron2", out=tmp_path / "r18.pkl")
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert set(data) == {"model", "__author__", "matching_heuristics"}
    assert data["__author__"] == "pcl_tune" and data["matching_heuristics"] is True
    model = data["model"]
    src = {k: v for k, v in _source_backbone(moco).items() if not k.endswith("num_batches_tracked")}
    assert len(model) == len(src) and not any("num_batches_tracked" in k for k in model)
    for k, v in src.items():
        name = _d2_reference(k)
        assert name in model, f"{k} -> {name} missing"
        assert isinstance(model[name], np.ndarray) and model[name].dtype == np.float32
        np.testing.assert_array_equal(model[name], v.numpy())
    for name in ("stem.conv1.weight", "stem.conv1.norm.weight", "stem.conv1.norm.running_mean",
                 "stem.conv1.norm.running_var", "res2.0.conv1.weight", "res2.1.conv2.norm.bias",
                 "res3.0.shortcut.weight", "res3.0.shortcut.norm.weight", "res5.1.conv2.weight"):
        assert name in model
    assert not any(k.startswith(("layer", "conv1", "bn1", "fc")) or "downsample" in k or ".bn" in k for k in model)
    assert all(k.startswith(("stem.", "res2.", "res3.", "res4.", "res5.")) for k in model)


def test_detectron2_names_cover_bottlenecks_and_reject_foreign_keys() -> None:
    assert detectron2_name("layer4.2.bn3.running_var") == "res5.2.conv3.norm.running_var"
    assert detectron2_name("layer1.0.downsample.1.running_mean") == "res2.0.shortcut.norm.running_mean"
    assert detectron2_name("bn1.bias") == "stem.conv1.norm.bias"
    with pytest.raises(ExportError, match="fc.weight"):
        detectron2_name("fc.weight")


def test_resnet50_export_loads_into_torchvision_resnet50(tmp_path: Path) -> None:
    # Only the query backbone (built by the same function MoCo uses) keeps this fast on CPU: the
    # export reads nothing else of the state dict.
    torch.manual_seed(1)
    backbone, _ = build_backbone("resnet50", small_stem=False)
    with torch.no_grad():
        backbone.layer3[5].bn3.running_mean.normal_()
    src = dict(backbone.state_dict())
    ckpt = tmp_path / "best.pt"
    torch.save({"config": {"model": {"backbone": "resnet50", "small_stem": False}},
                "model": {BACKBONE_PREFIX + k: v for k, v in src.items()}, "epoch": 3}, ckpt)
    loaded = load_backbone(ckpt)
    assert loaded.arch == "resnet50" and not loaded.small_stem
    out = tmp_path / "r50.pth"
    assert write_backbone(loaded, fmt="torchvision", out=out) == len(src)
    sd = torch.load(out, weights_only=True)
    net = torchvision.models.resnet50()
    report = net.load_state_dict(sd, strict=False)
    assert sorted(report.missing_keys) == ["fc.bias", "fc.weight"] and report.unexpected_keys == []
    assert all(torch.equal(net.state_dict()[k], src[k]) for k in src)
    d2 = to_detectron2(loaded.state_dict)
    assert "res5.2.conv3.norm.running_var" in d2 and "res2.0.shortcut.norm.bias" in d2
    np.testing.assert_array_equal(d2["res4.5.conv3.norm.running_mean"], src["layer3.5.bn3.running_mean"].numpy())


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "w.pth"
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), "--format", "torchvision", "--out", str(out)]) == 2
    assert "no checkpoint at" in _error_line(capsys)
    assert not out.exists()


def test_foreign_files_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    assert main(["--checkpoint", str(text), "--format", "torchvision", "--out", str(tmp_path / "a.pth")]) == 2
    assert "not a readable checkpoint" in _error_line(capsys)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, other)
    assert main(["--checkpoint", str(other), "--format", "torchvision", "--out", str(tmp_path / "b.pth")]) == 2
    assert "not a pcl_tune pretraining checkpoint" in _error_line(capsys)


def test_small_cnn_backbone_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = _save(tmp_path, MoCo("small_cnn", "mlp", 16, queue_size=32, width=8), "small_cnn")
    out = tmp_path / "w.pkl"
    assert main(["--checkpoint", str(ckpt), "--format", "detectron2", "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert "'small_cnn'" in line and "resnet18" in line and "resnet50" in line
    assert not out.exists()


def test_weights_of_another_architecture_are_refused(r18: tuple[MoCo, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    state = torch.load(r18[1], weights_only=False)
    state["config"]["model"]["backbone"] = "resnet50"  # config says 50, weights are a resnet18
    ckpt = tmp_path / "lying.pt"
    torch.save(state, ckpt)
    assert main(["--checkpoint", str(ckpt), "--format", "torchvision", "--out", str(tmp_path / "w.pth")]) == 2
    assert "do not fit torchvision's resnet50" in _error_line(capsys)


def test_small_stem_needs_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    moco = _moco("resnet18", small_stem=True)
    ckpt = _save(tmp_path, moco, "resnet18", small_stem=True)
    out = tmp_path / "w.pth"
    argv = ["--checkpoint", str(ckpt), "--format", "torchvision", "--out", str(out)]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "small stem" in line and "--allow-small-stem" in line
    assert not out.exists()

    assert main([*argv, "--allow-small-stem"]) == 0
    captured = capsys.readouterr()
    assert "stem differs" in captured.err
    sd = torch.load(out, weights_only=True)
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    net.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x), moco.encoder_q.backbone(x), atol=1e-5)


def test_detectron2_output_must_be_a_pkl(r18: tuple[MoCo, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--checkpoint", str(r18[1]), "--format", "detectron2", "--out", str(tmp_path / "w.pth")]) == 2
    assert ".pkl" in _error_line(capsys)


def test_module_help_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "pcl_tune.export", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--checkpoint" in proc.stdout and "detectron2" in proc.stdout and "--allow-small-stem" in proc.stdout
