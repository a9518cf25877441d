"""rpc-workers on this machine (`%cluster local N`): started on free loopback ports,
stopped with the kernel."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
from typing import Callable

from .._net import free_port
from ..errors import WorkbenchError
from . import probe as P


class LocalWorkers:
    """The rpc-worker processes this kernel started."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self._atexit = False

    def start(self, n: int, threads: int | None = None,
              mem_limit_gib: float | None = None) -> list[str]:
        """Start `n` rpc-workers on free loopback ports; their endpoints, once each is ready."""
        if not 1 <= n <= 8:
            raise WorkbenchError(f"start 1 to 8 local workers (got {n})",
                                 "Each holds a share of the model; 2 or 3 show the idea.")
        endpoints = []
        for _ in range(n):
            port = _free_pair(free_port)
            cmd = [sys.executable, "-m", "workbench.cli", "rpc-worker", "--port", str(port)]
            if threads:
                cmd += ["--threads", str(threads)]
            if mem_limit_gib:
                cmd += ["--mem-limit", str(mem_limit_gib)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            timer = threading.Timer(60, proc.kill)  # a worker that never says it is ready
            timer.start()
            line = _ready_line(proc)
            timer.cancel()
            if not line.startswith("rpc-worker ready"):
                proc.kill()
                raise WorkbenchError(f"a local rpc-worker did not start: {line.strip() or 'no output'}",
                                     "Run `workbench rpc-worker` in a terminal to see why.")
            threading.Thread(target=_drain, args=(proc,), daemon=True).start()
            self.procs.append(proc)
            endpoints.append(f"127.0.0.1:{port}")
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        return endpoints

    def by_endpoint(self) -> dict[str, subprocess.Popen]:
        return {f"127.0.0.1:{_port_of(p)}": p for p in self.procs}

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs.clear()


def _free_pair(free_port: Callable[[], int]) -> int:
    """A free port whose status port (+1000) is free too."""
    import socket

    for _ in range(50):
        port = free_port()
        if port + P.STATUS_OFFSET >= 65536:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", P.status_port(port)))
            except OSError:
                continue
        return port
    raise WorkbenchError("no free pair of loopback ports", "Close some servers and retry.")


def _ready_line(proc: subprocess.Popen) -> str:
    """The worker's "rpc-worker ready" line (llama.cpp's server prints its own lines
    around it), or its last line if it exits first."""
    line = ""
    for line in proc.stdout or ():
        if line.startswith("rpc-worker ready"):
            return line
    return line


def _port_of(proc: subprocess.Popen) -> int:
    args = list(proc.args)  # type: ignore[arg-type]
    return int(args[args.index("--port") + 1])


def _drain(proc: subprocess.Popen) -> None:
    for _ in proc.stdout or ():  # llama.cpp's server logs each connection
        pass
