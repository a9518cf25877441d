"""What the planner may use here: memory budgets and overheads, from the running engine.

The worker already holds its runtime (and, with a GPU, its GPU context) when the
devices are listed, and any loaded model is freed before a new one loads; the
budgets add those back, since the plan counts them itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..config import LoadConfig
from .plan import GPU_CONTEXT, GPU_MARGIN, HOST_MARGIN, MODEL_RUNTIME, MiB, Budget, Overheads


def overheads(engine: Any, db: Any = None, machine: str = "") -> Overheads:
    """The worker's measured size; with the tuning database `db` and this machine's
    fingerprint, plus what `workbench.calibrate` found here."""
    w = engine.worker
    base = Overheads(host=w.rss_bytes + MODEL_RUNTIME, gpu=w.gpu_bytes or GPU_CONTEXT)
    if db is None:
        return base
    return dataclasses.replace(
        base, host_correction=db.correction(machine, w.llama_cpp_version, "host"),
        gpu_correction=db.correction(machine, w.llama_cpp_version, "gpu"))


def budgets(engine: Any, config: LoadConfig) -> list[Budget]:
    """The host's budget first, then one per GPU llama.cpp sees."""
    import psutil

    devices = engine.devices()  # starts the worker if needed
    over = overheads(engine)
    model, stats = engine.model, engine.last_stats
    held = max(0, stats.rss_bytes - over.host) if model and stats else 0
    avail = psutil.virtual_memory().available + held + engine.worker.rss_bytes
    cache = config.kv_ram_mib * MiB if config.kv_cache == "on" else 0
    usable = avail - HOST_MARGIN - cache
    why = "available RAM less a 512 MiB margin" + (
        f" and the prefix cache's {config.kv_ram_mib:,} MiB" if cache else "")
    if config.ram_mib is not None and config.ram_mib * MiB < usable:
        usable, why = config.ram_mib * MiB, f"capped by ram_mib={config.ram_mib:,}"
    out = [Budget("CPU", "cpu", avail, max(0, usable), why)]
    for d in devices:
        if d.kind not in ("gpu", "igpu"):
            continue
        mine = sum(b.bytes for b in model.buffers if b.device.startswith(d.name)) if model else 0
        free = d.memory_free + mine + over.gpu
        usable, why = free - GPU_MARGIN, "free memory less a 512 MiB margin"
        if config.gpu_mem_mib is not None and config.gpu_mem_mib * MiB < usable:
            usable, why = config.gpu_mem_mib * MiB, f"capped by gpu_mem_mib={config.gpu_mem_mib:,}"
        out.append(Budget(d.name, "gpu", free, max(0, usable), why))
    return out
