"""Power caps: checking that one can be measured and held, the idle draw, the GPU's own
limit, and the power rows of a device profile."""

from __future__ import annotations

import time

from ..errors import WorkbenchError
from .meter import Sampler, Telemetry, cpu_power_w
from .nvml import optional as _call


def require_power(telemetry: Telemetry, what: str = "--power-cap") -> None:
    """A clear error when no power reading exists here, naming each missing one."""
    if telemetry.has_power:
        return
    gone = "; ".join(f"{k}: {v}" for k, v in telemetry.missing.items()
                     if "temperature" not in k)
    raise WorkbenchError(f"{what} needs power readings, and this machine has none ({gone})",
                         "Run on a machine with an NVIDIA GPU (NVML) or readable RAPL "
                         "counters (for example as root, or after `sudo chmod a+r "
                         "/sys/class/powercap/intel-rapl:*/energy_uj`), or leave out the cap.")


_idle: tuple[float, float] | None = None   # (monotonic time, watts)


def idle_power(seconds: float = 1.5, telemetry: Telemetry | None = None,
               max_age_s: float = 300.0) -> float:
    """The machine's draw with nothing of ours running (mean over `seconds`), measured
    at most every `max_age_s`."""
    global _idle
    if _idle is not None and time.monotonic() - _idle[0] < max_age_s:
        return _idle[1]
    s = Sampler(0.1, telemetry)
    s.start()
    time.sleep(seconds)
    r = s.stop()
    if r.mean_w is None:
        require_power(s.telemetry)
    _idle = (time.monotonic(), float(r.mean_w or 0.0))
    return _idle[1]


def check_cap(cap_w: float, telemetry: Telemetry | None = None) -> float:
    """Refuse a cap the machine cannot meet even idle; returns the idle draw."""
    tel = telemetry or Telemetry()
    try:
        require_power(tel)
        idle = idle_power(telemetry=tel)
    finally:
        if telemetry is None:
            tel.close()
    if cap_w <= idle:
        raise WorkbenchError(
            f"a power cap of {cap_w:,.0f} W is below this machine's idle draw: {idle:,.1f} W "
            f"measured just now ({', '.join(tel.power_sources())})",
            f"Give a cap above {idle:,.0f} W; the workload adds to the idle draw.")
    return idle


def profile_rows() -> list[tuple[str, str]]:
    """Temperature, power and clocks for the device profile, and what is not readable."""
    tel = Telemetry()
    try:
        r = tel.read()
        time.sleep(0.2)
        r2 = tel.read()
    finally:
        tel.close()
    rows = []
    if r2.cpu_temp_c is not None:
        rows.append(("CPU temperature", f"{r2.cpu_temp_c:.0f} °C" + (
            f" (high mark {r2.cpu_temp_high_c:.0f} °C)" if r2.cpu_temp_high_c else "")))
    cpu_w = cpu_power_w(r, r2)
    if cpu_w is not None:
        rows.append(("CPU power", f"{cpu_w:,.1f} W (RAPL: {', '.join(r2.cpu_energy_j)})"))
    for g in r2.gpus:
        parts = [f"{g.sm_clock_mhz:,.0f} of {g.sm_clock_max_mhz:,.0f} MHz SM clock"
                 if g.sm_clock_mhz and g.sm_clock_max_mhz else "",
                 f"throttled: {', '.join(g.throttle)}" if g.throttle else "not throttled"]
        rows.append((f"GPU {g.index} clocks", "; ".join(p for p in parts if p)))
    rows += [(k, f"not available: {v}") for k, v in tel.missing.items()]
    return rows


_restore: dict[int, int] = {}   # GPU index -> its power limit before we changed it (mW)
_registered = False


def set_gpu_power_limit(cap_w: float) -> tuple[str, str, str]:
    """Lower every GPU's power limit to `cap_w` (within what the board allows), keeping
    the old limits to restore at exit. Only on request; needs the right to do it."""
    import atexit

    from .nvml import open_nvml

    nv, handles = open_nvml()
    if not handles:
        raise WorkbenchError("--set-gpu-power-limit: NVML sees no NVIDIA GPU here",
                             "Leave it out: the cap is then met by the configuration alone.")
    set_to = []
    try:
        for i, h in enumerate(handles):
            lo, hi = nv.nvmlDeviceGetPowerManagementLimitConstraints(h)
            want = int(min(hi, max(lo, cap_w * 1000)))
            old = nv.nvmlDeviceGetPowerManagementLimit(h)
            try:
                nv.nvmlDeviceSetPowerManagementLimit(h, want)
            except nv.NVMLError as e:
                raise WorkbenchError(
                    f"the GPU power limit could not be changed: {e}",
                    "Changing it needs root (or `nvidia-smi -pl` by an administrator). The "
                    "cap is still met by the chosen configuration; leave out "
                    "--set-gpu-power-limit.") from None
            _restore.setdefault(i, old)
            set_to.append(f"GPU {i}: {want / 1000:,.0f} W (board range {lo / 1000:,.0f}–"
                          f"{hi / 1000:,.0f} W; was {old / 1000:,.0f} W)")
    finally:
        nv.nvmlShutdown()
    global _registered
    if not _registered:
        atexit.register(_restore_limits)
        _registered = True
    return ("GPU power limit", "; ".join(set_to), "set as asked; restored when Python exits")


def _restore_limits() -> None:
    from .nvml import open_nvml

    nv, handles = open_nvml()
    try:
        for i, old in list(_restore.items()):
            if i < len(handles):
                _call(nv.nvmlDeviceSetPowerManagementLimit, handles[i], old)
        _restore.clear()
    finally:
        if handles:
            nv.nvmlShutdown()
