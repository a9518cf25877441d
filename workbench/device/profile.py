"""What this machine has: CPU, memory, disk, GPUs, and what llama.cpp sees.

`profile_device()` measures what a spec sheet does not say (memory bandwidth, the
model folder's read speed, the cores this process may really use) and reads GPUs
through NVML. It works, and says so, where there is no GPU.
"""

from __future__ import annotations

import hashlib
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._cpu import usable_cores  # noqa: F401 - where the device tools look for it

GiB = 2 ** 30
MiB = 2 ** 20


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_total: int   # bytes
    memory_free: int    # bytes
    driver: str
    temperature_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    utilization_pct: float | None = None


@dataclass(frozen=True)
class DeviceProfile:
    cpu_model: str
    physical_cores: int
    logical_cores: int
    usable_cores: int              # what this process may run on (affinity, cgroup quota)
    cpu_mhz_max: float | None
    cpu_mhz_now: float | None
    ram_total: int                 # bytes
    ram_available: int
    swap_total: int
    swap_used: int
    mem_bandwidth_gbs: float | None    # measured copy bandwidth, GB/s (1e9 bytes)
    disk_read_mbs: float | None        # measured read speed of the model folder, MB/s
    disk_path: str | None
    gpus: tuple[GPU, ...]
    llama_devices: tuple[Any, ...] = ()  # engine.protocol.Device
    notes: tuple[str, ...] = field(default=())
    # temperature, power and clocks (device/power.py), and what is not readable here
    telemetry: tuple[tuple[str, str], ...] = field(default=())

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile as JSON (atomically), for planning on another machine:
        `workbench deploy --device PATH`."""
        import dataclasses
        import json

        from .._paths import write_text_atomic

        path = Path(path).expanduser()
        data = dataclasses.asdict(self)
        data["fingerprint"] = self.fingerprint
        write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
        return path

    @property
    def fingerprint(self) -> str:
        """Identifies this machine's hardware for the tuning database."""
        return _fingerprint(self.cpu_model, self.usable_cores, self.ram_total, self.gpus)

    def rows(self) -> list[tuple[str, str]]:
        rows = [("CPU", self.cpu_model),
                ("cores", f"{self.physical_cores} physical, {self.logical_cores} logical, "
                          f"{self.usable_cores} usable here"),
                ("frequency", " / ".join(f"{x:,.0f} MHz {n}" for x, n in
                                         ((self.cpu_mhz_now, "now"), (self.cpu_mhz_max, "max"))
                                         if x) or "not reported"),
                ("RAM", f"{self.ram_available / GiB:,.1f} GiB available of "
                        f"{self.ram_total / GiB:,.1f} GiB"),
                ("swap", f"{self.swap_used / GiB:,.1f} GiB used of "
                         f"{self.swap_total / GiB:,.1f} GiB"),
                ("memory bandwidth", f"{self.mem_bandwidth_gbs:,.1f} GB/s (measured copy)"
                 if self.mem_bandwidth_gbs else "not measured"),
                ("disk read", f"{self.disk_read_mbs:,.0f} MB/s ({self.disk_path})"
                 if self.disk_read_mbs else "not measured")]
        if not self.gpus:
            rows.append(("GPU", "none (NVML sees no NVIDIA GPU): models run on the CPU"))
        for g in self.gpus:
            extra = ", ".join(s for s in (
                f"{g.temperature_c:.0f} °C" if g.temperature_c is not None else "",
                f"{g.power_w:.0f} W of {g.power_limit_w:.0f} W" if g.power_w is not None
                and g.power_limit_w else "",
                f"{g.utilization_pct:.0f}% busy" if g.utilization_pct is not None else "") if s)
            rows.append((f"GPU {g.index}", f"{g.name}, {g.memory_free / GiB:,.1f} GiB free of "
                                           f"{g.memory_total / GiB:,.1f} GiB, driver {g.driver}"
                                           + (f"; {extra}" if extra else "")))
        for d in self.llama_devices:
            mem = (f", {d.memory_free / GiB:,.1f} GiB free" if d.kind != "cpu" else "")
            rows.append((f"llama.cpp {d.name}", f"{d.kind}: {d.description}{mem}"))
        rows += list(self.telemetry)
        rows += [("note", n) for n in self.notes]
        return rows

    def _repr_html_(self) -> str:
        from .._tables import table_html

        return f"<b>Device profile</b>{table_html(self.rows())}"

    def __repr__(self) -> str:
        from .._tables import table_text

        return f"Device profile\n{table_text(self.rows())}"


def _fingerprint(cpu: str, cores: int, ram: int, found: tuple[GPU, ...]) -> str:
    parts = [cpu, str(cores), str(round(ram / GiB))]
    parts += [f"{g.name}:{round(g.memory_total / GiB)}" for g in found]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def fingerprint() -> str:
    """This machine's fingerprint, without measuring anything."""
    import psutil

    return _fingerprint(cpu_model(), usable_cores(), psutil.virtual_memory().total, gpus())


def cpu_model() -> str:
    """The CPU's model name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> tuple[GPU, ...]:
    """NVIDIA GPUs through NVML; () where there are none or no driver."""
    from ..power.nvml import open_nvml, optional as _optional

    pynvml, handles = open_nvml()
    if pynvml is None:
        return ()
    out = []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        for i, h in enumerate(handles):
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)

            temp = _optional(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU)
            power = _optional(pynvml.nvmlDeviceGetPowerUsage, h)
            limit = _optional(pynvml.nvmlDeviceGetEnforcedPowerLimit, h)
            util = _optional(pynvml.nvmlDeviceGetUtilizationRates, h)
            out.append(GPU(index=i, name=name.decode() if isinstance(name, bytes) else name,
                           memory_total=int(mem.total), memory_free=int(mem.free), driver=driver,
                           temperature_c=temp, power_w=power / 1000 if power else None,
                           power_limit_w=limit / 1000 if limit else None,
                           utilization_pct=util.gpu if util is not None else None))
    finally:
        pynvml.nvmlShutdown()
    return tuple(out)


def memory_bandwidth(mib: int = 256, repeats: int = 3) -> float:
    """Copy bandwidth in GB/s (bytes read + written), best of `repeats` copies."""
    import numpy as np

    src = np.ones(mib * MiB // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def disk_read_speed(folder: str | os.PathLike, mib: int = 128) -> float | None:
    """Read speed of `folder`'s disk in MB/s: a file written there, dropped from the page
    cache (posix_fadvise), then read back. None where the folder is not writable."""
    folder = Path(folder)
    block = os.urandom(MiB)
    try:
        fd, name = tempfile.mkstemp(prefix=".wb-disk-", dir=folder)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "wb") as f:
            for _ in range(mib):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        with open(name, "rb", buffering=0) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            buf = bytearray(4 * MiB)
            t, n = time.perf_counter(), 0
            while True:
                k = f.readinto(buf)
                if not k:
                    break
                n += k
            return n / (time.perf_counter() - t) / 1e6
    finally:
        os.unlink(name)


def profile_device(model_dir: str | os.PathLike | None = None, *, measure: bool = True,
                   llama_devices: tuple[Any, ...] = ()) -> DeviceProfile:
    """Profile this machine. `measure=False` skips the bandwidth and disk runs (~1 s)."""
    import psutil

    vm, sw = psutil.virtual_memory(), psutil.swap_memory()
    freq = None
    try:
        freq = psutil.cpu_freq()
    except Exception:
        pass
    notes = []
    found = gpus()
    if not found:
        notes.append("No NVIDIA GPU: the planner places every layer on the CPU.")
    if found and not any(d.kind in ("gpu", "igpu") for d in llama_devices) and llama_devices:
        notes.append("NVML sees a GPU but this llama.cpp build has no GPU backend: "
                     "reinstall with WORKBENCH_CUDA=1 (make lab) to offload layers.")
    folder = Path(model_dir) if model_dir else None
    from ..power.cap import profile_rows

    return DeviceProfile(
        cpu_model=cpu_model(), physical_cores=psutil.cpu_count(logical=False) or 1,
        logical_cores=psutil.cpu_count() or 1, usable_cores=usable_cores(),
        cpu_mhz_max=freq.max if freq and freq.max else None,
        cpu_mhz_now=freq.current if freq and freq.current else None,
        ram_total=vm.total, ram_available=vm.available, swap_total=sw.total, swap_used=sw.used,
        mem_bandwidth_gbs=memory_bandwidth() if measure else None,
        disk_read_mbs=disk_read_speed(folder) if measure and folder else None,
        disk_path=str(folder) if folder else None, gpus=found,
        llama_devices=tuple(llama_devices), notes=tuple(notes),
        telemetry=tuple(profile_rows()))

