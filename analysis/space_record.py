"""What an experiment searched: its ``space.json``, or a space inferred from its trials.

The schema is :class:`pcl_tune.space.SearchSpace` (``to_json`` / ``from_json``), read through
:func:`pcl_tune.experiment_folder.read_space_json`; nothing here re-describes it. When
``space.json`` is missing or unreadable (a search killed before writing it, a folder copied in
part), the searched parameters are inferred from the trials' parameters, and the objective and
ASHA settings from the copied space file where it can be read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pcl_tune.config import ConfigError
from pcl_tune.experiment_folder import OPTUNA_DB, SPACE_JSON, SPACE_YAML, read_space_json, read_space_yaml
from pcl_tune.space import Param, SearchSpace, SpaceError

from .errors import Notes
from .trial_files import RawTrial

MAX_INFERRED_CHOICES = 6
"""A numeric parameter with more distinct values than this is inferred as a range, not a choice."""


def read_space(exp: Path, raw: list[RawTrial], notes: Notes) -> tuple[SearchSpace, dict[str, Any], bool]:
    """(space, run record, inferred): ``space.json`` when readable, else inferred from ``raw``."""
    if (exp / SPACE_JSON).is_file():
        try:
            space, run = read_space_json(exp)
            return space, run, False
        except SpaceError as e:  # its message names the file
            notes.warn(f"{e}; the search space is inferred from the trials")
        except (TypeError, AttributeError, KeyError) as e:  # a value of the wrong type in an older file
            notes.warn(f"{exp / SPACE_JSON}: not understood ({type(e).__name__}: {e}); the search space is "
                       "inferred from the trials")
    elif raw:
        notes.warn(f"{exp / SPACE_JSON}: missing; the searched parameters, max_t and the objective are "
                   "inferred from the trials")
    return infer_space(exp, raw, _read_yaml(exp, notes)), {}, True


def _read_yaml(exp: Path, notes: Notes) -> dict[str, Any]:
    try:
        return read_space_yaml(exp)
    except (ConfigError, OSError, ValueError) as e:  # a damaged copy only loses the searcher / ASHA details
        notes.warn(f"{exp / SPACE_YAML}: unreadable ({type(e).__name__}); searcher and ASHA settings are defaults")
        return {}


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def infer_param(name: str, values: list[Any]) -> Param:
    """A numeric parameter with many distinct values is a uniform range over what was seen; any
    other is a choice among the distinct values seen (sorted)."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    distinct = sorted({json.dumps(v, sort_keys=True, default=str) for v in values})
    if numeric and values and len(distinct) > MAX_INFERRED_CHOICES:
        return Param(name, "uniform", low=min(values), high=max(values))
    return Param(name, "choice", choices=tuple(json.loads(d) for d in distinct))


def infer_space(exp: Path, raw: list[RawTrial], yml: dict[str, Any]) -> SearchSpace:
    """A :class:`SearchSpace` pieced together from the trials and the copied space file ``yml``."""
    names: list[str] = []
    for t in raw:
        names += [k for k in t.params if k not in names]
    params = [infer_param(n, [t.params[n] for t in raw if n in t.params]) for n in names]
    searcher, asha, objective = _section(yml, "searcher"), _section(yml, "asha"), _section(yml, "objective")
    fixed = _section(yml, "fixed")
    epochs = [len(t.records) for t in raw]
    max_t = asha.get("max_t") or fixed.get("epochs") or (max(epochs) if epochs else None)
    defaults = SearchSpace(exp / SPACE_YAML, "", "", {}, [])
    return SearchSpace(
        path=exp / SPACE_YAML, name=str(yml.get("name") or exp.name),
        description=str(yml.get("description") or "").strip(), fixed=dict(fixed), params=params,
        metric=str(objective.get("metric") or defaults.metric), mode=str(objective.get("mode") or defaults.mode),
        algorithm=str(searcher.get("algorithm", "tpe" if (exp / OPTUNA_DB).is_file() else "grid")),
        # Without an asha section nothing says ASHA ran: draw no rungs rather than invented ones.
        asha=bool(asha.get("enabled", True)) if asha else False,
        grace_period=int(asha.get("grace_period", defaults.grace_period)),
        reduction_factor=int(asha.get("reduction_factor", defaults.reduction_factor)),
        max_t=int(max_t) if max_t is not None else None,
    )
