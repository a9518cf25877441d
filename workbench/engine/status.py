"""Each engine publishes its state as one small JSON file, for the JupyterLab panel.

The files live in `<Jupyter runtime dir>/workbench/` (or `$WORKBENCH_STATUS_DIR`), one per
engine, named `<engine id>.json`, and are replaced atomically (temporary name, rename),
so a reader never sees half a file. The server extension (`workbench.labext`) only
reads them; to stop an engine it writes `<engine id>.stop` next to it, which the
engine's publisher thread sees within a second and obeys. Format version 1:

    {"version": 1, "id": "...", "kernel_pid": 123, "kernel_started": 1.7e9,
     "kernel_id": "..." | null, "worker_pid": 456 | null,
     "state": "starting" | "no model" | "loading" | "idle" | "generating" | "crashed"
              | "stopped",
     "model": {"name", "path", "architecture", "quantization", "file_bytes"} | null,
     "placement": {"device": cpu | gpu | cpu+gpu | cluster, "n_gpu_layers", "n_layers",
                   "threads", "n_ctx", "n_batch", "type_k", "type_v", "flash_attn",
                   "nodes": [HOST:PORT, ...]} | null,
     "memory": {"worker_rss_bytes", "worker_gpu_bytes"},
     "requests": N, "last_tps": float | null, "last_ttft_s": float | null,
     "history": [{"t": unix time, "tps": decode tokens/s, "ttft_s": s}, ...],
     "restarts": N, "last_crash": str | null, "updated": unix time}

An entry whose kernel process is gone is stale: readers delete it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Engine

log = logging.getLogger(__name__)

VERSION = 1
HISTORY = 60          # requests kept for the sparklines
_PERIOD_S = 1.0       # how often the publisher looks for changes and stop requests
_HEARTBEAT_S = 10.0   # rewrite an unchanged entry this often, so `updated` stays fresh
# A process's start time is the boot time plus its start in clock ticks, and the kernel
# reports the boot time as wall time less uptime, in whole seconds: it moves by a second
# as it rounds, and by more when the clock is adjusted. A pid named by another process has
# a start time minutes or days off, far beyond this.
_START_SLACK_S = 120.0
ENGINE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def status_dir() -> Path:
    """Where engines publish their state."""
    env = os.environ.get("WORKBENCH_STATUS_DIR")
    if env:
        return Path(env).expanduser()
    try:
        from jupyter_core.paths import jupyter_runtime_dir
    except ImportError:  # a service machine without Jupyter: nobody reads these there
        from .. import _paths

        return _paths.home() / "engines"
    return Path(jupyter_runtime_dir()) / "workbench"


def write_json_atomic(path: Path, data: dict) -> None:
    from .._paths import write_text_atomic

    write_text_atomic(path, json.dumps(data))


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _worker_rss(engine: "Engine") -> int | None:
    """The worker's resident memory now (its own reports come once a second)."""
    import psutil

    try:
        rss = psutil.Process(engine.pid).memory_info().rss if engine.pid else None
        return rss and rss >> 20 << 20  # whole MiB: the file changes only when that does
    except psutil.Error:
        st = engine.last_stats
        return st.rss_bytes if st else None


def _kernel_id() -> str | None:
    """The Jupyter kernel id when this process is a kernel (the panel shows its notebook)."""
    try:
        from ipykernel.connect import get_connection_file

        name = Path(get_connection_file()).stem
    except Exception:  # not in a kernel
        return None
    return name.removeprefix("kernel-")


# ---- reading (the server extension) ---------------------------------------------------

def _valid(entry: Any, engine_id: str) -> bool:
    return (isinstance(entry, dict) and entry.get("version") == VERSION
            and entry.get("id") == engine_id
            and isinstance(entry.get("kernel_pid"), int) and entry["kernel_pid"] > 0
            and isinstance(entry.get("kernel_started"), (int, float))
            and isinstance(entry.get("state"), str))


def is_stale(entry: dict) -> bool:
    """True when the kernel that wrote `entry` is gone (or its pid now names another
    process, started later)."""
    started = _process_started(entry["kernel_pid"])
    return started is None or abs(started - entry["kernel_started"]) > _START_SLACK_S


def read_entry(engine_id: str, folder: Path | None = None, *, clean: bool = True
               ) -> dict | None:
    """The engine's entry, or None when there is no such engine. A malformed file is
    ignored; a stale one is deleted (with `clean`)."""
    if not ENGINE_ID.fullmatch(engine_id):
        return None
    folder = folder or status_dir()
    path = folder / f"{engine_id}.json"
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not _valid(entry, engine_id):
        return None
    if is_stale(entry):
        if clean:
            for p in (path, folder / f"{engine_id}.stop"):
                try:
                    p.unlink(missing_ok=True)
                except OSError:  # another user's file: skipping it is enough
                    pass
        return None
    return entry


def list_entries(folder: Path | None = None) -> list[dict]:
    """Every live engine's entry, oldest first; malformed files are skipped, stale ones
    deleted."""
    folder = folder or status_dir()
    try:
        names = sorted(p.stem for p in folder.glob("*.json"))
    except OSError:
        return []
    entries = [e for e in (read_entry(n, folder) for n in names) if e is not None]
    return sorted(entries, key=lambda e: e.get("created", 0))


def request_stop(engine_id: str, folder: Path | None = None) -> None:
    """Ask the engine to stop (its publisher acts within a second)."""
    folder = folder or status_dir()
    write_json_atomic(folder / f"{engine_id}.stop", {"requested": time.time()})


# ---- publishing (the kernel) ----------------------------------------------------------

class StatusPublisher:
    """Keeps one engine's status file up to date and obeys stop requests.

    A daemon thread wakes every second (sooner after an engine event), rewrites the
    file when something changed, and deletes it when the process exits.
    """

    def __init__(self, engine: "Engine", folder: Path | None = None) -> None:
        self.engine = engine
        self.id = uuid.uuid4().hex[:12]
        self.folder = folder or status_dir()
        self.path = self.folder / f"{self.id}.json"
        self.stop_path = self.folder / f"{self.id}.stop"
        self.created = time.time()
        self.kernel_started = _process_started(os.getpid()) or 0.0
        self.kernel_id = _kernel_id()
        self.stopped_from_panel = False
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._last: dict | None = None
        self._last_write = 0.0
        self._unsubscribe = engine.subscribe(self._on_event)
        self._thread = threading.Thread(target=self._run, name="workbench-status",
                                        daemon=True)
        self._thread.start()

    def _on_event(self, kind: str, payload: Any) -> None:
        if kind != "tokens":
            self._wake.set()

    def snapshot(self) -> dict:
        e = self.engine
        m, st = e.model, e.last_stats
        records = e.records[-HISTORY:]
        if e.alive:
            self.stopped_from_panel = False
        activity = e.activity()
        if activity:
            state = activity
        elif e.alive:
            state = "idle" if m is not None else "no model"
        elif self.stopped_from_panel:
            state = "stopped"
        elif e.last_crash:
            state = "crashed"
        else:
            state = "stopped"
        gpu_layers = min(m.n_gpu_layers, m.n_layers + 1) if m else 0
        return {
            "version": VERSION, "id": self.id, "created": self.created,
            "kernel_pid": os.getpid(), "kernel_started": self.kernel_started,
            "kernel_id": self.kernel_id,
            "worker_pid": e.pid if e.alive else None,
            "state": state,
            "model": None if m is None else {
                "name": m.name, "path": m.path, "architecture": m.architecture,
                "quantization": m.quantization, "file_bytes": m.file_bytes},
            "placement": None if m is None else {
                "device": "cluster" if m.rpc_servers else "cpu" if gpu_layers == 0 else
                "gpu" if gpu_layers > m.n_layers else "cpu+gpu",
                "nodes": list(m.rpc_servers),
                "n_gpu_layers": gpu_layers, "n_layers": m.n_layers, "threads": m.threads,
                "n_ctx": m.n_ctx, "n_batch": m.n_batch, "type_k": m.type_k,
                "type_v": m.type_v, "flash_attn": m.flash_attn},
            "memory": {"worker_rss_bytes": _worker_rss(e) if e.alive else None,
                       "worker_gpu_bytes": st.gpu_bytes if st and e.alive else None},
            "requests": len(e.records),
            "last_tps": records[-1].decode_tps if records else None,
            "last_ttft_s": records[-1].ttft_s if records else None,
            "history": [{"t": r.wall_time, "tps": r.decode_tps, "ttft_s": r.ttft_s}
                        for r in records],
            "restarts": e.restarts, "last_crash": e.last_crash,
        }

    def publish(self) -> None:
        """Write the entry now if it changed (or the heartbeat is due)."""
        snap = self.snapshot()
        now = time.time()
        if snap == self._last and now - self._last_write < _HEARTBEAT_S:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {**snap, "updated": now})
        except OSError as e:
            log.debug("could not publish the engine's status: %s", e)
            return
        self._last, self._last_write = snap, now

    def _obey_stop(self) -> None:
        try:
            self.stop_path.unlink()
        except OSError:  # no request (or no folder)
            return
        log.info("stopping the engine, as asked from the Workbench panel")
        self.stopped_from_panel = True
        try:
            self.engine.stop()
        except Exception:
            log.exception("stopping the engine failed")

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._obey_stop()
                self.publish()
            except Exception:  # the panel's view must never break the engine
                log.exception("engine status publisher failed")
            self._wake.wait(_PERIOD_S)
            self._wake.clear()

    def close(self) -> None:
        """Stop publishing and remove the entry."""
        self._closed.set()
        self._wake.set()
        self._unsubscribe()
        for p in (self.path, self.stop_path):
            try:
                p.unlink(missing_ok=True)
            except OSError:  # the folder itself is gone or unusable: nothing to remove
                pass
