"""``python -m pcl_tune.search --space FILE``: Ray Tune + OptunaSearch (TPE) + ASHA over PCL trials.

This is the only module that builds Tuners: it plans resources and concurrency, builds the
Tuner (or restores one), and summarises the result. What runs inside a trial (the ``direct`` and
``train`` executors) is :mod:`pcl_tune.trials`; the experiment folder's files are named in
:mod:`pcl_tune.experiment_folder`, and where it lives (a folder, a shared file system, object
storage) and where its Optuna study lives are :mod:`pcl_tune.storage`'s. The Optuna study
(``optuna.db``) opens with ``optuna-dashboard sqlite:///<experiment>/optuna.db``.

On a cluster of several nodes a storage folder must be one every node reads: the search checks
it (a marker written here, read by a task on every node) before any trial starts.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import experiment_folder as F
from .config import unwritable_reason
from .data import check_dataset
from .space import SearchSpace, SpaceError, check_batch_size, load_space
from .storage import StorageError, Store, check_study_url, default_study_url, join, nodes_missing_path, redact
from .trials import direct_trial, threads_for, train_trial

log = logging.getLogger("pcl_tune.search")


# --------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """Resources and concurrency of a search, derived from the space and the cluster."""

    executor: str
    workers_per_trial: int
    trial_resources: dict[str, float]
    worker_resources: dict[str, float]
    cluster_cpus: float
    cluster_gpus: float
    max_concurrent: int
    threads: int

    def describe(self) -> str:
        if self.executor == "direct":
            what = f"direct: each trial runs in its Tune trial with {self.trial_resources}"
        else:
            what = (f"train: each trial fits a TorchTrainer with {self.workers_per_trial} DDP worker(s), "
                    f"each {self.worker_resources}")
        return (f"{what}; cluster {self.cluster_cpus:g} CPU / {self.cluster_gpus:g} GPU -> at most "
                f"{self.max_concurrent} concurrent trial(s); torch threads per process {self.threads}")


def make_plan(space: SearchSpace, cluster_cpus: float, cluster_gpus: float) -> Plan:
    """Concurrency such that trials never starve each other's worker groups."""
    r = space.resources
    if r.executor == "direct":
        trial = {"CPU": float(r.cpus_per_trial)}
        if r.gpus_per_trial:
            trial["GPU"] = float(r.gpus_per_trial)
        per_cpu, per_gpu = r.cpus_per_trial, r.gpus_per_trial
        worker: dict[str, float] = {}
        threads = threads_for(r.cpus_per_trial)
    else:
        # The trial driver only waits on its TorchTrainer: it holds no CPU (Ray rejects cpu=0
        # alone, so it asks for a little memory); the workers hold the real resources.
        trial = {"CPU": 0.0, "memory": 64 * 1024 * 1024}
        worker = {"CPU": float(r.cpus_per_worker)}
        if r.gpus_per_worker:
            worker["GPU"] = float(r.gpus_per_worker)
        per_cpu = r.workers_per_trial * r.cpus_per_worker
        per_gpu = r.workers_per_trial * r.gpus_per_worker
        threads = threads_for(r.cpus_per_worker)
    limits = []
    if per_cpu > 0:
        limits.append(math.floor(cluster_cpus / per_cpu + 1e-9))
    if per_gpu > 0:
        limits.append(math.floor(cluster_gpus / per_gpu + 1e-9))
    fit = min(limits) if limits else space.total_trials()
    if fit < 1:
        need = f"{per_cpu:g} CPU" + (f" and {per_gpu:g} GPU" if per_gpu else "")
        raise SpaceError(f"{space.path}: key 'resources': one trial needs {need} but the Ray cluster has "
                         f"{cluster_cpus:g} CPU / {cluster_gpus:g} GPU")
    conc = min(fit, space.total_trials())
    if r.max_concurrent is not None:
        conc = min(conc, r.max_concurrent)
    return Plan(r.executor, r.workers_per_trial, trial, worker, cluster_cpus, cluster_gpus, max(1, conc), threads)


def apply_cli(space: SearchSpace, args: argparse.Namespace) -> SearchSpace:
    """Command-line overrides of the space file."""
    if args.smoke:
        space = space.smoke()
    if args.num_samples is not None:
        space.num_samples = args.num_samples
        space.startup_trials = min(space.startup_trials, args.num_samples)
    r = space.resources
    if args.workers_per_trial is not None:
        r.executor = "train" if args.workers_per_trial > 0 else "direct"
        r.workers_per_trial = max(1, args.workers_per_trial)
    for name in ("executor", "gpus_per_trial", "gpus_per_worker", "cpus_per_worker", "cpus_per_trial",
                 "max_concurrent"):
        if getattr(args, name) is not None:
            setattr(r, name, getattr(args, name))
    return space


def describe_space(space: SearchSpace) -> str:
    lines = [f"search space {space.path} ({space.name})"]
    if space.description:
        lines.append(f"  {space.description.strip()}")
    lines.append("  searched:")
    for p in space.params:
        lines.append(f"    {p.name:28s} {p.describe()}")
    lines.append("  fixed (differences from the defaults):")
    from .config import TrainConfig

    defaults = TrainConfig().flat()
    for k, v in space.base_config().flat().items():
        if defaults.get(k) != v:
            lines.append(f"    {k:28s} {v!r}")
    lines.append(f"  objective: {space.mode} {space.metric} (val split), a trial scored by its {space.score} epoch")
    if space.is_ablation:
        n = math.prod(len(p.choices) for p in space.params)
        arms = f" x {len(space.arms)} arm(s) ({', '.join(space.arms)})" if space.arms else ""
        lines.append(f"  ablation: grid of {n} combination(s){arms} x {len(space.seeds)} paired seeds "
                     f"{space.seeds} = {space.total_trials()} trials, full budget")
    elif space.algorithm == "grid":
        n = math.prod(len(p.choices) for p in space.params)
        lines.append(f"  searcher: grid of {n} combinations x {space.num_samples} sample(s)")
    elif space.is_pbt and space.pbt is not None:
        from .space import pbt_burn_in

        b = space.pbt
        lines.append(f"  Population Based Training: {b.population} trials drawn at random (seed {space.seed}) train "
                     f"together; every {b.interval} epochs from epoch {pbt_burn_in(space)} the bottom "
                     f"{b.quantile:.0%} clone a top-{b.quantile:.0%} trial and perturb {', '.join(b.mutate)} "
                     f"(resample p={b.resample_probability:g}, factors {list(b.perturbation_factors)})"
                     + ("; PB2's GP-UCB picks the new values of the ranges" if b.explore == "pb2" else ""))
        for point in space.points_to_evaluate[: b.population]:
            lines.append("    in the population: " + ", ".join(f"{k}={v}" for k, v in point.items()))
    else:
        told = ("as pruned (ranked by how far they got)" if space.stopped_trials == "pruned"
                else "as complete with their last value (stock Ray Tune)")
        lines.append(f"  searcher: Optuna TPE seed {space.seed}, {space.startup_trials} random start-up trials, "
                     f"{space.num_samples} trials; trials ASHA stops are told to TPE {told}")
        for point in space.points_to_evaluate:
            lines.append("    evaluated first: " + ", ".join(f"{k}={v}" for k, v in point.items()))
    if space.has_baseline:
        point = {k: v for k, v in space.baseline_point().items() if k != "arm"}
        lines.append("  baseline (MoCo v2, " + ("not in the population, never cloned or perturbed): " if space.is_pbt
                                         else "not told to TPE, never stopped early): ")
                     + ", ".join(f"{k}={v}" for k, v in point.items())
                     + (" (once per seed)" if space.is_ablation else ""))
    max_t = space.resolved_max_t()
    if space.is_pbt:
        lines.append(f"  no early stopping: every trial runs {max_t} epochs (PBT replaces its weakest instead)")
    elif space.asha:
        lines.append(f"  ASHA on the epoch: grace {space.grace_period}, reduction factor {space.reduction_factor}, "
                     f"max_t {max_t}, brackets {space.brackets}")
    else:
        lines.append(f"  no early stopping: every trial runs {max_t} epochs")
    return "\n".join(lines)


# --------------------------------------------------------------------------- running

def _init_ray(args: argparse.Namespace, want_dashboard: bool) -> None:
    import ray

    address = args.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as e:  # e.g. `auto` with no cluster on this machine
            first = (str(e).strip().splitlines() or [""])[0]
            raise SpaceError(f"address {address!r}: no Ray cluster to join ({first})") from None
        return
    kwargs: dict[str, Any] = {"include_dashboard": want_dashboard, "log_to_driver": True}
    if want_dashboard:
        port = args.dashboard_port
        if not _port_free(port):
            # Another Ray (another search, a test) holds the port: take a free one rather than fail.
            port = _port_free(0, pick=True)
            print(f"[pcl_tune] port {args.dashboard_port} is taken; the dashboard uses {port}", file=sys.stderr)
        kwargs.update(dashboard_host="127.0.0.1", dashboard_port=port)
    if args.num_cpus is not None:
        kwargs["num_cpus"] = args.num_cpus
    if args.num_gpus is not None:
        kwargs["num_gpus"] = args.num_gpus
    ctx = ray.init(**kwargs)
    if want_dashboard:
        url = getattr(ctx, "dashboard_url", None) or f"127.0.0.1:{kwargs['dashboard_port']}"
        token_note = ("the dashboard asks for Ray's auth token: print it with `ray get-auth-token` "
                      "(stored in ~/.ray/auth_token)") if os.environ.get("RAY_AUTH_MODE", "token") != "disabled" \
            else "token auth disabled (RAY_AUTH_MODE=disabled)"
        print(f"[pcl_tune] Ray dashboard: http://{url}  ({token_note})", flush=True)


def _check_address(address: str, what: str, timeout: float = 3.0) -> None:
    """Fail fast (one line) when ``address`` (``host:port``, ``ray://host:port``) does not accept a
    TCP connection: Ray itself retries for minutes (still at 150 s, measured). ``auto`` is left to Ray."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except OSError as e:
        reason = f"no answer in {timeout:g} s" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__)
        raise SpaceError(f"{what} {address}: no Ray cluster answers there ({reason}); start one with "
                         "`ray start --head` or check the address") from None


def _check_resumable(store: Store, name: str) -> None:
    """``store`` holds a search that ``--resume`` can continue (a remote one is downloaded into its
    working copy first); raises :class:`SpaceError`."""
    if not store.exists():
        raise SpaceError(f"--resume --name {name}: no experiment {store.display} to resume (check --name and "
                         "--storage-path)")
    exp_dir = store.pull()
    if not (exp_dir / F.SPACE_YAML).is_file():
        raise SpaceError(f"{store.display}: not a pcl_tune experiment (no {F.SPACE_YAML}); nothing to resume")
    from ray import tune

    if not tune.Tuner.can_restore(store.uri):
        raise SpaceError(f"{store.display}: Ray Tune saved no state there (the search stopped before it started); "
                         "nothing to resume: start it again under another --name")


def _study_url(store: Store, space: SearchSpace, args: argparse.Namespace, run: dict[str, Any]) -> str | None:
    """The Optuna storage URL of a TPE search (None for grid and PBT searches): ``--optuna-storage``
    or the experiment folder's ``optuna.db``. On ``--resume`` it must be the study the search
    started with (``run['optuna_storage']``, recorded without its password), which must exist:
    anything else would fork the study. Raises :class:`SpaceError`."""
    given = args.optuna_storage
    if space.is_pbt or space.algorithm == "grid":
        if given:
            raise SpaceError(f"--optuna-storage: {space.path} is a {'PBT' if space.is_pbt else 'grid'} search; "
                             "it has no Optuna study")
        return None
    url = given or default_study_url(store, F.OPTUNA_DB)  # a given URL was checked by main()
    if not args.resume:
        return url
    started = run.get("optuna_storage")  # absent: the experiment folder's own optuna.db
    own = "the experiment folder's optuna.db"
    if (redact(given) if given else None) != started:
        raise SpaceError(f"--resume: the search's Optuna study is in {started or own}, not in "
                         f"{redact(given) if given else own}; resuming with another would fork the study: "
                         + (f"pass --optuna-storage {started}" if started else "leave --optuna-storage out"))
    import optuna

    from .storage import open_study_storage

    if space.name not in optuna.study.get_all_study_names(open_study_storage(url)):
        where = redact(url) if given else f"{store.display}/{F.OPTUNA_DB}"
        raise SpaceError(f"--resume: the Optuna study {space.name!r} is not in {where}; resuming would start "
                         "TPE from nothing beside the trials Tune restores (a forked study)")
    return url


def _check_cli_numbers(args: argparse.Namespace) -> None:
    """Command-line numbers in their ranges; raises :class:`SpaceError` naming the option."""
    checks = [("num_samples", 1, "an integer >= 1"), ("max_concurrent", 1, "an integer >= 1"),
              ("workers_per_trial", 0, "0 (direct executor) or a number of DDP workers >= 1"),
              ("gpus_per_trial", 0, "a number >= 0"), ("gpus_per_worker", 0, "a number >= 0"),
              ("cpus_per_worker", 0, "a number >= 0"), ("cpus_per_trial", 0, "a number >= 0"),
              ("num_cpus", 0, "an integer >= 0"), ("num_gpus", 0, "an integer >= 0"),
              ("max_failures", 0, "an integer >= 0"), ("dashboard_port", 0, "a port number in 0..65535")]
    for name, low, expected in checks:
        value = getattr(args, name)
        if value is not None and (value < low or (name == "dashboard_port" and value > 65535)):
            raise SpaceError(f"--{name.replace('_', '-')} {value:g}: expected {expected}")
    if args.workers_per_trial == 0 and args.executor == "train":
        raise SpaceError("--workers-per-trial 0 --executor train: expected --workers-per-trial >= 1 for the train "
                         "executor (0 means the direct executor)")


def _port_free(port: int, *, pick: bool = False) -> Any:
    """Whether ``port`` on 127.0.0.1 can be bound; with ``pick``, a free port number."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return int(sock.getsockname()[1]) if pick else True


def build_tuner(space: SearchSpace, plan: Plan, store: Store, *, max_failures: int, restore: bool,
                warm: Any = None, study_url: str | None = None) -> Any:
    """The Tuner of a new search, or the restored one (``restore``). ``study_url``: the Optuna
    storage of a TPE search (default: the experiment folder's ``optuna.db``)."""
    import optuna
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from .config import merge
    from .searcher import BaselineExemptASHA, ResumableOptunaSearch, set_study_storage
    from .storage import open_study_storage

    # Each trial keeps its best epoch's weights (checkpoint/best.pt) by the search's objective.
    fixed = merge(dict(space.fixed), {"eval.best_metric": space.metric})
    if plan.executor == "direct":
        fn = tune.with_parameters(direct_trial, fixed=fixed, threads=plan.threads)
    else:
        fn = tune.with_parameters(train_trial, fixed=fixed, workers=plan.workers_per_trial,
                                  cpus_per_worker=plan.worker_resources.get("CPU", 1.0),
                                  gpus_per_worker=plan.worker_resources.get("GPU", 0.0),
                                  train_storage=join(store.uri, F.TRAIN_RUNS),
                                  max_failures=max_failures)
    resources = {k.lower() if k in ("CPU", "GPU") else k: v for k, v in plan.trial_resources.items()}
    trainable = tune.with_resources(fn, resources)
    if space.is_pbt:
        # Ray warns that num_to_keep <= 2 can delete a donor's checkpoint before its clone restores:
        # BoundedPBT clones the donor's latest checkpoint (never deleted) and copies it at once.
        warnings.filterwarnings("ignore", message=r"Using `CheckpointConfig.num_to_keep <= 2` with PBT")
    study_url = study_url or default_study_url(store, F.OPTUNA_DB)
    set_study_storage(study_url)  # what a restored (or copied) searcher reconnects to
    if restore:
        return tune.Tuner.restore(store.uri, trainable=trainable, resume_unfinished=True, resume_errored=True)
    param_space: dict[str, Any] = {}
    searcher: Any
    scheduler: Any = None
    if space.is_pbt:
        param_space, searcher, scheduler = _pbt_parts(space, max_concurrent=plan.max_concurrent)
        num_samples = space.total_trials()
    elif space.algorithm == "grid":
        # Every cell is a preset point (seed by seed, the baseline among them): Tune runs them in
        # this order, and each trial's params.json holds its full cell.
        cells = space.cells()
        param_space = dict(cells[0]) if cells else {}
        searcher = BasicVariantGenerator(points_to_evaluate=cells, max_concurrent=plan.max_concurrent)
        num_samples = len(cells)
    else:
        storage = open_study_storage(study_url)
        if warm is not None and warm.trials:
            from .warm_start import seed_study

            seed_study(storage, space.name, space, warm.trials)
        sampler = optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=space.startup_trials)
        searcher = ResumableOptunaSearch(space.define_by_run(), metric=space.metric, mode=space.mode,
                                         sampler=sampler, storage=storage, study_name=space.name,
                                         points_to_evaluate=space.points_to_evaluate or None,
                                         baseline=space.baseline_point() if space.has_baseline else None,
                                         max_t=space.resolved_max_t(), score=space.score,
                                         stopped_trials=space.stopped_trials, store=store)
        num_samples = space.total_trials()
    max_t = space.resolved_max_t()
    if space.asha:
        scheduler = BaselineExemptASHA(time_attr="epoch", max_t=max_t, grace_period=space.grace_period,
                                       reduction_factor=space.reduction_factor, brackets=space.brackets)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=space.metric, mode=space.mode, search_alg=searcher, scheduler=scheduler,
            num_samples=num_samples,
            # A BasicVariantGenerator (grid, PBT) takes the cap itself; Tune ignores this one then, with a warning.
            max_concurrent_trials=None if isinstance(searcher, BasicVariantGenerator) else plan.max_concurrent,
            reuse_actors=True if space.is_pbt else None,  # a clone restarts in a running process
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
            trial_name_creator=lambda t: f"trial_{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=store.name, storage_path=store.root,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=max_failures if plan.executor == "direct" else 0),
            verbose=1,
        ),
    )


def _pbt_parts(space: SearchSpace, *, max_concurrent: int) -> tuple[dict[str, Any], Any, Any]:
    """(param_space, searcher, scheduler) of a PBT search: a random initial population (the space's
    points first, then the MoCo v2 baseline) and :class:`~pcl_tune.searcher.BoundedPBT` (or
    :class:`~pcl_tune.searcher.BoundedPB2` with ``pbt.explore: pb2``)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from .searcher import BoundedPB2, BoundedPBT, tune_domain
    from .space import ARM_KEY, pbt_burn_in

    assert space.pbt is not None
    b = space.pbt
    param_space: dict[str, Any] = {p.name: tune_domain(p) for p in space.params}
    points = [dict(p) for p in space.points_to_evaluate[: b.population]]
    if space.has_baseline:
        param_space[ARM_KEY] = None  # PCL trials carry no arm; the baseline's point sets it
        points.insert(min(1, len(points)), space.baseline_point())
    if space.has_baseline:
        _quiet_baseline_point(space.baseline_point())
    searcher = BasicVariantGenerator(points_to_evaluate=points or None, random_state=space.seed,
                                     max_concurrent=max_concurrent)
    cls = BoundedPB2 if b.explore == "pb2" else BoundedPBT
    scheduler = cls(params=[p for p in space.params if p.name in b.mutate], seed=space.seed,
                           resample_probability=b.resample_probability, perturbation_factors=b.perturbation_factors,
                           time_attr="epoch", perturbation_interval=b.interval, burn_in_period=pbt_burn_in(space),
                           quantile_fraction=b.quantile, synch=False, all_live=max_concurrent >= space.total_trials(),
                           last_epoch=space.resolved_max_t())
    return param_space, searcher, scheduler


def _quiet_baseline_point(point: dict[str, Any]) -> None:
    """Drop Ray's "Pre-set value ... is not within valid values" warning for the MoCo v2 baseline's
    own settings (``pcl.proto_weight: 0`` lies outside a searched range on purpose); a user's
    out-of-range point still warns."""
    names = tuple(f"`{v}` is not within valid values of parameter `{k}`" for k, v in point.items())

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            msg = record.getMessage()
            return not (msg.startswith("Pre-set value") and any(n in msg for n in names))

    logging.getLogger("ray.tune.search.variant_generator").addFilter(_Filter())


def summarize(results: Any, space: SearchSpace, exp_dir: Path) -> dict[str, Any] | None:
    """Write trials.csv and best.yaml; print the best trial by the space's ``objective.score`` (its
    last or its best epoch: :func:`pcl_tune.experiment_folder.best_epoch`, as Optuna and the
    analysis score it)."""
    import pandas as pd

    results.get_dataframe().to_csv(exp_dir / F.TRIALS_CSV, index=False)
    errors = [r for r in results if r.error is not None]
    by_id = {Path(r.path).name.removeprefix(F.TRIAL_PREFIX): r for r in results if r.path}
    frames = [r.metrics_dataframe.assign(trial_id=tid) for tid, r in by_id.items()
              if r.metrics_dataframe is not None and "epoch" in r.metrics_dataframe]
    best = F.best_epoch(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(), space.metric, space.mode,
                        space.score, space.resolved_max_t())
    if best is None:
        print(f"[pcl_tune] no trial reported {space.metric}; see {exp_dir}", flush=True)
        return None
    result = by_id[best.trial_id]
    best_yaml = F.write_best_yaml(exp_dir / F.BEST_YAML, space.fixed, result.config)
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    print(f"\n[pcl_tune] {len(results)} trials, {len(errors)} errored. Best {space.metric} = {best.value:.4g} "
          f"({space.mode}) at epoch {best.epoch} of {F.TRIAL_PREFIX}{best.trial_id}", flush=True)
    for k, v in sorted(result.config.items()):
        print(f"    {k:28s} {v!r}")
    print(f"  latest checkpoint: {ckpt}\n  full config: {best_yaml} "
          f"(re-run: python -m pcl_tune.train --config {best_yaml} --out {exp_dir / 'best_rerun'})\n"
          f"  trial table: {exp_dir / F.TRIALS_CSV}; per-epoch results: {exp_dir}/{F.TRIAL_PREFIX}*/progress.csv",
          flush=True)
    for r in errors:
        print(f"  errored: {Path(r.path).name}: {str(r.error).strip().splitlines()[-1][:300]}")
    return {"metric": best.value, "epoch": best.epoch, "trial_id": best.trial_id, "config": result.config,
            "checkpoint": ckpt}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pcl_tune.search",
                                description="Search PCL hyperparameters with Ray Tune, Optuna (TPE) and ASHA.")
    p.add_argument("--space", help="search-space YAML (see search_spaces/); with --resume defaults to the copy "
                                   "in the experiment folder")
    p.add_argument("--name", help="experiment name (default: the space's name)")
    p.add_argument("--storage-path", default="./runs",
                   help="where experiments go: a folder (on a cluster, one every node mounts) or an object-store "
                        "URI such as s3://bucket/prefix, credentials from the environment (default ./runs)")
    p.add_argument("--optuna-storage", metavar="URL",
                   help="the Optuna study's database: postgresql://..., mysql+pymysql://..., "
                        "sqlite:////abs/path.db or journal:////abs/path.log (default: optuna.db in the "
                        "experiment folder; pcl_tune/storage.py)")
    p.add_argument("--num-samples", type=int, help="number of trials")
    p.add_argument("--max-concurrent", type=int, help="cap on concurrent trials")
    p.add_argument("--executor", choices=["direct", "train"], help="run trials directly or through Ray Train")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train DDP workers per trial (0 = direct executor)")
    p.add_argument("--gpus-per-trial", type=float, help="direct executor: GPUs per trial (fractions allowed)")
    p.add_argument("--gpus-per-worker", type=float, help="train executor: GPUs per worker")
    p.add_argument("--cpus-per-worker", type=float, help="train executor: CPUs per worker")
    p.add_argument("--cpus-per-trial", type=float, help="direct executor: CPUs per trial")
    p.add_argument("--num-cpus", type=int, help="local Ray: logical CPUs to declare")
    p.add_argument("--num-gpus", type=int, help="local Ray: GPUs to declare")
    p.add_argument("--address", help="join an existing Ray cluster (RAY_ADDRESS is honoured)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted experiment (Tuner.restore)")
    p.add_argument("--dashboard", dest="dashboard", action="store_true", default=True,
                   help="start Ray's dashboard on 127.0.0.1 (default)")
    p.add_argument("--no-dashboard", dest="dashboard", action="store_false")
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--max-failures", type=int, default=1, help="restarts of a failed trial / worker group")
    p.add_argument("--warm-start", nargs="+", default=[], metavar="RUN_DIR",
                   help="earlier experiment folders: their best configurations are evaluated first and, where "
                        "the spaces match, their trials are told to TPE (pcl_tune/warm_start.py)")
    p.add_argument("--warm-start-top", type=int, default=3, metavar="N",
                   help="configurations taken from each --warm-start folder (default 3)")
    p.add_argument("--smoke", action="store_true", help="shrink everything (CI, quick checks)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved space and resource plan, then exit")
    p.add_argument("--no-report", action="store_true", help="do not write the analysis report at the end")
    return p


def _warm_start(space: SearchSpace, args: argparse.Namespace) -> Any:
    """Load ``--warm-start`` folders and put their best configurations first (None without any)."""
    if not args.warm_start:
        return None
    if space.algorithm == "grid" or space.is_ablation or space.is_pbt:
        raise SpaceError(f"--warm-start: {space.path} is a grid, an ablation or a PBT search; only a TPE search is "
                         "warm-started")
    from .storage import is_uri
    from .warm_start import load_warm_start

    # A remote earlier search is read from its working copy (weights stay remote).
    folders = [str(Store.of_folder(w).pull()) if is_uri(w) else w for w in args.warm_start]
    warm = load_warm_start(folders, space, top=args.warm_start_top)
    space.points_to_evaluate = list(space.points_to_evaluate) + warm.points
    return warm


EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""An experiment name: a folder name under ``--storage-path``, never a path out of it."""


def check_experiment_name(name: str, where: str) -> None:
    """Refuse a name that is not a plain folder name (``../x``, ``/abs``, ``a b; rm``): raises SpaceError."""
    if not EXPERIMENT_NAME.fullmatch(str(name)):
        raise SpaceError(f"{where}: got {str(name)!r}, expected an experiment name of letters, digits, '.', '_' "
                         "and '-' (a folder under --storage-path), starting with a letter or digit")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="[%(name)s] %(message)s")
    try:
        root = Store.open(args.storage_path, "_").root
        _check_cli_numbers(args)
        if args.warm_start and args.resume:
            raise SpaceError("--warm-start goes with a new search, not --resume (the study already has its trials)")
        if args.resume and not args.space and not args.name:
            raise SpaceError("--resume needs --name (or --space) to find the experiment folder")
        if args.resume and not args.space:
            check_experiment_name(args.name, "--name")
            _check_resumable(Store(root, args.name), args.name)
            space_file = Store(root, args.name).local / F.SPACE_YAML
        else:
            if not args.space:
                raise SpaceError("--space FILE is required (see search_spaces/)")
            space_file = Path(args.space)
        space = apply_cli(load_space(space_file), args)
        check_batch_size(space)  # again: --workers-per-trial changes how the batch splits
        if space.is_pbt and space.resources.executor == "train":
            raise SpaceError(f"{space.path}: `scheduler: pbt` runs with the direct executor (a Ray Train trial "
                             "resumes its own checkpoint, not the one PBT clones); drop --executor train / "
                             "--workers-per-trial")
        name = args.name or space.name
        check_experiment_name(name, "--name" if args.name else f"{space.path}: key 'name'")
        store = Store(root, name)
        exp_dir = store.local
        if args.optuna_storage:
            check_study_url(args.optuna_storage, store)
        warm = _warm_start(space, args)
        if args.dry_run:
            import multiprocessing

            cpus = float(args.num_cpus or multiprocessing.cpu_count())
            gpus = float(args.num_gpus or 0)
            print(describe_space(space))
            if warm is not None:
                print("  " + "\n  ".join([warm.describe(), *warm.notes]))
            where = f"cluster at {args.address or os.environ.get('RAY_ADDRESS')}" if (
                args.address or os.environ.get("RAY_ADDRESS")) else "this machine"
            try:
                plan_text = make_plan(space, cpus, gpus).describe()
            except SpaceError as e:
                plan_text = str(e).split("key 'resources': ", 1)[-1] + " (declare --num-cpus/--num-gpus or use --address)"
            print(f"  resources ({where}; assumed {cpus:g} CPU / {gpus:g} GPU): {plan_text}")
            print(f"  experiment folder: {store.display}" + (f" (working copy {exp_dir})" if store.remote else ""))
            return 0
        if args.resume and args.space:
            _check_resumable(store, name)
        if not args.resume and store.exists():
            raise SpaceError(f"{store.display} already exists; pass --resume to continue it or choose another --name")
        if store.remote:
            store.check_writable()
            if not args.resume:
                store.reset_local()
        reason = unwritable_reason(exp_dir, folder=True)
        if reason:
            raise SpaceError(f"--storage-path {args.storage_path}: cannot write the experiment folder {exp_dir}: {reason}")
        run_record = F.read_space_json(exp_dir)[1] if args.resume and (exp_dir / F.SPACE_JSON).is_file() else {}
        study_url = _study_url(store, space, args, run_record)
        address = args.address or os.environ.get("RAY_ADDRESS")
        if address:
            _check_address(address, "--address" if args.address else "RAY_ADDRESS")
        else:  # on a cluster the data live on its nodes, not necessarily here
            try:
                check_dataset(space.base_config())
            except OSError as e:
                raise SpaceError(f"{space_file}: key 'data.root': {e}") from None
    except SpaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import ray

    want_dashboard = args.dashboard
    if space.resources.executor == "train" and not want_dashboard:
        print("[pcl_tune] note: keeping Ray's dashboard process on: without it a Ray Train trial stopped by ASHA "
              "leaks its placement group and later trials wait forever (Ray 2.60)", file=sys.stderr)
        want_dashboard = True
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "1")
    # Keeping one checkpoint per trial forces an experiment snapshot at every report; that is the
    # intended trade-off (resume loses at most one epoch), so Tune's warning about it is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")
    try:
        _init_ray(args, want_dashboard)
    except SpaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = ray.cluster_resources()
    try:
        plan = make_plan(space, float(res.get("CPU", 0)), float(res.get("GPU", 0)))
    except SpaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe_space(space), flush=True)
    if warm is not None:
        print("  " + "\n  ".join([warm.describe(), *warm.notes]), flush=True)
    print(f"  resources: {plan.describe()}\n  experiment folder: {store.display}"
          + (f" (pcl_tune's files written first to {exp_dir})" if store.remote else ""), flush=True)
    try:
        _check_shared(store, args)
    except SpaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    exp_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        shutil.copyfile(space_file, exp_dir / F.SPACE_YAML)
        F.write_space_json(exp_dir, space, {
            "executor": plan.executor, "workers_per_trial": plan.workers_per_trial, "smoke": bool(args.smoke),
            "command": shlex.join([sys.executable, "-m", "pcl_tune.search"] + (argv if argv is not None else sys.argv[1:])),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            **({"warm_start": warm.sources} if warm is not None else {}),
            **({"optuna_storage": redact(args.optuna_storage)} if args.optuna_storage else {}),
        })
        store.push(F.SPACE_YAML, F.SPACE_JSON)
    tuner = build_tuner(space, plan, store, max_failures=args.max_failures, restore=args.resume, warm=warm,
                        study_url=study_url)
    t0 = time.time()
    results = tuner.fit()
    unfinished = [r for r in results if r.metrics is None or not r.metrics.get("done", True)]
    if store.remote:
        # The trials' files, for the summary and the report (weights stay remote); the driver's
        # own files here are newer than or equal to their uploads.
        store.pull(keep=(F.SPACE_YAML, F.SPACE_JSON, F.OPTUNA_DB))
    best = summarize(results, space, exp_dir)
    print(f"[pcl_tune] wall time {time.time() - t0:.0f}s", flush=True)
    if study_url and args.optuna_storage:
        _copy_study(study_url, space.name, exp_dir / F.OPTUNA_DB)
    if not args.no_report:
        _write_report(exp_dir)
    try:
        store.push(F.TRIALS_CSV, F.BEST_YAML, F.OPTUNA_DB, *F.REPORT_FILES)
    except StorageError as e:
        print(f"[pcl_tune] {e}; the files stay in {exp_dir}", file=sys.stderr)
    if unfinished and len(results) < space.total_trials():
        print("[pcl_tune] the search stopped early; continue it with: "
              + shlex.join(["python", "-m", "pcl_tune.search", "--name", name, "--storage-path", redact(root),
                            "--resume"] + (["--optuna-storage", redact(args.optuna_storage)] if args.optuna_storage
                                           else [])), flush=True)
    return 0 if best is not None else 1


def _check_shared(store: Store, args: argparse.Namespace) -> None:
    """On a cluster of several nodes, a file-system storage path must be one every node reads
    (trials restore from it wherever they run); raises :class:`SpaceError` naming what to pass."""
    if store.remote:
        return
    missing, total = nodes_missing_path(store.root)
    if missing:
        raise SpaceError(f"--storage-path {args.storage_path}: {store.root} is on this machine only: "
                         f"{len(missing)} of the cluster's {total} nodes ({', '.join(missing)}) cannot read it; "
                         "pass a folder every node mounts (a shared file system such as NFS) or an object-store "
                         "URI (s3://bucket/prefix)")


def _copy_study(url: str, study_name: str, dest: Path) -> None:
    """A copy of a study kept in a database server, as the experiment folder's ``optuna.db``, so
    the analysis reads it offline (replaced on every run)."""
    import optuna

    from .storage import open_study_storage

    try:
        dest.unlink(missing_ok=True)
        optuna.copy_study(from_study_name=study_name, from_storage=open_study_storage(url),
                          to_storage=f"sqlite:///{dest}")
    except Exception as e:  # the search's results stand without the copy
        print(f"[pcl_tune] could not copy the Optuna study into {dest}: {e}", file=sys.stderr)


def _write_report(exp_dir: Path) -> None:
    """The analysis report, when the analysis package provides one."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # a command-line process: Optuna's figures go through pyplot
        from analysis import report as report_mod  # type: ignore[attr-defined]
    except ImportError:
        return
    try:
        import analysis
        from analysis.__main__ import print_verdicts

        exp = analysis.load(exp_dir)
        path = report_mod.write_report(exp_dir, experiment=exp)
        print(f"[pcl_tune] report: {path}", flush=True)
        print_verdicts(exp)  # the ablation's verdicts, or the best PCL trial against MoCo v2 alone
    except Exception as e:  # the search result stands even if the report fails
        print(f"[pcl_tune] report failed: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
