"""What every benchmark result records about where and how it ran."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def sha256(path: str | os.PathLike) -> str:
    from workbench.models.hashing import file_sha256

    return file_sha256(path)


def _gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine() -> dict[str, Any]:
    import psutil

    from workbench.device.profile import cpu_model

    try:
        import llama_cpp

        lcp = {"llama_cpp_python": llama_cpp.__version__,
               "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(
                   errors="replace")}
    except ImportError:  # a training-only run on a machine without the bindings
        lcp = {"llama_cpp_python": None, "llama_cpp_system_info": None}
    return {
        "cpu": cpu_model(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "ram_bytes": psutil.virtual_memory().total,
        "gpus": _gpus(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        **lcp,
    }


def write(name: str, data: dict[str, Any]) -> Path:
    """Write results/NAME.json atomically."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    data = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **data}
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def result_line(values: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    return "RESULT " + " ".join(f"{k}={fmt(v)}" for k, v in values.items())
