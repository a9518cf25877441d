"""Routes of the Workbench panel's API. Each handler is a jupyter_server `APIHandler`
with `@tornado.web.authenticated` on every method: without the server's token or
cookie a request gets 403.

    GET  /workbench/engines             the live engines (stale entries are cleaned up)
    GET  /workbench/engines/ID          one engine, 404 if there is none
    POST /workbench/engines/ID/stop     stop it (202), 404 if there is none
    GET  /workbench/models              the default model and the GGUF files found on disk
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import tornado.web
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join

from ..engine import status

_STOP_WAIT_S = 5.0  # how long a stop waits for the kernel before stopping the worker itself


def _folder(handler: APIHandler) -> Path:
    return status.status_dir()


class _Base(APIHandler):
    async def _notebooks(self) -> dict[str, str]:
        """kernel id -> the path of the notebook (or console) it serves."""
        try:
            sessions = await self.session_manager.list_sessions()
        except Exception:  # the panel shows the kernel id instead
            return {}
        return {s["kernel"]["id"]: s.get("path", "") for s in sessions
                if isinstance(s, dict) and s.get("kernel")}

    async def _entry(self, engine_id: str) -> dict:
        entry = await asyncio.to_thread(status.read_entry, engine_id, _folder(self))
        if entry is None:
            raise tornado.web.HTTPError(404, f"no workbench engine {engine_id!r}")
        entry["notebook"] = (await self._notebooks()).get(entry.get("kernel_id") or "")
        return entry


class EnginesHandler(_Base):
    @tornado.web.authenticated
    async def get(self) -> None:
        entries = await asyncio.to_thread(status.list_entries, _folder(self))
        notebooks = await self._notebooks()
        for e in entries:
            e["notebook"] = notebooks.get(e.get("kernel_id") or "")
        self.finish(json.dumps({"engines": entries, "now": time.time()}))


class EngineHandler(_Base):
    @tornado.web.authenticated
    async def get(self, engine_id: str) -> None:
        self.finish(json.dumps(await self._entry(engine_id)))


class StopHandler(_Base):
    @tornado.web.authenticated
    async def post(self, engine_id: str) -> None:
        entry = await self._entry(engine_id)
        folder = _folder(self)
        await asyncio.to_thread(status.request_stop, engine_id, folder)
        forced = False
        deadline = time.monotonic() + _STOP_WAIT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            now = await asyncio.to_thread(status.read_entry, engine_id, folder)
            if now is None or now["state"] == "stopped":
                break
        else:
            # The kernel is busy holding the interpreter (or hung): stop its worker
            # directly. The kernel sees the worker end and, once free, obeys the request.
            forced = _kill_worker(entry)
        self.set_status(202)
        self.finish(json.dumps({"id": engine_id, "stopping": True, "forced": forced}))


def _kill_worker(entry: dict) -> bool:
    """SIGTERM the engine's worker, if that pid is still a child of the engine's kernel."""
    import psutil

    pid = entry.get("worker_pid")
    if not isinstance(pid, int):
        return False
    try:
        proc = psutil.Process(pid)
        if proc.ppid() != entry["kernel_pid"]:
            return False
        os.kill(pid, signal.SIGTERM)
    except (psutil.Error, OSError):
        return False
    return True


class ModelsHandler(_Base):
    @tornado.web.authenticated
    async def get(self) -> None:
        self.finish(json.dumps(await asyncio.to_thread(_models)))


def _models() -> dict[str, Any]:
    from ..models.default import default_model_path
    from ..models.discover import discover
    from ..models.gguf_file import read_header
    from ..errors import WorkbenchError

    default: dict[str, Any] = {"name": "default", "label": "default model", "path": "",
                               "source": "default", "size": 0, "quantization": "",
                               "architecture": "", "problem": "", "load": "%load_model"}
    try:
        path = default_model_path()
        header = read_header(path)
        default.update(label=path.name, path=str(path), size=path.stat().st_size,
                       quantization=header.quantization, architecture=header.architecture)
    except (WorkbenchError, OSError) as e:
        default["problem"] = str(e)
    models = [default]
    for m in discover():
        models.append({"name": m.name, "label": m.name, "path": str(m.path),
                       "source": m.source, "size": m.size, "quantization": m.quantization,
                       "architecture": m.architecture, "problem": m.problem,
                       "load": f"%load_model {m.name}"})
    return {"models": models}


def routes(base_url: str) -> list[tuple[str, type[APIHandler]]]:
    engine = r"(?P<engine_id>[A-Za-z0-9_-]+)"
    return [
        (url_path_join(base_url, "workbench", "engines") + "/?", EnginesHandler),
        (url_path_join(base_url, "workbench", "engines", engine) + "/?", EngineHandler),
        (url_path_join(base_url, "workbench", "engines", engine, "stop") + "/?", StopHandler),
        (url_path_join(base_url, "workbench", "models") + "/?", ModelsHandler),
    ]


def setup_handlers(web_app: Any) -> None:
    web_app.add_handlers(".*$", routes(web_app.settings["base_url"]))
