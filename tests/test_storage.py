"""Experiments on object storage and the Optuna study's storage (:mod:`pcl_tune.storage`).

The S3 tests run against a real S3-compatible server the tests start on 127.0.0.1 (``moto``'s
server mode, a test dependency) with credentials in the environment only: a search writes there,
is killed, resumes there from another working copy (another machine's), and the analysis reads
it back; the secret key never appears in any output or any stored file.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_faults import _paused_env, _run_until_paused, _three_trials
from test_search import _env, _space, _wait_for

from pcl_tune.storage import (
    StorageError,
    Store,
    check_study_url,
    is_uri,
    join,
    nodes_missing_path,
    redact,
    resolve_root,
)

# ----------------------------------------------------------------------------- paths and URLs


def test_uris_paths_and_joins() -> None:
    assert is_uri("s3://b/p") and is_uri("gs://b") and not is_uri("/x/runs") and not is_uri("file:///x")
    assert not is_uri("runs") and not is_uri("C:/runs")
    assert resolve_root("s3://b/p/") == "s3://b/p"
    assert resolve_root("file:///tmp/x/../runs") == "/tmp/runs"
    assert join("s3://b/p?endpoint_override=h:9000", "exp", "train_runs") == "s3://b/p/exp/train_runs?endpoint_override=h:9000"
    store = Store.of_folder("s3://b/pre/fix/exp1")
    assert (store.root, store.name, store.uri) == ("s3://b/pre/fix", "exp1", "s3://b/pre/fix/exp1")
    assert store.remote and store.local.parts[-5:] == ("s3", "b", "pre", "fix", "exp1")
    local = Store.of_folder("/tmp/runs/exp1")
    assert (local.root, local.name, local.remote, local.local) == ("/tmp/runs", "exp1", False, Path("/tmp/runs/exp1"))


def test_redaction_hides_passwords_and_secret_query_values() -> None:
    assert redact("postgresql://alice:hunter2@db:5432/optuna") == "postgresql://alice:***@db:5432/optuna"
    assert "hunter2" not in redact("s3://b/p?secret_key=hunter2&region=eu")
    assert redact("s3://b/p?region=eu") == "s3://b/p?region=eu"


@pytest.mark.parametrize("uri", ["s3://b/p?access_key=AKIA&secret_key=hunter2", "s3://alice:hunter2@b/p"])
def test_credentials_in_the_uri_are_refused_without_echoing_them(uri: str) -> None:
    with pytest.raises(StorageError) as e:
        resolve_root(uri)
    assert "hunter2" not in str(e.value) and "environment" in str(e.value)


def test_study_urls_that_would_fork_the_study_are_refused(tmp_path: Path) -> None:
    local, remote = Store(str(tmp_path), "e"), Store("s3://b/p", "e")
    check_study_url(f"sqlite:///{tmp_path}/x.db", local)  # four slashes: absolute
    check_study_url("postgresql://u:pw@host/db", remote)
    for url, store, words in [("sqlite:///rel.db", local, "absolute path"),
                              (f"journal:///{tmp_path}/j.log", remote, "forks the study"),
                              (f"sqlite:///{tmp_path}/x.db", remote, "forks the study"),
                              ("redis://h/0", local, "expected a database URL")]:
        with pytest.raises(StorageError, match=words):
            check_study_url(url, store)


def test_a_restored_searcher_opens_the_study_it_is_told_not_the_pickled_path(tmp_path: Path) -> None:
    """A folder moved (or downloaded to another machine) resumes its own study: the searcher
    pickles no storage, and reconnects to the URL the resuming command names."""
    import optuna

    from pcl_tune.searcher import ResumableOptunaSearch, set_study_storage
    from pcl_tune.space import DefineByRun, Param

    space = DefineByRun([Param("optim.lr", "loguniform", low=0.01, high=0.1, log=True)], {})
    first = tmp_path / "a" / "optuna.db"
    first.parent.mkdir()
    s = ResumableOptunaSearch(space, metric="knn_top1", mode="max", study_name="s", max_t=2,
                              storage=optuna.storages.RDBStorage(f"sqlite:///{first}"),
                              sampler=optuna.samplers.RandomSampler(seed=0))
    s.suggest("t1")
    s.suggest("t2")
    s.on_trial_result("t1", {"knn_top1": 10.0, "epoch": 1})
    s.on_trial_complete("t1", {"knn_top1": 12.0, "epoch": 2})
    blob = pickle.dumps(s)
    # No storage is pickled (its URL could hold a password); only a SQLite file's own URL is kept,
    # as the fallback when no URL is set, and the URL set wins over it.
    assert b"RDBStorage" not in blob and str(first).encode() in blob
    moved = tmp_path / "b" / "optuna.db"
    moved.parent.mkdir()
    first.rename(moved)
    try:
        set_study_storage(f"sqlite:///{moved}")
        restored = pickle.loads(blob)
        restored.on_trial_result("t2", {"knn_top1": 5.0, "epoch": 1})
        restored.on_trial_complete("t2", {"knn_top1": 5.0, "epoch": 1})  # stopped at 1 of 2: pruned
    finally:
        set_study_storage(None)
    assert not first.exists()
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{moved}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED"] and study.trials[0].value == 12.0


def test_a_one_node_ray_needs_no_shared_storage(tmp_path: Path) -> None:
    import ray

    ray.init(num_cpus=1, include_dashboard=False)
    try:
        assert nodes_missing_path(str(tmp_path)) == ([], 1)
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------- an S3 server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 (this module's own process) and the environment that points
    pyarrow and boto3 at it; yields that environment with a fresh bucket name in ``BUCKET``."""
    pytest.importorskip("moto")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": f"pcltune-key-{uuid.uuid4().hex[:8]}",
           "AWS_SECRET_ACCESS_KEY": f"pcltune-secret-{uuid.uuid4().hex}",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert _wait_for(lambda: _answers(port), 30), "the moto server did not start"
        import boto3

        boto3.client("s3").create_bucket(Bucket="pcl")
        yield {**env, "BUCKET": "pcl"}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        server.terminate()
        server.wait(timeout=30)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _objects(prefix: str) -> dict[str, bytes]:
    import boto3

    client = boto3.client("s3")
    out: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="pcl", Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/"):  # a folder marker
                continue
            out[obj["Key"]] = client.get_object(Bucket="pcl", Key=obj["Key"])["Body"].read()
    return out


def test_push_and_pull_keep_files_and_times_and_leave_weights_remote(s3: dict[str, str], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCL_TUNE_CACHE", str(tmp_path / "cache_a"))
    store = Store("s3://pcl/unit", "e1")
    assert not store.exists()
    store.check_writable()
    (store.local / "trial_1" / "checkpoint_000001").mkdir(parents=True)
    (store.local / "space.json").write_text("{}")
    (store.local / "trial_1" / "progress.csv").write_text("epoch\n1\n")
    (store.local / "trial_1" / "checkpoint_000001" / "checkpoint.pt").write_bytes(b"w" * 1000)
    store.push("space.json", "trial_1")
    assert store.exists()
    assert set(_objects("unit/e1/")) == {"unit/e1/space.json", "unit/e1/trial_1/progress.csv",
                                         "unit/e1/trial_1/checkpoint_000001/checkpoint.pt"}
    monkeypatch.setenv("PCL_TUNE_CACHE", str(tmp_path / "cache_b"))  # another machine
    other = Store("s3://pcl/unit", "e1")
    got = other.pull()
    assert got == tmp_path / "cache_b" / "experiments" / "s3" / "pcl" / "unit" / "e1"
    assert (got / "trial_1" / "progress.csv").read_text() == "epoch\n1\n"
    assert not (got / "trial_1" / "checkpoint_000001" / "checkpoint.pt").exists()  # weights stay remote
    assert (got / "trial_1" / "checkpoint_000001").exists() is False
    import boto3

    stamp = boto3.client("s3").head_object(Bucket="pcl", Key="unit/e1/space.json")["LastModified"].timestamp()
    assert abs((got / "space.json").stat().st_mtime - stamp) < 1e-3  # the remote time, not the download's
    other.pull(weights=True)
    assert (got / "trial_1" / "checkpoint_000001" / "checkpoint.pt").read_bytes() == b"w" * 1000
    (got / "stale.txt").write_text("gone remotely")
    other.pull(weights=True)
    assert not (got / "stale.txt").exists()


def test_an_unreachable_bucket_is_one_line(s3: dict[str, str], tmp_path: Path) -> None:
    env = {**_env(), "PCL_TUNE_CACHE": str(tmp_path / "cache")}
    space = _space(tmp_path, lrs=[0.08], num_samples=1, resources={"executor": "direct", "cpus_per_trial": 1})
    proc = subprocess.run([sys.executable, "-m", "pcl_tune.search", "--space", str(space), "--storage-path",
                           "s3://no-such-bucket/runs", "--no-dashboard"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "s3://no-such-bucket/runs" in errors[0] and "cannot write" in errors[0]
    assert s3["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_search_on_s3_is_killed_resumed_elsewhere_and_analysed(s3: dict[str, str], tmp_path: Path) -> None:
    secret = s3["AWS_SECRET_ACCESS_KEY"]
    root, name = "s3://pcl/runs", "s3search"
    space, marker = _three_trials(tmp_path), tmp_path / "paused"
    outputs: list[str] = []

    def env_on(machine: str, **extra: str) -> dict[str, str]:
        return {**extra, "PCL_TUNE_CACHE": str(tmp_path / machine)}

    # 1. Machine A: the search runs until the second trial's second epoch, then the driver dies.
    env = {**_paused_env("driver/result6", marker), **env_on("machine_a")}
    _run_until_paused([sys.executable, "-m", "pcl_tune.search", "--space", str(space), "--storage-path", root,
                       "--name", name, "--no-dashboard", "--no-report", "--num-cpus", "2"], env, marker)
    stored = _objects(f"runs/{name}/")
    assert f"runs/{name}/search_space.yaml" in stored and f"runs/{name}/space.json" in stored
    assert f"runs/{name}/optuna.db" in stored  # uploaded after the first trial finished
    assert any("/checkpoint_" in k for k in stored)

    # 2. Refused before anything starts: another study than the one the search began with, or a
    #    study file beside object storage (either would fork the study).
    proc = subprocess.run([sys.executable, "-m", "pcl_tune.search", "--name", name, "--storage-path", root,
                           "--resume", "--no-dashboard", "--optuna-storage", "postgresql://alice:pw-never-shown@db/optuna"],
                          capture_output=True, text=True, env={**_env(), **env_on("machine_b")}, timeout=120)
    outputs.append(proc.stdout + proc.stderr)
    assert proc.returncode == 2 and "fork" in proc.stderr and "pw-never-shown" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "pcl_tune.search", "--space", str(space), "--storage-path", root,
                           "--name", "other", "--optuna-storage", f"sqlite:///{tmp_path}/study.db",
                           "--no-dashboard"], capture_output=True, text=True, env={**_env(), **env_on("machine_b")},
                          timeout=120)
    assert proc.returncode == 2 and "forks the study" in proc.stderr

    # 3. Machine B (an empty working copy) resumes it from the bucket alone.
    proc = subprocess.run([sys.executable, "-m", "pcl_tune.search", "--name", name, "--storage-path", root,
                           "--resume", "--no-dashboard", "--no-report", "--num-cpus", "2"], capture_output=True,
                          text=True, env={**_env(), **env_on("machine_b")}, timeout=600)
    outputs.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stored = _objects(f"runs/{name}/")
    progress = {k: pd.read_csv(pd.io.common.BytesIO(v)) for k, v in stored.items() if k.endswith("progress.csv")}
    assert len(progress) == 3
    for key, df in progress.items():
        assert sorted(df["epoch"].unique()) == [1, 2, 3, 4], (key, df["epoch"].tolist())
    assert f"runs/{name}/trials.csv" in stored and f"runs/{name}/best.yaml" in stored
    import optuna

    db = tmp_path / "study_check.db"
    db.write_bytes(stored[f"runs/{name}/optuna.db"])
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{db}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3  # one study, each trial told once

    # 4. Machine C analyses the remote experiment; the report goes up beside the trials.
    proc = subprocess.run([sys.executable, "-m", "analysis", f"{root}/{name}"], capture_output=True, text=True,
                          env={**_env(), **env_on("machine_c")}, timeout=300)
    outputs.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "uploaded the report" in proc.stdout
    stored = _objects(f"runs/{name}/")
    assert {f"runs/{name}/report.html", f"runs/{name}/report.md"} <= set(stored)
    import analysis

    os.environ["PCL_TUNE_CACHE"] = str(tmp_path / "machine_d")
    try:
        exp = analysis.load(f"{root}/{name}")
    finally:
        os.environ.pop("PCL_TUNE_CACHE")
    assert len(exp.trials) == 3 and exp.best().value == pytest.approx(exp.trials[exp.objective_col].max())

    # 5. The best trial's weights are judged from the bucket; downstream.csv goes up beside it.
    proc = subprocess.run([sys.executable, "-m", "pcl_tune.evaluate", "--best", f"{root}/{name}", "--top", "1",
                           "--task", "knn"], capture_output=True, text=True, env={**_env(), **env_on("machine_e")},
                          timeout=300)
    outputs.append(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stored = _objects(f"runs/{name}/")
    downstream = pd.read_csv(pd.io.common.BytesIO(stored[f"runs/{name}/downstream.csv"]))
    assert set(downstream["encoder"]) == {"pretrained", "random init"} and downstream["value"].notna().all()

    # 6. The credentials live in the environment only.
    for text in outputs:
        assert secret not in text and s3["AWS_ACCESS_KEY_ID"] not in text
    for key, blob in stored.items():
        assert secret.encode() not in blob and s3["AWS_ACCESS_KEY_ID"].encode() not in blob, key
    assert yaml.safe_load(stored[f"runs/{name}/best.yaml"])["optim"]["lr"] == 0.08


@pytest.mark.slow
def test_a_ray_train_search_on_s3_keeps_its_train_runs_there(s3: dict[str, str], tmp_path: Path) -> None:
    """The Ray Train executor (the GPU path): its workers' checkpoints go to the bucket through
    Ray Train's own storage, under the experiment's ``train_runs/``."""
    space = _space(tmp_path, lrs=[0.08], num_samples=1, epochs=2,
                   resources={"executor": "train", "workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent": 1})
    data = yaml.safe_load(space.read_text())
    data["asha"] = {"enabled": False}
    space.write_text(yaml.safe_dump(data, sort_keys=False))
    proc = subprocess.run([sys.executable, "-m", "pcl_tune.search", "--space", str(space), "--storage-path",
                           "s3://pcl/train", "--name", "ddp", "--num-cpus", "3", "--no-report"], capture_output=True,
                          text=True, timeout=600, env={**_env(), "PCL_TUNE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stored = _objects("train/ddp/")
    assert any(k.startswith("train/ddp/train_runs/") and k.endswith(".pt") for k in stored), sorted(stored)[:20]
    progress = [k for k in stored if k.endswith("progress.csv") and "/trial_" in k and "train_runs" not in k]
    assert len(progress) == 1
    assert list(pd.read_csv(pd.io.common.BytesIO(stored[progress[0]]))["epoch"]) == [1, 2]
    assert s3["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- node-local storage

def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare(), reason="needs mount namespaces (unshare --mount) to give a node its own disk")
def test_a_storage_path_one_node_cannot_read_fails_before_any_trial(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker node started in its own mount namespace sees an empty tmpfs where the driver's
    storage folder is: the node-local disk of a real cluster. The search refuses in one line that
    names the node and what to pass, before any trial starts."""
    import tempfile

    from ray.cluster_utils import Cluster
    from test_search import _cluster_processes

    temp = tempfile.mkdtemp(prefix="pclnl_", dir="/tmp")
    ray_dir = Path(temp) / "ray"
    ray_dir.mkdir()
    runs = Path(temp) / "runs"
    runs.mkdir()
    env = {**_env(), "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": temp}
    for key, value in env.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    cluster = Cluster(shutdown_at_exit=True)
    worker = None
    try:
        cluster.add_node(num_cpus=1, temp_dir=str(ray_dir), object_store_memory=128 * 1024 * 1024,
                         include_dashboard=False)
        script = (f"mount -t tmpfs pcl_tune_node_disk {runs} && exec {Path(sys.executable).parent / 'ray'} start "
                  f"--address={cluster.address} --num-cpus=1 --object-store-memory={128 * 1024 * 1024} --block")
        worker = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                  start_new_session=True)
        import ray

        ray.init(address=cluster.address)
        try:
            assert _wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 120), "no second node"
        finally:
            ray.shutdown()
        space = _space(tmp_path, lrs=[0.08], num_samples=1, resources={"executor": "direct", "cpus_per_trial": 1})
        proc = subprocess.run([sys.executable, "-m", "pcl_tune.search", "--space", str(space), "--storage-path",
                               str(runs), "--name", "nl", "--address", cluster.address, "--no-report"],
                              capture_output=True, text=True, timeout=300, env=env)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert len(errors) == 1 and "1 of the cluster's 2 nodes" in errors[0] and "s3://" in errors[0], errors
        assert not list(runs.glob("nl/trial_*"))  # no trial started
        assert not list(runs.glob(".pcl_tune_shared_check_*"))  # the marker is removed
        # The same cluster with a folder both nodes read (the head's /tmp is shared) passes the check.
        shared = Path(temp) / "shared"
        ray.init(address=cluster.address)
        try:
            assert nodes_missing_path(str(shared)) == ([], 2)
        finally:
            ray.shutdown()
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        roots = [info.process.pid for n in cluster.list_all_nodes() for infos in n.all_processes.values()
                 for info in infos]
        started = _cluster_processes(roots, temp)
        cluster.shutdown()
        _wait_for(lambda: not _cluster_processes(list(started), temp), 60)
        left = _cluster_processes(list(started), temp)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes of the test cluster still running: {sorted(left)}"
