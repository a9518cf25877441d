"""Power, heat and clocks: what the machine draws and whether it is slowing itself down.

Three sources, each read where it exists and named where it does not:
- NVML on NVIDIA GPUs: temperature, power draw and limit, SM clock, throttle reasons,
  and the energy counter;
- psutil's sensors: CPU temperatures (with the OS's "high" mark) and frequency;
- the Linux powercap (RAPL) energy counters of the CPU packages, where readable
  (root only since Linux 5.10 on most distributions).

`Sampler` reads them on a thread, a few times a second, while something runs. Its
`report()` gives the mean and 95th-percentile power, the energy used, and a thermal
verdict: a run whose clocks fell or whose GPU reported a throttle reason is flagged, so
that it is never quoted as the machine's speed.

`WORKBENCH_POWERCAP` points the RAPL reader at another folder laid out like
/sys/class/powercap (the tests drive such a folder as a stand-in meter).
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .nvml import optional as _call

POWERCAP = Path("/sys/class/powercap")
# NVML throttle reasons that mean "slower than it could be": the rest (idle, application
# clocks, sync boost, display) are settings or the absence of work.
_THROTTLE_BITS = {
    0x4: "software power cap", 0x8: "hardware slowdown", 0x20: "software thermal slowdown",
    0x40: "hardware thermal slowdown", 0x80: "hardware power brake"}
CLOCK_DROP = 0.85   # a busy device's clock below this share of its earlier clock: throttled
BUSY_PCT = 50.0     # utilization above which a clock is expected to stay up
WINDOW_S = 0.25     # each power sample spans at least this long
# NVML's board power is a trailing one-second mean (Ampere and newer): for the first second
# of a window it still counts what ran before, so power samples start after it.
NVML_MEAN_S = 1.0


def _powercap_root() -> Path:
    return Path(os.environ.get("WORKBENCH_POWERCAP") or POWERCAP)


@dataclass(frozen=True)
class RaplZone:
    name: str            # package-0, dram, psys
    energy: Path         # energy_uj
    wrap_uj: int         # max_energy_range_uj: the counter wraps there


def rapl_zones() -> tuple[list[RaplZone], str]:
    """The readable top-level RAPL zones, and why there are none when there are none.
    A platform ("psys") zone covers the packages, so it is used alone where present."""
    root = _powercap_root()
    if not root.is_dir():
        return [], f"no powercap interface ({root} is absent)"
    zones, unreadable = [], []
    for d in sorted(root.glob("*rapl:*")):
        if d.name.count(":") != 1:  # subzones (core, uncore) are inside their package
            continue
        try:
            name = (d / "name").read_text().strip()
            wrap = int((d / "max_energy_range_uj").read_text())
            int((d / "energy_uj").read_text())
        except PermissionError:
            unreadable.append(d.name)
            continue
        except (OSError, ValueError):
            continue
        zones.append(RaplZone(name, d / "energy_uj", wrap))
    psys = [z for z in zones if z.name.startswith("psys")]
    if psys:
        zones = psys
    if zones:
        return zones, ""
    if unreadable:
        return [], (f"RAPL counters in {root} are not readable by this user (root only since "
                    "Linux 5.10)")
    return [], f"no RAPL zone in {root}"


def _read_uj(z: RaplZone) -> int | None:
    try:
        return int(z.energy.read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class GpuReading:
    index: int
    temperature_c: float | None
    power_w: float | None
    power_limit_w: float | None
    sm_clock_mhz: float | None
    sm_clock_max_mhz: float | None
    utilization_pct: float | None
    throttle: tuple[str, ...]
    energy_j: float | None       # the board's energy counter since the driver loaded


@dataclass(frozen=True)
class Reading:
    """One moment of the machine."""
    t: float                              # time.monotonic()
    gpus: tuple[GpuReading, ...]
    cpu_energy_j: dict[str, float]        # RAPL zone -> counter, joules
    cpu_temp_c: float | None              # hottest CPU sensor
    cpu_temp_high_c: float | None         # the OS's "high" mark of that sensor
    cpu_mhz: float | None
    cpu_pct: float | None


class Telemetry:
    """Reads every source this machine has. `missing` says which it lacks and why."""

    def __init__(self, nvml: tuple[Any, list[Any]] | None = None) -> None:
        """`nvml`: (module, handles) already opened by the caller, to share them."""
        from .nvml import open_nvml

        self._nv, self._handles = nvml if nvml is not None else open_nvml()
        self.zones, rapl_why = rapl_zones()
        self._last_uj: dict[str, int] = {}
        self._wraps: dict[str, int] = {}
        self.missing: dict[str, str] = {}
        if not self._handles:
            self.missing["GPU telemetry"] = "no NVIDIA GPU through NVML (no driver, or nvidia-ml-py absent)"
        if not self.zones:
            self.missing["CPU power"] = rapl_why
        if self._cpu_temperature()[0] is None:
            self.missing["CPU temperature"] = "the OS exposes no CPU temperature sensor " \
                                              "(psutil.sensors_temperatures() is empty)"
        self.gpu_power = bool(self._handles) and any(
            _call(self._nv.nvmlDeviceGetPowerUsage, h) is not None for h in self._handles)
        if self._handles and not self.gpu_power:
            self.missing["GPU power"] = "NVML reports no power draw for this GPU"

    @property
    def has_power(self) -> bool:
        """Whether any power reading exists here (GPU board power or CPU RAPL)."""
        return self.gpu_power or bool(self.zones)

    def power_sources(self) -> list[str]:
        out = [f"GPU {i} board power (NVML)" for i in range(len(self._handles))
               if self.gpu_power]
        return out + [f"CPU {z.name} (RAPL)" for z in self.zones]

    def close(self) -> None:
        if self._handles:
            _call(self._nv.nvmlShutdown)
            self._handles = []

    @staticmethod
    def _cpu_temperature() -> tuple[float | None, float | None]:
        import psutil

        try:
            sensors = psutil.sensors_temperatures() or {}
        except Exception:
            return None, None
        best: tuple[float | None, float | None] = (None, None)
        for name, entries in sensors.items():
            if not any(k in name for k in ("coretemp", "k10temp", "zenpower", "cpu", "acpitz",
                                           "soc")):
                continue
            for e in entries:
                if e.current and (best[0] is None or e.current > best[0]):
                    best = (float(e.current), float(e.high) if e.high else None)
        return best

    def _gpu(self, i: int, h: Any) -> GpuReading:
        nv = self._nv
        power = _call(nv.nvmlDeviceGetPowerUsage, h)
        limit = _call(nv.nvmlDeviceGetEnforcedPowerLimit, h)
        util = _call(nv.nvmlDeviceGetUtilizationRates, h)
        energy = _call(nv.nvmlDeviceGetTotalEnergyConsumption, h)
        reasons = _call(nv.nvmlDeviceGetCurrentClocksThrottleReasons, h) or 0
        return GpuReading(
            index=i, temperature_c=_call(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU),
            power_w=power / 1000 if power is not None else None,
            power_limit_w=limit / 1000 if limit else None,
            sm_clock_mhz=_call(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM),
            sm_clock_max_mhz=_call(nv.nvmlDeviceGetMaxClockInfo, h, nv.NVML_CLOCK_SM),
            utilization_pct=util.gpu if util is not None else None,
            throttle=tuple(v for bit, v in _THROTTLE_BITS.items() if reasons & bit),
            energy_j=energy / 1000 if energy is not None else None)

    def _zone_joules(self, z: RaplZone) -> float | None:
        """A zone's counter in joules, continued across its wrap-arounds."""
        uj = _read_uj(z)
        if uj is None:
            return None
        last = self._last_uj.get(z.name)
        if last is not None and uj < last:  # the counter wrapped
            self._wraps[z.name] = self._wraps.get(z.name, 0) + 1
        self._last_uj[z.name] = uj
        return (uj + self._wraps.get(z.name, 0) * z.wrap_uj) / 1e6

    def energy_j(self) -> float | None:
        """Joules the metered parts (each GPU's energy counter, the RAPL zones) have used
        since an arbitrary origin; None unless every one of them could be read."""
        total = 0.0
        for z in self.zones:
            j = self._zone_joules(z)
            if j is None:
                return None
            total += j
        for h in self._handles:
            mj = _call(self._nv.nvmlDeviceGetTotalEnergyConsumption, h)
            if mj is None:
                return None
            total += mj / 1000
        return total if (self.zones or self._handles) else None

    def read(self) -> Reading:
        import psutil

        energy = {z.name: j for z in self.zones if (j := self._zone_joules(z)) is not None}
        temp, high = self._cpu_temperature()
        freq = _call(psutil.cpu_freq)
        return Reading(t=time.monotonic(),
                       gpus=tuple(self._gpu(i, h) for i, h in enumerate(self._handles)),
                       cpu_energy_j=energy, cpu_temp_c=temp, cpu_temp_high_c=high,
                       cpu_mhz=freq.current if freq and freq.current else None,
                       cpu_pct=_call(psutil.cpu_percent))


def cpu_power_w(a: Reading, b: Reading) -> float | None:
    """The CPU's mean power between two readings, from its RAPL counters; None without."""
    zones = [k for k in b.cpu_energy_j if k in a.cpu_energy_j]
    if not zones or b.t <= a.t:
        return None
    return sum(b.cpu_energy_j[k] - a.cpu_energy_j[k] for k in zones) / (b.t - a.t)


def power_w(a: Reading, b: Reading) -> float | None:
    """Mean power between two readings: the GPUs' board power (as read at `b`) plus the
    CPU's RAPL energy over the interval. None without any power reading."""
    parts = [g.power_w for g in b.gpus if g.power_w is not None]
    cpu = cpu_power_w(a, b)
    if cpu is not None:
        parts.append(cpu)
    return sum(parts) if parts else None


@dataclass
class PowerReport:
    """What a `Sampler` saw over one window."""
    seconds: float
    samples: int
    mean_w: float | None          # energy / time where counters exist, else mean of samples
    p95_w: float | None
    energy_j: float | None
    sources: list[str]
    throttled: bool
    why: list[str]                # what made it throttled
    gpu_temp_max_c: float | None = None
    cpu_temp_max_c: float | None = None
    clocks: dict[str, list[float]] = field(default_factory=dict)   # name -> [first, min, last]
    missing: dict[str, str] = field(default_factory=dict)
    watts: list[float] = field(default_factory=list)   # each sample's power

    def joules_per_token(self, tokens: int) -> float | None:
        return self.energy_j / tokens if self.energy_j is not None and tokens else None

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "watts"}
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}

    def summary(self) -> str:
        if self.mean_w is None:
            return "no power reading (" + "; ".join(
                v for k, v in self.missing.items() if "temperature" not in k) + ")"
        s = f"{self.mean_w:,.0f} W mean, {self.p95_w:,.0f} W p95"
        return s + (" — THROTTLED: " + ", ".join(self.why) if self.throttled else "")


def _throttle_verdict(readings: list[Reading]) -> tuple[list[str], dict[str, list[float]]]:
    """Why a run counts as throttled (empty: it does not), and each clock's course."""
    why: list[str] = []
    clocks: dict[str, list[float]] = {}
    for i in range(len(readings[0].gpus) if readings else 0):
        gs = [r.gpus[i] for r in readings if len(r.gpus) > i]
        reasons = sorted({x for g in gs for x in g.throttle})
        if reasons:
            why.append(f"GPU {i} reported " + ", ".join(reasons))
        busy = [g.sm_clock_mhz for g in gs if g.sm_clock_mhz and
                (g.utilization_pct or 0) >= BUSY_PCT]
        if busy:
            clocks[f"gpu{i}_sm_mhz"] = [busy[0], min(busy), busy[-1]]
            if len(busy) >= 4 and _fell(busy):
                why.append(f"GPU {i}'s SM clock fell from {max(busy[:len(busy) // 2]):,.0f} to "
                           f"{min(busy[len(busy) // 2:]):,.0f} MHz while busy")
    cpu = [r.cpu_mhz for r in readings if r.cpu_mhz and (r.cpu_pct or 0) >= BUSY_PCT]
    if cpu:
        clocks["cpu_mhz"] = [cpu[0], min(cpu), cpu[-1]]
        if len(cpu) >= 4 and _fell(cpu):
            why.append(f"the CPU clock fell from {max(cpu[:len(cpu) // 2]):,.0f} to "
                       f"{min(cpu[len(cpu) // 2:]):,.0f} MHz while busy")
    hot = [r for r in readings if r.cpu_temp_c and r.cpu_temp_high_c
           and r.cpu_temp_c >= r.cpu_temp_high_c]
    if hot:
        why.append(f"the CPU reached {hot[0].cpu_temp_c:.0f} °C, at or above its "
                   f"{hot[0].cpu_temp_high_c:.0f} °C high mark")
    return why, clocks


def _fell(xs: list[float]) -> bool:
    """A sustained fall: the later half's median below CLOCK_DROP of the earlier peak."""
    half = len(xs) // 2
    return statistics.median(xs[half:]) < CLOCK_DROP * max(xs[:half])


class Sampler:
    """Reads `Telemetry` every `period_s` on a thread between `start()` and `stop()`
    (or as a context manager); `report()` summarizes the window."""

    def __init__(self, period_s: float = 0.1, telemetry: Telemetry | None = None) -> None:
        self.period_s = period_s
        self._own = telemetry is None
        self.telemetry = telemetry or Telemetry()
        self.readings: list[Reading] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Sampler":
        import psutil

        psutil.cpu_percent()  # sets the baseline of the first utilization reading
        self.readings = [self.telemetry.read()]
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="power-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.readings.append(self.telemetry.read())

    def stop(self) -> PowerReport:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None
        self.readings.append(self.telemetry.read())
        report = self.report()
        if self._own:
            self.telemetry.close()
        return report

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self.stop()

    def report(self) -> PowerReport:
        rs = list(self.readings)
        tel = self.telemetry
        secs = rs[-1].t - rs[0].t if len(rs) > 1 else 0.0
        spans = _windows(rs, WINDOW_S)
        if any(g.power_w is not None for r in rs[-1:] for g in r.gpus):
            settled = [(a, b) for a, b in spans if b.t - rs[0].t >= NVML_MEAN_S + WINDOW_S]
            spans = settled or spans[-1:]
        watts = [w for a, b in spans if (w := power_w(a, b)) is not None]
        energy = None
        if len(rs) > 1 and tel.has_power:
            e = 0.0
            first, last = rs[0], rs[-1]
            for k in last.cpu_energy_j:
                if k in first.cpu_energy_j:
                    e += last.cpu_energy_j[k] - first.cpu_energy_j[k]
            for i in range(len(last.gpus)):
                g0, g1 = first.gpus[i], last.gpus[i]
                if g0.energy_j is not None and g1.energy_j is not None:
                    e += g1.energy_j - g0.energy_j
                else:  # no counter: integrate the sampled board power
                    e += sum((b.t - a.t) * (b.gpus[i].power_w or 0) for a, b in zip(rs, rs[1:]))
            energy = e
        mean = energy / secs if energy is not None and secs > 0 else (
            statistics.fmean(watts) if watts else None)
        why, clocks = _throttle_verdict(rs)
        gtemps = [g.temperature_c for r in rs for g in r.gpus if g.temperature_c is not None]
        ctemps = [r.cpu_temp_c for r in rs if r.cpu_temp_c is not None]
        return PowerReport(
            seconds=secs, samples=len(rs), mean_w=mean,
            p95_w=_percentile(watts, 95) if watts else None, energy_j=energy,
            sources=tel.power_sources(), throttled=bool(why), why=why,
            gpu_temp_max_c=max(gtemps) if gtemps else None,
            cpu_temp_max_c=max(ctemps) if ctemps else None, clocks=clocks,
            missing=dict(tel.missing), watts=watts)


def _windows(rs: list[Reading], seconds: float) -> list[tuple[Reading, Reading]]:
    """Consecutive spans of at least `seconds`: an energy counter read every 50 ms moves
    in the OS's scheduling ticks, so the power of a span that short is mostly noise."""
    out, i = [], 0
    for j in range(1, len(rs)):
        if rs[j].t - rs[i].t >= seconds:
            out.append((rs[i], rs[j]))
            i = j
    return out


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
