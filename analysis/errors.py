"""What the analysis raises and warns: a folder it cannot analyse, or data it loaded only in part.

Damaged files never stop the analysis. Each problem becomes one :class:`AnalysisWarning` that
names the file, and the same message is kept (``Experiment.warnings``) for the report's "Data
problems" section.
"""

from __future__ import annotations

import warnings


class AnalysisError(Exception):
    """A folder that cannot be analysed; the message is one line and names the folder."""


class EmptyExperimentError(AnalysisError):
    """An experiment folder without any trial result yet."""


class AnalysisWarning(UserWarning):
    """Partial or damaged data that were loaded anyway; the message names the file."""


class Notes:
    """Collects the problems met while reading a folder: each is warned about once and kept."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def warn(self, message: str) -> None:
        self.items.append(message)
        warnings.warn(message, AnalysisWarning, stacklevel=3)
