"""Talking to a node from the kernel, without llama.cpp: the RPC handshake (HELLO,
device count, device memory) over a plain socket, and the rpc-worker's status page.

The handshake is the first thing llama.cpp's client does; doing it here first turns
"nothing listens there", "that is not an RPC server" and "wrong protocol version"
into clear errors, where llama.cpp would abort the process. llama.cpp's RPC server
serves one client at a time, so a node busy with another client does not answer.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from ..errors import WorkbenchError

PROTO_MAJOR = 7            # ggml-rpc.h RPC_PROTO_MAJOR_VERSION
_CMD_GET_DEVICE_MEMORY = 11
_CMD_HELLO = 14
_CMD_DEVICE_COUNT = 15
_CAPS = 24                 # RPC_CONN_CAPS_SIZE: zeros ask for plain TCP
STATUS_OFFSET = 1000       # the rpc-worker's status page: RPC port + 1000


class NodeError(WorkbenchError):
    """A cluster node cannot be used: unreachable, not an RPC server, or lost."""

    def __init__(self, endpoint: str, message: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.endpoint = endpoint


def parse_endpoint(text: str) -> str:
    """`HOST:PORT`, checked; returns it normalised (IPv6 hosts in brackets)."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise WorkbenchError(f"{text!r} is not HOST:PORT",
                             "For example: %cluster add 127.0.0.1:50052")
    return f"[{host}]:{int(port)}" if ":" in host else f"{host}:{int(port)}"


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def status_port(port: int) -> int:
    return port + STATUS_OFFSET if port + STATUS_OFFSET < 65536 else port - STATUS_OFFSET


@dataclass(frozen=True)
class RemoteDevice:
    index: int
    free: int
    total: int


@dataclass(frozen=True)
class NodeInfo:
    """What a node told us: over RPC (version, devices, memory) and, for an rpc-worker,
    on its status page (device kind, memory limit, bandwidth, traffic)."""

    endpoint: str
    version: str
    devices: tuple[RemoteDevice, ...]
    rtt_ms: float
    status: dict[str, Any] = field(default_factory=dict)

    @property
    def advertised_free(self) -> int:
        """Free memory as the RPC server reports it (what llama.cpp would believe)."""
        return sum(d.free for d in self.devices)

    @property
    def usable(self) -> int:
        """What the planner may put there: what the worker's status page offers (its
        available memory, within its limit), else what its RPC server reports."""
        offered = self.status.get("advertised")
        return min(self.advertised_free, offered) if offered else self.advertised_free

    @property
    def kind(self) -> str:
        return self.status.get("device", "unknown")

    @property
    def bandwidth_gbs(self) -> float | None:
        return self.status.get("bandwidth_gbs")


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def _call(s: socket.socket, cmd: int, payload: bytes, reply: int) -> bytes:
    s.sendall(bytes([cmd]) + struct.pack("<Q", len(payload)) + payload)
    size = struct.unpack("<Q", _recv_exact(s, 8))[0]
    if size != reply:
        raise ValueError(f"a {size}-byte reply where {reply} were expected")
    return _recv_exact(s, reply)


def _connect(endpoint: str, timeout: float) -> socket.socket:
    host, port = split_endpoint(endpoint)
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        raise NodeError(endpoint, f"nothing listens at {endpoint} (connection refused)",
                        "Check the port, and that `workbench rpc-worker` runs there.") from None
    except socket.gaierror as e:
        raise NodeError(endpoint, f"cannot resolve the host of {endpoint}: {e.strerror}",
                        "Give an IP address or a name this machine can resolve.") from None
    except OSError as e:
        raise NodeError(endpoint, f"cannot reach {endpoint}: {e.strerror or e}",
                        "Check the address, the network and any firewall between.") from None


def probe(endpoint: str, timeout: float = 3.0) -> NodeInfo:
    """Handshake with the RPC server at `endpoint` and read its devices' memory."""
    t0 = time.perf_counter()
    s = _connect(endpoint, timeout)
    try:
        with s:
            hello = _call(s, _CMD_HELLO, bytes(_CAPS), 4 + _CAPS)
            rtt = (time.perf_counter() - t0) * 1000
            major, minor, patch = hello[0], hello[1], hello[2]
            if major != PROTO_MAJOR:
                raise NodeError(endpoint, f"{endpoint} speaks RPC protocol {major}.{minor}."
                                f"{patch}; this llama.cpp speaks {PROTO_MAJOR}.x",
                                "Run the same llama-cpp-python version on every node.")
            count = struct.unpack("<I", _call(s, _CMD_DEVICE_COUNT, b"", 4))[0]
            devices = []
            for i in range(count):
                free, total = struct.unpack(
                    "<QQ", _call(s, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", i), 16))
                devices.append(RemoteDevice(i, free, total))
    except socket.timeout:
        if _speaks_http(endpoint, timeout):
            raise NodeError(endpoint, f"{endpoint} is an HTTP server, not a llama.cpp RPC server",
                            "Give the RPC port (`workbench rpc-worker` listens on 50052 unless "
                            "told otherwise; its status page is the port + 1000).") from None
        raise NodeError(endpoint, f"{endpoint} accepted a connection but did not answer the "
                        f"RPC handshake within {timeout:.0f} s",
                        "Either it is not a llama.cpp RPC server, or another client holds it "
                        "(an RPC server serves one client at a time).") from None
    except (ConnectionError, ValueError, OSError):
        raise NodeError(endpoint, f"{endpoint} is not a llama.cpp RPC server (it answered the "
                        "handshake with something else)",
                        "Check the port: `workbench rpc-worker` listens on 50052 unless told "
                        "otherwise.") from None
    if not devices:
        raise NodeError(endpoint, f"the RPC server at {endpoint} offers no device",
                        "Start it with `workbench rpc-worker`, which serves one.")
    return NodeInfo(endpoint, f"{major}.{minor}.{patch}", tuple(devices), rtt, status(endpoint))


def _speaks_http(endpoint: str, timeout: float) -> bool:
    try:
        with _connect(endpoint, timeout) as s:
            s.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
            return s.recv(5) == b"HTTP/"
    except (NodeError, OSError):
        return False


def status(endpoint: str, timeout: float = 1.0) -> dict[str, Any]:
    """The rpc-worker's status page, or {} when the node has none (a plain rpc-server)."""
    host, port = split_endpoint(endpoint)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{status_port(port)}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = json.loads(r.read(1 << 20))
    except (OSError, ValueError, urllib.error.URLError, http.client.HTTPException):
        return {}
    return data if isinstance(data, dict) and data.get("workbench_rpc_worker") == 1 else {}


def reachable(endpoint: str, timeout: float = 1.0) -> bool:
    """Does the RPC port accept connections? Only for a node no engine holds: llama.cpp's
    server accepts one client at a time, so probes queued behind a busy one would fill
    its backlog and time out."""
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
