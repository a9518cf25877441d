"""The cluster, as the kernel sees it: its nodes, the placement of the loaded model,
health watching, and re-planning when a node is lost or joins.

A model split across nodes lives in the engine worker as usual; llama.cpp's RPC
client aborts that process when a node stops answering mid-request. The engine then
asks `on_crash` what happened: the lost node is named, the layers are re-planned
onto the nodes that remain, and the model is loaded again in the background.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import _paths
from .._net import is_loopback
from ..device.planner import resolve
from ..errors import WorkbenchError
from . import probe as P
from .local import LocalWorkers
from .plan import GiB, MiB, ClusterPlan, Member, place
from .status import ClusterStatus, Event, Node

log = logging.getLogger("workbench.cluster")

WATCH_PERIOD_S = 1.0
MISSES_TO_LOSE = 3          # status pages that must go unanswered in a row


class NodeLost(P.NodeError):
    """A node holding layers stopped answering. `retry()` waits for the re-planned
    model and says whether a request may be sent again."""

    retry: Callable[[], bool] | None = None
    replanned = False


class Cluster:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.nodes: dict[str, Node] = {}
        self.policy = "manual"               # what a joining node does: manual | auto
        self.plan: ClusterPlan | None = None
        self.events: list[Event] = []
        self.last_replan_s: float | None = None
        # the model, its config without the plan's settings, and the settings the user gave
        self._load: tuple[Path, Any, dict[str, Any]] | None = None
        self._loading: ClusterPlan | None = None     # a plan being loaded
        self._generation = 0                         # counts loads: a stale recovery sees it
        self._atexit = False
        self._lock = threading.RLock()
        self._recovered = threading.Event()
        self._recovered.set()
        self._watcher: threading.Thread | None = None
        self._local = LocalWorkers()
        self._bandwidth: float | None = None
        self._listeners: list[Callable[[], None]] = []
        engine.crash_hook = self.on_crash

    # ---- events -----------------------------------------------------------------

    def _event(self, kind: str, text: str) -> None:
        e = Event(time.time(), kind, text)
        self.events.append(e)
        log.warning("%s", text) if kind in ("lost", "failed") else log.info("%s", text)
        try:
            folder = _paths.home()
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / "cluster.log", "a", encoding="utf-8") as f:
                f.write(json.dumps(dataclasses.asdict(e)) + "\n")
        except OSError as err:
            log.warning("could not append to the cluster log: %s", err)
        self._notify()

    def _notify(self) -> None:
        for fn in list(self._listeners):
            try:
                fn()
            except Exception:  # a broken widget must not stop the cluster
                log.exception("cluster listener failed")

    def subscribe(self, fn: Callable[[], None]) -> Callable[[], None]:
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    # ---- membership ---------------------------------------------------------------

    def add(self, endpoints: Sequence[str]) -> "ClusterStatus":
        """Probe and add nodes. Every endpoint is checked before any is added."""
        wanted = [P.parse_endpoint(e) for e in endpoints]
        if not wanted:
            raise WorkbenchError("no node given", "For example: %cluster add 127.0.0.1:50052")
        held = set(self.plan.nodes) if self.plan and self.engine.alive else set()
        infos = [P.probe(e) for e in wanted if e not in held]
        with self._lock:
            for info in infos:
                rejoined = info.endpoint in self.nodes
                self.nodes[info.endpoint] = Node(info)
                self._event("joined", f"node {info.endpoint} {'re' if rejoined else ''}joined: "
                            f"{info.kind}, {info.usable / GiB:,.2f} GiB usable, "
                            f"RPC {info.version}, round trip {info.rtt_ms:.1f} ms")
        if infos and self.plan is not None:
            if self.policy == "auto":
                self.rebalance()
            else:
                self._event("joined", "the loaded model does not use the new node yet: "
                            "`%cluster rebalance` re-plans onto it")
        return self.status()

    def remove(self, endpoints: Sequence[str]) -> "ClusterStatus":
        for e in (P.parse_endpoint(x) for x in endpoints):
            if e not in self.nodes:
                raise WorkbenchError(f"{e} is not in the cluster",
                                     f"Nodes: {', '.join(self.nodes) or 'none'}.")
            if self.plan is not None and e in self.plan.nodes and self.engine.alive:
                raise WorkbenchError(f"{e} holds layers of the loaded model",
                                     "Unload the model (or load it without --cluster) first.")
            del self.nodes[e]
            self._event("removed", f"node {e} removed")
        return self.status()

    # ---- planning and loading -----------------------------------------------------------

    def _local_member(self, config: Any) -> Member:
        import psutil

        from ..device.profile import gpus, memory_bandwidth

        if self.engine.worker is None:
            self.engine.devices()  # starts the worker: does this llama.cpp offload at all?
        found = gpus() if config.device in ("gpu", "auto") else ()
        if found and not self.engine.worker.supports_gpu_offload:
            found = ()
        if config.device == "gpu" and not found:
            raise WorkbenchError("--device gpu, but this machine has no GPU llama.cpp can use",
                                 "Use --device cpu (or auto).")
        if found:
            g = found[0]
            usable, why = g.memory_free - 512 * MiB, "free GPU memory less 512 MiB"
            if config.gpu_mem_mib is not None and config.gpu_mem_mib * MiB < usable:
                usable, why = config.gpu_mem_mib * MiB, f"capped by gpu_mem_mib={config.gpu_mem_mib}"
            return Member("local", "gpu", max(0, usable), gpu_bandwidth(0), 0.0, why)
        usable = psutil.virtual_memory().available - 512 * MiB
        if config.kv_cache == "on":
            usable -= config.kv_ram_mib * MiB
        why = "available RAM less 512 MiB"
        if config.ram_mib is not None and config.ram_mib * MiB < usable:
            usable, why = config.ram_mib * MiB, f"capped by ram_mib={config.ram_mib}"
        if self._bandwidth is None:
            self._bandwidth = memory_bandwidth(mib=128, repeats=2)
        return Member("local", "cpu", max(0, usable), self._bandwidth, 0.0, why)

    def members(self, config: Any) -> list[Member]:
        out = [self._local_member(config)]
        for n in self.nodes.values():
            if n.state == "lost":
                continue
            i = n.info
            out.append(Member(i.endpoint, i.kind if i.kind != "unknown" else "cpu", i.usable,
                              i.bandwidth_gbs, i.rtt_ms,
                              "its --mem-limit" if i.status.get("mem_limit") else
                              "what its RPC server reports free"))
        return out

    def place(self, path: Path, config: Any) -> ClusterPlan:
        from ..models.inspect import inspect_model

        if not any(n.state != "lost" for n in self.nodes.values()):
            raise WorkbenchError("the cluster has no node to place layers on",
                                 "Add one with `%cluster add HOST:PORT` (start one with "
                                 "`workbench rpc-worker`, or `%cluster local 2` on this machine).")
        from .rpc_worker import machine_id

        members = self.members(config)
        here = machine_id()

        def on_this_machine(endpoint: str) -> bool:
            node = self.nodes[endpoint].info.status.get("machine")
            return node == here if node else is_loopback(P.split_endpoint(endpoint)[0])

        same_machine = all(on_this_machine(x.name) for x in members[1:])
        return place(inspect_model(path), members, config,
                     local_layers=members[0].kind == "gpu" or not same_machine)

    def load(self, path: Path, config: Any, given: dict[str, Any],
             on_progress: Callable[[float], None] | None = None) -> tuple[Any, ClusterPlan]:
        """Plan and load `path` across the cluster."""
        held = set(self.plan.nodes) if self.plan is not None and self.engine.alive else set()
        for n in self.nodes.values():  # fresh memory figures; a node may have left
            if n.state != "lost" and n.endpoint not in held:  # held ones cannot answer
                n.info = P.probe(n.endpoint)
        chosen, plan = resolve(self.engine, Path(path), config, given, cluster=self)
        with self._lock:
            self._generation += 1
            self.plan, self._load, self._loading = None, None, plan
        self._start_watch()  # a node that vanishes mid-load must not hang it
        try:
            info = self.engine.load(path, chosen, on_progress=on_progress)
        except WorkbenchError as e:
            raise self._explain_load_failure(e, plan) from None
        finally:
            self._loading = None
        with self._lock:
            self.plan, self._load = plan, (Path(path), config, dict(given))
        self._event("replanned", f"loaded {Path(path).name} across {len(plan.nodes)} node(s): "
                    + "; ".join(f"{r[0]} layers {r[2]}" for r in plan.rows()))
        self._start_watch()
        return info, plan

    def _explain_load_failure(self, e: WorkbenchError, plan: ClusterPlan) -> WorkbenchError:
        if isinstance(e, P.NodeError):  # a node lost during the load names itself
            return e
        for s in plan.shares[1:]:
            if s.member.name in e.message:
                n = self.nodes[s.member.name]
                return P.NodeError(
                    s.member.name,
                    f"node {s.member.name} could not hold its share of the model ({s.total / MiB:,.0f}"
                    f" MiB for layers {s.span}), although it advertised "
                    f"{n.info.advertised_free / GiB:,.2f} GiB free: {e.message}",
                    "The node advertises more memory than it can give. Restart it with an "
                    "honest --mem-limit (workbench rpc-worker), or `%cluster remove` it.")
        return e

    def detach(self) -> None:
        """The engine no longer runs a cluster placement (a plain load or an unload)."""
        self._stop_watch()
        with self._lock:
            self._generation += 1
            self.plan, self._load = None, None

    def rebalance(self) -> ClusterPlan:
        """Re-plan the loaded model onto the nodes there are now, and reload it."""
        if self.plan is None or self._load is None:
            raise WorkbenchError("no model is loaded across the cluster",
                                 "Load one with `%load_model MODEL --cluster`.")
        path, config, given = self._load
        t0 = time.monotonic()
        try:
            _, plan = self.load(path, config, given)
        except WorkbenchError:
            if not self.engine.alive or self.engine.model is None:
                self.plan = None
            raise
        self.last_replan_s = time.monotonic() - t0
        self._event("rebalanced", f"rebalanced onto {len(plan.nodes)} node(s) in "
                    f"{self.last_replan_s:.1f} s")
        return plan

    # ---- losing a node --------------------------------------------------------------

    def _answers(self, node: Node) -> bool:
        if node.info.status:
            return bool(P.status(node.endpoint, timeout=1.5))
        return P.reachable(node.endpoint)

    def on_crash(self, how: str, serving: str) -> WorkbenchError | None:
        """The engine worker died: was it a node? Called on the engine's receiver thread,
        before the failed requests hear of it."""
        loading, plan = self._loading, self.plan
        watched = plan or loading
        if watched is None:
            return None
        lost = [e for e in watched.nodes if e in self.nodes and
                (self.nodes[e].state == "lost" or not self._answers(self.nodes[e]))]
        if not lost:
            return None
        if plan is None:  # lost while a model was being loaded onto it: the load fails
            for e in lost:
                self.nodes[e].state = "lost"
                self._event("lost", f"node {e} was lost during a load ({how})")
            return NodeLost(lost[0], f"cluster node {', '.join(lost)} stopped answering while "
                            "the model was being loaded onto it",
                            "Load the model again: the planner leaves the lost node out.")
        t_lost = time.monotonic()
        for e in lost:
            if self.nodes[e].state != "lost":
                self.nodes[e].state = "lost"
                self._event("lost", f"node {e} was lost (the engine worker {how}"
                            f"{' while serving ' + serving if serving else ''})")
        names = ", ".join(lost)
        with self._lock:
            self.plan = None
            generation = self._generation
        path, config, given = self._load  # type: ignore[misc]
        try:
            chosen, new = resolve(self.engine, path, config, given, cluster=self)
        except WorkbenchError as e:
            self.engine.forget_load()
            self._event("failed", f"cannot re-plan without {names}: {e.message}")
            err = NodeLost(lost[0], f"cluster node {names} stopped answering, and the model "
                           f"no longer fits on what remains: {e.message}",
                           "Add nodes (`%cluster add`) and load the model again.")
            return err
        self.engine.replace_load(chosen)
        self._recovered.clear()
        threading.Thread(target=self._recover, args=(new, t_lost, names, generation), daemon=True,
                         name="workbench-cluster-recover").start()
        err = NodeLost(lost[0], f"cluster node {names} stopped answering (the engine worker "
                       f"{how}{' while serving ' + serving if serving else ''})",
                       f"The engine re-planned onto {len(new.nodes)} remaining node(s) and is "
                       "reloading the model; the next request runs there (`%cluster status`).")
        err.retry, err.replanned = self.wait_recovered, True
        return err

    def _recover(self, plan: ClusterPlan, t_lost: float, names: str, generation: int) -> None:
        try:
            self.engine.ensure_loaded()
            m = self.engine.model
            with self._lock:
                if generation != self._generation:
                    return  # the user loaded or unloaded meanwhile: that stands
                if m is None or tuple(m.rpc_servers) != plan.nodes:
                    self._event("failed", f"reloading without {names} did not restore the model")
                    return
                self.plan = plan
                self.last_replan_s = time.monotonic() - t_lost
            self._event("replanned", f"re-planned without {names} in {self.last_replan_s:.1f} s: "
                        + "; ".join(f"{r[0]} layers {r[2]}" for r in plan.rows()))
            self._start_watch()
        except Exception as e:  # WorkbenchError, or a bug: either way say so, never hang
            self._event("failed", f"reloading without {names} failed: {e}")
        finally:
            self._recovered.set()

    def wait_recovered(self, timeout: float = 300.0) -> bool:
        """Wait for a re-plan in progress; True when the model is loaded again."""
        self._recovered.wait(timeout)
        return self.plan is not None and self.engine.alive

    # ---- watching -------------------------------------------------------------------

    def _start_watch(self) -> None:
        if self._watcher is None or not self._watcher.is_alive():
            self._stop = threading.Event()
            self._watcher = threading.Thread(target=self._watch, args=(self._stop,),
                                             daemon=True, name="workbench-cluster-watch")
            self._watcher.start()

    def _stop_watch(self, join: bool = True) -> None:
        if self._watcher is not None:
            self._stop.set()
            if join and self._watcher is not threading.current_thread():
                self._watcher.join(5)
            self._watcher = None

    def _watch(self, stop: threading.Event) -> None:
        while not stop.wait(WATCH_PERIOD_S):
            plan = self.plan or self._loading
            if plan is None:
                continue
            for e in plan.nodes:
                node = self.nodes.get(e)
                if node is None or not node.info.status:
                    continue  # a plain rpc-server: its loss shows when a request fails
                page = P.status(e, timeout=1.5)
                if page:
                    node.misses = 0
                    node.traffic.append((time.time(), page.get("bytes_in", 0),
                                         page.get("bytes_out", 0)))
                    continue
                node.misses += 1
                if node.misses >= MISSES_TO_LOSE and not stop.is_set():
                    self._event("lost", f"node {e} stopped answering its status page; "
                                "stopping the engine worker to re-plan")
                    node.state = "lost"
                    self.engine.kill_worker()
                    return
            self._notify()

    # ---- loopback workers (one machine) ----------------------------------------------------

    def start_local(self, n: int, threads: int | None = None,
                    mem_limit_gib: float | None = None) -> list[str]:
        """Start `n` rpc-workers on this machine, on free loopback ports, and add them."""
        endpoints = self._local.start(n, threads, mem_limit_gib)
        if not self._atexit:
            atexit.register(self.stop_local)
            self._atexit = True
        self.add(endpoints)
        return endpoints

    def local_workers(self) -> dict[str, subprocess.Popen]:
        return self._local.by_endpoint()

    def stop_local(self) -> None:
        """Stop the workers start_local started (the engine first, if it uses them: a
        worker whose node vanishes under it aborts)."""
        mine = set(self.local_workers())
        if self.plan is not None and mine & set(self.plan.nodes):
            self.engine.stop("the cluster's local workers were stopped")
            self.detach()
        self._stop_watch()
        self._local.stop()
        for e in mine:
            if self.nodes.pop(e, None) is not None:
                self._event("removed", f"node {e} stopped (a local worker)")

    def topology(self) -> Any:
        """A live widget: the members, their memory and layers, and each node's traffic."""
        from ..dashboards.topology import TopologyWidget

        return TopologyWidget(self)

    # ---- reporting --------------------------------------------------------------------

    def state_of(self, endpoint: str) -> str:
        """lost, holding layers (of the loaded model), or ready."""
        if self.nodes[endpoint].state == "lost":
            return "lost"
        plan = self.plan
        return "holding layers" if plan is not None and plan.holder(endpoint) else "ready"

    def status(self) -> "ClusterStatus":
        rows = []
        plan = self.plan
        for e, n in self.nodes.items():
            share = plan.holder(e) if plan else None
            rin, rout = n.rate()
            rows.append((e, self.state_of(e), n.info.kind, f"{n.info.usable / GiB:,.2f} GiB",
                         f"{n.info.bandwidth_gbs:,.1f} GB/s" if n.info.bandwidth_gbs else "?",
                         share.span if share else "-",
                         f"{(rin + rout) / 1024:,.0f} KiB/s" if share else "-",
                         f"{n.info.rtt_ms:.1f} ms"))
        return ClusterStatus(rows, self.events[-8:], plan, self.policy, self.last_replan_s)


def gpu_bandwidth(index: int) -> float | None:
    """A GPU's peak memory bandwidth in GB/s from NVML (memory clock x bus width, double
    data rate): the spec figure, since no copy can be timed from the kernel."""
    from ..power.nvml import open_nvml

    pynvml, handles = open_nvml()
    if pynvml is None or index >= len(handles):
        return None
    try:
        h = handles[index]
        mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
        bits = pynvml.nvmlDeviceGetMemoryBusWidth(h)
        return mhz * 1e6 * 2 * bits / 8 / 1e9
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()
