"""Security properties of issue 12: where the dashboard listens, how checkpoints and YAML are read,
and that no shell command is built from what a user typed.

* The Ray dashboard a search starts listens on 127.0.0.1 (``_init_ray`` with ``ray.init`` captured).
* Checkpoints are read with ``torch.load(weights_only=True)``: a file whose unpickling would run
  code is refused and the code does not run; a source scan finds no other kind of load.
* YAML (run configs, search spaces, ``--set`` values, an experiment's copied space file) goes
  through a safe loader: ``!!python/object/apply`` tags are refused and do not run; a source scan
  finds no unsafe loader.
* No ``os.system``/``os.popen``/``shell=True``, every subprocess gets an argument list; an
  experiment name made of shell syntax and ``..`` runs nothing and writes nothing outside
  ``--storage-path``.

Source scans cover ``pcl_tune/``, ``analysis/`` and ``benchmarks/``; each scanner is also run on
snippets it must flag, so a scan that finds nothing is not a scan that looks at nothing.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import shlex
import socket
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pcl_tune import search
from pcl_tune.checkpoint import CheckpointError, read_checkpoint
from pcl_tune.config import ConfigError, load_config_file, parse_overrides
from pcl_tune.experiment_folder import SPACE_JSON, SPACE_YAML, read_space_yaml
from pcl_tune.space import SpaceError, load_space

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("pcl_tune", "analysis", "benchmarks")
DEMO_SPACE = ROOT / "search_spaces" / "demo.yaml"


# --------------------------------------------------------------------------- source scanning

def _sources(dirs: tuple[str, ...] = SCANNED) -> Iterator[tuple[str, str]]:
    """(path relative to the repository, source) of every Python file under ``dirs``."""
    for d in dirs:
        for path in sorted((ROOT / d).rglob("*.py")):
            yield str(path.relative_to(ROOT)), path.read_text()


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> qualified name for every import of the module (``np`` -> ``numpy``,
    ``system`` -> ``os.system`` after ``from os import system``)."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = a.name
                else:
                    out[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _qualified(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``np.random.seed`` -> ``numpy.random.seed`` (imports resolved); None for anything not a dotted name."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _calls(tree: ast.Module) -> Iterator[tuple[ast.Call, str, ast.AST]]:
    """(call, qualified name of what is called, innermost enclosing function or the module)."""
    aliases = _aliases(tree)

    def visit(node: ast.AST, scope: ast.AST) -> Iterator[tuple[ast.Call, str, ast.AST]]:
        for child in ast.iter_child_nodes(node):
            inner = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else scope
            if isinstance(child, ast.Call):
                name = _qualified(child.func, aliases)
                if name is not None:
                    yield child, name, scope
            yield from visit(child, inner)

    yield from visit(tree, tree)


def _kwarg(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


# ---- torch.load / unpickling

TORCH_LOADS = ("torch.load", "torch.serialization.load")
UNPICKLERS = ("pickle.load", "pickle.loads", "pickle.Unpickler", "cloudpickle.load", "cloudpickle.loads",
              "ray.cloudpickle.loads", "joblib.load", "dill.load", "dill.loads", "pandas.read_pickle")
# (file, qualified call) pairs allowed to load without weights_only=True, with the reason. None today.
LOAD_EXCEPTIONS: dict[tuple[str, str], str] = {}


def _unsafe_loads(where: str, source: str) -> list[str]:
    """Every torch.load without ``weights_only=True``, every pickle-style load, every
    ``numpy.load(allow_pickle=True)`` in ``source``."""
    bad = []
    for call, name, _ in _calls(ast.parse(source)):
        if (where, name) in LOAD_EXCEPTIONS:
            continue
        if name in TORCH_LOADS and not _is_true(_kwarg(call, "weights_only")):
            bad.append(f"{where}:{call.lineno}: {name} without weights_only=True")
        elif name in UNPICKLERS or name.endswith(".read_pickle"):
            bad.append(f"{where}:{call.lineno}: {name} unpickles")
        elif name == "numpy.load" and not (_kwarg(call, "allow_pickle") is None
                                           or isinstance(_kwarg(call, "allow_pickle"), ast.Constant)
                                           and not _kwarg(call, "allow_pickle").value):  # type: ignore[union-attr]
            bad.append(f"{where}:{call.lineno}: numpy.load with allow_pickle")
    return bad


# ---- YAML

UNSAFE_YAML = ("yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all",
               "yaml.Loader", "yaml.FullLoader", "yaml.UnsafeLoader", "yaml.CLoader", "yaml.CFullLoader",
               "yaml.CUnsafeLoader", "yaml.load_all", "yaml.add_constructor", "yaml.add_multi_constructor")
SAFE_YAML_LOADERS = ("yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader")


def _module_of(where: str) -> str | None:
    """``pcl_tune/config.py`` -> ``pcl_tune.config`` for the importable packages, else None."""
    if not where.startswith(("pcl_tune/", "analysis/")):
        return None
    mod = where[:-3].replace("/", ".")
    return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


def _safe_loader(where: str, node: ast.expr | None, aliases: dict[str, str]) -> bool:
    """Whether ``Loader=node`` is PyYAML's safe (or base) loader or a module-level subclass of it
    that registers no ``python/`` constructor."""
    if node is None:
        return False
    name = _qualified(node, aliases)
    if name in SAFE_YAML_LOADERS:
        return True
    module = _module_of(where)
    if name is None or module is None or "." in name:
        return False
    loader = getattr(importlib.import_module(module), name, None)
    if not (isinstance(loader, type) and issubclass(loader, yaml.SafeLoader)):
        return False
    tags = list(loader.yaml_constructors) + list(loader.yaml_multi_constructors)
    return not any(isinstance(t, str) and "python/" in t for t in tags)


def _unsafe_yaml(where: str, source: str) -> list[str]:
    """Every reference to an unsafe PyYAML loader, and every ``yaml.load`` whose Loader is not safe."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)):
            name = _qualified(node, aliases)
            if name in UNSAFE_YAML:
                bad.append(f"{where}:{node.lineno}: {name}")
    for call, name, _ in _calls(tree):
        if name == "yaml.load":
            loader = _kwarg(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
            if not _safe_loader(where, loader, aliases):
                bad.append(f"{where}:{call.lineno}: yaml.load with Loader "
                           f"{ast.unparse(loader) if loader is not None else '(none)'}")
    return bad


# ---- shell

SHELL_CALLS = ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput", "pty.spawn",
               "asyncio.create_subprocess_shell")
SHELL_PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn", "commands.")
SUBPROCESS_CALLS = ("subprocess.run", "subprocess.Popen", "subprocess.call", "subprocess.check_call",
                    "subprocess.check_output", "asyncio.create_subprocess_exec")
LIST_ANNOTATIONS = ("list", "tuple", "Sequence", "typing.Sequence", "collections.abc.Sequence")


def _is_list_expr(node: ast.expr) -> bool:
    if isinstance(node, (ast.List, ast.Tuple, ast.ListComp)):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _is_list_expr(node.left) and _is_list_expr(node.right)
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("list", "tuple")


def _bound_to_list(name: str, scope: ast.AST) -> bool:
    """Whether ``name`` in ``scope`` is a parameter annotated as a list/sequence or is only ever
    assigned list expressions."""
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for a in scope.args.posonlyargs + scope.args.args + scope.args.kwonlyargs:
            if a.arg == name:
                text = ast.unparse(a.annotation) if a.annotation is not None else ""
                return text.split("[")[0] in LIST_ANNOTATIONS
    values = []
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            values.append(node.value)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            if node.value is not None:
                values.append(node.value)
    return bool(values) and all(_is_list_expr(v) for v in values)


def _shell_uses(where: str, source: str) -> list[str]:
    """Every shell-running call, every ``shell=`` not literally False, every subprocess call whose
    command is not (provably) an argument list."""
    bad = []
    for call, name, scope in _calls(ast.parse(source)):
        if name in SHELL_CALLS or name.startswith(SHELL_PREFIXES):
            bad.append(f"{where}:{call.lineno}: {name}")
            continue
        shell = _kwarg(call, "shell")
        if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
            bad.append(f"{where}:{call.lineno}: {name}(shell={ast.unparse(shell)})")
        if name in SUBPROCESS_CALLS:
            cmd = call.args[0] if call.args else _kwarg(call, "args")
            ok = cmd is not None and (_is_list_expr(cmd) or isinstance(cmd, ast.Name) and _bound_to_list(cmd.id, scope))
            if not ok:
                bad.append(f"{where}:{call.lineno}: {name} with a command that is not an argument list: "
                           f"{ast.unparse(cmd) if cmd is not None else '(none)'}")
    return bad


def _scan(check: Any) -> list[str]:
    return [problem for where, source in _sources() for problem in check(where, source)]


# The scanners flag what they are meant to flag (and pass what they are meant to pass).
@pytest.mark.parametrize(("check", "snippet", "flagged"), [
    (_unsafe_loads, "import torch\ntorch.load(p)", True),
    (_unsafe_loads, "import torch\ntorch.load(p, weights_only=False)", True),
    (_unsafe_loads, "from torch import load as tl\ntl(p)", True),
    (_unsafe_loads, "import pickle\npickle.loads(b)", True),
    (_unsafe_loads, "import numpy as np\nnp.load(p, allow_pickle=True)", True),
    (_unsafe_loads, "import torch\ntorch.load(p, map_location='cpu', weights_only=True)", False),
    (_unsafe_loads, "import numpy as np\nnp.load(p)", False),
    (_unsafe_yaml, "import yaml\nyaml.load(t, Loader=yaml.Loader)", True),
    (_unsafe_yaml, "import yaml\nyaml.load(t)", True),
    (_unsafe_yaml, "import yaml\nyaml.unsafe_load(t)", True),
    (_unsafe_yaml, "from yaml import FullLoader\nx = FullLoader", True),
    (_unsafe_yaml, "import yaml\nyaml.load(t, Loader=yaml.SafeLoader)", False),
    (_unsafe_yaml, "import yaml\nyaml.safe_load(t)", False),
    (_shell_uses, "import os\nos.system('ls')", True),
    (_shell_uses, "from os import popen\npopen('ls')", True),
    (_shell_uses, "import subprocess\nsubprocess.run(['ls'], shell=True)", True),
    (_shell_uses, "import subprocess as sp\nsp.check_output(f'ls {d}')", True),
    (_shell_uses, "import subprocess\ndef f(cmd: str):\n    subprocess.run(cmd)", True),
    (_shell_uses, "import subprocess\ncmd = 'ls ' + d\nsubprocess.Popen(cmd)", True),
    (_shell_uses, "import subprocess\ndef f(cmd: list[str]):\n    subprocess.run(cmd, shell=False)", False),
    (_shell_uses, "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'pass'] + ['-v'])", False),
    (_shell_uses, "import subprocess, sys\nsubprocess.run([sys.executable] + extra)", True),
])
def test_scanners_flag_what_they_should(check: Any, snippet: str, flagged: bool) -> None:
    assert bool(check("snippet.py", snippet)) is flagged, check("snippet.py", snippet)


def test_scans_see_the_real_loads_and_subprocess_calls() -> None:
    """The scans below are not vacuous: they find the project's real calls."""
    names = {(where, name) for where, source in _sources() for _, name, _ in _calls(ast.parse(source))}
    assert ("pcl_tune/checkpoint.py", "torch.load") in names
    assert ("pcl_tune/config.py", "yaml.load") in names
    assert sum(1 for _, n in names if n == "subprocess.run") >= 2  # the benchmarks start searches


# --------------------------------------------------------------------------- dashboard

@pytest.fixture
def captured_ray_init(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace ``ray.init`` (and ``ray.is_initialized``) by a recorder; no Ray starts."""
    import ray

    calls: list[dict[str, Any]] = []

    def fake_init(**kwargs: Any) -> Any:
        calls.append(kwargs)
        port = kwargs.get("dashboard_port")
        return types.SimpleNamespace(dashboard_url=f"{kwargs.get('dashboard_host')}:{port}" if port else None)

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def _args(*extra: str) -> Any:
    return search.build_parser().parse_args(["--space", str(DEMO_SPACE), *extra])


def test_dashboard_binds_to_localhost_by_default(captured_ray_init: list[dict[str, Any]],
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(search, "_port_free", lambda port, pick=False: True)
    args = _args()
    assert args.dashboard is True and args.address is None
    search._init_ray(args, args.dashboard)
    (kwargs,) = captured_ray_init
    assert kwargs["include_dashboard"] is True
    assert kwargs["dashboard_host"] == "127.0.0.1"
    assert kwargs["dashboard_port"] == 8265
    assert "http://127.0.0.1:8265" in capsys.readouterr().out


def test_dashboard_on_a_taken_port_still_binds_to_localhost(captured_ray_init: list[dict[str, Any]]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = int(taken.getsockname()[1])
        search._init_ray(_args("--dashboard-port", str(port)), True)
    (kwargs,) = captured_ray_init
    assert kwargs["dashboard_host"] == "127.0.0.1"
    assert kwargs["dashboard_port"] != port


def test_no_dashboard_starts_none(captured_ray_init: list[dict[str, Any]]) -> None:
    args = _args("--no-dashboard")
    search._init_ray(args, args.dashboard)
    (kwargs,) = captured_ray_init
    assert kwargs["include_dashboard"] is False and "dashboard_host" not in kwargs


@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS"])
def test_joining_a_cluster_passes_no_dashboard_settings(how: str, captured_ray_init: list[dict[str, Any]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing cluster's dashboard is that cluster's (``ray start --dashboard-host ...``): the
    search passes no dashboard settings when it joins one."""
    if how == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
        args = _args()
    else:
        args = _args("--address", "10.0.0.1:6379")
    search._init_ray(args, True)
    assert captured_ray_init == [{"address": "10.0.0.1:6379", "log_to_driver": True}]


# --------------------------------------------------------------------------- checkpoints

class _Plain:
    """A custom class: unpickling it would import this module and build an object (not weights)."""

    def __init__(self) -> None:
        self.value = 1


class _RunsShell:
    """Unpickling this runs ``os.system(command)``: the classic malicious pickle."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (os.system, (self.command,))


def _valid_state() -> dict[str, Any]:
    return {"epoch": 0, "config": {"seed": 0}, "model": {"w": torch.arange(4.0)},
            "numpy_rng": np.random.get_state()}


def test_a_plain_checkpoint_loads(tmp_path: Path) -> None:
    torch.save(_valid_state(), tmp_path / "ok.pt")
    path, state = read_checkpoint(tmp_path / "ok.pt")
    assert path == tmp_path / "ok.pt" and torch.equal(state["model"]["w"], torch.arange(4.0))


def _evil_checkpoint(payload: str, folder: Path) -> tuple[Path, Path]:
    """(checkpoint file, marker) where unpickling the file would create the marker (os.system) or
    build an object of this module (custom class)."""
    marker = folder / "code_ran"
    evil: Any = _RunsShell(f"touch {shlex.quote(str(marker))}") if payload == "os.system" else _Plain()
    path = folder / "checkpoint.pt"
    torch.save({**_valid_state(), "extra": evil}, path)
    return path, marker


@pytest.mark.parametrize("payload", ["os.system", "custom class"])
def test_checkpoint_that_would_run_code_is_refused(payload: str, tmp_path: Path) -> None:
    path, marker = _evil_checkpoint(payload, tmp_path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(tmp_path)  # the folder: checkpoint.pt inside, as resuming reads it
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert not marker.exists()
    if payload == "os.system":  # the file really is malicious: an unsafe load runs it
        torch.load(path, weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize("payload", [
    "os.system",  # torch words this one "unsupported GLOBAL posix.system whose module posix is blocked"
    "custom class",
])
def test_checkpoint_refusal_says_why(payload: str, tmp_path: Path) -> None:
    """The one-line message says that the file holds pickled objects and that they were not run."""
    _evil_checkpoint(payload, tmp_path)
    with pytest.raises(CheckpointError, match=r"pickled Python objects.*weights_only=True"):
        read_checkpoint(tmp_path)


def test_every_torch_load_passes_weights_only() -> None:
    assert _scan(_unsafe_loads) == []


# --------------------------------------------------------------------------- YAML

def _evil_yaml(marker: Path) -> str:
    return f'!!python/object/apply:os.system ["touch {marker}"]'


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("reader", ["config file", "space file", "--set value", "experiment space copy"])
def test_yaml_python_tags_are_refused(reader: str, tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    evil = _evil_yaml(marker)
    expected: type[Exception] = ConfigError
    if reader == "config file":
        where = str(_write(tmp_path / "config.yaml", f"optim:\n  lr: {evil}\n"))
        load: Any = lambda: load_config_file(where)  # noqa: E731
    elif reader == "space file":
        where = str(_write(tmp_path / "space.yaml", f"name: evil\nfixed:\n  epochs: {evil}\nsearch: {{}}\n"))
        load, expected = (lambda: load_space(where)), SpaceError
    elif reader == "--set value":
        where = "--set"
        load = lambda: parse_overrides([f"optim.lr={evil}"])  # noqa: E731
    else:
        where = str(_write(tmp_path / "exp" / SPACE_YAML, f"name: {evil}\n"))
        load = lambda: read_space_yaml(tmp_path / "exp")  # noqa: E731
    with pytest.raises(expected) as err:
        load()
    message = str(err.value)
    assert "\n" not in message and where in message and "python/object/apply:os.system" in message
    assert not marker.exists()
    yaml.load(evil, Loader=yaml.UnsafeLoader)  # the text really is malicious: an unsafe loader runs it
    assert marker.exists()


def test_yaml_is_only_read_with_safe_loaders() -> None:
    # pcl_tune/config.py's yaml.load(text, Loader=YamlLoader) passes: YamlLoader is a SafeLoader
    # subclass (checked by importing it) that adds a float resolver and no python/ constructor.
    assert _scan(_unsafe_yaml) == []


# --------------------------------------------------------------------------- no shell

def test_no_shell_commands_and_only_argument_lists() -> None:
    assert _scan(_shell_uses) == []


MALICIOUS_NAME = "../../x; touch pwned"


def _tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def test_malicious_name_dry_run_runs_nothing_and_writes_nothing(tmp_path: Path,
                                                                subprocess_env: dict[str, str]) -> None:
    """The command line exactly as a user would type it (arguments as a list: no shell involved)."""
    cwd = tmp_path / "cwd"
    storage = tmp_path / "a" / "b" / "runs"
    cwd.mkdir()
    before = _tree(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "pcl_tune.search", "--space", str(DEMO_SPACE), "--name",
                           MALICIOUS_NAME, "--storage-path", str(storage), "--dry-run"],
                          capture_output=True, text=True, timeout=120, env=subprocess_env, cwd=cwd)
    assert proc.returncode in (0, 2), proc.stderr[-2000:]
    if proc.returncode == 2:  # refused: one line saying why
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:")
    else:
        assert "experiment folder:" in proc.stdout
    assert _tree(tmp_path) == before
    assert not (cwd / "pwned").exists() and not (ROOT / "pwned").exists()


def _run_search_main(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """``pcl_tune.search.main`` up to and past the point where it creates the experiment folder,
    with no Ray: a 2-CPU cluster is pretended and ``Tuner.fit`` returns one unfinished trial."""
    import ray

    for var in ("RAY_ADDRESS", "RAY_AIR_NEW_OUTPUT", "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S",
                "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"):
        monkeypatch.delenv(var, raising=False)  # main sets some: restored after the test
    monkeypatch.setattr(search, "_init_ray", lambda args, want_dashboard: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    unfinished = [types.SimpleNamespace(metrics=None)]
    monkeypatch.setattr(search, "build_tuner", lambda *a, **k: types.SimpleNamespace(fit=lambda: unfinished))
    monkeypatch.setattr(search, "summarize", lambda *a, **k: None)
    return search.main([*argv, "--no-report", "--no-dashboard"])


@pytest.mark.parametrize("how", ["--name ../escaped", "--name " + MALICIOUS_NAME, "--name <absolute>",
                                 "space name: ../escaped"])
def test_experiment_name_cannot_leave_the_storage_path(how: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    storage = tmp_path / "a" / "b" / "runs"
    argv = ["--space", str(DEMO_SPACE), "--storage-path", str(storage)]
    if how == "--name <absolute>":
        argv += ["--name", str(tmp_path / "absolute")]
    elif how.startswith("--name "):
        argv += ["--name", how.removeprefix("--name ")]
    else:
        space = _write(tmp_path / "spaces" / "escaping.yaml",
                       DEMO_SPACE.read_text().replace("\nname: demo\n", "\nname: ../escaped\n"))
        assert "name: ../escaped" in space.read_text()
        argv[1] = str(space)
    before = _tree(tmp_path)
    rc = _run_search_main(argv, monkeypatch)
    err = capsys.readouterr().err
    if rc == 2:  # refused: one line saying why, nothing written
        assert len(err.strip().splitlines()) == 1 and err.startswith("error:")
        assert _tree(tmp_path) == before
    else:
        # new paths must lie in the storage path (or be its parents, created with it)
        outside = [p for p in _tree(tmp_path) - before if not p.is_relative_to(storage) and not storage.is_relative_to(p)]
        assert outside == []
    assert not any(p.name == "pwned" for p in _tree(tmp_path))


SHELLY_NAME = "x; touch pwned"


@pytest.mark.parametrize("which", ["printed resume command", "recorded search command"])
def test_commands_shown_to_the_user_quote_their_paths(which: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A storage path with shell syntax, copied from what the search prints or records, stays one
    argument (names cannot hold such characters: they are refused above)."""
    storage = tmp_path / SHELLY_NAME / "runs"
    argv = ["--space", str(DEMO_SPACE), "--storage-path", str(storage), "--name", "quoted"]
    assert _run_search_main(argv, monkeypatch) == 1  # the fake tuner leaves the search unfinished
    out, _ = capsys.readouterr()
    if which == "printed resume command":
        line = next(ln for ln in out.splitlines() if "--resume" in ln)
        words = shlex.split(line.split("continue it with: ", 1)[1])
    else:
        words = shlex.split(json.loads((storage / "quoted" / SPACE_JSON).read_text())["run"]["command"])
    assert words[words.index("--storage-path") + 1] == str(storage)
    assert words[words.index("--name") + 1] == "quoted"


def test_rerun_command_quotes_paths(tmp_path: Path) -> None:
    """analysis's "re-run the best trial" command shell-quotes the experiment's paths."""
    from analysis.experiment import Experiment

    exp_dir = tmp_path / "x; touch pwned"
    fake = types.SimpleNamespace(path=exp_dir, best_yaml_path=lambda: exp_dir / "best.yaml")
    words = shlex.split(Experiment.rerun_command(fake))  # type: ignore[arg-type]
    assert words[words.index("--config") + 1] == str(exp_dir / "best.yaml")
    assert words[words.index("--out") + 1] == str(exp_dir / "best_rerun")
