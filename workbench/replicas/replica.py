"""One replica: a workbench engine (its worker process, continuous batching inside it)
behind a Ray Serve deployment.

Before it loads, a replica checks what its machine has against what the service was
deployed with: the workbench's and llama-cpp-python's versions, Python's, and the model
file's sha256 (a lab's machines must hold the same file at the same path). A mismatch is a
`WorkbenchError` that names both sides; Ray Serve reports it as the replica's start failure.

A generation streams its text pieces, then one dict: the result (metrics, finish reason,
log-probabilities) or the error (the workbench error's class, message and hint), so that
the service can give the client the same 4xx it would give for a single engine.
"""

from __future__ import annotations

import asyncio
import os
import platform
import socket
from pathlib import Path
from typing import Any, AsyncIterator

from ..errors import WorkbenchError


def versions() -> dict[str, str | None]:
    """What must match between the service's machine and each replica's."""
    from ..device.provenance import package_version

    return {"workbench": package_version("gguf-workbench") or package_version("workbench"),
            "llama-cpp-python": package_version("llama-cpp-python"),
            "python": ".".join(platform.python_version_tuple()[:2])}


def check_machine(model: str, sha256: str, expect: dict[str, str | None]) -> None:
    here = versions()
    host = socket.gethostname()
    wrong = [f"{k} {here.get(k)} here, {v} on the service's machine"
             for k, v in expect.items() if here.get(k) != v]
    if wrong:
        raise WorkbenchError(f"replica on {host}: version mismatch: {'; '.join(wrong)}",
                             "Install the same versions on every machine of the Ray cluster "
                             "(the same `make lab` checkout, or the same wheel).")
    path = Path(model)
    if not path.is_file():
        raise WorkbenchError(f"replica on {host}: the model file {model} is not there",
                             "Every machine needs the service folder at the same path "
                             "(a shared folder, or a copy).")
    from ..models.hashing import file_sha256

    got = file_sha256(path)
    if got != sha256:
        raise WorkbenchError(f"replica on {host}: {model} differs from the service's model "
                             f"(sha256 {got[:12]}… here, {sha256[:12]}… deployed)",
                             "Copy the same file to every machine; the service checks the "
                             "sha256 so that no replica answers with another model.")


class EngineReplica:
    """The deployment's body (launch.py wraps it in `serve.deployment`)."""

    def __init__(self, model: str, sha256: str, load: dict[str, Any],
                 expect: dict[str, str | None]) -> None:
        from ..config import LoadConfig, build
        from ..device.planner import resolve
        from ..engine.client import Engine

        check_machine(model, sha256, expect)
        self.model, self.sha256 = model, sha256
        self.kv_dir = None
        if load.get("kv_dir"):  # the disk tier of this replica's prefix cache, its own
            self.kv_dir = Path(load["kv_dir"]) / f"replica-{socket.gethostname()}-{os.getpid()}"
            load = {**load, "kv_dir": str(self.kv_dir)}
        self.engine = Engine()
        try:  # what the folder fixes is kept; the planner places the rest on this machine
            config, _ = resolve(self.engine, Path(model), build(LoadConfig, load), load)
            self.info_ = self.engine.load(model, config)
        except BaseException:
            self.engine.close()
            raise

    async def generate(self, kind: str, payload: Any, config: Any, tools: str = "",
                       prefix: tuple[int, ...] = ()) -> AsyncIterator[Any]:
        """Who serves it ({"replica", "pid", "host"}), text pieces, then {"result": ...} or
        {"error": ...}. `prefix` is the router's (router.py); the engine's prefix cache
        finds the prefix by itself."""
        yield {"replica": _replica_tag(), "pid": os.getpid(), "host": socket.gethostname()}
        try:
            stream = await asyncio.to_thread(self.engine.stream, kind, payload, config, tools)
        except WorkbenchError as e:
            yield _error(e)
            return
        try:
            async for piece in stream:
                yield piece
        except WorkbenchError as e:
            yield _error(e)
            return
        finally:
            stream.cancel_nowait()  # a client that went away: the generation stops
        yield {"result": {"metrics": stream.metrics, "finish_reason": stream.finish_reason,
                          "logprobs": stream.logprobs, "replica": _replica_tag()}}

    def info(self) -> dict[str, Any]:
        return {"model": self.model, "sha256": self.sha256, "info": self.info_,
                "replica": _replica_tag(),
                "pid": os.getpid(), "worker_pid": self.engine.pid,
                "host": socket.gethostname()}

    def check_health(self) -> None:
        """Ray Serve calls this every few seconds: a replica whose worker died is
        replaced (the engine restarts its worker with the next request in any case)."""
        if not self.engine.alive:
            raise RuntimeError("the replica's engine worker is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        if getattr(self, "kv_dir", None) is not None:
            import shutil

            shutil.rmtree(self.kv_dir, ignore_errors=True)


def _replica_tag() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001: outside a replica (tests of the class itself)
        return f"pid-{os.getpid()}"


def _error(e: WorkbenchError) -> dict[str, Any]:
    return {"error": {"type": type(e).__name__, "message": e.message, "hint": e.hint,
                      "where": getattr(e, "where", None),
                      "position": getattr(e, "position", None)}}
