"""Analysis of ``python -m pcl_tune.search`` experiment folders: tables, plots and a report.

>>> import analysis
>>> exp = analysis.load("runs/demo")          # doctest: +SKIP
>>> exp.trials, exp.epochs, exp.best(), exp.importance()   # doctest: +SKIP

``python -m analysis RUN_DIR [RUN_DIR ...]`` prints the summaries and writes ``report.md`` and
``report.html`` into the experiment folder.

Modules, in the order the data flow through them: ``errors`` (what is raised and warned);
``loader`` reads a folder through ``space_record`` (what was searched), ``tune_state`` (Tune's
experiment state, via Ray's reader) and ``trial_files`` (each trial folder), and ``tables``
builds the DataFrames; ``experiment`` wraps them (:class:`Experiment`); ``summaries``,
``importance`` and ``verdicts`` (paired ablation verdicts, the MoCo v2 baseline, the objective's
noise, comparisons at equal budget) compute from them; ``plots`` (ours) and ``study`` (Optuna's figures of the study)
draw; ``render`` and ``report`` write the report. Importing the package sets no matplotlib
backend.
"""

from .errors import AnalysisError, AnalysisWarning, EmptyExperimentError
from .experiment import BestTrial, Experiment, compare, load
from .importance import Importance
from .tables import STATUSES
from .verdicts import AblationResult, BaselineCheck, Noise, Verdict

__all__ = ["STATUSES", "AblationResult", "AnalysisError", "AnalysisWarning", "BaselineCheck", "BestTrial",
           "EmptyExperimentError", "Experiment", "Importance", "Noise", "Verdict", "compare", "load"]
