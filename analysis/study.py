"""The search's Optuna study (``optuna.db``): opened for reading, and the figures Optuna draws of it.

Optuna's own figures (``optuna.visualization.matplotlib``: optimisation history, parameter
importances, slice) are used where a study exists; :mod:`analysis.plots` draws what Optuna has
no figure for, and stands in for these when there is no study (grid searches) or the analysed
metric is not the one the study optimised.

A study trial's value is what Ray's ``OptunaSearch`` told Optuna: the objective at the trial's
last epoch (an ASHA-stopped trial: at its stop), not its best epoch as in the trials table.
Optuna is imported only when a study is opened; its figures go through pyplot, so they are drawn
with whatever backend the caller chose (the CLIs choose Agg) and closed once saved.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

DPI = 110


def open_study(db: Path, study_name: str) -> tuple[optuna.Study | None, list[str]]:
    """(study, []) for the study ``study_name`` in ``db`` (the only study there if the name is not
    found), else (None, [why not])."""
    if not db.is_file():
        return None, [f"No Optuna study ({db.name} missing: a grid search, or the study was not persisted)."]
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = f"sqlite:///{db}"
        names = optuna.study.get_all_study_names(storage=storage)
        if study_name not in names:
            if len(names) != 1:
                return None, [f"{db.name} holds no study named {study_name!r} (found {names})."]
            study_name = names[0]
        return optuna.load_study(study_name=study_name, storage=storage), []
    except Exception as e:  # a locked or damaged database: the callers fall back
        return None, [f"Could not open the Optuna study in {db.name} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200] if str(e) else ''})."]


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's COMPLETE trials (the ones with a value)."""
    import optuna

    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def _draw(draw: Callable[[], Any], path: Path) -> Path:
    """Run one of Optuna's matplotlib functions, save its figure and close it."""
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib figures experimental
        drawn = draw()
    ax = drawn.flat[0] if hasattr(drawn, "flat") else drawn
    fig: Figure = ax.figure
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def history_plot(study: optuna.Study, path: Path, target_name: str) -> Path | None:
    """``optuna.visualization.matplotlib.plot_optimization_history``; None without completed trials."""
    if not completed(study):
        return None
    from optuna.visualization.matplotlib import plot_optimization_history

    return _draw(lambda: plot_optimization_history(study, target_name=target_name), path)


def importance_plot(study: optuna.Study, evaluator: Any, path: Path, target_name: str) -> Path | None:
    """``plot_param_importances`` with ``evaluator`` (the one the importance table used, same seed);
    None with fewer than two completed trials."""
    if len(completed(study)) < 2:
        return None
    from optuna.visualization.matplotlib import plot_param_importances

    return _draw(lambda: plot_param_importances(study, evaluator=evaluator, target_name=target_name), path)


def slice_plot(study: optuna.Study, params: Sequence[str], path: Path, target_name: str) -> Path | None:
    """``plot_slice`` of ``params`` (those the study knows); None when there is nothing to draw."""
    done = completed(study)
    known = [p for p in params if any(p in t.params for t in done)]
    if not known:
        return None
    from optuna.visualization.matplotlib import plot_slice

    return _draw(lambda: plot_slice(study, params=known, target_name=target_name), path)
