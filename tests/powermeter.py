"""A stand-in RAPL meter for a machine whose powercap interface is absent or unreadable.

It lays out a folder like /sys/class/powercap (one `intel-rapl:0` package zone) and a
thread advances its `energy_uj` counter from the CPU time the tests really spend:
`idle_w` plus `per_core_w` for each core kept busy. The telemetry reads it through
WORKBENCH_POWERCAP exactly as it reads the kernel's files, so more threads draw more.

Only this process and its children count (the test, its engine workers and services):
on a shared machine a real meter would also count other users' work, which would make
the draw of a configuration depend on who else is busy.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil

WRAP_UJ = 262_143_328_850  # what a real package zone reports as max_energy_range_uj


class StandInMeter:
    def __init__(self, root: Path, idle_w: float = 6.0, per_core_w: float = 12.0,
                 start_uj: int = WRAP_UJ - 3_000_000) -> None:
        self.root = Path(root)
        self.idle_w, self.per_core_w = idle_w, per_core_w
        zone = self.root / "intel-rapl:0"
        zone.mkdir(parents=True, exist_ok=True)
        (zone / "name").write_text("package-0\n")
        (zone / "max_energy_range_uj").write_text(f"{WRAP_UJ}\n")
        sub = self.root / "intel-rapl:0:0"  # a subzone the reader must not add again
        sub.mkdir(exist_ok=True)
        (sub / "name").write_text("core\n")
        (sub / "max_energy_range_uj").write_text(f"{WRAP_UJ}\n")
        (sub / "energy_uj").write_text("0\n")
        self.energy = zone / "energy_uj"
        self.uj = start_uj  # near the wrap, so the reader's wrap handling is exercised
        self.energy.write_text(f"{self.uj}\n")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _busy_s(self) -> float:
        me = psutil.Process()
        total = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.Error:  # a child that just ended
                continue
            total += t.user + t.system
        return total

    def _run(self) -> None:
        last_t, last_busy = time.monotonic(), self._busy_s()
        while not self._stop.wait(0.02):
            now, busy = time.monotonic(), self._busy_s()
            # a child that ended takes its CPU time along: that interval counts none
            joules = self.idle_w * (now - last_t) + self.per_core_w * max(0.0, busy - last_busy)
            last_t, last_busy = now, busy
            self.uj = (self.uj + int(joules * 1e6)) % WRAP_UJ
            tmp = self.energy.with_name("energy_uj.tmp")
            tmp.write_text(f"{self.uj}\n")
            tmp.replace(self.energy)

    def __enter__(self) -> "StandInMeter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
