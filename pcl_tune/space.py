"""Search-space files: YAML -> validated fixed config, searched parameters, objective, searcher,
ASHA and resources.

A file has these top-level keys (only ``search`` is required)::

    name: demo                        # experiment name (default: the file's stem)
    description: ...                  # free text, shown in the report
    fixed:                            # settings of pcl_tune.config.TrainConfig (nested or dotted)
      epochs: 10
      data: {dataset: digits}
    search:                           # dotted config key -> distribution
      optim.lr: {loguniform: [0.01, 0.3]}
      pcl.cluster_schedule: {choice: ["5,10", "linear:5,10->20,40"]}
      pcl.proto_loss: {choice: [proto_nce, topk]}
      pcl.k: {int: [1, 4], when: {pcl.proto_loss: topk}}     # conditional parameter
    objective: {metric: knn_top1, mode: max, score: last}   # a trial's score: its last epoch or its best
    searcher: {algorithm: tpe, seed: 0, startup_trials: 4, num_samples: 8, points_to_evaluate: [{...}],
               stopped_trials: pruned}   # ASHA-stopped trials told to Optuna as pruned (or: complete)
    asha: {grace_period: 3, reduction_factor: 2, max_t: 10}  # on the epoch; max_t defaults to epochs

``searcher.algorithm: grid`` runs every combination of the ``choice`` parameters once per
``num_samples`` (no conditions allowed); ``asha: {enabled: false}`` runs every trial to the end.

A controlled ablation (a grid, every trial at full budget, paired seeds)::

    ablation:
      seeds: 5                        # every cell runs with seeds 0..4 (or a list: [0, 3, 7])
      arms:                           # optional named variants, each a set of settings over `fixed`
        proto_nce: {}
        topk: {pcl.proto_loss: topk, pcl.k: 2}
      reference: proto_nce            # what differences are taken against (default: the first arm;
                                      # for a grid factor, its first listed value)
      metrics: [knn_top1, fewshot_5w5s]   # verdicts for these (default: the objective)

The cells are the grid of ``search`` (may be empty when ``arms`` are given) crossed with the arms;
each runs once per seed, seed by seed, so an interrupted ablation holds complete pairs. The
analysis reports, per comparison, the paired difference per seed with a paired-t interval
(:mod:`analysis.ablation`).

The MoCo v2 baseline: every search runs one trial with ``pcl.proto_weight: 0`` and every other
searched setting at the space's first point (``searcher.points_to_evaluate[0]``, else each
parameter's first choice or the middle of its range), named arm ``moco_v2``; it is not told to
TPE (its setting lies outside the searched space) and ASHA never stops it, so it always runs the
full budget. In an ablation it is one more cell per seed. ``searcher.baseline: false`` turns it
off; a space whose fixed ``pcl.proto_weight`` is 0 has none.
    resources: {executor: direct, cpus_per_trial: 1, gpus_per_trial: 0,
                workers_per_trial: 2, cpus_per_worker: 1, gpus_per_worker: 0, max_concurrent: null}

Distributions: ``uniform: [lo, hi]``, ``loguniform: [lo, hi]``, ``int: [lo, hi]`` (optional
``step``, ``log``), ``choice: [a, b, ...]`` (scalars; encode lists as strings, e.g. cluster
schedules). ``when: {key: value-or-list}`` samples a parameter only when an earlier searched
parameter (or a fixed setting) has one of those values.

Every problem is reported as one :class:`SpaceError` line naming the file, the key, the value
and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .clustering import ClusterSchedule
from .config import ConfigError, TrainConfig, config_from_dict, flatten, merge, read_yaml, unflatten
from .data import train_size
from .metrics import lookup, reported_metrics

TOP_KEYS = ("name", "description", "fixed", "search", "objective", "searcher", "scheduler", "asha", "pbt", "resources",
            "ablation")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
SEARCHER_KEYS = ("algorithm", "seed", "startup_trials", "num_samples", "points_to_evaluate", "baseline",
                 "stopped_trials")
SCORES: tuple[str, ...] = ("last", "best")
"""``objective.score``: a trial is scored by its last epoch's value (Tune's default) or its best epoch's."""
STOPPED_TRIALS: tuple[str, ...] = ("pruned", "complete")
"""``searcher.stopped_trials``: how a trial ASHA stopped is told to Optuna (see :mod:`pcl_tune.searcher`)."""
ABLATION_KEYS = ("seeds", "arms", "reference", "metrics")
ARM_KEY = "arm"
"""Trial-config key naming a trial's arm (an ablation arm or the baseline); not a config setting:
the trial executors drop it before building the config."""
BASELINE_ARM = "moco_v2"
"""Arm name of the MoCo v2 baseline trial (``pcl.proto_weight: 0``)."""
BASELINE_SETTINGS = {"pcl.proto_weight": 0.0}
SEED_KEY = "seed"
SEARCH_ALGORITHMS = ("tpe", "grid")
SCHEDULERS: tuple[str, ...] = ("asha", "pbt")
"""``scheduler``: ASHA early stopping over TPE's trials (``asha``), or Population Based Training
(``pbt``: a population trained together; the weak clone the strong and perturb their settings)."""
PBT_KEYS = ("population", "interval", "burn_in", "quantile", "resample_probability", "perturbation_factors", "mutate",
            "explore")
PBT_EXPLORE: tuple[str, ...] = ("perturb", "pb2")
"""How a clone's new settings are chosen: random bounded perturbations, or PB2's bandit (ranges only)."""
PBT_MUTABLE: tuple[str, ...] = ("pcl.", "optim.lr", "optim.momentum", "optim.weight_decay", "model.momentum")
"""Settings a running trial can change between two epochs (a dotted key, or a prefix ending in '.').
A resumed trial rebuilds its run from the config and then loads the model, queue and optimiser
state, re-applying these settings (:meth:`pcl_tune.train.state.RunState.load_state_dict`); each
epoch re-clusters at the schedule's counts, so a new schedule takes effect at the next epoch.
Architecture, data, batch and epoch settings would not fit the cloned weights or schedule."""
ASHA_KEYS = ("enabled", "grace_period", "reduction_factor", "max_t", "brackets")
RESOURCE_KEYS = ("executor", "cpus_per_trial", "gpus_per_trial", "workers_per_trial", "cpus_per_worker",
                 "gpus_per_worker", "max_concurrent")
EXECUTORS = ("direct", "train")


class SpaceError(ValueError):
    """One line: ``FILE: key 'K': got V, expected E``."""


@dataclass(frozen=True)
class Param:
    """One searched parameter."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple[Any, ...] = ()
    log: bool = False
    step: int | None = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def values_for_check(self) -> list[Any]:
        """Values this parameter can take, for validation (the bounds for ranges)."""
        if self.kind == "choice":
            return list(self.choices)
        return [self.low, self.high]

    @property
    def numeric(self) -> bool:
        """Ranges (uniform, loguniform, int) are numeric; choices are categorical."""
        return self.kind != "choice"

    def distribution(self) -> Any:
        """The Optuna distribution this parameter is suggested from (:class:`DefineByRun`)."""
        import optuna.distributions as od

        if self.kind == "choice":
            return od.CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return od.IntDistribution(int(self.low), int(self.high), log=self.log, step=self.step or 1)  # type: ignore[arg-type]
        return od.FloatDistribution(float(self.low), float(self.high), log=self.log)  # type: ignore[arg-type]

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this parameter can take."""
        if self.kind == "choice":
            return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not float(self.low) <= float(value) <= float(self.high):  # type: ignore[arg-type]
            return False
        return self.kind != "int" or (float(value).is_integer() and (int(value) - int(self.low)) % (self.step or 1) == 0)  # type: ignore[arg-type]

    def describe(self) -> str:
        """``"loguniform [0.01, 0.3]"``, ``"choice [a, b]"``, ``"int [1, 4] log"``, with the condition if any."""
        if self.kind == "choice":
            text = f"choice {list(self.choices)}"
        else:
            text = f"{self.kind} [{self.low}, {self.high}]" + (" log" if self.log and self.kind != "loguniform" else "")
        if self.when:
            text += "; when " + ", ".join(f"{k} in {list(v)}" for k, v in self.when)
        return text

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "low": self.low, "high": self.high,
                "choices": list(self.choices), "log": self.log, "step": self.step,
                "when": [[k, list(v)] for k, v in self.when]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Param:
        """Inverse of :meth:`to_json`; raises KeyError / TypeError / ValueError on a malformed entry."""
        when = tuple((str(k), tuple(v) if isinstance(v, (list, tuple)) else (v,)) for k, v in (d.get("when") or []))
        kind = str(d.get("kind", "choice"))
        if kind not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {kind!r}")
        return cls(name=str(d["name"]), kind=kind, low=d.get("low"), high=d.get("high"),
                   choices=tuple(d.get("choices") or ()), log=bool(d.get("log", False)), step=d.get("step"),
                   when=when)


@dataclass
class Resources:
    executor: str = "direct"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent: int | None = None


def pbt_mutable(key: str) -> bool:
    """Whether a running trial can change setting ``key`` between epochs (:data:`PBT_MUTABLE`)."""
    return any(key.startswith(m) if m.endswith(".") else key == m for m in PBT_MUTABLE)


@dataclass
class PBTSettings:
    """The ``pbt`` section: Population Based Training (Jaderberg et al., 2017, arXiv 1711.09846).

    ``population`` trials train together. Every ``interval`` epochs from ``burn_in`` on, a trial in
    the bottom ``quantile`` of the population (by its latest objective) loads the checkpoint of a
    trial in the top ``quantile`` and continues from it with that trial's settings, perturbed
    (:class:`pcl_tune.searcher.BoundedPBT`): each setting in ``mutate`` is, with probability
    ``resample_probability``, drawn afresh from its distribution; otherwise a range is multiplied
    by one of ``perturbation_factors`` (in log space for a log range) and clipped to its bounds,
    an integer moves one step, a choice moves to a neighbouring value in the listed order (so list
    cluster schedules from coarse to fine). Searched settings not in ``mutate`` are drawn once
    for the initial population and copied on cloning.
    """

    population: int = 8
    interval: int = 6
    burn_in: int | None = None
    """First epoch at which trials are compared (default: the first multiple of ``interval`` after
    the warm-up, so every comparison sees prototypes)."""
    quantile: float = 0.25
    resample_probability: float = 0.25
    perturbation_factors: tuple[float, float] = (0.8, 1.2)
    mutate: list[str] = field(default_factory=list)
    """Settings perturbed on cloning (default: every searched setting in :data:`PBT_MUTABLE`)."""
    explore: str = "perturb"
    """``perturb`` (the above) or ``pb2``: Population Based Bandits (Parker-Holder et al., NeurIPS
    2020) choose the new values of the numeric ranges in ``mutate`` by GP-UCB on how much each
    trial's objective rose per epoch under its settings (:class:`pcl_tune.searcher.BoundedPB2`);
    choices are still perturbed as above."""

    def to_json(self) -> dict[str, Any]:
        return {"population": self.population, "interval": self.interval, "burn_in": self.burn_in,
                "quantile": self.quantile, "resample_probability": self.resample_probability,
                "perturbation_factors": list(self.perturbation_factors), "mutate": list(self.mutate),
                "explore": self.explore}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PBTSettings:
        out = cls(**{k: v for k, v in d.items() if k in PBT_KEYS})
        out.perturbation_factors = tuple(out.perturbation_factors)  # type: ignore[assignment]
        out.mutate = list(out.mutate or [])
        return out


@dataclass
class SearchSpace:
    """A validated search-space file."""

    path: Path
    name: str
    description: str
    fixed: dict[str, Any]
    params: list[Param]
    metric: str = "knn_top1"
    mode: str = "max"
    score: str = "last"
    """A trial's score: the objective at its ``last`` epoch, or at its ``best``; used alike by Optuna,
    the search's summary and the analysis."""
    algorithm: str = "tpe"
    asha: bool = True
    seed: int = 0
    startup_trials: int = 10
    num_samples: int = 20
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)
    grace_period: int = 1
    reduction_factor: int = 3
    max_t: int | None = None
    brackets: int = 1
    resources: Resources = field(default_factory=Resources)
    baseline: bool = True
    """Run the MoCo v2 baseline trial (see the module docstring)."""
    seeds: list[int] = field(default_factory=list)
    """Ablation seeds (empty: not an ablation)."""
    arms: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Ablation arms: name -> dotted settings over ``fixed``."""
    reference: str | None = None
    """Ablation: the arm differences are taken against (None: the first arm)."""
    ablation_metrics: list[str] = field(default_factory=list)
    """Ablation: metrics with verdicts (empty: the objective)."""
    scheduler: str = "asha"
    """``asha`` (TPE + ASHA, or a grid) or ``pbt`` (:class:`PBTSettings`)."""
    pbt: PBTSettings | None = None
    stopped_trials: str = "pruned"
    """How a trial ASHA stopped before its budget is told to Optuna: ``pruned`` (TPE ranks it by
    how far it got) or ``complete`` (stock Ray Tune: as a finished trial with its last value)."""

    @property
    def is_ablation(self) -> bool:
        return bool(self.seeds)

    @property
    def is_pbt(self) -> bool:
        """Population Based Training (``scheduler: pbt``)."""
        return self.scheduler == "pbt" and self.pbt is not None

    @property
    def has_baseline(self) -> bool:
        """Whether the search runs the MoCo v2 baseline trial."""
        if not self.baseline or float(self.base_config().pcl.proto_weight) == 0.0:
            return False
        weights = [float(v) for q in self.params if q.name == "pcl.proto_weight" for v in q.values_for_check()]
        weights += [float(a["pcl.proto_weight"]) for a in self.arms.values() if "pcl.proto_weight" in a]
        return 0.0 not in weights  # the space already has a MoCo arm or value

    def baseline_point(self) -> dict[str, Any]:
        """The baseline trial's config (dotted keys, :data:`ARM_KEY` included): the space's first
        point with ``pcl.proto_weight`` 0."""
        first = dict(self.points_to_evaluate[0]) if self.points_to_evaluate else {}
        fixed_flat = flatten(unflatten(self.fixed))
        point: dict[str, Any] = {}
        for q in self.params:
            if q.name == SEED_KEY:
                continue
            if not _condition_holds(q, point, fixed_flat):
                continue
            point[q.name] = first[q.name] if q.name in first else _first_value(q)
        if self.arms:
            point.update(next(iter(self.arms.values())))
        return {**point, **BASELINE_SETTINGS, ARM_KEY: BASELINE_ARM}

    def cells(self) -> list[dict[str, Any]]:
        """Every trial of a grid or an ablation, in run order (seed by seed), as trial configs.

        Each cell has the same keys (a key an arm does not set takes the fixed value), so Tune
        can carry them as ``points_to_evaluate``; :data:`ARM_KEY` names the arm (absent without
        arms), :data:`SEED_KEY` the seed (ablations).
        """
        import itertools

        grid = [dict(zip([q.name for q in self.params], combo, strict=True))
                for combo in itertools.product(*[q.choices for q in self.params])]
        arms = [(name, dict(s)) for name, s in self.arms.items()] or [(None, {})]
        per_seed: list[dict[str, Any]] = []
        for g in grid:
            for name, settings in arms:
                per_seed.append({**g, **settings, **({ARM_KEY: name} if name is not None else {})})
        if self.has_baseline:
            per_seed.append(self.baseline_point())
        repeats: list[dict[str, Any]] = [{SEED_KEY: s} for s in self.seeds] if self.seeds else \
            [{} for _ in range(self.num_samples)]
        cells = [{**c, **r} for r in repeats for c in per_seed]
        keys = list(dict.fromkeys(k for c in cells for k in c))
        fixed_flat = self.base_config().flat()
        return [{k: c.get(k, fixed_flat.get(k)) for k in keys} for c in cells]

    def total_trials(self) -> int:
        """Trials the search runs: the cells of a grid / ablation; num_samples for TPE (the
        baseline trial comes on top)."""
        if self.algorithm == "grid":
            return len(self.cells())
        return self.num_samples + int(self.has_baseline)

    def base_config(self) -> TrainConfig:
        return config_from_dict(self.fixed)

    def resolved_max_t(self) -> int:
        """The epoch at which ASHA ends a trial: ``asha.max_t``, or the trials' epochs."""
        return int(self.max_t) if self.max_t is not None else self.base_config().epochs

    def rungs(self) -> list[int]:
        """ASHA's milestones (epochs at which a trial can be stopped); empty without ASHA."""
        if not self.asha:
            return []
        out, t, max_t = [], self.grace_period, self.resolved_max_t()
        while t < max_t:
            out.append(int(t))
            t *= self.reduction_factor
        return out

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    def to_json(self) -> dict[str, Any]:
        """The resolved space as plain JSON types: what the experiment folder's ``space.json`` holds."""
        return {
            "path": str(self.path), "name": self.name, "description": self.description, "fixed": self.fixed,
            "params": [p.to_json() for p in self.params], "metric": self.metric, "mode": self.mode,
            "score": self.score, "stopped_trials": self.stopped_trials,
            "algorithm": self.algorithm, "asha": self.asha, "seed": self.seed, "startup_trials": self.startup_trials,
            "num_samples": self.num_samples, "points_to_evaluate": self.points_to_evaluate,
            "grace_period": self.grace_period, "reduction_factor": self.reduction_factor,
            "max_t": self.resolved_max_t(), "brackets": self.brackets, "resources": dataclasses.asdict(self.resources),
            "baseline": self.has_baseline, "seeds": list(self.seeds), "arms": self.arms, "reference": self.reference,
            "ablation_metrics": list(self.ablation_metrics), "scheduler": self.scheduler,
            "pbt": self.pbt.to_json() if self.pbt is not None else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], *, path: str | Path | None = None) -> SearchSpace:
        """Read :meth:`to_json`'s output back, not validated (the search validated it when it ran).

        Missing keys take the file format's defaults, so a ``space.json`` written by an older
        version (it lacked ``seed``, ``resources``, ...) still reads. Raises :class:`SpaceError`
        naming the key when a value has the wrong type.
        """
        where = str(path or data.get("path") or "space.json")
        if not isinstance(data, dict):
            raise SpaceError(f"{where}: expected a JSON object, got {type(data).__name__}")
        params = []
        for i, d in enumerate(data.get("params") or []):
            try:
                params.append(Param.from_json(d))
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise SpaceError(f"{where}: key 'params[{i}]': got {d!r}, expected a parameter entry ({e})") from None
        res = data.get("resources") or {}
        known = {f.name for f in dataclasses.fields(Resources)}
        defaults = cls(Path(where), "", "", {}, [])
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in ("path", "params", "resources", "pbt") or f.name not in data or data[f.name] is None:
                continue
            kwargs[f.name] = data[f.name]
        space = dataclasses.replace(defaults, **kwargs, params=params,
                                    resources=Resources(**{k: v for k, v in res.items() if k in known}))
        space.path = Path(data.get("path") or where)
        space.name = str(space.name or Path(where).parent.name)
        space.fixed = dict(space.fixed or {})
        space.points_to_evaluate = list(space.points_to_evaluate or [])
        space.seeds = [int(v) for v in space.seeds or []]
        space.arms = {str(k): dict(v or {}) for k, v in (space.arms or {}).items()}
        space.ablation_metrics = list(space.ablation_metrics or [])
        if isinstance(data.get("pbt"), dict):
            try:
                space.pbt = PBTSettings.from_json(data["pbt"])
            except (TypeError, ValueError) as e:
                raise SpaceError(f"{where}: key 'pbt': got {data['pbt']!r}, expected a pbt section ({e})") from None
        if "baseline" not in data:  # written before the baseline existed: it had none
            space.baseline = False
        for key, tp in (("num_samples", int), ("grace_period", int), ("reduction_factor", int), ("max_t", int)):
            v = getattr(space, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, tp)):
                raise SpaceError(f"{where}: key {key!r}: got {v!r}, expected an integer")
        return space

    def define_by_run(self) -> DefineByRun:
        return DefineByRun(self.params, flatten(unflatten(self.fixed)))

    def smoke(self) -> SearchSpace:
        """A shrunken copy for CI and quick checks (2 epochs... of tiny data)."""
        import copy

        s = copy.deepcopy(self)
        s.fixed = merge(s.fixed, {"epochs": min(3, self.base_config().epochs), "data.subset": 256,
                                  "data.digits_copies": [1, 1, 1], "model.width": 8, "model.queue_size": 256,
                                  "optim.batch_size": 32, "pcl.warmup_epochs": 1, "clustering.nredo": 1,
                                  "progress": False})
        s.num_samples = min(self.num_samples, 4)
        s.seeds = s.seeds[:2]
        s.startup_trials = min(self.startup_trials, 2)
        s.grace_period = 2
        s.max_t = 3
        if s.is_pbt and s.pbt is not None:
            # PBT needs room for two perturbation rounds: 6 epochs, compared every 2 after epoch 2.
            s.fixed = merge(s.fixed, {"epochs": min(6, self.base_config().epochs)})
            s.max_t = None
            s.pbt = dataclasses.replace(s.pbt, population=min(s.pbt.population, 4), interval=2, burn_in=2)
            s.num_samples = s.pbt.population
        return s


class DefineByRun:
    """Optuna define-by-run space (picklable, so Tune can checkpoint the searcher).

    Conditional parameters are suggested only when their condition holds, so TPE never sees a
    value that the trial would ignore.
    """

    def __init__(self, params: list[Param], fixed_flat: dict[str, Any]) -> None:
        self.params = params
        self.fixed_flat = fixed_flat

    def __call__(self, trial: Any) -> None:
        chosen: dict[str, Any] = {}
        for p in self.params:
            if not _condition_holds(p, chosen, self.fixed_flat):
                continue
            if p.kind == "choice":
                chosen[p.name] = trial.suggest_categorical(p.name, list(p.choices))
            elif p.kind == "int":
                chosen[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high), step=p.step or 1, log=p.log)
            else:
                chosen[p.name] = trial.suggest_float(p.name, float(p.low), float(p.high), log=p.log)
        return None


def _condition_holds(p: Param, chosen: dict[str, Any], fixed_flat: dict[str, Any]) -> bool:
    for key, allowed in p.when:
        value = chosen.get(key, fixed_flat.get(key, _default_of(key)))
        if value not in allowed:
            return False
    return True


def _first_value(p: Param) -> Any:
    """A parameter's first choice, or the middle of its range (geometric for a log range)."""
    if p.kind == "choice":
        return p.choices[0]
    lo, hi = float(p.low), float(p.high)  # type: ignore[arg-type]
    mid = math.sqrt(lo * hi) if p.log else (lo + hi) / 2
    return int(round(mid)) if p.kind == "int" else mid


def _default_of(key: str) -> Any:
    return TrainConfig().flat().get(key)


# --------------------------------------------------------------------------- loading

class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, value: Any, expected: str) -> SpaceError:
        return SpaceError(f"{self.path}: key {key!r}: got {value!r}, expected {expected}")

    def section(self, data: dict[str, Any], key: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        sec = data.get(key) or {}
        if not isinstance(sec, dict):
            raise self.fail(key, sec, "a mapping")
        for k in sec:
            if k not in allowed:
                raise self.fail(f"{key}.{k}", sec[k], f"one of the keys {', '.join(allowed)}")
        return sec

    def number(self, key: str, value: Any, *, integer: bool = False, positive: bool = True,
               minimum: float | None = None) -> Any:
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            raise self.fail(key, value, "an integer" if integer else "a number")
        if minimum is not None and value < minimum:
            raise self.fail(key, value, f"a number >= {minimum}")
        if positive and minimum is None and value <= 0:
            raise self.fail(key, value, "a number > 0")
        return value


def _parse_param(ld: _Loader, name: str, spec: Any) -> Param:
    key = f"search.{name}"
    if not isinstance(spec, dict):
        raise ld.fail(key, spec, "a mapping like {uniform: [lo, hi]} or {choice: [a, b]}")
    kinds = [k for k in spec if k in DISTRIBUTIONS]
    extra = [k for k in spec if k not in DISTRIBUTIONS + ("when", "step", "log")]
    if extra:
        raise ld.fail(f"{key}.{extra[0]}", spec[extra[0]], f"one of {', '.join(DISTRIBUTIONS + ('when', 'step', 'log'))}")
    if len(kinds) != 1:
        raise ld.fail(key, spec, f"exactly one distribution among {', '.join(DISTRIBUTIONS)}")
    kind = kinds[0]
    body = spec[kind]
    when_spec = spec.get("when") or {}
    if not isinstance(when_spec, dict):
        raise ld.fail(f"{key}.when", when_spec, "a mapping {other_key: value or [values]}")
    when = tuple((str(k), tuple(v) if isinstance(v, list) else (v,)) for k, v in when_spec.items())
    if kind == "choice":
        if not isinstance(body, list) or not body:
            raise ld.fail(f"{key}.choice", body, "a non-empty list of values")
        for v in body:
            if isinstance(v, (list, dict)):
                raise ld.fail(f"{key}.choice", v, "scalar values (write cluster schedules as strings, e.g. '5,10')")
        if len(set(map(repr, body))) != len(body):
            raise ld.fail(f"{key}.choice", body, "distinct values")
        return Param(name, "choice", choices=tuple(body), when=when)
    if not isinstance(body, list) or len(body) != 2:
        raise ld.fail(f"{key}.{kind}", body, "[low, high]")
    lo, hi = body
    integer = kind == "int"
    ld.number(f"{key}.{kind}", lo, integer=integer, positive=False)
    ld.number(f"{key}.{kind}", hi, integer=integer, positive=False)
    if not lo < hi:
        raise ld.fail(f"{key}.{kind}", body, "low < high (the range is empty)")
    log = bool(spec.get("log", kind == "loguniform"))
    if log and lo <= 0:
        raise ld.fail(f"{key}.{kind}", body, "low > 0 for a log-scale range")
    step = spec.get("step")
    if step is not None:
        ld.number(f"{key}.step", step, integer=True)
    return Param(name, kind, low=lo, high=hi, log=log, step=step, when=when)


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space file; raises :class:`SpaceError` (one line)."""
    p = Path(path)
    ld = _Loader(p)
    if not p.is_file():
        raise SpaceError(f"{p}: search-space file not found")
    try:
        data = read_yaml(p.read_text(), str(p))
    except ConfigError as e:
        raise SpaceError(str(e)) from None
    if not isinstance(data, dict):
        raise SpaceError(f"{p}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    for k in data:
        if k not in TOP_KEYS:
            import difflib

            close = difflib.get_close_matches(str(k), TOP_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ld.fail(k, "...", f"one of the top-level keys {', '.join(TOP_KEYS)}{hint}")
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise ld.fail("fixed", fixed, "a mapping of settings")
    try:
        base = config_from_dict(fixed)
    except ConfigError as e:
        raise SpaceError(f"{p}: fixed: {e}") from None
    abl = ld.section(data, "ablation", ABLATION_KEYS)
    search = data.get("search")
    if search is None and abl.get("arms"):
        search = {}
    if not isinstance(search, dict) or (not search and not abl.get("arms")):
        raise ld.fail("search", search, "a non-empty mapping of dotted config keys to distributions")
    known = base.flat()
    params = []
    for name, spec in search.items():
        if name not in known:
            import difflib

            close = difflib.get_close_matches(str(name), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ld.fail(f"search.{name}", spec, f"a config key{hint}; run `python -m pcl_tune.train --help-config`")
        params.append(_parse_param(ld, name, spec))
    names = [q.name for q in params]
    for i, q in enumerate(params):
        for cond_key, _ in q.when:
            if cond_key in names and names.index(cond_key) >= i:
                raise ld.fail(f"search.{q.name}.when", cond_key, "a parameter listed earlier in `search`")
            if cond_key not in names and cond_key not in known:
                raise ld.fail(f"search.{q.name}.when", cond_key, "a config key")

    obj = ld.section(data, "objective", ("metric", "mode", "score"))
    metric = obj.get("metric", "knn_top1")
    mode = obj.get("mode", "max")
    if mode not in ("min", "max"):
        raise ld.fail("objective.mode", mode, "min or max")
    score = obj.get("score", "last")
    if score not in SCORES:
        raise ld.fail("objective.score", score, f"one of {', '.join(SCORES)}")
    srch = ld.section(data, "searcher", SEARCHER_KEYS)
    stopped = srch.get("stopped_trials", "pruned")
    if stopped not in STOPPED_TRIALS:
        raise ld.fail("searcher.stopped_trials", stopped, f"one of {', '.join(STOPPED_TRIALS)}")
    asha = ld.section(data, "asha", ASHA_KEYS)
    scheduler = data.get("scheduler", "asha")
    if scheduler not in SCHEDULERS:
        raise ld.fail("scheduler", scheduler, f"one of {', '.join(SCHEDULERS)}")
    pbt_section = ld.section(data, "pbt", PBT_KEYS)
    if pbt_section and scheduler != "pbt":
        raise ld.fail("pbt", "...", "no pbt section unless `scheduler: pbt`")
    res = ld.section(data, "resources", RESOURCE_KEYS)
    space = SearchSpace(
        path=p, name=str(data.get("name") or p.stem), description=str(data.get("description") or ""),
        fixed=fixed, params=params, metric=metric, mode=mode, score=score, stopped_trials=stopped,
        algorithm=srch.get("algorithm", "tpe"), asha=asha.get("enabled", True),
        seed=ld.number("searcher.seed", srch.get("seed", 0), integer=True, minimum=0),
        startup_trials=ld.number("searcher.startup_trials", srch.get("startup_trials", 10), integer=True, minimum=0),
        num_samples=ld.number("searcher.num_samples", srch.get("num_samples", 20), integer=True),
        points_to_evaluate=list(srch.get("points_to_evaluate") or []),
        grace_period=ld.number("asha.grace_period", asha.get("grace_period", 1), integer=True),
        reduction_factor=ld.number("asha.reduction_factor", asha.get("reduction_factor", 3), integer=True, minimum=2),
        max_t=asha.get("max_t"),
        brackets=ld.number("asha.brackets", asha.get("brackets", 1), integer=True),
        resources=_parse_resources(ld, res),
        baseline=srch.get("baseline", True),
    )
    if not isinstance(space.baseline, bool):
        raise ld.fail("searcher.baseline", space.baseline, "true or false")
    if scheduler == "pbt":
        _parse_pbt(ld, space, pbt_section, srch, asha, abl)
    if abl:
        _parse_ablation(ld, space, abl, srch, asha, data)
    validate_space(space)
    return space


def _parse_pbt(ld: _Loader, space: SearchSpace, sec: dict[str, Any], srch: dict[str, Any], asha: dict[str, Any],
               abl: dict[str, Any]) -> None:
    """The ``pbt`` section (``scheduler: pbt``): population, interval, burn-in, perturbations."""
    if abl:
        raise ld.fail("scheduler", "pbt", "asha (an ablation runs a grid at full budget, not a population)")
    if asha:
        raise ld.fail("asha", "...", "no asha section with `scheduler: pbt` (PBT replaces early stopping)")
    if srch.get("algorithm", "tpe") != "tpe":
        raise ld.fail("searcher.algorithm", srch["algorithm"], "nothing with `scheduler: pbt` (the initial "
                                                               "population is drawn at random)")
    for k in ("num_samples", "startup_trials", "stopped_trials"):
        if k in srch:
            raise ld.fail(f"searcher.{k}", srch[k], "nothing with `scheduler: pbt` (pbt.population sets the trials)"
                          if k == "num_samples" else "nothing with `scheduler: pbt` (no TPE)")
    d = PBTSettings()
    population = ld.number("pbt.population", sec.get("population", d.population), integer=True, minimum=2)
    interval = ld.number("pbt.interval", sec.get("interval", d.interval), integer=True, minimum=1)
    burn_in = sec.get("burn_in")
    if burn_in is not None:
        ld.number("pbt.burn_in", burn_in, integer=True, minimum=0)
    quantile = ld.number("pbt.quantile", sec.get("quantile", d.quantile))
    if not 0 < quantile <= 0.5:
        raise ld.fail("pbt.quantile", quantile, "a fraction in (0, 0.5]")
    resample = ld.number("pbt.resample_probability", sec.get("resample_probability", d.resample_probability),
                         positive=False, minimum=0)
    if resample > 1:
        raise ld.fail("pbt.resample_probability", resample, "a probability in [0, 1]")
    factors = sec.get("perturbation_factors", list(d.perturbation_factors))
    if (not isinstance(factors, list) or len(factors) < 1
            or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors)):
        raise ld.fail("pbt.perturbation_factors", factors, "a list of positive factors, e.g. [0.8, 1.2]")
    searched = [q.name for q in space.params]
    mutate = sec.get("mutate")
    if mutate is None:
        mutate = [n for n in searched if pbt_mutable(n)]
    if not isinstance(mutate, list) or not all(isinstance(m, str) for m in mutate):
        raise ld.fail("pbt.mutate", mutate, "a list of searched settings")
    for m in mutate:
        if m not in searched:
            raise ld.fail("pbt.mutate", m, f"a searched setting (one of {', '.join(searched)})")
        if not pbt_mutable(m):
            raise ld.fail("pbt.mutate", m, "a setting a running trial can change between epochs: "
                          + ", ".join(p + ("*" if p.endswith(".") else "") for p in PBT_MUTABLE))
    if not mutate:
        raise ld.fail("pbt.mutate", mutate, "at least one searched setting a running trial can change between "
                      "epochs: " + ", ".join(p + ("*" if p.endswith(".") else "") for p in PBT_MUTABLE))
    explore = sec.get("explore", d.explore)
    if explore not in PBT_EXPLORE:
        raise ld.fail("pbt.explore", explore, "one of " + ", ".join(PBT_EXPLORE))
    if explore == "pb2" and not any(q.numeric for q in space.params if q.name in mutate):
        raise ld.fail("pbt.explore", explore, "perturb when pbt.mutate holds no numeric range (PB2 models ranges "
                      "only; choices are perturbed either way)")
    space.scheduler = "pbt"
    space.algorithm = "pbt"
    space.asha = False
    space.num_samples = population
    space.startup_trials = population
    space.pbt = PBTSettings(population=population, interval=interval, burn_in=burn_in, quantile=float(quantile),
                            resample_probability=float(resample),
                            perturbation_factors=tuple(float(f) for f in factors),  # type: ignore[arg-type]
                            mutate=list(mutate), explore=str(explore))


def _parse_ablation(ld: _Loader, space: SearchSpace, abl: dict[str, Any], srch: dict[str, Any],
                    asha: dict[str, Any], data: dict[str, Any]) -> None:
    """The ``ablation`` section: paired seeds, arms, reference, metrics; a grid without ASHA."""
    seeds = abl.get("seeds")
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 2:
            raise ld.fail("ablation.seeds", seeds, "at least 2 seeds (a paired interval needs 2; use 5 or more)")
        space.seeds = list(range(seeds))
    elif isinstance(seeds, list) and len(seeds) >= 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                             and v >= 0 for v in seeds) and len(set(seeds)) == len(seeds):
        space.seeds = list(seeds)
    else:
        raise ld.fail("ablation.seeds", seeds, "a number of seeds >= 2 or a list of distinct seeds >= 0")
    if srch.get("algorithm", "grid") != "grid":
        raise ld.fail("searcher.algorithm", srch["algorithm"], "grid (or nothing): an ablation runs every cell")
    if "num_samples" in srch:
        raise ld.fail("searcher.num_samples", srch["num_samples"], "nothing: ablation.seeds sets the repeats")
    if asha.get("enabled", False) is not False:
        raise ld.fail("asha.enabled", asha.get("enabled"), "false (or nothing): an ablation runs every trial to "
                                                          "the end, no early stopping")
    fixed_flat = flatten(unflatten(space.fixed))
    if SEED_KEY in fixed_flat or any(q.name == SEED_KEY for q in space.params):
        where = f"search.{SEED_KEY}" if any(q.name == SEED_KEY for q in space.params) else f"fixed.{SEED_KEY}"
        raise ld.fail(where, "...", "no seed setting: ablation.seeds sets each trial's seed")
    space.algorithm = "grid"
    space.asha = False
    space.num_samples = 1
    arms = abl.get("arms") or {}
    if not isinstance(arms, dict):
        raise ld.fail("ablation.arms", arms, "a mapping of arm names to settings, e.g. {moco: {pcl.proto_weight: 0}}")
    known = space.base_config().flat()
    searched = {q.name for q in space.params}
    for name, settings in arms.items():
        key = f"ablation.arms.{name}"
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ld.fail(key, name, "an arm name of letters, digits, '_', '-' or '.'")
        if name == BASELINE_ARM and space.baseline:
            raise ld.fail(key, name, f"another name ({BASELINE_ARM} is the automatic baseline arm)")
        if settings is None:
            settings = {}
        if not isinstance(settings, dict):
            raise ld.fail(key, settings, "a mapping of settings (nested or dotted)")
        flat = flatten(unflatten(settings))
        for k in flat:
            if k not in known:
                raise ld.fail(f"{key}.{k}", flat[k], "a config key; run `python -m pcl_tune.train --help-config`")
            if k in searched or k == SEED_KEY:
                raise ld.fail(f"{key}.{k}", flat[k], "a key the grid does not vary (it is searched)"
                              if k in searched else "no seed setting: ablation.seeds sets it")
        try:
            config_from_dict(merge(space.fixed, flat))
        except ConfigError as e:
            raise SpaceError(f"{ld.path}: {key}: {e}") from None
        space.arms[name] = flat
    ref = abl.get("reference")
    if ref is not None and ref not in space.arms:
        raise ld.fail("ablation.reference", ref, f"one of the arms ({', '.join(space.arms) or 'none are defined'})")
    space.reference = ref
    metrics = abl.get("metrics") or []
    if not isinstance(metrics, list) or not all(isinstance(m, str) for m in metrics):
        raise ld.fail("ablation.metrics", metrics, "a list of metric names")
    space.ablation_metrics = list(metrics)


def _parse_resources(ld: _Loader, res: dict[str, Any]) -> Resources:
    r = Resources()
    if "executor" in res:
        if res["executor"] not in EXECUTORS:
            raise ld.fail("resources.executor", res["executor"], f"one of {', '.join(EXECUTORS)}")
        r.executor = res["executor"]
    for k in ("cpus_per_trial", "cpus_per_worker"):
        if k in res:
            setattr(r, k, ld.number(f"resources.{k}", res[k], positive=False, minimum=0))
    for k in ("gpus_per_trial", "gpus_per_worker"):
        if k in res:
            setattr(r, k, ld.number(f"resources.{k}", res[k], positive=False, minimum=0))
    if "workers_per_trial" in res:
        r.workers_per_trial = ld.number("resources.workers_per_trial", res["workers_per_trial"], integer=True)
    if res.get("max_concurrent") is not None:
        r.max_concurrent = ld.number("resources.max_concurrent", res["max_concurrent"], integer=True)
    return r


def pbt_burn_in(space: SearchSpace) -> int:
    """The epoch from which PBT compares trials: ``pbt.burn_in``, or the first multiple of the interval
    after the warm-up."""
    assert space.pbt is not None
    if space.pbt.burn_in is not None:
        return int(space.pbt.burn_in)
    warmup = max(int(v) for v in all_values(space, "pcl.warmup_epochs"))
    return (warmup // space.pbt.interval + 1) * space.pbt.interval


def _validate_pbt(space: SearchSpace, ld: _Loader, max_t: int, warmup: int) -> None:
    """Cross-field checks of a PBT space; raises :class:`SpaceError`."""
    assert space.pbt is not None
    pbt = space.pbt
    if space.max_t is not None:
        raise ld.fail("asha.max_t", space.max_t, "nothing with `scheduler: pbt`")
    if pbt.interval >= max_t:
        raise ld.fail("pbt.interval", pbt.interval, f"fewer epochs than a trial runs ({max_t}), or nothing is ever "
                                                    "perturbed")
    burn_in = pbt_burn_in(space)
    if burn_in % pbt.interval:
        raise ld.fail("pbt.burn_in", burn_in, f"a multiple of pbt.interval ({pbt.interval}): trials are compared, and "
                                              "their checkpoints handed to Tune, at those epochs")
    if burn_in >= max_t:
        raise ld.fail("pbt.burn_in", burn_in, f"< the epochs of a trial ({max_t})")
    if pbt.burn_in is not None and burn_in <= warmup < max_t:
        raise ld.fail("pbt.burn_in", burn_in, f"> the warm-up ({warmup} epochs): comparing trials before "
                                              "prototypes exist judges nothing")
    every = [int(v) for v in all_values(space, "checkpoint_every")]
    if any(pbt.interval % e for e in every):
        raise ld.fail("fixed.checkpoint_every", max(every), f"a divisor of pbt.interval ({pbt.interval}): trials are "
                                                           "compared and cloned at multiples of the interval, from "
                                                           "the checkpoints handed to Tune")
    for point in space.points_to_evaluate[: pbt.population]:
        for k, v in point.items():
            q = space.param(k)
            if q is not None and not q.contains(v):
                raise ld.fail(f"searcher.points_to_evaluate.{k}", v, f"a value of {q.describe()}")
    if space.resources.executor == "train":
        raise ld.fail("resources.executor", "train", "direct with `scheduler: pbt` (a Ray Train trial resumes its "
                                                     "own checkpoint, not the one PBT clones; not built yet)")


def all_values(space: SearchSpace, key: str) -> list[Any]:
    """Every value ``key`` can take in a trial (the fixed value, or the searched values/bounds,
    and the values ablation arms give it)."""
    for p in space.params:
        if p.name == key:
            return p.values_for_check()
    fixed = space.base_config().flat()[key]
    arm_values = [a[key] for a in space.arms.values() if key in a]
    unset = [fixed] if len(arm_values) < len(space.arms) or not space.arms else []
    return unset + arm_values


def check_batch_size(space: SearchSpace) -> None:
    """Every trial's batch, the global batch of a step, splits evenly across the trial's workers and
    fits the training images (when the dataset's size is known without loading it); raises
    :class:`SpaceError`. The epoch would refuse the first and silently shrink the second."""
    r = space.resources
    workers = max(1, int(r.workers_per_trial)) if r.executor == "train" else 1
    key = "search.optim.batch_size" if space.param("optim.batch_size") else "fixed.optim.batch_size"
    sizes = [int(v) for v in all_values(space, "optim.batch_size")]
    uneven = [v for v in sizes if v % workers]
    if uneven:
        raise _Loader(space.path).fail(key, uneven[0], f"a multiple of the {workers} workers per trial (the batch "
                                                       "is the global batch, split evenly across them)")
    n_train = train_size(space.base_config())
    if n_train is None:
        return
    if max(sizes) > n_train:
        raise _Loader(space.path).fail(key, max(sizes), f"a batch size <= the {n_train} training images of "
                                                        f"{space.base_config().data.dataset}")


def validate_space(space: SearchSpace) -> None:
    """Cross-field checks before anything starts; raises :class:`SpaceError`."""
    p = space.path
    base = space.base_config()
    ld = _Loader(p)
    # Every searched value must be acceptable to the config on its own.
    for q in space.params:
        for v in q.values_for_check():
            try:
                config_from_dict(merge(space.fixed, {q.name: v}))
            except ConfigError as e:
                raise SpaceError(f"{p}: search.{q.name}: value {v!r} is invalid: {e}") from None
    schedules = [ClusterSchedule.parse(s) for s in all_values(space, "pcl.cluster_schedule")]
    smallest = min(s.extremes()[0] for s in schedules)
    largest = max(s.extremes()[1] for s in schedules)
    loss_kinds = set(all_values(space, "pcl.proto_loss"))
    ks = [int(v) for v in all_values(space, "pcl.k")]
    if loss_kinds & {"topk", "topk_below"} and max(ks) > smallest:
        key = "search.pcl.k" if any(q.name == "pcl.k" for q in space.params) else "fixed.pcl.k"
        raise ld.fail(key, max(ks), f"K <= the smallest cluster count any schedule uses ({smallest})")
    n_train = train_size(base)
    if n_train is not None and largest > n_train:
        key = "search.pcl.cluster_schedule" if any(q.name == "pcl.cluster_schedule" for q in space.params) \
            else "fixed.pcl.cluster_schedule"
        raise ld.fail(key, largest, f"cluster counts <= the {n_train} training images of {base.data.dataset}")
    check_batch_size(space)
    epochs = [int(v) for v in all_values(space, "epochs")]
    max_t = space.max_t if space.max_t is not None else max(epochs)
    ld.number("asha.max_t", max_t, integer=True)
    if space.max_t is not None and space.max_t > max(epochs):
        raise ld.fail("asha.max_t", space.max_t, f"<= epochs ({max(epochs)})")
    warmups = [int(v) for v in all_values(space, "pcl.warmup_epochs")]
    if space.asha and space.grace_period <= max(warmups) and space.grace_period < max_t:
        raise ld.fail("asha.grace_period", space.grace_period,
                      f"> the warm-up ({max(warmups)} epochs): pruning before prototypes exist judges nothing")
    if space.asha and space.grace_period > max_t:
        raise ld.fail("asha.grace_period", space.grace_period, f"<= asha.max_t ({max_t})")
    levels = {s.num_levels for s in schedules}
    heads = [int(v) for v in all_values(space, "model.num_heads")] if "amcl" in all_values(space, "model.head") else [0]
    known = set(reported_metrics(max(levels), max(heads)))
    if space.metric not in known:
        raise ld.fail("objective.metric", space.metric, f"a metric the loop reports: {', '.join(sorted(known))}")
    for m in space.ablation_metrics:
        if m not in known:
            raise ld.fail("ablation.metrics", m, f"a metric the loop reports: {', '.join(sorted(known))}")
        if m.startswith("fewshot_") and min(int(v) for v in all_values(space, "eval.fewshot_episodes")) < 1:
            raise ld.fail("ablation.metrics", m, "a metric the configured evaluation produces: set "
                          "eval.fewshot_episodes >= 1")
    if space.algorithm not in SEARCH_ALGORITHMS and not (space.is_pbt and space.algorithm == "pbt"):
        raise ld.fail("searcher.algorithm", space.algorithm, f"one of {', '.join(SEARCH_ALGORITHMS)}")
    if space.is_pbt:
        _validate_pbt(space, ld, max_t, max(warmups))
    if not isinstance(space.asha, bool):
        raise ld.fail("asha.enabled", space.asha, "true or false")
    if space.algorithm == "grid":
        for q in space.params:
            if q.kind != "choice" or q.when:
                raise ld.fail(f"search.{q.name}", q.describe(), "an unconditional choice (grid search)")
    measured = lookup(space.metric)
    if measured is not None and measured.measured_at == "eval" and base.eval.every != 1:
        raise ld.fail("fixed.eval.every", base.eval.every, f"1: the objective {space.metric} is measured at evaluations")
    if space.metric.startswith("fewshot_") and min(int(v) for v in all_values(space, "eval.fewshot_episodes")) < 1:
        raise ld.fail("objective.metric", space.metric, "a metric the configured evaluation produces: set "
                      "eval.fewshot_episodes >= 1 (e.g. 200) to produce fewshot_5w1s / fewshot_5w5s")
    r = space.resources
    if r.executor == "train" and r.workers_per_trial < 1:
        raise ld.fail("resources.workers_per_trial", r.workers_per_trial, ">= 1 for the train executor")
    if space.startup_trials > space.num_samples:
        space.startup_trials = space.num_samples
    for i, point in enumerate(space.points_to_evaluate):
        if not isinstance(point, dict):
            raise ld.fail(f"searcher.points_to_evaluate[{i}]", point, "a mapping of searched keys to values")
        for k in point:
            if k not in {q.name for q in space.params}:
                raise ld.fail(f"searcher.points_to_evaluate[{i}].{k}", point[k], "a searched parameter")
    if not math.isfinite(float(space.num_samples)):
        raise ld.fail("searcher.num_samples", space.num_samples, "a finite integer")
