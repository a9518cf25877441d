"""`workbench rpc-worker`: serve this machine's compute over llama.cpp's RPC protocol.

The server is llama.cpp's own (`ggml_backend_rpc_start_server` in libggml-rpc); this
module picks the device, enforces the memory limit, refuses to listen beyond loopback
unless told, and serves a small JSON status page beside it (RPC port + 1000) that the
kernel reads for health, memory, bandwidth and traffic.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .. import _paths
from ..errors import WorkbenchError
from .._cpu import SPINCOUNT, idle_cores
from .._net import is_loopback
from .._platform import data_size
from .probe import status_port

GiB = 2 ** 30
UNSAFE_FLAG = "--allow-unauthenticated-network"
_STACK = 8 * 2 ** 20       # glibc's default thread stack, counted by RLIMIT_DATA
_SLACK = 48 * 2 ** 20      # transfer buffers and the graph the server deserialises


def check_host(host: str, allow_network: bool) -> None:
    if is_loopback(host) or allow_network:
        return
    raise WorkbenchError(
        f"refusing to serve llama.cpp's RPC on {host}: the protocol has no authentication, "
        "so anyone who can reach the port can use this machine's memory and compute",
        f"Keep the default 127.0.0.1 and reach it through an SSH tunnel (on the kernel's "
        f"machine: ssh -N -L 50052:127.0.0.1:50052 USER@NODE), or, on a trusted network "
        f"only, add {UNSAFE_FLAG}.")


def _check_port_free(host: str, port: int, what: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise WorkbenchError(f"cannot listen on {host}:{port} ({what}): {e.strerror}",
                                 "Pick another --port, or stop what uses it.") from None


def _pick_device(kind: str) -> Any:
    from ..worker.libs import DEV_CPU, DEV_GPU, DEV_IGPU, local_devices

    wanted = (DEV_CPU,) if kind == "cpu" else (DEV_GPU, DEV_IGPU)
    found = [d for d in local_devices() if d.kind in wanted]
    if not found:
        raise WorkbenchError(f"this machine has no {kind.upper()} device that llama.cpp can use",
                             "Use --device cpu, or a llama-cpp-python built for the GPU.")
    return found[0]


def limit_memory(limit: int, threads: int) -> None:
    """Make allocations beyond `limit` fail (RLIMIT_DATA), so the node refuses a share
    too big for it instead of swapping the machine to a halt."""
    data = data_size()
    if data is None:  # macOS: no VmData, and RLIMIT_DATA is not enforced there
        print("workbench: this platform cannot cap the node's memory; --memory is a "
              "budget it reports, not a limit", file=sys.stderr)
        return
    import resource

    cap = data + limit + _SLACK + _STACK * (threads + 2)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))


def machine_id() -> str:
    """Which machine this is, whatever address reaches it (an SSH tunnel looks local)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _io_bytes() -> tuple[int, int]:
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            values = dict(line.split(": ") for line in f.read().splitlines())
        return int(values["rchar"]), int(values["wchar"])
    except (OSError, KeyError, ValueError):
        return 0, 0


class _Status:
    def __init__(self, info: dict[str, Any], port: int) -> None:
        self.info = info
        self.port = port

    def snapshot(self) -> dict[str, Any]:
        import psutil

        clients = []
        try:
            for c in psutil.Process().net_connections(kind="tcp"):
                if c.laddr and c.laddr.port == self.port and c.raddr and \
                        c.status == psutil.CONN_ESTABLISHED:
                    clients.append(f"{c.raddr.ip}:{c.raddr.port}")
        except psutil.Error:
            pass
        rx, tx = _io_bytes()
        out = {**self.info, "clients": clients, "bytes_in": rx, "bytes_out": tx,
               "rss": psutil.Process().memory_info().rss, "time": time.time()}
        if self.info["device"] == "cpu":  # ggml calls all RAM free; say what is available
            available = psutil.virtual_memory().available
            limit = self.info["mem_limit"]
            out["advertised"] = min(limit, available) if limit else available
        return out


def _serve_status(host: str, port: int, state: _Status) -> ThreadingHTTPServer | None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server name
            if self.path not in ("/status", "/health"):
                self.send_error(404)
                return
            body = json.dumps(state.snapshot()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        print(f"rpc-worker: no status page on {host}:{port} ({e.strerror}); the kernel "
              "then sees only the RPC port", file=sys.stderr)
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="rpc-status", daemon=True).start()
    return server


def run(host: str = "127.0.0.1", port: int = 50052, device: str = "cpu",
        mem_limit_gib: float | None = None, threads: int | None = None,
        allow_network: bool = False, status_page: bool = True,
        cache_dir: str | None = None) -> None:
    """Serve until killed. Every check happens before anything listens."""
    # OpenMP threads spin for a while after each graph; on a machine that also runs the
    # kernel's engine or other nodes that spinning steals their cores. Set before
    # llama.cpp (and its OpenMP runtime) loads; benchmarks/cluster.py measures it.
    os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)
    os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    from ..device.profile import memory_bandwidth

    check_host(host, allow_network)
    if device not in ("cpu", "gpu"):
        raise WorkbenchError(f"--device must be cpu or gpu (got {device!r})",
                             "Use --device cpu or --device gpu.")
    if not 0 < port < 65536:
        raise WorkbenchError(f"--port must be 1-65535 (got {port})", "The default is 50052.")
    if mem_limit_gib is not None and mem_limit_gib <= 0:
        raise WorkbenchError(f"--mem-limit must be positive (got {mem_limit_gib})",
                             "Give GiB, for example --mem-limit 4.")
    _check_port_free(host, port, "the RPC port")
    threads = threads or idle_cores().idle  # the cores other work leaves idle now
    dev = _pick_device(device)
    limit = int(mem_limit_gib * GiB) if mem_limit_gib else None
    if limit is not None and limit > dev.free:
        raise WorkbenchError(
            f"--mem-limit {mem_limit_gib:g} GiB is more than the {dev.free / GiB:.1f} GiB "
            f"{dev.name} has free",
            "Give at most what the device has free: the planner trusts the limit.")
    bandwidth = memory_bandwidth(mib=128, repeats=2) if device == "cpu" else None
    info = {"workbench_rpc_worker": 1, "host": host, "port": port, "pid": os.getpid(),
            "started": time.time(), "device": device, "device_name": dev.name,
            "description": dev.description, "total": dev.total, "free": dev.free,
            "mem_limit": limit, "advertised": min(limit or dev.free, dev.free),
            "bandwidth_gbs": bandwidth, "threads": threads, "machine": machine_id()}
    server = _serve_status(host, status_port(port), _Status(info, port)) if status_page \
        else None
    if limit is not None and device == "cpu":
        limit_memory(limit, threads)
    cache = cache_dir or str(_paths.home() / "rpc-cache")
    os.makedirs(cache, exist_ok=True)
    from ..worker.libs import device_array, lib

    devices = device_array([dev.handle])
    server_thread = threading.Thread(
        target=lib().rpc.ggml_backend_rpc_start_server, name="rpc-server", daemon=True,
        args=(f"{host}:{port}".encode(), cache.encode(), threads, 1,
              ctypes.cast(devices, ctypes.POINTER(ctypes.c_void_p))))
    server_thread.start()
    # "ready" only once the port listens: whoever reads it may connect at once.
    deadline = time.monotonic() + 30
    while not _listening(port) and server_thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not _listening(port):
        raise WorkbenchError(f"llama.cpp's RPC server did not start listening on {host}:{port}",
                             "Its log above says why (often: the port was taken meanwhile).")
    print("rpc-worker ready " + json.dumps({k: info[k] for k in (
        "host", "port", "pid", "device", "device_name", "free", "mem_limit", "bandwidth_gbs")}
        | {"status_port": status_port(port) if server else None}), flush=True)
    while server_thread.is_alive():
        server_thread.join(0.5)
    raise WorkbenchError(f"llama.cpp's RPC server on {host}:{port} stopped",
                         "Its log above says why.")


def _listening(port: int) -> bool:
    import psutil

    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in psutil.Process().net_connections(kind="tcp"))
    except psutil.Error:
        return False
