""":class:`Experiment`: a loaded experiment folder with its tables and summaries."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pcl_tune import experiment_folder
from pcl_tune.experiment_folder import BEST_YAML, OPTUNA_DB, Best, best_epoch
from pcl_tune.space import ARM_KEY, BASELINE_ARM, SearchSpace

from . import summaries, verdicts
from .errors import AnalysisError, EmptyExperimentError
from .importance import MIN_TRIALS, Importance, compute_importance
from .loader import FolderContents, read_experiment
from .study import open_study
from .tables import metric_columns

if TYPE_CHECKING:
    import optuna

ANALYSIS_DIR = "analysis"
"""Sub-folder of the experiment that receives the tables and plots of the report."""


@dataclass(frozen=True)
class BestTrial(Best):
    """The best (trial, epoch) of the search for the objective
    (:func:`pcl_tune.experiment_folder.best_epoch`), with what the analysis knows of that trial."""

    status: str
    params: dict[str, Any]
    """The trial's searched parameters (dotted keys), as it ran them."""
    checkpoint: str | None
    """The trial's latest checkpoint (Tune keeps one: it may be later than the best epoch)."""
    trial_dir: str


class Experiment:
    """An experiment folder of ``python -m pcl_tune.search``, loaded.

    Attributes:
        path: the experiment folder.
        space: the :class:`pcl_tune.space.SearchSpace` that was searched (read from
            ``space.json``; inferred from the trials when it is missing: see ``space_inferred``).
        run: how the search ran (``executor``, ``workers_per_trial``, ``smoke``, ``command``,
            ``started``); {} when unknown.
        space_inferred: True when there was no readable ``space.json`` and :attr:`space` was
            pieced together from the trials.
        metric, mode: the objective analysed: the search's unless overridden at load time.
        trials: one row per trial, in start order. Columns: ``trial_id``; ``status`` (finished:
            ran ``max_t`` epochs / stopped: ended earlier, ASHA stopped it / errored / running: no
            terminal result yet); ``order`` (0 = started first); one column per searched parameter
            (dotted name, e.g. ``optim.lr``; NaN where a conditional parameter was not sampled);
            ``epochs`` (the last epoch its model reached); ``best_epoch`` (epoch of the trial's best objective);
            ``best_<metric>`` (best value over the trial's epochs, NaN if never reported) and
            ``last_<metric>``: the trial's score is one of them (:attr:`objective_col`); ``wall_time_s`` (Tune's ``time_total_s``: trial start-up included);
            ``train_time_s`` (sum of ``time_epoch``); ``start_time`` (unix seconds);
            ``checkpoint`` (latest checkpoint folder or None); ``error`` (last line of
            ``error.txt``, None if none); ``trial_dir``; then for every numeric metric M the
            trial reported: ``last_M`` (last non-NaN value) and ``best_M`` (in the direction
            :func:`pcl_tune.metrics.direction` gives; only where :func:`pcl_tune.metrics.has_best`,
            so not for ``lr`` and ``num_clusters_*``). Units: :func:`pcl_tune.metrics.unit`.
        epochs: one row per trial and epoch, in start order then epoch. Columns ``trial_id``,
            ``epoch``, then every field of the result: the loop's metrics (the registry,
            :data:`pcl_tune.metrics.REGISTRY`: ``loss``, ``acc_inst`` %, ``knn_top1`` %,
            ``time_*`` s, per level ``acc_proto_i`` %, ``num_clusters_i``, ...; prototype metrics
            are NaN in warm-up epochs), ``clusters``, and Tune's fields (``training_iteration``,
            ``time_this_iter_s``, ``time_total_s``, ``done``, ``date``, ``timestamp``,
            ``checkpoint_dir_name``, ...).
        warnings: messages about damaged or partial files (also emitted as AnalysisWarning).
        complete: whether the search wrote its end-of-search files (``trials.csv``).
    """

    def __init__(self, contents: FolderContents) -> None:
        self.path = contents.path
        self.space: SearchSpace = contents.space
        self.run = contents.run
        self.space_inferred = contents.space_inferred
        self.metric = contents.metric
        self.mode = contents.mode
        self.trials = contents.trials
        self.epochs = contents.epochs
        self.warnings = contents.warnings
        self.complete = contents.complete
        self._raw = {t.trial_id: t for t in contents.raw}
        self._cache: dict[Any, Any] = {}  # noise and comparisons: read by the leaderboard, the baseline
        # check, the figures and the report sections alike (the tables above are never changed)

    # ------------------------------------------------------------------ basics
    @property
    def objective_col(self) -> str:
        """Column of :attr:`trials` with each trial's score: ``last_<metric>`` or ``best_<metric>``, as
        the space's ``objective.score`` says (the rule Optuna and the search's summary used)."""
        return f"{self.score}_{self.metric}"

    @property
    def score(self) -> str:
        """``last`` or ``best``: how a trial is scored (the space's ``objective.score``)."""
        return self.space.score if self.space.score in ("last", "best") else "last"

    @property
    def own_objective(self) -> bool:
        """Whether the analysed objective is the one the search optimised (Optuna's study is
        about that one only)."""
        return self.space_inferred or (self.space.metric, self.space.mode) == (self.metric, self.mode)

    @property
    def params(self) -> list[str]:
        """Searched parameter columns of :attr:`trials`."""
        names = self.space.param_names
        extra: list[str] = []
        for t in self._raw.values():
            extra += [k for k in t.params if k not in names and k not in extra]
        return [p for p in names if p in self.trials.columns] + extra

    @property
    def pcl_trials(self) -> pd.DataFrame:
        """:attr:`trials` without the MoCo v2 baseline trial(s) (arm ``moco_v2``): what the
        parameter summaries (effects, importance, loss comparisons) are computed on."""
        if ARM_KEY not in self.trials.columns:
            return self.trials
        return self.trials[self.trials[ARM_KEY].astype(str) != BASELINE_ARM]

    @property
    def searched_params(self) -> list[str]:
        """The searched parameters (the space's, when it is known; else :attr:`params`)."""
        if self.space_inferred or not self.space.params:
            return [p for p in self.params if p != ARM_KEY]
        return [p for p in self.space.param_names if p in self.trials.columns]

    def is_numeric(self, param: str) -> bool:
        """Whether a searched parameter is a numeric range (else categorical)."""
        spec = self.space.param(param)
        if spec is not None:
            return spec.numeric
        s = self.trials[param].dropna() if param in self.trials.columns else pd.Series(dtype=object)
        return bool(len(s)) and pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)

    @property
    def metrics(self) -> list[str]:
        """Numeric metrics reported per epoch."""
        return metric_columns(self.epochs)

    @property
    def max_t(self) -> int | None:
        """The full budget of a trial in epochs (None when unknown)."""
        return self.space.max_t

    def rungs(self) -> list[int]:
        """ASHA's milestones (epochs at which trials could be stopped); empty without ASHA."""
        return self.space.rungs() if self.space.max_t is not None else []

    @property
    def has_results(self) -> bool:
        return bool(len(self.epochs))

    def require_results(self) -> None:
        """Raise :class:`EmptyExperimentError` when no trial reported anything yet."""
        if not self.has_results:
            n = len(self.trials)
            what = f"{n} trial folder(s) but no trial result yet" if n else "no trial folders yet"
            raise EmptyExperimentError(f"{self.path}: empty experiment: {what} (is the search still starting?)")
        if not pd.to_numeric(self.epochs[self.metric], errors="coerce").notna().any():
            raise EmptyExperimentError(f"{self.path}: no trial has reported a value of {self.metric} yet "
                                       f"({len(self.epochs)} epoch result(s), all NaN: still in warm-up?)")

    def __repr__(self) -> str:
        return (f"Experiment({str(self.path)!r}, trials={len(self.trials)}, epochs={len(self.epochs)}, "
                f"metric={self.metric!r}, mode={self.mode!r})")

    # ------------------------------------------------------------------ best
    def best(self) -> BestTrial:
        """The best trial by its score (:attr:`score`: its last or its best epoch; ties: the trial
        that started first), as :func:`pcl_tune.experiment_folder.best_epoch` defines it."""
        self.require_results()
        b = best_epoch(self.epochs, self.metric, self.mode, self.score, self.max_t)
        if b is None:  # require_results saw a number; only infinities are left
            raise EmptyExperimentError(f"{self.path}: no finite value of {self.metric} reported yet")
        raw = self._raw[b.trial_id]
        status = self.trials.set_index("trial_id").loc[b.trial_id, "status"]
        return BestTrial(b.trial_id, b.epoch, b.value, b.metric, b.mode, status=str(status),
                         params=dict(raw.params), checkpoint=raw.checkpoint, trial_dir=str(raw.path))

    def best_config(self) -> dict[str, Any]:
        """The full (nested) config of the best trial (:func:`pcl_tune.experiment_folder.best_config`)."""
        return experiment_folder.best_config(self.space.fixed, self.best().params)

    def best_yaml_path(self) -> Path:
        """``best.yaml`` for the search's own objective, ``best_<metric>_<mode>.yaml`` otherwise."""
        if self.own_objective:
            return self.path / BEST_YAML
        return self.path / f"best_{self.metric}_{self.mode}.yaml"

    def write_best_yaml(self, overwrite: bool = False) -> Path:
        """Write the best config (see :meth:`best_config`) unless the search already wrote it."""
        path = self.best_yaml_path()
        if path.is_file() and not overwrite:
            return path
        return experiment_folder.write_best_yaml(path, self.space.fixed, self.best().params)

    def rerun_command(self) -> str:
        """The command that re-trains the best configuration from scratch."""
        cfg = self.best_yaml_path()
        out = self.path / "best_rerun"
        return f"python -m pcl_tune.train --config {shlex.quote(str(cfg))} --out {shlex.quote(str(out))}"

    # ------------------------------------------------------------------ summaries
    def leaderboard(self, top: int = 10) -> pd.DataFrame:
        """Top trials by objective; columns in :func:`analysis.summaries.leaderboard`, plus ``arm``
        (``moco_v2`` marks the baseline), ``gap`` (behind the best, in the objective's unit) and
        ``vs_best`` (``"within noise"`` when the gap is below :meth:`noise`'s resolution)."""
        board = summaries.leaderboard(self.trials, self.objective_col, self.mode, top, self.params,
                                      finished_first=self.score == "last")
        if not len(board):
            return board
        best = board[self.objective_col].iloc[0]
        gap = (best - board[self.objective_col]) if self.mode == "max" else (board[self.objective_col] - best)
        res = self.noise().resolution
        pos = board.columns.get_loc(self.objective_col) + 1
        board.insert(pos, "gap", gap)
        board.insert(pos + 1, "vs_best", ["best" if i == 0 else ("within noise" if (not math.isnan(res) and g < res)
                                                                 else ("" if math.isnan(res) else "behind"))
                                          for i, g in enumerate(gap)])
        return board

    def best_so_far(self) -> pd.DataFrame:
        """Objective per trial in start order with the running best (:func:`summaries.best_so_far`)."""
        return summaries.best_so_far(self.trials, self.objective_col, self.mode)

    def effects(self, bins: int = 4) -> pd.DataFrame:
        """Objective statistics per parameter value (:func:`summaries.effects`)."""
        return summaries.effects(self.pcl_trials, self.searched_params, self.objective_col, bins, self.choice_orders())

    def compute(self) -> pd.DataFrame:
        """Compute accounting, one row (:func:`summaries.compute_accounting`)."""
        return summaries.compute_accounting(self.trials, self.max_t, self.epochs)

    def comparisons(self, confidence: float = 0.95) -> list[verdicts.GroupComparison]:
        """Duplicate-handling / prototype-loss tables (:func:`summaries.loss_comparisons`), each at
        one budget so that like is compared with like: on finished trials at the full budget, and,
        when ASHA stopped some trials, on every trial at the largest epoch all of them reached. Each
        names the other searched parameters that differ between its groups (confounders). Empty
        when neither setting varies, and for an ablation (see :meth:`verdicts`)."""
        from pcl_tune.config import flatten, unflatten

        key = ("comparisons", confidence)
        if key in self._cache:
            return self._cache[key]
        if self.space.is_ablation:
            return self._cache.setdefault(key, [])
        fixed_loss = flatten(unflatten(self.space.fixed)).get(summaries.PROTO_LOSS)
        out: list[verdicts.GroupComparison] = []
        for budget, values in self.budget_views():
            d = self.pcl_trials[self.pcl_trials["trial_id"].isin(values.index)].copy()
            d["_value"] = d["trial_id"].map(values)
            for name, table in summaries.loss_comparisons(d, "_value", self.mode, confidence, self.choice_orders(),
                                                          fixed_loss=fixed_loss).items():
                by = [c for c in table.columns if c in d.columns or c == "loss_variant"]
                if "loss_variant" in by:
                    d["loss_variant"] = summaries.loss_variants(d)
                compared = by + ([summaries.PROTO_LOSS, summaries.DUPLICATES] if "loss_variant" in by else [])
                sub = d[d[summaries.PROTO_LOSS].isin(summaries.USES_DUPLICATES)] if (
                    name == "duplicates" and summaries.PROTO_LOSS in d.columns) else d
                out.append(verdicts.GroupComparison(
                    name, budget, verdicts.with_points(table, sub, by, "_value"),
                    verdicts.confounders(sub, compared, self.space.params), by))
        return self._cache.setdefault(key, out)

    def budget_views(self) -> list[tuple[str, pd.Series]]:
        """(label, each trial's objective at that budget) for like-for-like comparisons: finished
        trials at the full budget, and, when trials stopped early, every trial at the largest epoch
        all reached (ASHA's first rung, usually)."""
        views = []
        final = verdicts.final_values(self.pcl_trials, self.epochs, self.metric, self.max_t)
        if len(final):
            views.append((f"finished trials ({len(final)}) at their last epoch ({self.max_t or 'full budget'})", final))
        ran = self.pcl_trials[(self.pcl_trials["epochs"] > 0) & (self.pcl_trials["status"] != "errored")]
        if len(ran) and (ran["status"] == "stopped").any():
            common = int(ran["epochs"].min())
            at = verdicts.values_at(self.epochs, self.metric, common)
            at = at[at.index.isin(ran["trial_id"])]
            views.append((f"all {len(at)} trials at epoch {common} (the largest epoch every trial reached)", at))
        return views

    # ------------------------------------------------------------------ verdicts
    def noise(self) -> verdicts.Noise:
        """How precisely the objective is measured (binomial error on the validation split, seed
        spread): :func:`analysis.verdicts.objective_noise`."""
        if "noise" in self._cache:
            return self._cache["noise"]
        from pcl_tune.data import val_size

        try:
            n_val = val_size(self.space.base_config())
        except Exception:  # an inferred or foreign space: the size stays unknown
            n_val = None
        values = self.trials.set_index("trial_id")[self.objective_col]
        if self.space.is_ablation:
            values = verdicts.final_values(self.trials, self.epochs, self.metric, self.max_t)
        t = self.trials.set_index("trial_id").loc[values.index].assign(_v=values)
        noise = verdicts.objective_noise(t, self.metric, "_v", n_val, [p for p in self.params if p != "seed"])
        return self._cache.setdefault("noise", noise)

    def baseline_check(self) -> verdicts.BaselineCheck | None:
        """The best PCL trial against the MoCo v2 baseline trial at equal budget (TPE searches);
        None without a baseline trial."""
        return verdicts.baseline_check(self.trials, self.epochs, self.metric, self.noise())

    def verdicts(self, metric: str | None = None) -> verdicts.AblationResult | None:
        """The paired verdicts of an ablation for ``metric`` (default: the objective); None for a
        search that is not an ablation (no ``ablation`` section, or no seed column)."""
        if not self.space.is_ablation or "seed" not in self.trials.columns:
            return None
        metric = metric or self.metric
        if metric not in self.epochs.columns:
            raise AnalysisError(f"{self.path}: no trial reported {metric!r}")
        values = verdicts.final_values(self.trials, self.epochs, metric, self.max_t)
        return verdicts.ablation_verdicts(self.trials, values, metric, self.space.param_names, self.choice_orders(),
                                          self.space.reference or (next(iter(self.space.arms), None)))

    def verdict_metrics(self) -> list[str]:
        """Metrics an ablation gives verdicts for: ``ablation.metrics`` that were reported, else the
        objective."""
        wanted = self.space.ablation_metrics or [self.metric]
        return [m for m in dict.fromkeys([self.metric] + wanted) if m in self.epochs.columns]

    def choice_orders(self) -> dict[str, list[Any]]:
        """The listed order of each choice parameter's values (tables and plots follow it)."""
        orders: dict[str, list[Any]] = {p.name: list(p.choices) for p in self.space.params if p.kind == "choice"}
        orders[ARM_KEY] = list(self.space.arms) + [BASELINE_ARM]
        return orders

    @property
    def replicates(self) -> str:
        """What the confidence intervals of :meth:`comparisons` run over: ``"seeds"`` or ``"trials"``."""
        return "seeds" if "seed" in self.params else "trials"

    def study(self) -> optuna.Study | None:
        """The search's Optuna study (``optuna.db``), or None (a grid search, or none persisted).

        Its trial values are what the searcher was told: the objective at a trial's last epoch.
        """
        return open_study(self.path / OPTUNA_DB, self.space.name)[0]

    def importance(self, evaluator: str = "fanova", min_trials: int = MIN_TRIALS, seed: int = 0) -> Importance:
        """Parameter importance: Optuna's ``evaluator`` on ``optuna.db`` (fANOVA by default) when the
        study has at least ``min_trials`` completed trials, else the labelled simple fallback."""
        return compute_importance(self.pcl_trials, {p: self.is_numeric(p) for p in self.searched_params},
                                  self.objective_col,
                                  db=self.path / OPTUNA_DB, study_name=self.space.name, use_study=self.own_objective,
                                  evaluator=evaluator, min_trials=min_trials, seed=seed)

    def like_for_like_importance(self, evaluator: str = "fanova", min_trials: int = MIN_TRIALS,
                                 seed: int = 0) -> list[Importance]:
        """Importance on values at one budget (:func:`analysis.importance.importance_on_values`):
        every trial's objective at the first ASHA rung, and finished trials at the full budget (the
        baseline trial left out: its ``pcl.proto_weight`` is not searched). Empty for an ablation."""
        if self.space.is_ablation or not self.space.params:
            return []
        from .importance import importance_on_values

        pcl = self.pcl_trials
        out = []
        rungs = self.rungs()
        if rungs:
            at = verdicts.values_at(self.epochs, self.metric, rungs[0])
            at = at[at.index.isin(pcl["trial_id"])]
            out.append(importance_on_values(pcl, self._signed(at), self.space.params,
                                            f"every trial's {self.metric} at the first ASHA rung (epoch {rungs[0]})",
                                            evaluator=evaluator, min_trials=min_trials, seed=seed))
        final = verdicts.final_values(pcl, self.epochs, self.metric, self.max_t)
        out.append(importance_on_values(pcl, self._signed(final), self.space.params,
                                        f"finished trials' {self.metric} at the full budget (epoch {self.max_t})",
                                        evaluator=evaluator, min_trials=min_trials, seed=seed))
        return out

    def _signed(self, values: pd.Series) -> pd.Series:
        return values if self.mode == "max" else -values

    def summary(self) -> dict[str, Any]:
        """Headline numbers for side-by-side comparisons (see :func:`analysis.compare`)."""
        comp = self.compute().iloc[0]
        try:
            b = self.best()
            best_value, best_trial = b.value, b.trial_id
        except EmptyExperimentError:
            best_value, best_trial = math.nan, None
        return {"experiment": self.path.name, "path": str(self.path), "name": self.space.name,
                "metric": self.metric, "mode": self.mode, "best": best_value, "best_trial": best_trial,
                "trials": int(comp["trials"]), "finished": int(comp["finished"]), "stopped": int(comp["stopped"]),
                "errored": int(comp["errored"]), "running": int(comp["running"]),
                "pending": int(comp["pending"]), "max_t": comp["max_t"],
                "epochs_spent": int(comp["epochs_spent"]), "epochs_full_budget": comp["epochs_full_budget"],
                "saved_fraction": comp["saved_fraction"], "train_time_s": comp["train_time_s"],
                "complete": self.complete}

    # ------------------------------------------------------------------ saving
    def save(self, folder: str | Path | None = None) -> list[Path]:
        """Write ``trials`` and ``epochs`` as CSV and Parquet into ``folder`` (default
        ``<exp>/analysis/``); returns the paths written."""
        out = Path(folder) if folder is not None else self.path / ANALYSIS_DIR
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, df in (("trials", self.trials), ("epochs", self.epochs)):
            csv = out / f"{name}.csv"
            df.to_csv(csv, index=False)
            pq = out / f"{name}.parquet"
            _parquet_safe(df).to_parquet(pq, index=False)
            written += [csv, pq]
        return written


def _parquet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns mixing types (a choice of numbers and strings) become strings for Arrow."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object:
            kinds = {type(v) for v in out[c].dropna()}
            if len(kinds) > 1:
                out[c] = out[c].map(lambda v: v if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    return out


def load(run_dir: str | Path, *, metric: str | None = None, mode: str | None = None,
         allow_empty: bool = False) -> Experiment:
    """Load an experiment folder (``<storage-path>/<name>/`` of ``python -m pcl_tune.search``).

    Args:
        run_dir: the experiment folder.
        metric: objective to analyse (default: the search's); ``mode`` defaults to the search's
            for its own metric, else to the metric's direction in :mod:`pcl_tune.metrics`.
        allow_empty: return an experiment without results instead of raising.

    Raises:
        AnalysisError: not an experiment folder (no ``space.json`` and no ``trial_*`` folders),
            ``metric`` was never reported, or ``mode`` is neither min nor max.
        EmptyExperimentError: no trial has reported a result yet (unless ``allow_empty``).

    Damaged trial files produce :class:`~analysis.errors.AnalysisWarning` (kept in
    :attr:`Experiment.warnings`); their partial data are loaded.
    """
    exp = Experiment(read_experiment(run_dir, metric, mode))
    if not allow_empty:
        exp.require_results()
    return exp


def compare(experiments: list[Experiment]) -> pd.DataFrame:
    """Side-by-side headline numbers, one row per experiment.

    Columns: ``experiment`` (folder name), ``path``, ``name`` (space name), ``metric``, ``mode``,
    ``best`` (the best trial's score: its last or best epoch, ``objective.score``), ``best_trial``, ``trials``, ``finished``,
    ``stopped``, ``errored``, ``running``, ``pending``, ``max_t``, ``epochs_spent``, ``epochs_full_budget``,
    ``saved_fraction``, ``train_time_s``, ``complete``.
    """
    return pd.DataFrame([e.summary() for e in experiments])


__all__ = ["AnalysisError", "BestTrial", "EmptyExperimentError", "Experiment", "compare", "load"]
