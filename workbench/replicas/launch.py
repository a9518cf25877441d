"""Replicas on Ray Serve: connect to a Ray cluster (or start one here), deploy the engine
replicas, roll them onto a new model file.

The replicas are one Ray Serve application (`APP`) of one deployment (`DEPLOYMENT`), with no
HTTP proxy of Ray's: the workbench's own service (serve/app.py) is the front, in the process
that runs `workbench serve`, and calls the replicas through a deployment handle. Ray Serve
starts, places, health-checks and autoscales the replicas, and routes each request with the
router the service names (router.py, or Ray's default, power of two choices).

Each replica reserves as many of Ray's CPUs as it runs threads, so Ray places replicas on
machines with cores to spare, and one machine's replicas do not oversubscribe its cores.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import time
from typing import Any

from ..errors import WorkbenchError

APP, DEPLOYMENT = "workbench", "engine"
ROUTERS = ("prefix", "default")
_DEFAULT_ROUTER = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"


@dataclasses.dataclass(frozen=True)
class Replicas:
    min: int
    max: int

    def __str__(self) -> str:
        return str(self.min) if self.min == self.max else f"{self.min}-{self.max}"


def parse_replicas(text: Any) -> Replicas:
    """"N" or "MIN-MAX" (autoscaled between them on queue depth)."""
    s = str(text).strip()
    m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", s)
    if not m:
        raise WorkbenchError(f"--replicas {s!r} is not a count",
                             "Give N (say 2) or MIN-MAX (say 1-4).")
    lo = int(m.group(1))
    hi = int(m.group(2)) if m.group(2) is not None else lo
    if lo < 1 or hi < 1:
        raise WorkbenchError(f"--replicas {s}: a service needs at least one replica",
                             "Give N >= 1, or MIN-MAX with MIN >= 1.")
    if lo > hi:
        raise WorkbenchError(f"--replicas {s}: MIN ({lo}) is more than MAX ({hi})",
                             f"Write it as {hi}-{lo}.")
    return Replicas(lo, hi)


def check_router(name: str) -> str:
    if name not in ROUTERS:
        raise WorkbenchError(f"unknown router {name!r}", f"Use one of: {', '.join(ROUTERS)}.")
    return name


def _reachable(address: str, timeout_s: float = 3.0) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise WorkbenchError(f"--ray {address!r} is not HOST:PORT",
                             "Give the head node's address as `ray start --head` prints it, "
                             "for example 10.0.0.5:6379.")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise WorkbenchError(f"no Ray cluster answers at {address} ({e.strerror or e})",
                             "Start one with `ray start --head` on the head machine (and "
                             "`ray start --address HEAD:6379` on the others), or leave out "
                             "--ray to start Ray on this machine.") from None


def connect(address: str | None, cpus: int | None = None) -> None:
    """Join the Ray cluster at `address` ("auto": the one running on this machine), or
    start one here with `cpus` CPUs."""
    from .._extras import require

    require("replicas", "serving replicas")
    import ray

    if ray.is_initialized():
        return
    if address and address != "auto":
        _reachable(address)
    quiet = {"log_to_driver": False, "logging_level": "ERROR"}
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=cpus, include_dashboard=False, **quiet)
    except (RuntimeError, ConnectionError, ValueError) as e:
        text = str(e)
        what = "the Ray cluster runs other versions than this machine" \
            if "version mismatch" in text.lower() else f"could not join Ray at {address}"
        raise WorkbenchError(f"{what}: {text.strip().splitlines()[0][:300]}",
                             "Every machine needs the same Python and the same workbench "
                             "install (hence the same Ray).") from None


def deployment(*, model: str, sha256: str, load: dict[str, Any], replicas: Replicas,
               threads: int, n_parallel: int, max_queue: int, router: str,
               request_timeout_s: float, expect: dict[str, str | None] | None = None,
               cpus: float | None = None) -> Any:
    """The bound application: what `serve.run` deploys. `expect`: the versions each
    replica must have (default: this machine's); `cpus`: Ray's CPUs each reserves
    (default: `threads`)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .replica import EngineReplica, versions

    scale: dict[str, Any] = {"num_replicas": replicas.min} if replicas.min == replicas.max \
        else {"autoscaling_config": {
            "min_replicas": replicas.min, "max_replicas": replicas.max,
            "target_ongoing_requests": max(1, n_parallel), "upscale_delay_s": 5,
            "downscale_delay_s": 60}}
    router_class = "workbench.replicas.router:PrefixRouter" if router == "prefix" \
        else _DEFAULT_ROUTER
    d = serve.deployment(
        EngineReplica, name=DEPLOYMENT, max_ongoing_requests=n_parallel + max_queue,
        ray_actor_options={"num_cpus": threads if cpus is None else cpus},
        max_constructor_retry_count=1,
        health_check_period_s=2, health_check_timeout_s=30,
        graceful_shutdown_wait_loop_s=0.5, graceful_shutdown_timeout_s=request_timeout_s,
        request_router_config=RequestRouterConfig(request_router_class=router_class),
        **scale)
    return d.bind(model, sha256, {**load, "threads": threads}, expect or versions())


def run(app: Any, name: str = APP) -> Any:
    """Deploy (or roll onto) `app`; returns the deployment's handle once every replica
    serves. A replica that cannot start is a WorkbenchError with its own error (and the
    application is removed, unless it still has replicas that serve)."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    try:
        serve.run(app, name=name, route_prefix=None)
    except RuntimeError:
        why = _failure(name)
        try:
            if not _running(name):
                serve.delete(name)
        except Exception:  # noqa: BLE001: the error below is what matters
            pass
        raise WorkbenchError(f"the replicas did not start: {why}",
                             "Nothing was changed in a running service; fix the cause and "
                             "try again.") from None
    return serve.get_deployment_handle(DEPLOYMENT, app_name=name)


def _running(name: str = APP) -> int:
    from ray import serve

    try:
        states = serve.status().applications[name].deployments[DEPLOYMENT].replica_states
    except (KeyError, AttributeError):
        return 0
    return sum(n for state, n in states.items() if str(state).endswith("RUNNING"))


def _failure(name: str) -> str:
    """The last line of the error a replica failed with (its WorkbenchError's message)."""
    from ray import serve

    try:
        d = serve.status().applications[name].deployments[DEPLOYMENT]
    except (KeyError, AttributeError):
        return "Ray Serve gave no reason"
    lines = [ln.strip() for ln in (d.message or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("workbench.errors.") or "Error:" in ln:
            text = ln.split(": ", 1)[1] if ": " in ln else ln
            return text.rstrip("')\"")
    return lines[-1][:300] if lines else str(d.status)


def replica_infos(handle: Any, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Ask each running replica who it is: calls until as many answered as Ray Serve
    counts running (the routers spread calls that carry no prefix)."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline:
        running = _running()
        for _ in range(4 * max(running, 1)):
            info = handle.info.remote().result(timeout_s=max(1.0, deadline - time.monotonic()))
            seen[info["replica"]] = info
        if len(seen) >= running:
            return list(seen.values())
        time.sleep(0.5)
    return list(seen.values())


def shutdown() -> None:
    import ray
    from ray import serve

    try:  # the replicas go (on a cluster, once their requests end); Ray here goes now
        serve.delete(APP, _blocking=False)
    except Exception:  # noqa: BLE001: Ray may already be gone
        pass
    ray.shutdown()
