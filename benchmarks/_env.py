"""The environment line every benchmark prints first and writes at the top of its saved table.

A timing means little without the machine and versions it was taken on, so each script calls
:func:`environment` after setting its thread counts and before measuring anything::

    from _env import environment
    env = environment()            # or environment("cuda") for a GPU run
    print(f"Environment: {env}")   # environment_lines() gives the same as a list of lines

Versions are read from the installed distributions (no heavy imports); a package that is not
installed is reported as such. Thread counts are those of torch (and faiss, when the script
has imported it) at the time of the call.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from importlib import metadata
from typing import Any

# Shown name -> distribution names to try, first match wins (faiss ships under several names).
PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"),
    "ray": ("ray",),
    "optuna": ("optuna",),
    "scikit-learn": ("scikit-learn",),
}


def versions() -> dict[str, str | None]:
    """Installed version of each package in :data:`PACKAGES` (None when not installed)."""
    out: dict[str, str | None] = {}
    for name, dists in PACKAGES.items():
        out[name] = None
        for dist in dists:
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def _device(device: Any) -> str | None:
    if device is None:
        return None
    text = str(device)
    if text.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            text += f" ({torch.cuda.get_device_name(torch.device(text))})"
    return text


def environment(device: Any = None) -> str:
    """One line: python, package versions, torch/faiss threads, device, CPUs, load, date (UTC).

    Args:
        device: the device measured on (e.g. ``"cpu"``, ``"cuda"``, a ``torch.device``), or None
            when the script does not choose one.
    """
    found = versions()
    torch_threads = None
    if found["torch"]:
        import torch

        found["torch"] = torch.__version__  # with its build tag (e.g. +cu130), which the metadata lacks
        torch_threads = torch.get_num_threads()
    parts = [f"python {platform.python_version()}"]
    parts += [f"{name} {version}" if version else f"{name} not installed" for name, version in found.items()]
    if torch_threads is not None:
        parts.append(f"torch threads {torch_threads}")
    if "faiss" in sys.modules:  # only when the script uses faiss: importing it costs time
        parts.append(f"faiss omp threads {sys.modules['faiss'].omp_get_max_threads()}")
    dev = _device(device)
    if dev:
        parts.append(f"device {dev}")
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    cpu = f"cpu {platform.processor() or platform.machine()}, {cpus} cpus"
    if usable != cpus:
        cpu += f" ({usable} usable)"
    parts.append(cpu)
    if hasattr(os, "getloadavg"):
        parts.append("load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    parts.append(datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return ", ".join(parts)


def environment_lines(device: Any = None) -> list[str]:
    """The header lines a script prints first and writes at the top of its table (one line today)."""
    return [f"Environment: {environment(device)}"]


if __name__ == "__main__":
    print("\n".join(environment_lines()))


def publish(text: str, out: str | os.PathLike[str], name: str, tables: dict[str, Any] | None = None) -> None:
    """Print a benchmark's report and save it as ``<out>/<name>.md``, with each DataFrame of
    ``tables`` as ``<out>/<key>.csv`` beside it."""
    from pathlib import Path

    print(text)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.md").write_text(text.rstrip("\n") + "\n")
    for key, frame in (tables or {}).items():
        frame.to_csv(folder / f"{key}.csv", index=False)
