"""CPU cores as they are now: usable by this process, and idle of other work.

A lab machine is shared. llama.cpp's decode threads wait for each other at every step
of the graph, and a thread that has no core of its own holds all the others up: on 2
cores with one busy elsewhere, 2 threads decoded at 0.23x of 1 thread's speed
(benchmarks/contention.py).
So threads are chosen from the cores idle now, not from the cores the machine has.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

# How long llama.cpp's OpenMP threads spin waiting for work before they sleep (libgomp's
# GOMP_SPINCOUNT, in spin iterations; its default is 300,000). Set in every process that
# loads llama.cpp, before it loads: a thread spinning on a shared core takes that core
# from whoever needs it (benchmarks/cluster.py and benchmarks/contention.py measure it).
SPINCOUNT = "10000"
# A core counts as busy elsewhere when other processes use more than this share of it.
BUSY_SHARE = 0.3
WINDOW_S = 0.3


def usable_cores() -> int:
    """Cores this process can use: physical cores, limited by CPU affinity and by a
    cgroup CPU quota. More decode threads than that slow decoding down sharply."""
    import psutil

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    n = physical
    if hasattr(os, "sched_getaffinity"):
        n = min(n, len(os.sched_getaffinity(0)))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


class CpuMeter:
    """Cores kept busy by other processes between two readings: the machine's busy CPU
    time, less what this process (and, with `with_parent`, the process that started it:
    the engine worker's kernel or service) used meanwhile. Other children of ours, such
    as a fine-tuning run, are other work: they count as busy."""

    def __init__(self, with_parent: bool = False) -> None:
        import psutil

        self._psutil = psutil
        me = psutil.Process()
        self._own = [me]
        if with_parent:
            try:
                parent = me.parent()
                if parent is not None and parent.pid > 1:
                    self._own.append(parent)
            except psutil.Error:
                pass
        self._cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else None
        self._last = self._read()

    def _read(self) -> tuple[float, float, float]:
        """(monotonic time, busy CPU seconds of the machine, CPU seconds of our own)."""
        ps = self._psutil
        per = ps.cpu_times(percpu=True)
        if self._cpus is not None:
            per = [per[i] for i in self._cpus if i < len(per)]
        busy = sum(sum(t) - t.idle - getattr(t, "iowait", 0.0) for t in per)
        own = 0.0
        for p in self._own:
            try:
                c = p.cpu_times()
                own += c.user + c.system
            except ps.Error:
                continue
        return time.monotonic(), busy, own

    def busy_elsewhere(self) -> float:
        """Cores busy with other work since the last call (or since this meter began)."""
        now = self._read()
        t0, busy0, own0 = self._last
        self._last = now
        dt = now[0] - t0
        if dt <= 0:
            return 0.0
        return max(0.0, ((now[1] - busy0) - (now[2] - own0)) / dt)


def idle_of(usable: int, busy_elsewhere: float) -> int:
    """Cores free for our threads: those not busy elsewhere (at least one)."""
    return max(1, min(usable, usable - math.ceil(busy_elsewhere - BUSY_SHARE)))


@dataclasses.dataclass(frozen=True)
class IdleCores:
    usable: int             # cores this process may run on
    idle: int               # of those, not busy with other work now
    busy_elsewhere: float   # cores' worth of CPU time other processes used, over `window_s`
    load_avg: float         # the 1-minute load average, for the record
    window_s: float

    def why(self) -> str:
        return (f"{self.idle} of {self.usable} usable cores idle now (other processes kept "
                f"{self.busy_elsewhere:.1f} busy over {self.window_s:.1f} s; load average "
                f"{self.load_avg:.1f})")


def idle_cores(window_s: float = WINDOW_S, meter: Any = None) -> IdleCores:
    """Measure, over `window_s` seconds, how many usable cores other processes leave idle."""
    meter = meter or CpuMeter()
    time.sleep(window_s)
    busy = meter.busy_elsewhere()
    usable = usable_cores()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return IdleCores(usable, idle_of(usable, busy), busy, load, window_s)
