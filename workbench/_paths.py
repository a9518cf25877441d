"""Where the workbench keeps its files. WORKBENCH_HOME overrides the default."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    path = Path(os.environ.get("WORKBENCH_HOME", Path.home() / ".workbench")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_writable(folder: Path, hint: str, create: bool = False) -> None:
    """Raise a WorkbenchError naming `folder` unless a file can be written in it now
    (after creating it, with `create`), so an unwritable place is named before any work."""
    from .errors import WorkbenchError

    probe = folder / f".write-test-{os.getpid()}"
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise WorkbenchError(f"cannot write to {folder}: {e.strerror or e}", hint) from None


def metrics_log() -> Path:
    return home() / "metrics.jsonl"
