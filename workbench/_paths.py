"""Where the workbench keeps its files. WORKBENCH_HOME overrides the default."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    path = Path(os.environ.get("WORKBENCH_HOME", Path.home() / ".workbench")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def metrics_log() -> Path:
    return home() / "metrics.jsonl"
