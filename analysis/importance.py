"""Parameter importance: Optuna's evaluators on the persisted study, or a labelled simple fallback.

Optuna's importance (``optuna.importance.get_param_importances``) fits a model of the objective
on the completed trials of the study in ``optuna.db``. The study's value of a trial is what the
search's searcher (:mod:`pcl_tune.searcher`) told it: its score (``objective.score``, the last or
the best epoch's objective) when it finished. An ASHA-stopped trial is PRUNED there (or, with
``searcher.stopped_trials: complete`` and in searches made before that existed, COMPLETE with its
value at the stop). Optuna assesses only parameters present in every completed trial, so
conditional parameters drop out of its ranking.

Without a study (grid search), with too few completed trials, or for a metric other than the
search's objective, :func:`analysis.summaries.simple_importance` is used instead, and the result
says so.

Where stopped trials are COMPLETE, the study's values mix budgets: under ASHA most trials stop at
the first rung, so a model fitted on them mostly learns which settings *start* fast; where they are
PRUNED, the study holds only the finished trials, which may be few. :func:`importance_on_values` fits the same
evaluator on like-for-like values instead (an in-memory study built from the trials table): every
trial's objective at the first ASHA rung, and, separately, finished trials at the full budget.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pcl_tune.space import Param

from .study import completed, open_study
from .summaries import simple_importance

EVALUATORS = ("fanova", "ped_anova", "mdi")
EVALUATOR_NAMES = {
    "fanova": "fANOVA (optuna FanovaImportanceEvaluator)",
    "ped_anova": "PED-ANOVA (optuna PedAnovaImportanceEvaluator)",
    "mdi": "mean decrease impurity (optuna MeanDecreaseImpurityImportanceEvaluator)",
}
SIMPLE_METHOD = "simple: |Spearman rho| (numeric) / eta^2 of group means (categorical), no model"
MIN_TRIALS = 8
"""Completed Optuna trials needed before a model-based importance is attempted."""


@dataclass
class Importance:
    """A parameter-importance ranking and how it was obtained.

    ``table`` columns: ``param``, ``importance`` (the method's score), ``share`` (scores normalised
    to sum to 1; for Optuna evaluators the same as importance), ``method`` (per row), ``n``
    (trials the score is based on); sorted by importance, highest first.
    """

    table: pd.DataFrame
    method: str
    """``EVALUATOR_NAMES[...]`` when Optuna's evaluator ran, else :data:`SIMPLE_METHOD`."""
    evaluator: str | None
    """``"fanova"`` / ``"ped_anova"`` / ``"mdi"``, or None for the simple fallback."""
    notes: list[str] = field(default_factory=list)
    """Why the fallback was used, which parameters Optuna could not assess, ..."""
    seed: int = 0
    """The evaluator's seed (drawing Optuna's figure with it gives the same scores)."""

    @property
    def fallback(self) -> bool:
        return self.evaluator is None

    def describe(self) -> str:
        """One paragraph: method and notes."""
        return f"Method: {self.method}." + ("" if not self.notes else " " + " ".join(self.notes))


def make_evaluator(name: str, seed: int = 0) -> object:
    """Optuna's importance evaluator called ``name`` (one of :data:`EVALUATORS`)."""
    import optuna.importance as oi

    if name == "fanova":
        return oi.FanovaImportanceEvaluator(seed=seed)
    if name == "ped_anova":
        return oi.PedAnovaImportanceEvaluator()
    if name == "mdi":
        return oi.MeanDecreaseImpurityImportanceEvaluator(seed=seed)
    raise ValueError(f"evaluator must be one of {', '.join(EVALUATORS)}, got {name!r}")


def optuna_importance(db: Path, study_name: str, evaluator: str = "fanova", min_trials: int = MIN_TRIALS,
                      seed: int = 0) -> tuple[pd.DataFrame | None, list[str]]:
    """Optuna's importance on the study in ``db``; (None, reasons) when it cannot be computed."""
    if evaluator not in EVALUATORS:
        raise ValueError(f"evaluator must be one of {', '.join(EVALUATORS)}, got {evaluator!r}")
    study, reasons = open_study(db, study_name)
    if study is None:
        return None, reasons
    done = completed(study)
    if len(done) < max(2, min_trials):
        return None, [f"Only {len(done)} completed Optuna trial(s) (< {max(2, min_trials)}): too few to fit "
                      f"{EVALUATOR_NAMES[evaluator].split(' (')[0]}."]
    try:
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores = optuna.importance.get_param_importances(study, evaluator=make_evaluator(evaluator, seed))
    except Exception as e:  # an evaluator failure: use the fallback
        return None, [f"Optuna importance failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})."]
    study_name = study.study_name
    every = set.intersection(*(set(t.params) for t in done)) if done else set()
    seen = set().union(*(set(t.params) for t in done)) if done else set()
    notes = []
    skipped = sorted(seen - every)
    if skipped:
        notes.append(f"Not assessed by Optuna (not sampled in every trial: conditional): {', '.join(skipped)}.")
    notes.append(f"Based on {len(done)} completed Optuna trials of study {study_name!r}; a trial's value is its "
                 "score as the search told Optuna (objective.score: its last or its best epoch).")
    table = pd.DataFrame({"param": list(scores), "importance": [float(v) for v in scores.values()]})
    total = table["importance"].sum()
    table["share"] = table["importance"] / total if total > 0 else math.nan
    table["method"] = evaluator
    table["n"] = len(done)
    return table.sort_values("importance", ascending=False, kind="stable").reset_index(drop=True), notes


def compute_importance(trials: pd.DataFrame, params: dict[str, bool], objective_col: str, *, db: Path | None,
                       study_name: str, use_study: bool, evaluator: str = "fanova",
                       min_trials: int = MIN_TRIALS, seed: int = 0) -> Importance:
    """Optuna's importance when possible (``use_study`` false skips it), else the simple fallback."""
    notes: list[str] = []
    if use_study and db is not None:
        table, notes = optuna_importance(db, study_name, evaluator, min_trials, seed)
        if table is not None:
            return Importance(table, EVALUATOR_NAMES[evaluator], evaluator, notes, seed)
    elif not use_study:
        notes = ["The Optuna study optimised the search's own objective, not this metric."]
    table = simple_importance(trials, params, objective_col)
    n = int(trials[objective_col].notna().sum()) if objective_col in trials.columns else 0
    notes = notes + [f"Fallback over {n} trial(s) using each trial's score; scores of the two kinds "
                     "are not comparable with each other, and few trials make them noisy."]
    return Importance(table, SIMPLE_METHOD, None, notes, seed)


def importance_on_values(trials: pd.DataFrame, values: pd.Series, params: Sequence[Param], label: str, *,
                         evaluator: str = "fanova", min_trials: int = MIN_TRIALS, seed: int = 0) -> Importance:
    """Importance of ``params`` for ``values`` (one per trial id, e.g. the objective at one epoch),
    with Optuna's ``evaluator`` on an in-memory study of those trials; the simple fallback when fewer
    than ``min_trials`` trials have a value. ``label`` says what the values are (it leads the notes)."""
    import optuna

    rows = trials.set_index("trial_id")
    ids = [t for t in values.index if t in rows.index and pd.notna(values[t])]
    notes = [f"Values: {label}; {len(ids)} trial(s)."]
    numeric = {p.name: p.numeric for p in params}
    if len(ids) >= max(2, min_trials):
        study = optuna.create_study(direction="maximize")
        for t in ids:
            chosen = {p.name: rows.at[t, p.name] for p in params if p.name in rows.columns and pd.notna(rows.at[t, p.name])}
            chosen = {k: (v.item() if hasattr(v, "item") else v) for k, v in chosen.items()}
            dists = {p.name: p.distribution() for p in params if p.name in chosen}
            try:
                study.add_trial(optuna.trial.create_trial(params=chosen, distributions=dists, value=float(values[t])))
            except ValueError:  # a value outside the space (edited space.json): leave the trial out
                continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scores = optuna.importance.get_param_importances(study, evaluator=make_evaluator(evaluator, seed))
            table = pd.DataFrame({"param": list(scores), "importance": [float(v) for v in scores.values()]})
            total = table["importance"].sum()
            table["share"] = table["importance"] / total if total > 0 else math.nan
            table["method"] = evaluator
            table["n"] = len(study.trials)
            every = set.intersection(*(set(t.params) for t in study.trials))
            skipped = sorted({p.name for p in params} - every)
            if skipped:
                notes.append(f"Not assessed (not set in every trial: conditional): {', '.join(skipped)}.")
            return Importance(table.sort_values("importance", ascending=False, kind="stable").reset_index(drop=True),
                              EVALUATOR_NAMES[evaluator], evaluator, notes, seed)
        except Exception as e:
            notes.append(f"Optuna importance failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}).")
    else:
        notes.append(f"Too few trials (< {max(2, min_trials)}) for {EVALUATOR_NAMES[evaluator].split(' (')[0]}.")
    d = rows.loc[ids].assign(_v=values.loc[ids]).reset_index()
    return Importance(simple_importance(d, {k: v for k, v in numeric.items() if k in d.columns}, "_v"),
                      SIMPLE_METHOD, None, notes, seed)
