"""What a trial hands to Ray, and what Ray Train prints: ``checkpoint_every`` in the trials'
reporter (a fake ``report`` and ``make_checkpoint``, no Ray), the key's validation, the switch
that keeps Ray Train's per-report INFO lines off the console, and one real train-executor search
with ``checkpoint_every: 2`` killed and resumed from the last checkpoint it handed over.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pcl_tune import trials
from pcl_tune.checkpoint import CHECKPOINT_FILE, CHECKPOINT_METRICS
from pcl_tune.config import ConfigError, TrainConfig, config_from_dict


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reporter asks Ray for its node id, which would start a local Ray outside a Ray process."""
    monkeypatch.setattr(trials, "_node_id", lambda: "node")


class FakeRay:
    """``report`` and ``make_checkpoint`` of a trial: records what each report carried."""

    def __init__(self) -> None:
        self.reports: list[tuple[int, str | None]] = []

    def make_checkpoint(self, path: str) -> str:
        return f"checkpoint:{path}"

    def report(self, metrics: dict[str, Any], *, checkpoint: str | None = None) -> None:
        self.reports.append((int(metrics["epoch"]), checkpoint))


def _run(reporter: Any, epochs: range, ckpt_dir: Path | None) -> None:
    for epoch in epochs:  # 0-based, as the loop calls it
        reporter(epoch, {"epoch": epoch + 1, "loss": 1.0 / (epoch + 1), "time_epoch": 0.5}, ckpt_dir)


@pytest.mark.parametrize(("every", "epochs", "handed"), [
    (1, 5, [1, 2, 3, 4, 5]),
    (3, 7, [3, 6, 7]),  # multiples of 3, and the last epoch
    (4, 8, [4, 8]),  # the last epoch is a multiple: handed once
    (10, 4, [4]),  # longer than the run: the last epoch only
])
def test_checkpoint_every_hands_checkpoints_at_its_multiples_and_the_last_epoch(
        tmp_path: Path, no_ray: None, every: int, epochs: int, handed: list[int]) -> None:
    fake = FakeRay()
    reporter = trials.tune_reporter(fake.report, fake.make_checkpoint, None, checkpoint_every=every, epochs=epochs)
    _run(reporter, range(epochs), tmp_path)
    assert [e for e, _ in fake.reports] == list(range(1, epochs + 1))  # every epoch is reported
    assert [e for e, c in fake.reports if c is not None] == handed
    assert all(c == f"checkpoint:{tmp_path}" for _, c in fake.reports if c is not None)


def test_ranks_without_a_checkpoint_folder_never_hand_one(no_ray: None) -> None:
    fake = FakeRay()
    reporter = trials.tune_reporter(fake.report, fake.make_checkpoint, None, checkpoint_every=2, epochs=4)
    _run(reporter, range(4), None)  # a DDP rank other than 0: the loop gives it no folder
    assert fake.reports == [(1, None), (2, None), (3, None), (4, None)]


def test_a_restored_run_replays_its_epoch_without_a_checkpoint_then_counts_from_epoch_one(
        tmp_path: Path, no_ray: None) -> None:
    restored = tmp_path / "restore"
    restored.mkdir()
    (restored / CHECKPOINT_FILE).write_bytes(b"")
    history = [{"epoch": e, "loss": 1.0, "time_epoch": 0.5} for e in (1, 2, 3, 4)]
    (restored / CHECKPOINT_METRICS).write_text(json.dumps(history))
    fake = FakeRay()
    reporter = trials.tune_reporter(fake.report, fake.make_checkpoint, restored, checkpoint_every=4, epochs=10)
    _run(reporter, range(4, 10), tmp_path / "run")
    # Epoch 4 (the restored one) again without a checkpoint; then 8 (a multiple) and 10 (the last).
    assert fake.reports[0] == (4, None)
    assert [e for e, c in fake.reports if c is not None] == [8, 10]


def test_checkpoints_carry_the_lineage_of_the_restored_model_then_this_trials_epochs(
        tmp_path: Path, no_ray: None) -> None:
    """A clone restored from a donor's epoch-2 checkpoint keeps the donor's entries up to epoch 2
    (not the donor's later ones, should its file hold more) and adds its own from epoch 3."""
    from pcl_tune.checkpoint import CHECKPOINT_LINEAGE, checkpoint_lineage

    restored = tmp_path / "restore"
    restored.mkdir()
    (restored / CHECKPOINT_FILE).write_bytes(b"")
    (restored / CHECKPOINT_METRICS).write_text(json.dumps([{"epoch": e, "loss": 1.0} for e in (1, 2)]))
    donor = [{"epoch": e, "trial": "donor", "settings": {"optim.lr": 0.1}} for e in (1, 2, 3)]
    (restored / CHECKPOINT_LINEAGE).write_text(json.dumps(donor))
    fake = FakeRay()
    run = tmp_path / "run"
    run.mkdir()
    reporter = trials.tune_reporter(fake.report, fake.make_checkpoint, restored, checkpoint_every=2, epochs=5,
                                    trial=("clone", {"optim.lr": 0.05}))
    _run(reporter, range(2, 4), run)  # epochs 3 and 4; 4 is handed over
    assert [(e["epoch"], e["trial"], e["settings"]["optim.lr"]) for e in checkpoint_lineage(run)] == [
        (1, "donor", 0.1), (2, "donor", 0.1), (3, "clone", 0.05), (4, "clone", 0.05)]
    reporter = trials.tune_reporter(fake.report, fake.make_checkpoint, None, epochs=2)  # no trial: no file
    _run(reporter, range(2), tmp_path)
    assert not (tmp_path / CHECKPOINT_LINEAGE).exists()


def test_checkpoint_every_is_a_config_key_of_at_least_one() -> None:
    assert TrainConfig().checkpoint_every == 1
    assert config_from_dict({"checkpoint_every": 5}).checkpoint_every == 5
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=r"key 'checkpoint_every': got -?\d+, expected an integer >= 1"):
            config_from_dict({"checkpoint_every": bad})
    with pytest.raises(ConfigError, match="key 'checkpoint_every'"):
        config_from_dict({"checkpoint_every": 2.5})


class Capture(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def report_loggers() -> Iterator[list[tuple[logging.Logger, Capture, Capture]]]:
    """Ray Train's per-report loggers, each with an INFO and a DEBUG capturing handler; their
    levels, handlers and filters restored after."""
    loggers = trials.train_report_loggers()
    assert len(loggers) == len(trials.TRAIN_REPORT_MODULES)  # Ray 2.60 has both modules
    levels = [logger.level for logger in loggers]
    handlers = []
    for logger in loggers:
        info, debug = Capture(logging.INFO), Capture(logging.DEBUG)
        logger.addHandler(info)
        logger.addHandler(debug)
        handlers.append((logger, info, debug))
    yield handlers
    trials.quiet_train_reports(verbose=True)
    for (logger, info, debug), level in zip(handlers, levels):
        logger.removeHandler(info)
        logger.removeHandler(debug)
        logger.setLevel(level)


def test_train_report_lines_are_debug_unless_asked_for(report_loggers: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # The logger Ray 2.60 writes "Reporting training result N: ..." with is named after its file.
    assert any(logger.name.endswith("context.py") for logger, _, _ in report_loggers)
    monkeypatch.delenv(trials.TRAIN_LOG_ENV, raising=False)
    for logger, info, debug in report_loggers:
        # As in a Ray Train worker: the context logger inherits the root's INFO, ray.train's are DEBUG.
        for level in (logging.INFO, logging.DEBUG):
            logger.setLevel(level)
            info.records.clear()
            debug.records.clear()
            assert trials.quiet_train_reports() is True  # the default: quiet
            logger.info("Reporting training result 1: {'loss': 1.0}")
            logger.warning("a warning stays a warning")
            assert [r.getMessage() for r in info.records] == ["a warning stays a warning"], logger.name
            # Where the logger takes DEBUG (Ray Train's system log files), the line is kept as DEBUG.
            kept = [r.levelname for r in debug.records if r.getMessage().startswith("Reporting")]
            assert kept == (["DEBUG"] if level == logging.DEBUG else []), (logger.name, level)

            monkeypatch.setenv(trials.TRAIN_LOG_ENV, "verbose")
            assert trials.quiet_train_reports() is False
            info.records.clear()
            logger.info("Reporting training result 2: {'loss': 0.5}")
            assert [(r.levelname, r.getMessage()) for r in info.records] == [
                ("INFO", "Reporting training result 2: {'loss': 0.5}")]
            monkeypatch.delenv(trials.TRAIN_LOG_ENV)


def test_quieting_twice_adds_one_filter(report_loggers: Any) -> None:
    trials.quiet_train_reports(verbose=False)
    trials.quiet_train_reports(verbose=False)
    for logger, _, _ in report_loggers:
        assert sum(isinstance(f, trials._InfoToDebug) for f in logger.filters) == 1
    trials.quiet_train_reports(verbose=True)
    for logger, _, _ in report_loggers:
        assert not any(isinstance(f, trials._InfoToDebug) for f in logger.filters)


@pytest.mark.slow
def test_train_executor_with_checkpoint_every_resumes_from_the_last_checkpoint_it_handed(tmp_path: Path) -> None:
    """A train-executor search (1 worker, 5 epochs, ``checkpoint_every: 2``) killed whole in the
    middle of epoch 4, then ``--resume``d: the Train run goes on from epoch 2's checkpoint (the last
    handed over; epoch 3's was not), so the resumed trial reports epoch 2 again, then 3, 4, 5."""
    from test_faults import _paused_env, _resume_args, _run_until_paused, _search_args
    from test_search import _env, _space, _trials

    space = _space(tmp_path, lrs=[0.04], num_samples=1, epochs=5,
                   resources={"executor": "train", "workers_per_trial": 1, "cpus_per_worker": 1,
                              "max_concurrent": 1})
    data = yaml.safe_load(space.read_text())
    data["asha"] = {"enabled": False}
    data["fixed"]["checkpoint_every"] = 2
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    runs, marker = tmp_path / "runs", tmp_path / "paused"
    _run_until_paused(_search_args(space, runs, "every", "--num-cpus", "2"),
                      _paused_env("train_step/rank0/epoch4/step2", marker, callbacks=""), marker)
    before = _trials(runs / "every")
    first = [int(e) for e in next(iter(before.values()))["epoch"]] if before else []
    # Killed in epoch 4: at most epochs 1-3 reached the log (the last of them may not have).
    assert first == list(range(1, len(first) + 1)) and len(first) <= 3, first
    proc = subprocess.run(_resume_args(runs, "every", "--num-cpus", "2"), capture_output=True, text=True,
                          timeout=600, env=_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (name, df), = _trials(runs / "every").items()
    epochs = [int(e) for e in df["epoch"]]
    # Epoch 2's record replayed, then on. The rows before it are the log as the killed driver left
    # it on storage: usually every row read above, but once in CI (under load) Tune's resumed
    # driver wrote its older local copy over it and the rows of epochs 1-2 were gone (the
    # checkpoint's own records, checked below, are whole either way).
    assert epochs[-4:] == [2, 3, 4, 5], epochs
    assert epochs[:-4] == first[:len(epochs) - 4], (epochs, first)
    assert df["knn_top1"].notna().all()
    # The Train run keeps one checkpoint: the last epoch's, always handed over.
    ckpts = sorted(p for p in (runs / "every" / "train_runs").glob("*/checkpoint_*") if p.is_dir())
    assert len(ckpts) == 1
    assert [m["epoch"] for m in json.loads((ckpts[0] / CHECKPOINT_METRICS).read_text())] == [1, 2, 3, 4, 5]
    assert "Reporting training result" not in proc.stdout + proc.stderr
