"""The searcher and schedulers the search uses: Ray Tune's ``OptunaSearch``, safe to resume after a
kill; ASHA and Population Based Training that leave the MoCo v2 baseline alone.

Kept apart from :mod:`pcl_tune.search` because Tune pickles the searcher into the experiment
folder and must import its class on restore; this module imports Ray at the top, the CLI does not.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pyarrow.fs as pafs
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from .pbt import LINEAGE_DIR, from_gp, gp_bounds, perturb, to_gp
from .space import ARM_KEY, BASELINE_ARM, Param

log = logging.getLogger("pcl_tune.search")


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that tells Optuna what ASHA did, skips results for trials Optuna has already
    finished, and runs the MoCo v2 baseline trial beside the study.

    **Stopped trials are pruned trials.** Stock ``OptunaSearch`` tells Optuna every trial ASHA
    stopped as COMPLETE with its last value, so TPE reads a trial stopped at epoch 6 (kNN ~20 %)
    as a finished trial that scored 20 % beside finished ones at 50 %: it learns "starts fast",
    not "ends well". Here (``stopped_trials="pruned"``) a trial that ends before its budget
    (``max_t``, or its own ``epochs`` when smaller) is told as PRUNED; Optuna's TPE ranks pruned
    trials after complete ones, by how far they got and then by their value there, from the
    intermediate values reported every epoch (at ``step = epoch``, so a restored trial's replayed
    epoch lands on its own step). A finished trial is COMPLETE with its score: its ``last`` or its
    ``best`` epoch's value (``score``, the space's ``objective.score``); an errored one is FAIL.
    ``stopped_trials="complete"`` keeps the stock behaviour (for comparisons).

    Optuna commits a finished trial to its SQLite study at once; Tune saves its own state every
    few seconds. A driver killed in between restores that trial as still running, and the
    trial's next result makes Optuna raise ``UpdateFinishedTrialError`` inside Tune's controller,
    which ends the whole search. Intermediate values only feed Optuna's pruners, which this
    project does not use (ASHA stops trials), so such a result is logged and not passed on.

    ``baseline`` (a trial config, :meth:`pcl_tune.space.SearchSpace.baseline_point`) is suggested
    once, right after the first of ``points_to_evaluate`` (first when there are none). Optuna never
    hears of it: its ``pcl.proto_weight`` lies outside the searched space, and TPE would otherwise
    model a value it cannot propose. The flag that it was issued is part of the searcher's pickled
    state, so a resumed search does not run it twice.
    """

    def __init__(self, *args: Any, baseline: dict[str, Any] | None = None, max_t: int | None = None,
                 score: str = "last", stopped_trials: str = "pruned", time_attr: str = "epoch", store: Any = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if score not in ("last", "best") or stopped_trials not in ("pruned", "complete"):
            raise ValueError(f"score must be last|best and stopped_trials pruned|complete, got {score!r}, "
                             f"{stopped_trials!r}")
        self._baseline = dict(baseline) if baseline else None
        self._baseline_position = 1 if kwargs.get("points_to_evaluate") else 0
        self._baseline_trials: set[str] = set()
        self._max_t = max_t
        self._score = score
        self._stopped_trials = stopped_trials
        self._time_attr = time_attr
        self._values: dict[str, dict[int, float]] = {}  # trial -> step -> objective (pickled with the searcher)
        url = str(getattr(self._storage, "url", ""))
        # A SQLite file's URL holds no secret: kept as the fallback when no study URL is set.
        self._file_url = url if url.startswith("sqlite:") else None
        self._store = store  # a pcl_tune.storage.Store: its study file is uploaded with each snapshot

    study_url: str | None = None
    """The Optuna storage URL a restored searcher reconnects to (:func:`set_study_storage`)."""

    # The study, its storage and Optuna's live trials are not pickled (neither in ``tuner.pkl``
    # nor in Tune's searcher state): a storage pickles its URL, which can hold a database password
    # and, for SQLite, the absolute path where the folder was when the search started. A restored
    # searcher reconnects to the study the resuming command names; Optuna's trials are kept as
    # their ids and re-attached.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_storage"] = None
        state["_ot_study"] = None
        state["_ot_trials"] = {tid: getattr(t, "_trial_id", t) for tid, t in self._ot_trials.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reconnect()

    def save(self, checkpoint_path: str) -> None:
        """Tune's snapshot of the searcher. With an experiment on object storage the study's file
        is uploaded here, before Tune uploads the snapshot: the stored study is never older than
        the stored searcher state that refers to its trials."""
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)
        store = getattr(self, "_store", None)
        # On object storage a SQLite study can only be the experiment's own (others are refused).
        if store is not None and store.remote and self._file_url is not None:
            from .experiment_folder import OPTUNA_DB

            try:
                store.push(OPTUNA_DB)
            except Exception as e:  # the search goes on; the next snapshot uploads it again
                log.warning("could not upload the Optuna study: %s", e)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._reconnect()

    def _reconnect(self) -> None:
        """Open the study at :attr:`study_url` (else the SQLite file it was created with) and
        re-attach Optuna's trials by id. A state of an earlier version that still holds its own
        study keeps it when neither is known."""
        url = type(self).study_url or getattr(self, "_file_url", None)
        if url is None:
            if self._ot_study is None:
                raise RuntimeError("ResumableOptunaSearch restored without a study: call "
                                   "pcl_tune.searcher.set_study_storage(url) first")
            return
        from .storage import open_study_storage

        self._storage = open_study_storage(url)
        self._file_url = url if url.startswith("sqlite:") else None
        # Not _setup_study: it would enqueue points_to_evaluate again. The study exists already.
        self._ot_study = optuna.load_study(study_name=self._study_name, storage=self._storage, sampler=self._sampler,
                                           pruner=optuna.pruners.NopPruner())
        self._ot_trials = {tid: optuna.Trial(self._ot_study, getattr(t, "_trial_id", t))
                           for tid, t in self._ot_trials.items()}
        # An enqueued trial Tune had asked for just before a kill can be stored as still WAITING:
        # claim it again as Optuna's ask does, so it is not handed to another trial.
        waiting = {t._trial_id for t in self._ot_study.get_trials(deepcopy=False,
                                                                  states=(optuna.trial.TrialState.WAITING,))}
        for tid, trial in self._ot_trials.items():
            if trial._trial_id in waiting and tid not in self._completed_trials:
                self._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.RUNNING)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        baseline = getattr(self, "_baseline", None)
        if baseline is not None and not self._baseline_trials and len(self._ot_trials) >= self._baseline_position:
            self._baseline_trials.add(trial_id)
            return dict(baseline)
        return super().suggest(trial_id)

    def _is_baseline(self, trial_id: str) -> bool:
        return trial_id in getattr(self, "_baseline_trials", ())

    def _budget(self, trial_id: str) -> int | None:
        """The epoch a trial runs to unless stopped: ``max_t``, or its own ``epochs`` when smaller."""
        epochs = self._ot_trials[trial_id].params.get("epochs") if trial_id in self._ot_trials else None
        budgets = [int(b) for b in (self._max_t, epochs) if b is not None]
        return min(budgets) if budgets else None

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self._is_baseline(trial_id):
            return
        if not hasattr(self, "_values"):  # a searcher pickled by an earlier version, resumed
            self._stock_result(trial_id, result)
            return
        value, step = result.get(self.metric), result.get(self._time_attr)
        if trial_id in self._completed_trials or value is None or step is None:
            return
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return  # NaN epochs (before the first evaluation) tell Optuna nothing
        self._values.setdefault(trial_id, {})[int(step)] = float(value)
        self._stock_result(trial_id, result, lambda: self._ot_trials[trial_id].report(float(value), int(step)))

    def _stock_result(self, trial_id: str, result: dict[str, Any], report: Any = None) -> None:
        """Pass a result on to Optuna (``report``, else the stock way); a trial Optuna already
        finished (a resumed search) is logged, not raised into Tune's loop."""
        try:
            if report is not None:
                report()
            else:
                super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError as exc:
            log.warning("trial %s: a result after Optuna finished the trial (a resumed search); not passed "
                        "to Optuna: %s", trial_id, exc)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if self._is_baseline(trial_id):
            return
        if not hasattr(self, "_values") or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        state, value = self._verdict(trial_id, result, error)
        try:
            if state == optuna.trial.TrialState.COMPLETE:
                self._ot_study.tell(self._ot_trials[trial_id], value)
            else:
                self._ot_study.tell(self._ot_trials[trial_id], state=state)
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError) as exc:
            # Optuna already holds it as finished (the driver died between Optuna's commit and
            # Tune's snapshot), or a value it refuses: logged, never raised into Tune's loop.
            log.warning("trial %s: not told to Optuna again: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    def _verdict(self, trial_id: str, result: dict[str, Any] | None,
                 error: bool) -> tuple[optuna.trial.TrialState, float | None]:
        """How a trial that ended is told to Optuna: (state, value for COMPLETE)."""
        TS = optuna.trial.TrialState
        values = self._values.get(trial_id, {})
        if result and isinstance(result.get(self.metric), (int, float)) and result.get(self._time_attr) is not None \
                and math.isfinite(result[self.metric]):
            values = {**values, int(result[self._time_attr]): float(result[self.metric])}
        if error:
            return TS.FAIL, None
        if not values:
            return TS.PRUNED if result is None else TS.FAIL, None
        last_step = max(values)
        budget = self._budget(trial_id)
        if self._stopped_trials == "pruned" and budget is not None and last_step < budget:
            return TS.PRUNED, None
        if self._stopped_trials == "complete" or self._score == "last":
            return TS.COMPLETE, values[last_step]
        best = max if self.mode == "max" else min
        return TS.COMPLETE, best(values.values())


def set_study_storage(url: str | None) -> None:
    """Name the Optuna storage a :class:`ResumableOptunaSearch` restored in this process opens
    (``Tuner.restore`` unpickles the searcher before the search could pass it anything)."""
    ResumableOptunaSearch.study_url = url


class BaselineExemptASHA(AsyncHyperBandScheduler):
    """ASHA that records the baseline trial's results in its rungs but never stops it early, so the
    MoCo v2 baseline always reaches the full budget and compares like for like with finished trials."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        at = result.get(self._time_attr)
        if (action == TrialScheduler.STOP and trial.config.get(ARM_KEY) == BASELINE_ARM and at is not None
                and at < self._max_t):
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action


def tune_domain(p: Param) -> Any:
    """The Ray Tune sampling domain of a searched parameter (PBT's initial population)."""
    if p.kind == "choice":
        return tune.choice(list(p.choices))
    lo, hi = p.low, p.high
    if p.kind == "int":
        step = int(p.step or 1)
        if p.log:
            return tune.lograndint(int(lo), int(hi) + 1)  # type: ignore[arg-type]
        return tune.qrandint(int(lo), int(hi), step) if step > 1 else tune.randint(int(lo), int(hi) + 1)  # type: ignore[arg-type]
    return tune.loguniform(float(lo), float(hi)) if p.log else tune.uniform(float(lo), float(hi))  # type: ignore[arg-type]


class BoundedPBT(PopulationBasedTraining):
    """Ray Tune's asynchronous ``PopulationBasedTraining`` with bounded, seeded perturbations, a
    lineage log, and the MoCo v2 baseline kept out of the population.

    * **Perturbations** (:func:`pcl_tune.pbt.perturb`): stock PBT multiplies a range by 0.8 or 1.2
      without bounds (a temperature can leave its range, an integer ``k = 2`` never moves:
      round(2 * 1.2) = 2) and draws from Python's global ``random``. Here each mutated setting
      stays inside its searched range, integers move a step, choices move to a neighbour, and
      every draw comes from one generator seeded with ``searcher.seed``.
    * **Lineage log**: every trial's start and every clone (who cloned whom, at which epochs, with
      which settings) goes to ``pbt_lineage/`` in the experiment folder
      (:mod:`pcl_tune.pbt`); the analysis rebuilds each trial's learned schedule from it.
    * **Not at the last epoch** (``last_epoch``): stock PBT also perturbs a trial at its final
      report, sending it back to a donor's earlier checkpoint to redo epochs for nothing; and never
      from a donor that has finished (its final checkpoint leaves the clone nothing to train).
    * **Baseline**: the MoCo v2 trial (``arm: moco_v2``) is never compared, cloned or perturbed,
      so it runs its own settings for the full budget like any baseline.
    """

    def __init__(self, *, params: list[Param], seed: int = 0, resample_probability: float = 0.25,
                 perturbation_factors: tuple[float, ...] = (0.8, 1.2), all_live: bool = False,
                 last_epoch: int | None = None, **kwargs: Any) -> None:
        mutations = {p.name: list(p.choices) if p.kind == "choice" else tune_domain(p) for p in params}
        super().__init__(hyperparam_mutations=mutations, resample_probability=resample_probability,
                         perturbation_factors=tuple(perturbation_factors), **kwargs)  # type: ignore[arg-type]
        self._params = list(params)
        self._rng = np.random.default_rng(seed)
        self._last_operations: dict[str, str] = {}
        self._all_live = all_live
        self._last_epoch = last_epoch
        self._result_time: Any = None

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        self._log(trial, {"event": "start", "trial": trial.trial_id, "config": dict(trial.config)})

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if trial.config.get(ARM_KEY) == BASELINE_ARM:
            return TrialScheduler.CONTINUE  # never scored, so never in a quantile: neither donor nor clone
        self._result_time = result.get(self._time_attr)
        if self._last_epoch is not None and self._result_time is not None and self._result_time >= self._last_epoch:
            return TrialScheduler.CONTINUE  # a trial's last epoch: cloning into it would only redo epochs
        action = super().on_trial_result(tune_controller, trial, result)
        if self._all_live and action == TrialScheduler.PAUSE and trial.status != "PAUSED":
            # Stock PBT pauses every trial at its perturbation point while another is paused or
            # pending, to share the slots fairly; when the whole population runs at once, the only
            # paused trial is one restarting from a clone, and a pause would cost a restart.
            return TrialScheduler.CONTINUE
        return action

    def _checkpoint_or_exploit(self, trial: Any, tune_controller: Any, upper_quantile: list[Any],
                               lower_quantile: list[Any]) -> None:
        """A trial in the bottom quantile clones a random top-quantile trial's latest checkpoint.

        Stock PBT asks every top trial to save again at its perturbation point and clones that
        save. For a function trainable the save returns the checkpoint just reported, which Tune
        then registers a second time; when Tune later deletes the older entry it deletes the
        folder both point to (measured: "Path not found" errors, and a clone that could not
        restore). Here nothing is saved twice: the clone takes the donor's latest registered
        checkpoint, which Tune never deletes, and copies it at once
        (:meth:`_copy_donor_checkpoint`); the lineage log records that checkpoint's epoch.
        """
        if trial not in lower_quantile or not upper_quantile:
            return
        donor = upper_quantile[int(self._rng.integers(len(upper_quantile)))]
        latest = donor.run_metadata.checkpoint_manager.latest_checkpoint_result
        if latest is None or latest.checkpoint is None:
            log.info("PBT: trial %s has no checkpoint yet; trial %s is not cloned this round", donor.trial_id,
                     trial.trial_id)
            return
        donor_epoch = (latest.metrics or {}).get(self._time_attr)
        if self._last_epoch is not None and donor_epoch is not None and donor_epoch >= self._last_epoch:
            # The donor has finished: a clone of its final checkpoint would have no epoch left to
            # train, and would end as a copy of the donor's model under another trial's name.
            log.info("PBT: trial %s has finished; trial %s is not cloned from it", donor.trial_id, trial.trial_id)
            return
        state = self._trial_state[donor]
        state.last_checkpoint, state.last_result = latest.checkpoint, latest.metrics
        self._exploit(tune_controller, trial, donor)

    def _get_new_config(self, trial: Any, trial_to_clone: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        new, ops = perturb(dict(trial_to_clone.config), self._params, self._rng,
                           resample_probability=self._resample_probability, factors=self._perturbation_factors)
        self._last_operations = ops
        return new, dict(ops)

    def _exploit(self, tune_controller: Any, trial: Any, trial_to_clone: Any) -> None:
        trial_epoch = self._result_time  # Tune updates trial.last_result after this callback
        copy = self._copy_donor_checkpoint(trial, self._trial_state[trial_to_clone].last_checkpoint)
        if copy is None:
            return  # the donor's checkpoint is gone: no exploit this round, as stock PBT does without one
        super()._exploit(tune_controller, trial, trial_to_clone)
        trial.run_metadata.checkpoint_manager._latest_checkpoint_result.checkpoint = copy
        donor = self._trial_state[trial_to_clone].last_result or {}
        self._log(trial, {"event": "clone", "trial": trial.trial_id, "donor": trial_to_clone.trial_id,
                          "donor_epoch": donor.get(self._time_attr), "trial_epoch": trial_epoch,
                          "config": dict(trial.config), "operations": self._last_operations})

    def _copy_donor_checkpoint(self, trial: Any, checkpoint: Any) -> Any:
        """A copy of the donor's checkpoint, in ``pbt_clones/<trial id>/`` of the experiment, for the
        clone to restore from (None, logged, when it cannot be copied).

        Tune deletes a trial's older checkpoints as it reports new ones; the donor goes on
        training while the clone restarts, so the folder the clone would restore from can be gone
        by then (measured: a clone restored a few seconds after the exploit found it deleted and
        errored). The copy belongs to the clone alone; it replaces the clone's previous copy, which
        it no longer needs (it has reported checkpoints since).
        """
        from ray.train import Checkpoint

        if checkpoint is None:
            return None
        fs = checkpoint.filesystem
        dest = f"{trial.storage.experiment_fs_path}/pbt_clones/{trial.trial_id}"
        try:
            fs.delete_dir_contents(dest, missing_dir_ok=True)
            fs.create_dir(dest, recursive=True)
            pafs.copy_files(checkpoint.path, dest, source_filesystem=fs, destination_filesystem=fs)
        except (OSError, ValueError) as e:
            log.warning("PBT: trial %s not cloned: its donor's checkpoint %s cannot be copied (%s)",
                        trial.trial_id, checkpoint.path, e)
            return None
        return Checkpoint(path=dest, filesystem=fs)

    def _log(self, trial: Any, event: dict[str, Any]) -> None:
        """Write one event of the lineage log (never raises into Tune's loop).

        One small file per event, written straight to the experiment folder on the storage file
        system (``pbt_lineage/<time>_<event>_<trial>.json``): Tune's driver folder is synced up
        only every few seconds (a killed driver loses what was not), and on resume Tune brings back
        only its own ``.json``/``.pkl`` files, so a log kept there would be overwritten by the
        resumed search's new, shorter one. Separate files need no append, which object stores lack.
        """
        stamp = time.time()
        try:
            fs = trial.storage.storage_filesystem
            folder = f"{trial.storage.experiment_fs_path}/{LINEAGE_DIR}"
            fs.create_dir(folder, recursive=True)
            name = f"{time.time_ns():020d}_{event['event']}_{trial.trial_id}.json"
            with fs.open_output_stream(f"{folder}/{name}") as f:
                f.write(json.dumps({**event, "time": stamp}, default=str).encode())
        except (OSError, ValueError) as e:
            log.warning("PBT lineage log not written (%s): %s", event.get("event"), e)


class BoundedPB2(BoundedPBT):
    """:class:`BoundedPBT` whose clones take new values of the numeric ranges from Population Based
    Bandits (PB2: Parker-Holder, Nguyen and Roberts, NeurIPS 2020) instead of random factors.

    At every perturbation point each PCL trial's objective, epoch and current settings are
    recorded. A clone's new ranges come from Ray Tune's PB2 step (``ray.tune.schedulers.pb2``,
    GP-UCB with a time-varying kernel): a Gaussian process models how much the objective rose
    per epoch under given settings, and the clone takes the settings with the highest upper
    confidence bound, avoiding those other trials took in the same round. Differences to Ray's
    ``PB2`` class, which keeps the rest of :class:`BoundedPBT` (lineage, baseline, last epoch):

    * log ranges (the lr, temperatures) are modelled on a log10 axis (:func:`pcl_tune.pbt.to_gp`),
      integer ranges are rounded to their step, every value is clipped to the space's bounds;
    * choices (a cluster schedule) move to a neighbour as in :func:`pcl_tune.pbt.perturb`: PB2
      models ranges only;
    * until the GP has a data point for the donor (its objective at two perturbation points under
      the same settings), the ranges are perturbed as :class:`BoundedPBT` does; Ray's PB2 would
      copy the donor's values unchanged.

    The GP's optimiser draws its restarts from NumPy's global generator, so PB2 searches are not
    reproducible to the bit even with ``searcher.seed``.
    """

    def __init__(self, *, params: list[Param], **kwargs: Any) -> None:
        super().__init__(params=params, **kwargs)
        self._ranges = [p for p in params if p.numeric]
        self._bounds = {p.name: list(gp_bounds(p)) for p in self._ranges}
        self.data = pd.DataFrame()
        self.current: Any = None
        self.last_exploration_time = 0

    def _save_trial_state(self, state: Any, time: int, result: dict[str, Any], trial: Any) -> float:
        score = super()._save_trial_state(state, time, result, trial)
        row = {"Trial": str(trial), "Time": result[self._time_attr],
               **{p.name: to_gp(p, trial.config[p.name]) for p in self._ranges}, "Reward": score}
        self.data = pd.concat([self.data, pd.DataFrame([row])], ignore_index=True)
        return score

    def _get_new_config(self, trial: Any, trial_to_clone: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        from ray.tune.schedulers.pb2 import _explore
        from sklearn.exceptions import ConvergenceWarning

        new, ops = super()._get_new_config(trial, trial_to_clone)  # choices (and fallback ranges) perturbed
        if not self._ranges or self.data.empty:
            return new, ops
        donor = dict(trial_to_clone.config)
        if self.data["Time"].max() > self.last_exploration_time:
            self.current = None  # a new round: the points other clones took before do not count
        flat = {p.name: to_gp(p, donor[p.name]) for p in self._ranges}
        with warnings.catch_warnings():  # sklearn's GP fit: "close to the specified bound", every round
            warnings.simplefilter("ignore", ConvergenceWarning)
            chosen, data = _explore(self.data, self._bounds, self.current, trial_to_clone, trial, flat)
        if all(chosen[k] == flat[k] for k in flat) and data is self.data:
            return new, ops  # no data point for the donor yet: keep BoundedPBT's perturbation
        self.data = data.copy()
        point = np.array([[chosen[k] for k in self._bounds]], dtype=float)
        if self.data["Time"].max() > self.last_exploration_time:
            self.last_exploration_time = self.data["Time"].max()
            self.current = point
        else:
            self.current = point if self.current is None else np.concatenate([self.current, point])
        for p in self._ranges:
            new[p.name] = from_gp(p, chosen[p.name])
            ops[p.name] = "pb2"
        self._last_operations = ops
        return new, dict(ops)
