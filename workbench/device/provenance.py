"""Where a measurement was taken: the machine and the versions that matter. Benchmark
results and the benchmark report record it."""

from __future__ import annotations

import platform
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from typing import Any


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def gpus() -> list[str]:
    """Each NVIDIA GPU as "name, memory, driver" (nvidia-smi's words); [] without one."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine(system_info: bool = False) -> dict[str, Any]:
    """CPU, cores, RAM, GPUs, OS, Python and llama-cpp-python's version. With
    `system_info`, also llama.cpp's own view of the CPU features it was built for (read
    in a child process)."""
    import sys

    import psutil

    from .profile import cpu_model

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "ram_bytes": psutil.virtual_memory().total,
        "gpus": gpus(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "llama_cpp_python": package_version("llama-cpp-python"),
    }
    if system_info:
        from .. import _child
        from ..errors import WorkbenchError

        try:  # llama.cpp loads in a child process, never in this one
            info["llama_cpp_system_info"] = _child.run(
                "workbench.worker.libs:system_info", (), "reading llama.cpp's system info")
        except (WorkbenchError, RuntimeError):  # e.g. a training-only machine without it
            info["llama_cpp_system_info"] = None
    return info
