"""Read a ``pcl_tune.search`` experiment folder into two pandas DataFrames.

An experiment folder (``<storage-path>/<name>/``) holds ``space.json`` (the resolved search space),
``search_space.yaml``, ``optuna.db`` (TPE searches), Tune's ``experiment_state-*.json`` and one
``trial_<id>/`` folder per trial with ``params.json``, ``result.json`` (JSON lines, one per epoch),
``progress.csv``, the latest ``checkpoint_*/`` and ``error.txt`` when the trial errored.

Everything that can be read is read: a truncated ``result.json`` line, a missing ``params.json`` or
an unreadable state file produce an :class:`AnalysisWarning` that names the file (also kept in
:attr:`Experiment.warnings`), and the partial data stay in the tables.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

SPACE_JSON = "space.json"
SPACE_YAML = "search_space.yaml"
OPTUNA_DB = "optuna.db"

STATUSES = ("finished", "stopped", "errored", "running")
"""Trial status values: ``finished`` (reached ``max_t`` epochs), ``stopped`` (ended earlier: ASHA
stopped it), ``errored`` (the trial raised; ``error`` holds the message), ``running`` (no terminal
result yet: the search is still running or was interrupted)."""

# Fields Tune adds to every result; they are kept in ``epochs`` but are not metrics.
TUNE_FIELDS = frozenset({
    "timestamp", "should_checkpoint", "done", "training_iteration", "trial_id", "date", "time_this_iter_s",
    "time_total_s", "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore",
    "checkpoint_dir_name", "node_id", "config", "logdir", "experiment_tag", "experiment_id",
})
NOT_METRICS = TUNE_FIELDS | {"epoch", "clusters"}
# Metrics whose "best" value means nothing (a schedule value, a count): only their last value is kept.
NO_BEST_PREFIXES = ("lr", "num_clusters")


class AnalysisError(Exception):
    """A folder that cannot be analysed; the message is one line and names the folder."""


class EmptyExperimentError(AnalysisError):
    """An experiment folder without any trial result yet."""


class AnalysisWarning(UserWarning):
    """Partial or damaged data that were loaded anyway; the message names the file."""


def metric_direction(metric: str, objective: str | None = None, mode: str = "max") -> str:
    """``"min"`` or ``"max"``: what counts as better for ``metric``.

    The objective follows the search's ``mode``; ``loss*`` and ``time_*`` are minimised; everything
    else (accuracies, kNN, NMI/AMI, throughput) is maximised.
    """
    if objective is not None and metric == objective:
        return mode
    if metric.startswith(("loss", "time")):
        return "min"
    return "max"


def metric_unit(metric: str) -> str:
    """Unit of a reported metric for axis labels: accuracies are in percent, times in seconds."""
    if metric.startswith("acc") or metric == "knn_top1":
        return "%"
    if metric.startswith("time"):
        return "s"
    if metric == "images_per_s":
        return "images/s"
    return ""


def metric_label(metric: str) -> str:
    """``"knn_top1 (%)"``: the metric with its unit, for axis labels and table headers."""
    unit = metric_unit(metric)
    return f"{metric} ({unit})" if unit else metric


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter, as recorded in ``space.json``."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()
    log: bool = False
    step: int | None = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def numeric(self) -> bool:
        """Ranges (uniform, loguniform, int) are numeric; choices are categorical."""
        return self.kind in ("uniform", "loguniform", "int")

    def describe(self) -> str:
        """``"loguniform [0.01, 0.3]"``, ``"choice [a, b]"``, with the condition if any."""
        if self.kind == "choice":
            text = f"choice {list(self.choices)}"
        else:
            text = f"{self.kind} [{self.low}, {self.high}]" + (" log" if self.log and self.kind == "int" else "")
        if self.when:
            text += "; when " + ", ".join(f"{k} in {list(v)}" for k, v in self.when)
        return text


@dataclass
class SpaceInfo:
    """What was searched: ``space.json`` plus the searcher/ASHA settings of ``search_space.yaml``."""

    name: str
    metric: str
    mode: str
    fixed: dict[str, Any]
    params: list[ParamSpec]
    num_samples: int | None = None
    max_t: int | None = None
    grace_period: int | None = None
    reduction_factor: int | None = None
    asha: bool = True
    algorithm: str = "tpe"
    executor: str | None = None
    workers_per_trial: int | None = None
    smoke: bool = False
    command: str | None = None
    started: str | None = None
    description: str = ""
    inferred: bool = False
    """True when there was no ``space.json`` and this was pieced together from the trials."""
    raw: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> ParamSpec | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def rungs(self) -> list[int]:
        """ASHA's milestones (epochs at which trials can be stopped), empty without ASHA."""
        if not self.asha or not self.grace_period or not self.reduction_factor or not self.max_t:
            return []
        out, t = [], self.grace_period
        while t < self.max_t:
            out.append(int(t))
            t *= self.reduction_factor
        return out


@dataclass
class TrialState:
    """A trial as Tune's ``experiment_state-*.json`` last saw it."""

    trial_id: str
    status: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    start_time: float | None = None
    num_failures: int = 0
    snapshot_time: float = 0.0
    """Modification time of the state file this was read from."""


@dataclass
class RawTrial:
    """Everything read from one ``trial_<id>/`` folder (internal)."""

    trial_id: str
    path: Path
    params: dict[str, Any]
    records: list[dict[str, Any]]
    error: str | None
    error_text: str | None
    error_mtime: float | None
    checkpoint: str | None
    state: TrialState | None


class _Notes:
    """Collects warnings: emitted as AnalysisWarning and kept for the report."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def warn(self, message: str) -> None:
        self.items.append(message)
        warnings.warn(message, AnalysisWarning, stacklevel=3)


# --------------------------------------------------------------------------- files

def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _read_space(exp: Path, notes: _Notes) -> dict[str, Any] | None:
    f = exp / SPACE_JSON
    if not f.is_file():
        return None
    try:
        data = _read_json(f)
    except (OSError, ValueError) as e:
        notes.warn(f"{f}: unreadable ({e}); the search space is inferred from the trials")
        return None
    if not isinstance(data, dict):
        notes.warn(f"{f}: expected a JSON object; the search space is inferred from the trials")
        return None
    return data


def _read_space_yaml(exp: Path, notes: _Notes) -> dict[str, Any]:
    f = exp / SPACE_YAML
    if not f.is_file():
        return {}
    try:
        import yaml

        data = yaml.safe_load(f.read_text())
    except Exception as e:  # a damaged copy only loses the description / searcher details
        notes.warn(f"{f}: unreadable ({type(e).__name__}); searcher and ASHA settings taken from space.json")
        return {}
    return data if isinstance(data, dict) else {}


def _param_spec(d: dict[str, Any]) -> ParamSpec:
    when = tuple((str(k), tuple(v) if isinstance(v, (list, tuple)) else (v,)) for k, v in (d.get("when") or []))
    return ParamSpec(name=str(d["name"]), kind=str(d.get("kind", "choice")), low=d.get("low"), high=d.get("high"),
                     choices=tuple(d.get("choices") or ()), log=bool(d.get("log", False)), step=d.get("step"),
                     when=when)


def read_records(trial_dir: Path, notes: _Notes) -> list[dict[str, Any]]:
    """The trial's results, one dict per reported epoch, from ``result.json`` (or ``progress.csv``).

    Lines that are not valid JSON (a result being written when the search was killed) are skipped
    with a warning naming the file and line. When ``progress.csv`` holds more results than the
    readable part of ``result.json``, it is used instead (with a warning).
    """
    records: list[dict[str, Any]] = []
    rj = trial_dir / "result.json"
    if rj.is_file():
        try:
            lines = rj.read_text(errors="replace").splitlines()
        except OSError as e:
            notes.warn(f"{rj}: unreadable ({e})")
            lines = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                what = "truncated last line" if i == len(lines) else f"invalid JSON on line {i}"
                notes.warn(f"{rj}: {what} skipped ({len(line)} characters); the other results are kept")
                continue
            if isinstance(rec, dict):
                records.append(rec)
    pc = trial_dir / "progress.csv"
    if pc.is_file() and pc.stat().st_size > 0:
        try:
            df = pd.read_csv(pc)
        except Exception as e:
            if not records:
                notes.warn(f"{pc}: unreadable ({type(e).__name__}: {e})")
            df = None
        if df is not None and len(df) > len(records):
            if records or rj.is_file():
                notes.warn(f"{rj}: {len(records)} readable result(s) but {pc.name} has {len(df)}; using {pc.name}")
            df = df[[c for c in df.columns if not str(c).startswith("config/")]]
            records = [{k: _scalar(v) for k, v in row.items()} for row in df.to_dict("records")]
    return records


def _scalar(v: Any) -> Any:
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


def _read_error(trial_dir: Path) -> tuple[str | None, str | None]:
    """(one-line message, full text) of ``error.txt``; ``error.pkl`` alone gives a pointer to it."""
    txt = trial_dir / "error.txt"
    if txt.is_file():
        try:
            text = txt.read_text(errors="replace")
        except OSError as e:
            return f"error.txt unreadable: {e}", None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        message = lines[-1] if lines else "error.txt is empty"
        return message[:500], text
    pkl = trial_dir / "error.pkl"
    if pkl.is_file():
        return f"errored (pickled exception in {pkl})", None
    return None, None


def _latest_checkpoint(trial_dir: Path) -> str | None:
    ckpts = sorted(d for d in trial_dir.glob("checkpoint_*") if d.is_dir())
    return str(ckpts[-1]) if ckpts else None


def read_trial_states(exp: Path, notes: _Notes) -> dict[str, TrialState]:
    """Trial status / config / start time from the newest ``experiment_state-*.json`` (if any)."""
    files = sorted(exp.glob("experiment_state-*.json"), key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        return {}
    f = files[-1]
    try:
        data = _read_json(f)
        entries = data["trial_data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        notes.warn(f"{f}: unreadable Tune state ({type(e).__name__}); trial status taken from the results only")
        return {}
    out: dict[str, TrialState] = {}
    snapshot = f.stat().st_mtime
    for entry in entries:
        try:
            meta = json.loads(entry[0]) if isinstance(entry[0], str) else dict(entry[0])
            runtime = json.loads(entry[1]) if len(entry) > 1 and isinstance(entry[1], str) else {}
            tid = str(meta["trial_id"])
            start = runtime.get("start_time")
            out[tid] = TrialState(
                trial_id=tid, status=meta.get("status"),
                config=meta.get("config") if isinstance(meta.get("config"), dict) else {},
                start_time=float(start) if start not in (None, "None") else None,
                num_failures=int(runtime.get("num_failures") or 0), snapshot_time=snapshot,
            )
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    return out


def read_trial(trial_dir: Path, state: TrialState | None, notes: _Notes) -> RawTrial:
    """One ``trial_<id>/`` folder; missing or damaged files are warned about, never fatal."""
    tid = trial_dir.name.removeprefix("trial_")
    records = read_records(trial_dir, notes)
    params: dict[str, Any] | None = None
    pj = trial_dir / "params.json"
    if pj.is_file():
        try:
            loaded = _read_json(pj)
            params = loaded if isinstance(loaded, dict) else None
            if params is None:
                notes.warn(f"{pj}: expected a JSON object")
        except (OSError, ValueError) as e:
            notes.warn(f"{pj}: unreadable ({type(e).__name__})")
    if params is None:
        source = None
        cfg = next((r["config"] for r in reversed(records) if isinstance(r.get("config"), dict)), None)
        if cfg is not None:
            params, source = dict(cfg), "the 'config' of its results"
        elif state is not None and state.config:
            params, source = dict(state.config), "Tune's experiment state"
        else:
            params = {}
        if pj.is_file():
            pass  # already warned about
        elif source:
            notes.warn(f"{pj}: missing; parameters recovered from {source}")
        else:
            notes.warn(f"{pj}: missing and no other record of the parameters; they are shown as NaN")
    error, error_text = _read_error(trial_dir)
    err_files = [f for f in (trial_dir / "error.txt", trial_dir / "error.pkl") if f.is_file()]
    error_mtime = max(f.stat().st_mtime for f in err_files) if err_files else None
    return RawTrial(trial_id=tid, path=trial_dir, params=params, records=records, error=error,
                    error_text=error_text, error_mtime=error_mtime, checkpoint=_latest_checkpoint(trial_dir),
                    state=state)


# --------------------------------------------------------------------------- tables

def _epochs_table(raw: list[RawTrial], notes: _Notes) -> pd.DataFrame:
    frames = []
    for t in raw:
        if not t.records:
            continue
        df = pd.DataFrame([{k: v for k, v in r.items() if k != "config"} for r in t.records])
        df["trial_id"] = t.trial_id
        if "epoch" not in df.columns:
            df["epoch"] = df["training_iteration"] if "training_iteration" in df.columns else np.arange(1, len(df) + 1)
        df["epoch"] = pd.to_numeric(df["epoch"], errors="coerce")
        dup = df["epoch"].duplicated(keep="last")
        if dup.any():
            notes.warn(f"{t.path / 'result.json'}: epoch(s) {sorted(df.loc[dup, 'epoch'].astype(int).tolist())} "
                       "reported more than once (trial restored); the last report of each is kept")
            df = df[~dup]
        frames.append(df.sort_values("epoch", kind="stable"))
    if not frames:
        return pd.DataFrame({"trial_id": pd.Series(dtype=str), "epoch": pd.Series(dtype=int)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # concat of all-NaN columns
        ep = pd.concat(frames, ignore_index=True, sort=False)
    ep["epoch"] = ep["epoch"].astype("int64")
    first = ["trial_id", "epoch"]
    return ep[first + [c for c in ep.columns if c not in first]]


def metric_columns(epochs: pd.DataFrame) -> list[str]:
    """Numeric metric columns of ``epochs`` (Tune's bookkeeping fields excluded), in report order."""
    out = []
    for c in epochs.columns:
        if c in NOT_METRICS or c == "trial_id":
            continue
        if pd.api.types.is_bool_dtype(epochs[c]):
            continue
        if pd.api.types.is_numeric_dtype(epochs[c]):
            out.append(c)
    return out


def _status(t: RawTrial, epochs_run: int, max_t: int | None) -> str:
    """See :data:`STATUSES`.

    Tune marks a trial's last result ``done`` only when the trial ends, and its state file says
    ERROR / TERMINATED / RUNNING as of its last snapshot. A trial that failed, was restarted and
    then ended keeps its ``error.txt`` (and message) but is not errored; an ``error.txt`` newer than
    a RUNNING snapshot means the snapshot is stale and the trial errored.
    """
    state = t.state.status if t.state is not None else None
    if state == "ERROR":
        return "errored"
    if max_t is not None and epochs_run >= max_t:
        return "finished"
    last_done = bool(t.records[-1].get("done")) if t.records else False
    if last_done or state == "TERMINATED":
        return "stopped"
    if t.error is not None:
        retrying = (state in ("RUNNING", "PENDING", "PAUSED") and t.state is not None
                    and t.error_mtime is not None and t.state.snapshot_time >= t.error_mtime)
        return "running" if retrying else "errored"
    return "running"


def _best(series: pd.Series, direction: str) -> tuple[float, Any]:
    s = pd.to_numeric(series, errors="coerce").dropna()
    if s.empty:
        return math.nan, None
    idx = s.idxmax() if direction == "max" else s.idxmin()
    return float(s.loc[idx]), idx


def build_trials_table(raw: list[RawTrial], epochs: pd.DataFrame, space: SpaceInfo) -> pd.DataFrame:
    """One row per trial; see :attr:`Experiment.trials` for the columns."""
    metrics = metric_columns(epochs)
    param_names = list(space.param_names)
    for t in raw:
        for k in t.params:
            if k not in param_names:
                param_names.append(k)
    by_trial = {tid: df for tid, df in epochs.groupby("trial_id", sort=False)} if len(epochs) else {}
    rows = []
    for order, t in enumerate(raw):
        df = by_trial.get(t.trial_id)
        n = 0 if df is None else int(df["epoch"].nunique())
        row: dict[str, Any] = {"trial_id": t.trial_id,
                               "status": _status(t, n, space.max_t)}
        for p in param_names:
            row[p] = t.params.get(p, np.nan)
        row["epochs"] = n
        obj = f"best_{space.metric}"
        if df is not None and space.metric in df.columns:
            value, idx = _best(df[space.metric], space.mode)
            row["best_epoch"] = int(df.loc[idx, "epoch"]) if idx is not None else np.nan
        else:
            value, row["best_epoch"] = math.nan, np.nan
        row[obj] = value
        row["wall_time_s"] = float(pd.to_numeric(df["time_total_s"], errors="coerce").max()) \
            if df is not None and "time_total_s" in df.columns else np.nan
        row["train_time_s"] = float(pd.to_numeric(df["time_epoch"], errors="coerce").sum()) \
            if df is not None and "time_epoch" in df.columns else np.nan
        start = t.state.start_time if t.state is not None else None
        if start is None and df is not None and {"timestamp", "time_total_s"} <= set(df.columns):
            first = df.iloc[0]
            start = float(first["timestamp"]) - float(first["time_total_s"])
        if start is None:
            try:
                start = t.path.stat().st_mtime
            except OSError:
                start = math.nan
        row["start_time"] = start
        row["checkpoint"] = t.checkpoint
        row["error"] = t.error
        row["trial_dir"] = str(t.path)
        row["_order"] = order
        for m in metrics:
            col = df[m] if df is not None and m in df.columns else None
            valid = pd.to_numeric(col, errors="coerce").dropna() if col is not None else pd.Series(dtype=float)
            row[f"last_{m}"] = float(valid.iloc[-1]) if len(valid) else math.nan
            if m != space.metric and not m.startswith(NO_BEST_PREFIXES):
                row[f"best_{m}"] = _best(valid, metric_direction(m))[0] if len(valid) else math.nan
        rows.append(row)
    trials = pd.DataFrame(rows)
    if trials.empty:
        return trials
    trials = trials.sort_values(["start_time", "_order"], kind="stable").drop(columns="_order")
    trials.insert(2, "order", np.arange(len(trials)))
    return trials.reset_index(drop=True)


def build_space(exp: Path, data: dict[str, Any] | None, yml: dict[str, Any], raw: list[RawTrial],
                notes: _Notes, metric: str | None, mode: str | None) -> SpaceInfo:
    """The :class:`SpaceInfo` of ``space.json``, or one inferred from the trials when it is missing."""
    searcher = yml.get("searcher") if isinstance(yml.get("searcher"), dict) else {}
    asha = yml.get("asha") if isinstance(yml.get("asha"), dict) else {}
    objective = yml.get("objective") if isinstance(yml.get("objective"), dict) else {}
    if data is not None:
        params = []
        for d in data.get("params") or []:
            try:
                params.append(_param_spec(d))
            except (KeyError, TypeError, ValueError):
                notes.warn(f"{exp / SPACE_JSON}: parameter entry {d!r} not understood; skipped")
        space = SpaceInfo(
            name=str(data.get("name") or exp.name), metric=str(data.get("metric") or "knn_top1"),
            mode=str(data.get("mode") or "max"), fixed=dict(data.get("fixed") or {}), params=params,
            num_samples=data.get("num_samples"), max_t=data.get("max_t"), grace_period=data.get("grace_period"),
            reduction_factor=data.get("reduction_factor"), asha=bool(asha.get("enabled", True)),
            algorithm=str(searcher.get("algorithm", "tpe" if (exp / OPTUNA_DB).is_file() else "grid")),
            executor=data.get("executor"), workers_per_trial=data.get("workers_per_trial"),
            smoke=bool(data.get("smoke", False)), command=data.get("command"), started=data.get("started"),
            description=str(yml.get("description") or "").strip(), raw=data,
        )
    else:
        if raw:
            notes.warn(f"{exp / SPACE_JSON}: missing; the searched parameters, max_t and the objective are "
                       "inferred from the trials")
        names: list[str] = []
        for t in raw:
            names += [k for k in t.params if k not in names]
        params = []
        for n in names:
            values = [t.params[n] for t in raw if n in t.params]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            distinct = sorted({json.dumps(v, sort_keys=True, default=str) for v in values})
            if numeric and len(distinct) > 6:
                params.append(ParamSpec(n, "uniform", low=min(values), high=max(values)))
            else:
                params.append(ParamSpec(n, "choice", choices=tuple(json.loads(d) for d in distinct)))
        epochs = [len(t.records) for t in raw]
        fixed = dict(yml.get("fixed") or {})
        space = SpaceInfo(name=str(yml.get("name") or exp.name), metric=str(objective.get("metric") or "knn_top1"),
                          mode=str(objective.get("mode") or "max"), fixed=fixed, params=params,
                          max_t=(asha.get("max_t") or fixed.get("epochs") or (max(epochs) if epochs else None)),
                          grace_period=asha.get("grace_period"), reduction_factor=asha.get("reduction_factor"),
                          asha=bool(asha.get("enabled", True)) if asha else False,
                          algorithm=str(searcher.get("algorithm", "tpe" if (exp / OPTUNA_DB).is_file() else "grid")),
                          description=str(yml.get("description") or "").strip(), inferred=True)
    if metric is not None:
        if mode is None:
            mode = space.mode if metric == space.metric else metric_direction(metric)
        space.metric = metric
    if mode is not None:
        if mode not in ("min", "max"):
            raise AnalysisError(f"mode must be min or max, got {mode!r}")
        space.mode = mode
    return space


def _trial_dirs(exp: Path) -> list[Path]:
    return sorted(d for d in exp.glob("trial_*") if d.is_dir())


def is_experiment(path: Path) -> bool:
    """A folder with ``space.json`` or at least one ``trial_*`` folder."""
    return path.is_dir() and ((path / SPACE_JSON).is_file() or bool(_trial_dirs(path)))


def read_experiment(run_dir: str | Path, metric: str | None = None, mode: str | None = None
                    ) -> tuple[Path, SpaceInfo, list[RawTrial], pd.DataFrame, pd.DataFrame, list[str], bool]:
    """Read every file (internal; use :func:`analysis.load`)."""
    exp = Path(run_dir).expanduser()
    if not exp.exists():
        raise AnalysisError(f"{exp}: no such folder")
    if not exp.is_dir():
        raise AnalysisError(f"{exp}: not a folder (pass an experiment folder, <storage-path>/<name>)")
    exp = exp.resolve()
    if not is_experiment(exp):
        raise AnalysisError(f"{exp}: not a pcl_tune experiment (no {SPACE_JSON} and no trial_* folders)")
    notes = _Notes()
    data = _read_space(exp, notes)
    yml = _read_space_yaml(exp, notes)
    states = read_trial_states(exp, notes)
    raw = [read_trial(d, states.get(d.name.removeprefix("trial_")), notes) for d in _trial_dirs(exp)]
    search_done = (exp / "trials.csv").is_file()
    space = build_space(exp, data, yml, raw, notes, metric, mode)
    epochs = _epochs_table(raw, notes)
    if len(epochs) and space.metric not in epochs.columns:
        known = ", ".join(metric_columns(epochs))
        raise AnalysisError(f"{exp}: metric {space.metric!r} was never reported; reported metrics: {known}")
    trials = build_trials_table(raw, epochs, space)
    return exp, space, raw, trials, epochs, notes.items, search_done
