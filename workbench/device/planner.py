"""The one planner: everything a load does not fix, decided in one place.

`resolve` turns the settings a user gave into a `LoadConfig` with nothing left to choose
(GPU layers, context, KV types, micro-batch, flash attention, backend sampling, threads),
from this machine's measured memory (`budget`), the engine's dry run of the compute
buffers, the tuning database (autotune's runs, calibration, power caps) and, for a
model split over RPC nodes, the cluster. `Engine.load` takes only what this returns.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .._cpu import idle_cores
from ..config import LoadConfig
from ..errors import WorkbenchError
from ..models.hashing import file_sha256
from ..models.inspect import inspect_model
from . import budget
from .plan import Placement, choose_threads, place

if TYPE_CHECKING:
    from ..cluster.cluster import Cluster
    from ..cluster.plan import ClusterPlan
    from ..engine.client import Engine

# The settings a placement decides; those the user gave are kept as given.
PLACEMENT_SETTINGS = ("n_ctx", "n_gpu_layers", "threads", "n_batch", "n_ubatch", "flash_attn",
                      "type_k", "type_v", "tensor_split", "backend_sampling", "n_parallel",
                      "max_threads")
# The settings a cluster plan decides.
CLUSTER_SETTINGS = ("rpc_servers", "tensor_split", "n_gpu_layers", "device", "flash_attn",
                    "backend_sampling")


def resolve(engine: Engine, path: Path, config: LoadConfig, given: dict[str, Any], *,
            cluster: Cluster | None = None) -> tuple[LoadConfig, Placement | ClusterPlan]:
    """(the configuration to load `path` with, the plan that explains it). `config` holds
    the user's settings over the defaults; `given`, the ones the user named."""
    if config.type_v != "f16" and config.flash_attn == "off":
        raise WorkbenchError(f"a {config.type_v} V cache needs flash attention, which is off",
                             "Drop --flash-attn off, or keep --type-v f16.")
    if config.cluster:
        if cluster is None:
            raise WorkbenchError("this load needs the cluster, and none was given",
                                 "Load with --cluster from a kernel that has nodes.")
        return _across(engine, cluster, path, config, given)
    placement = plan(engine, path, config, given)
    return dataclasses.replace(config, **placement.settings).validate(), placement


def plan(engine: Engine, path: Path, config: LoadConfig, given: dict[str, Any]) -> Placement:
    """How `path` would be placed on this machine, with the reasons. Nothing is loaded: the
    compute buffers come from a dry run."""
    from .profile import fingerprint
    from .tuning_db import TuningDB

    inspection = inspect_model(path)
    budgets = budget.budgets(engine, config)
    fixed = {k: value for k in PLACEMENT_SETTINGS
             if (value := getattr(config, k)) is not None and given.get(k) is not None}

    def measure(chosen: dict[str, Any]) -> Any:
        return engine.measure_buffers(path, dataclasses.replace(config, **chosen))

    db = TuningDB()  # this machine's calibration and autotune runs
    try:
        machine, sha = fingerprint(), file_sha256(path)
        version = engine.worker.llama_cpp_version
        over = budget.overheads(engine, db, machine)
        tuned = None if "threads" in fixed else db.best(machine, sha, version)
        capped, fixed_why = None, {}
        if config.power_cap is not None:
            from .tune import under_cap

            capped = under_cap(db, machine, sha, version, path.name, config.power_cap, fixed)
            fixed_why = {k: "chosen under the power cap (below)" for k in capped.settings
                         if k not in fixed}
            fixed.update(capped.settings)
            tuned = None
    finally:
        db.close()
    idle = idle_cores()
    placement = place(inspection, budgets, device=config.device, fixed=fixed,
                      cores=idle.idle, overheads=over, measure=measure, tuned=tuned,
                      fixed_why=fixed_why, idle=idle)
    if capped is not None:
        placement = dataclasses.replace(placement, reasons=placement.reasons + capped.reasons)
    return placement


def _across(engine: Engine, cluster: Cluster, path: Path, config: LoadConfig,
            given: dict[str, Any]) -> tuple[LoadConfig, ClusterPlan]:
    """A model split over the cluster's nodes: the cluster plans the layers, this machine
    its threads."""
    base = dataclasses.replace(config, **{k: getattr(LoadConfig(), k) for k in CLUSTER_SETTINGS
                                          if given.get(k) is None})
    layers = cluster.place(path, base)
    chosen = dataclasses.replace(base, **{k: v for k, v in layers.settings.items()
                                          if given.get(k) in (None, "auto")})
    fixed = {k: getattr(chosen, k) for k in ("threads", "max_threads")
             if given.get(k) is not None}
    idle = idle_cores()
    threads = choose_threads(fixed, idle.idle, idle=idle)
    return dataclasses.replace(chosen, **threads).validate(), layers


def fit_tools(engine: Engine) -> tuple[Callable[[Any], Placement],
                                      Callable[[Path], float | None], int]:
    """The planner with this machine's budgets (no dry runs), autotune's best decode
    speed of a file measured here, and the most bytes any one device may use."""
    from .._cpu import usable_cores
    from .profile import fingerprint
    from .tuning_db import TuningDB

    e = engine
    budgets = budget.budgets(e, LoadConfig())
    machine = fingerprint()
    cores = usable_cores()
    version = e.worker.llama_cpp_version
    db = TuningDB()
    try:  # the calibration here, and autotune's best decode speed of each model measured
        over = budget.overheads(e, db, machine)
        fastest = {sha: db.best(machine, sha, version)["tg_tps"]
                   for sha in db.measured_models(machine, version)}
    finally:
        db.close()

    def planned(m: Any) -> Placement:
        return place(m, budgets, cores=cores, overheads=over)

    def speed(path: Path) -> float | None:
        if not fastest:  # nothing measured here: no file needs hashing
            return None
        from ..models.fetch import blob_sha

        return fastest.get(blob_sha(path) or file_sha256(path))  # Hub files: named by it

    return planned, speed, max(b.usable for b in budgets)
