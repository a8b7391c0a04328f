"""Analysis of ``python -m pcl_tune.search`` experiment folders: tables, plots and a report.

>>> import analysis
>>> exp = analysis.load("runs/demo")          # doctest: +SKIP
>>> exp.trials, exp.epochs, exp.best(), exp.importance()   # doctest: +SKIP

``python -m analysis RUN_DIR [RUN_DIR ...]`` prints the summaries and writes ``report.md`` and
``report.html`` into the experiment folder.
"""

from .experiment import BestTrial, Experiment, compare, load
from .importance import Importance
from .loader import STATUSES, AnalysisError, AnalysisWarning, EmptyExperimentError

__all__ = ["STATUSES", "AnalysisError", "AnalysisWarning", "BestTrial", "EmptyExperimentError", "Experiment",
           "Importance", "compare", "load"]
