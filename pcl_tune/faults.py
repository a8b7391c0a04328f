"""Fault injection for tests: stop a process at one named point, so a test can kill it exactly there.

A test sets ``PCL_TUNE_PAUSE_AT`` to a point's name and ``PCL_TUNE_PAUSE_FILE`` to a path. The
first process (of any started with that environment) that reaches the point writes its pid to the
file and blocks; the test waits for the file, checks the frozen state if it likes, and kills the
process. No sleeps decide where the kill lands. The file also marks the pause as spent: a process
restarted after the kill (a Ray Train worker group, a resumed search) passes the point.

Points in this package: ``train_step/rank{R}/epoch{E}/step{S}`` (1-based epoch and step, before
the step's forward pass). Tests add their own (a Ray Tune callback in the driver, for example).

Without ``PCL_TUNE_PAUSE_AT`` every call is a dictionary lookup; nothing else happens.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_AT_ENV = "PCL_TUNE_PAUSE_AT"
PAUSE_FILE_ENV = "PCL_TUNE_PAUSE_FILE"


def armed() -> bool:
    """Whether a pause point is set in this process's environment."""
    return bool(os.environ.get(PAUSE_AT_ENV))


def pause_point(name: str) -> None:
    """Block forever here if ``PCL_TUNE_PAUSE_AT`` names this point and its pause is not spent."""
    if os.environ.get(PAUSE_AT_ENV) != name:
        return
    marker = os.environ.get(PAUSE_FILE_ENV)
    if not marker:
        raise RuntimeError(f"{PAUSE_AT_ENV}={name} needs {PAUSE_FILE_ENV}: the file that says the point was reached")
    path = Path(marker)
    try:
        with open(path, "x") as f:  # exclusive: one process pauses, once
            f.write(f"{os.getpid()}\n")
    except FileExistsError:
        return
    while True:  # until the test kills this process
        time.sleep(60)
