"""The cluster recipes in examples/: the Slurm batch script run for real on this machine as two
fake Slurm nodes (fake ``srun`` and ``scontrol`` on PATH), and the KubeRay RayJob and its
Dockerfile checked for structure, with KubeRay's entrypoint quoting replayed in local shells.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from conftest import tiny_settings
from test_search import _processes

from pcl_tune.config import unflatten

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "examples" / "slurm"
K8S = REPO / "examples" / "kubernetes"
NODES = ("pclnode1", "pclnode2")


def _shell_scripts() -> list[Path]:
    return sorted(p for p in (REPO / "examples").rglob("*") if p.suffix in (".sh", ".sbatch"))


def test_examples_shell_scripts_parse() -> None:
    scripts = _shell_scripts()
    assert {p.name for p in scripts} >= {"search.sbatch", "ray_cluster.sh"}
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"


def _bash(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in bash after sourcing ray_cluster.sh."""
    return subprocess.run(["bash", "-c", f"set -u; source {shlex.quote(str(SLURM / 'ray_cluster.sh'))}; {code}"],
                          capture_output=True, text=True, env=env, timeout=60)


def _clean_env() -> dict[str, str]:
    """This process's environment without Slurm's, Ray's address and Ray's auth variables."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "RAY_AUTH_", "PCL_TUNE_")) and k not in ("RAY_ADDRESS", "SPACE")}


@pytest.mark.parametrize(("slurm", "gpus"), [
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, "4"),
    ({"SLURM_GPUS_ON_NODE": "2"}, "2"),
    ({}, "0"),
    ({"SLURM_GPUS_PER_NODE": "4"}, "4"),
    ({"SLURM_GPUS_PER_NODE": "a100:2,v100:2"}, "4"),
    ({"SLURM_GPUS_ON_NODE": "0", "SLURM_GPUS_PER_NODE": "a100:4"}, "0"),  # what the node has wins
])
def test_gpus_per_node_from_slurm_variables(slurm: dict[str, str], gpus: str) -> None:
    proc = _bash("slurm_gpus_per_node", {**_clean_env(), **slurm})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == gpus


def test_storage_check_refuses_a_path_another_node_does_not_see(tmp_path: Path) -> None:
    storage = tmp_path / "runs"
    # srun as a shell function: "not there" on the other node, then the real answer (run locally).
    blind = _bash(f"srun() {{ return 1; }}; ray_check_storage {shlex.quote(str(storage))} pclnode2")
    assert blind.returncode != 0 and "pclnode2 does not see" in blind.stderr
    assert storage.is_dir() and not list(storage.iterdir())  # the marker file is removed
    shared = _bash(f"srun() {{ shift 4; \"$@\"; }}; ray_check_storage {shlex.quote(str(storage))} pclnode2")
    assert shared.returncode == 0, shared.stderr
    assert not list(storage.iterdir())
    # A URI is not a path to check: srun is never called.
    uri = _bash("srun() { exit 99; }; ray_check_storage s3://bucket/runs pclnode2")
    assert uri.returncode == 0, uri.stderr


# --------------------------------------------------------------------------- Slurm, two local nodes

FAKE_SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] || { echo "fake scontrol: unsupported: $*" >&2; exit 2; }
printf '%s\\n' {nodes}
"""
# Logs the call, drops srun's options (-w takes a value) and runs the command here, in place of
# srun: killing the background "srun" signals the command itself, as srun forwards signals to its task.
FAKE_SRUN = """#!/bin/bash
printf '%s\\n' "$*" >> "$FAKE_SLURM_LOG"
while (($#)); do
  case $1 in -w|--nodelist|-N|-n|-c) shift 2 ;; -*) shift ;; *) break ;; esac
done
exec "$@"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _slurm_env(tmp_path: Path, temp: Path) -> dict[str, str]:
    """The environment of a fake 2-node job: fake srun/scontrol first on PATH, 2 CPUs and no GPUs
    per node, free ports, Ray's files under ``temp``, a token file of the test's own."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL.replace("{nodes}", " ".join(NODES))), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = _clean_env()
    mem = str(256 * 1024 * 1024)
    env.update(
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{env.get('PATH', '')}",
        FAKE_SLURM_LOG=str(tmp_path / "srun.log"),
        SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="pclnode[1-2]", SLURM_CPUS_PER_TASK="2",
        SLURM_SUBMIT_DIR=str(REPO),
        RAY_PORT=str(_free_port()), RAY_TMPDIR=str(temp), RAY_AUTH_TOKEN_PATH=str(token),
        # Free ports for what a second Ray on this machine (the user's) may hold: dashboard, client
        # server, each node's dashboard agent.
        RAY_HEAD_ARGS=f"--dashboard-port={_free_port()} --ray-client-server-port={_free_port()} "
                      f"--dashboard-agent-listen-port={_free_port()} --object-store-memory={mem}",
        RAY_WORKER_ARGS=f"--dashboard-agent-listen-port={_free_port()} --object-store-memory={mem}",
        RAY_START_TIMEOUT="180", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="1",
        RAY_memory_monitor_refresh_ms="0",
    )
    return env


def _space(tmp_path: Path) -> Path:
    """Two 2-epoch trials of the tests' tiny run, 2 CPUs each: one per node, run to the end."""
    fixed = unflatten(tiny_settings(
        {"epochs": 2, "data.subset": 128, "model.queue_size": 128, "pcl.cluster_schedule": "4,8",
         "pcl.num_negatives": 16, "clustering.niter": 5},
        without=("device", "threads", "seed")))
    data = {"name": "slurm", "fixed": fixed,
            "search": {"optim.lr": {"choice": [0.04, 0.01]}, "pcl.temperature": {"uniform": [0.1, 0.3]}},
            "objective": {"metric": "knn_top1", "mode": "max"},
            "searcher": {"seed": 0, "startup_trials": 1, "num_samples": 2,
                         "points_to_evaluate": [{"optim.lr": 0.04}, {"optim.lr": 0.01}], "baseline": False},
            "asha": {"enabled": False},
            "resources": {"executor": "direct", "cpus_per_trial": 2, "max_concurrent": 2}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _started_by(root: int, marker: str) -> set[tuple[int, str]]:
    """(pid, start time) of the live descendants of ``root`` and of every process whose command
    line names ``marker`` (Ray's workers rename themselves, and outlive their raylet a moment)."""
    table = {pid: p for pid, p in _processes().items() if p[1] != "Z"}  # zombies are dead
    mine = {pid for pid, (_, _, cmd, _) in table.items() if marker.encode() in cmd}
    todo = [root] if root in table else []
    while todo:
        pid = todo.pop()
        mine.add(pid)
        todo += [c for c, (parent, _, _, _) in table.items() if parent == pid and c not in mine]
    return {(pid, table[pid][3]) for pid in mine if pid in table}


def _alive(procs: set[tuple[int, str]]) -> set[tuple[int, str]]:
    table = _processes()
    return {(pid, start) for pid, start in procs if pid in table and table[pid][1] != "Z" and table[pid][3] == start}


@pytest.fixture
def ray_temp() -> Iterator[Path]:
    """A short private folder for Ray's files (unix socket paths must stay under 107 bytes)."""
    temp = Path(tempfile.mkdtemp(prefix="pclslurm_", dir="/tmp"))
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


def _run_sbatch(env: dict[str, str], cwd: Path, temp: Path, timeout: float,
                on_up: Callable[[], Any] | None = None) -> tuple[int, str, set[tuple[int, str]], Any]:
    """Run search.sbatch as Slurm would (bash, from its own folder); returns its exit status, its
    output, every process it started (looked up each second while it runs) and what ``on_up``
    returned, called once while the Ray nodes are up."""
    log = cwd / "sbatch.out"
    probed = None
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", str(SLURM / "search.sbatch")], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        seen: set[tuple[int, str]] = set()
        end = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < end:
                seen |= _started_by(proc.pid, str(temp))
                if on_up is not None and probed is None and "Ray nodes are up" in log.read_text():
                    probed = on_up()
                time.sleep(1.0)
        finally:
            if proc.poll() is None:  # too slow: SIGTERM runs its exit trap, which stops its Ray nodes
                proc.terminate()
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)  # its own session: only what this test started
                    proc.wait()
    return proc.returncode, log.read_text(), seen, probed


def _dashboard_status(port: int, path: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers),
                                    timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError as e:  # no answer: reported by the assertions
        return 0, str(e)


@pytest.mark.slow
def test_slurm_script_runs_the_search_on_two_nodes_and_stops_them(tmp_path: Path, ray_temp: Path) -> None:
    env = _slurm_env(tmp_path, ray_temp)
    env.update(SPACE=str(_space(tmp_path)), PCL_TUNE_STORAGE=str(tmp_path / "runs"),
               PCL_TUNE_ARGS="--name slurm --no-report")
    token = (ray_temp / "auth_token").read_text()
    port = int(re.search(r"--dashboard-port=(\d+)", env["RAY_HEAD_ARGS"]).group(1))

    def auth() -> dict[str, tuple[int, str]]:  # the head's dashboard, without and with the token
        return {"mode": _dashboard_status(port, "/api/authentication_mode"),
                "anonymous": _dashboard_status(port, "/api/v0/nodes"),
                "token": _dashboard_status(port, "/api/v0/nodes", token)}

    started = time.monotonic()
    rc, output, seen, probed = _run_sbatch(env, tmp_path, ray_temp, timeout=900, on_up=auth)
    print(f"search.sbatch: exit {rc} after {time.monotonic() - started:.0f} s")
    try:
        assert rc == 0, output[-6000:]
        assert "2 Ray nodes are up" in output
        calls = (tmp_path / "srun.log").read_text().splitlines()
        head = [c for c in calls if "ray start --head" in c]
        workers = [c for c in calls if "ray start --address" in c]
        assert len(head) == 1 and f"-w {NODES[0]} " in head[0] and f"--port={env['RAY_PORT']}" in head[0]
        assert len(workers) == 1 and f"-w {NODES[1]} " in workers[0]
        assert all("--num-cpus=2 --num-gpus=0" in c for c in head + workers)
        trials = {}
        for d in sorted((tmp_path / "runs" / "slurm").glob("trial_*")):
            trials[d.name] = pd.read_csv(d / "progress.csv")
        assert len(trials) == 2
        assert all(list(df["epoch"]) == [1, 2] and df["knn_top1"].notna().all() for df in trials.values())
        # 2 CPUs a trial, 2 a node: the two trials ran at once, one on each node.
        assert len({df["node_id"].iloc[-1] for df in trials.values()}) == 2
        # Token auth is on: the dashboard refuses a request without the token, and the given token
        # (not a new one) is the cluster's.
        assert probed is not None, "the cluster was never seen up"
        assert probed["mode"][0] == 200 and json.loads(probed["mode"][1])["authentication_mode"] == "token"
        assert probed["anonymous"][0] in (401, 403) and probed["token"][0] == 200, probed
        assert (ray_temp / "auth_token").read_text() == token
        assert seen, "no process of the script was seen"
    finally:
        # The exit trap has stopped both nodes: only idle workers may take a moment to follow.
        end = time.monotonic() + 60
        while _alive(seen) and time.monotonic() < end:
            time.sleep(1.0)
        left = _alive(seen) | _started_by(-1, str(ray_temp))  # -1: no root, only the folder's name
        for pid, _ in left:  # this test's processes only; reported below
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    assert not left, f"processes the script started are still running: {sorted(left)}"


def test_slurm_script_refuses_a_head_port_in_use(tmp_path: Path, ray_temp: Path) -> None:
    env = _slurm_env(tmp_path, ray_temp)
    env["PCL_TUNE_STORAGE"] = str(tmp_path / "runs")
    with socket.socket() as busy:  # someone else's service on the GCS port
        busy.bind(("", 0))
        busy.listen()
        env["RAY_PORT"] = str(busy.getsockname()[1])
        rc, output, seen, _ = _run_sbatch(env, tmp_path, ray_temp, timeout=120)
    assert rc != 0
    assert f"port {env['RAY_PORT']} on" in output and "already in use" in output
    assert "ray start" not in (tmp_path / "srun.log").read_text()  # nothing was started
    assert not _alive(seen)


# --------------------------------------------------------------------------- Kubernetes (KubeRay)

def _rayjob() -> dict[str, Any]:
    return yaml.safe_load((K8S / "rayjob.yaml").read_text())


def _containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (K8S / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def _built_image() -> str:
    """The image tag the README and the Dockerfile's comment build (they must agree)."""
    tags = {m for f in (K8S / "README.md", K8S / "Dockerfile")
            for m in re.findall(r"docker build [^\n]*-t (\S+)", f.read_text())}
    assert len(tags) == 1, tags
    return tags.pop()


def test_rayjob_cluster_structure() -> None:
    import ray

    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and int(spec["ttlSecondsAfterFinished"]) > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"]["mode"] == "token"
    assert "dashboard-host" not in cluster["headGroupSpec"]["rayStartParams"]  # KubeRay's default, port-forwarded
    workers = cluster["workerGroupSpecs"]
    assert workers
    for group in workers:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in group["template"]["spec"]["containers"]]
        assert sum(gpus) > 0, group["groupName"]
    containers = _containers(job)
    assert len(containers) == 1 + sum(len(g["template"]["spec"]["containers"]) for g in workers)
    image = _built_image()
    for c in containers:
        assert c["image"] == image, c["name"]
        env = {e["name"]: e for e in c["env"]}
        assert env["PCL_TUNE_STORAGE"]["value"].startswith("s3://"), c["name"]
        aws = {name: e for name, e in env.items() if name.startswith("AWS_")}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(aws), c["name"]
        for name, e in aws.items():
            assert "value" not in e and e["valueFrom"]["secretKeyRef"]["key"], (c["name"], name)
    text = (K8S / "rayjob.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # no access key id pasted anywhere
    assert "$(" not in spec["entrypoint"]  # Kubernetes would try to expand it in the submitter's args


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _through_kuberay(entrypoint: str, tmp_path: Path, storage: str) -> list[str]:
    """The arguments `python` gets when KubeRay runs ``entrypoint``: the submitter's
    ``/bin/bash -c "ray job submit ... -- <entrypoint> ;"`` without PCL_TUNE_STORAGE in its
    environment, `ray job submit` joining its words with shlex.join, then the head's /bin/sh
    running that with PCL_TUNE_STORAGE set (a fake `python` records its arguments)."""
    bin_dir = tmp_path / "kbin"
    bin_dir.mkdir(exist_ok=True)
    _write_exe(bin_dir / "ray", f"#!{sys.executable}\nimport shlex, sys\nprint(shlex.join(sys.argv[sys.argv.index('--') + 1:]))\n")
    _write_exe(bin_dir / "python", f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(tmp_path / 'argv.json')!r}, 'w'))\n")
    base = {k: v for k, v in os.environ.items() if k != "PCL_TUNE_STORAGE"}
    base["PATH"] = f"{bin_dir}:{base.get('PATH', '')}"
    submit = subprocess.run(["/bin/bash", "-ce", "--", f"ray job submit --address http://head:8265 -- {entrypoint} ;"],
                            capture_output=True, text=True, env=base, timeout=60)
    assert submit.returncode == 0, submit.stderr
    (tmp_path / "argv.json").unlink(missing_ok=True)
    head = subprocess.run(["/bin/sh", "-c", submit.stdout.strip()], capture_output=True, text=True,
                          env={**base, "PCL_TUNE_STORAGE": storage}, timeout=60)
    assert head.returncode == 0, head.stderr
    return json.loads((tmp_path / "argv.json").read_text())


def test_rayjob_entrypoint_expands_the_storage_on_the_head(tmp_path: Path) -> None:
    from pcl_tune.search import build_parser

    entrypoint = _rayjob()["spec"]["entrypoint"]
    workdir = [args for op, args in _dockerfile() if op == "WORKDIR"][-1]
    assert f"cd {workdir} " in entrypoint  # the image's folder, where search_spaces/ is
    local = tmp_path / "app"
    local.mkdir()
    storage = "s3://my bucket/pcl runs"  # spaces must survive the three shells
    argv = _through_kuberay(entrypoint.replace(f"cd {workdir} ", f"cd {local} "), tmp_path, storage)
    assert argv[:2] == ["-m", "pcl_tune.search"]
    args = build_parser().parse_args(argv[2:])
    assert args.storage_path == storage
    assert (REPO / args.space).is_file() and args.space.startswith("search_spaces/")
    assert args.gpus_per_trial == 1
    # The control: a bare $PCL_TUNE_STORAGE is expanded by the submitter, where it is not set.
    naive = _through_kuberay("python -m pcl_tune.search --storage-path $PCL_TUNE_STORAGE", tmp_path, storage)
    assert storage not in naive


def test_dockerfile_builds_the_package_from_files_that_exist() -> None:
    import ray

    tomllib = pytest.importorskip("tomllib")
    steps = _dockerfile()
    assert steps[0][0] == "FROM" and steps[0][1].startswith(f"rayproject/ray:{ray.__version__}-py311")
    copied = set()
    for op, args in steps:
        if op == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            for src in words[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
                copied.add(src.rstrip("/"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", project["project"]["readme"], "search_spaces"} <= copied
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert "pip install --no-cache-dir '.[gpu]'" in runs and "pip uninstall -y faiss-cpu" in runs
    assert any(op == "WORKDIR" for op, _ in steps)
