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


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary name beside `path`, then rename it into place: a reader
    (or a crash) never sees half a file."""
    import threading

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def metrics_log() -> Path:
    return home() / "metrics.jsonl"
