"""`workbench deploy --check FOLDER`: start the service, run a smoke test, stop it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .._net import free_port
from ..errors import WorkbenchError
from .run import read_config

_START_TIMEOUT_S = 180.0


def start(folder: Path, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """The service in a process of its own (its own session, so it can be stopped whole)."""
    return subprocess.Popen(
        [sys.executable, "-m", "workbench.cli", "serve", str(folder), "--host", "127.0.0.1",
         "--port", str(port), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, **(env or {})}, start_new_session=True)


def wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float = _START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise WorkbenchError(f"the service exited with code {proc.returncode}: "
                                 f"{out.strip()[-600:]}", "Run `workbench serve FOLDER` to see why.")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise WorkbenchError(f"the service did not become healthy within {timeout_s:.0f} s",
                         "Run `workbench serve FOLDER` to see why.")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class RunningService:
    """A service started in the background (`workbench.start_service`): its URL, and stop()."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.model = read_config(self.folder)["model"]["name"]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = start(self.folder, self.port)
        try:
            wait_healthy(self.url, self.proc)
        except BaseException:
            stop(self.proc)
            raise

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop(self.proc)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (f"Service {self.model} at {self.url}/v1 ({state}, pid {self.proc.pid}); "
                "stop it with .stop()")


def _post(url: str, body: dict, timeout: float = 120) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()


def check(folder: Path) -> None:
    folder = folder.expanduser().resolve()
    config = read_config(folder)
    name = config["model"]["name"]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start(folder, port)
    t0 = time.monotonic()
    try:
        wait_healthy(base, proc)
        print(f"healthy after {time.monotonic() - t0:.1f} s on {base}")
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as r:
            models = [m["id"] for m in json.loads(r.read())["data"]]
        if models != [name]:
            raise WorkbenchError(f"/v1/models lists {models}, not {name}", "Deploy again.")
        print(f"/v1/models: {name}")
        t = time.monotonic()
        reply = json.loads(_post(f"{base}/v1/chat/completions", {
            "model": name, "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 16, "temperature": 0}))
        text = reply["choices"][0]["message"]["content"]
        print(f"chat: {reply['usage']['completion_tokens']} tokens in "
              f"{time.monotonic() - t:.2f} s: {text!r}")
        events = _post(f"{base}/v1/completions", {"model": name, "prompt": "One, two,",
                                                  "max_tokens": 8, "stream": True,
                                                  "temperature": 0})
        chunks = [e for e in events.split("\n\n") if e.startswith("data: ")]
        if not chunks or chunks[-1] != "data: [DONE]":
            raise WorkbenchError("the streamed completion did not end with [DONE]",
                                 "Run `workbench serve FOLDER` and try it by hand.")
        print(f"stream: {len(chunks) - 1} events, ended with [DONE]")
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        if "workbench_ttft_seconds_count" not in metrics:
            raise WorkbenchError("/metrics has no TTFT histogram", "Deploy again.")
        print("metrics: ok")
    except urllib.error.HTTPError as e:
        raise WorkbenchError(f"the smoke test got HTTP {e.code}: {e.read().decode()[:300]}",
                             "Run `workbench serve FOLDER` and try it by hand.") from None
    finally:
        stop(proc)
    print(f"{folder}: service ok")
