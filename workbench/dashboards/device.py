"""Live view of the machine while the engine works: CPU and GPU utilization, and
memory (host used, the worker's resident set, GPU used). It samples psutil and NVML
itself, once per `period_s`, on a thread it starts and stops explicitly."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import ipywidgets as widgets

from ._live import MAX_POINTS, LivePlot


class UtilizationPlot(LivePlot):
    title = "Utilization"
    y_title = "%"

    def setup(self) -> None:
        self.xs: collections.deque[float] = collections.deque(maxlen=MAX_POINTS)
        self.cpu: collections.deque[float] = collections.deque(maxlen=MAX_POINTS)
        self.gpu: collections.deque[float | None] = collections.deque(maxlen=MAX_POINTS)
        self.figure.add_scatter(mode="lines", name="CPU", line={"color": "#1f77b4"})
        self.figure.add_scatter(mode="lines", name="GPU", line={"color": "#d62728"})
        self.figure.layout.yaxis.range = [0, 100]

    def add(self, t: float, cpu: float, gpu: float | None) -> None:
        with self._lock:
            self.xs.append(t)
            self.cpu.append(cpu)
            self.gpu.append(gpu)
        self.mark()

    def draw(self) -> None:
        xs = list(self.xs)
        self.figure.data[0].x, self.figure.data[0].y = xs, list(self.cpu)
        if any(g is not None for g in self.gpu):
            self.figure.data[1].x, self.figure.data[1].y = xs, list(self.gpu)


class MachineMemoryPlot(LivePlot):
    title = "Memory"
    y_title = "GiB"

    def setup(self) -> None:
        self.xs: collections.deque[float] = collections.deque(maxlen=MAX_POINTS)
        self.series: dict[str, collections.deque[float | None]] = {
            k: collections.deque(maxlen=MAX_POINTS) for k in ("host", "worker", "gpu")}
        for name, color in (("RAM used", "#7f7f7f"), ("worker RSS", "#2ca02c"),
                            ("GPU used", "#d62728")):
            self.figure.add_scatter(mode="lines", name=name, line={"color": color})

    def add(self, t: float, host: float, worker: float | None, gpu: float | None) -> None:
        with self._lock:
            self.xs.append(t)
            for k, v in (("host", host), ("worker", worker), ("gpu", gpu)):
                self.series[k].append(v)
        self.mark()

    def draw(self) -> None:
        xs = list(self.xs)
        for i, k in enumerate(("host", "worker", "gpu")):
            ys = list(self.series[k])
            if any(y is not None for y in ys):
                self.figure.data[i].x, self.figure.data[i].y = xs, ys


class PowerPlot(LivePlot):
    title = "Power and temperature"
    y_title = "W / °C"
    SERIES = (("gpu_w", "GPU W", "#d62728", None), ("cpu_w", "CPU W (RAPL)", "#1f77b4", None),
              ("gpu_c", "GPU °C", "#ff7f0e", "dot"), ("cpu_c", "CPU °C", "#17becf", "dot"))

    def setup(self) -> None:
        self.xs: collections.deque[float] = collections.deque(maxlen=MAX_POINTS)
        self.series: dict[str, collections.deque[float | None]] = {
            k: collections.deque(maxlen=MAX_POINTS) for k, *_ in self.SERIES}
        for _, name, color, dash in self.SERIES:
            self.figure.add_scatter(mode="lines", name=name, line={"color": color, "dash": dash})

    def add(self, t: float, values: dict[str, float | None]) -> None:
        with self._lock:
            self.xs.append(t)
            for k in self.series:
                self.series[k].append(values.get(k))
        self.mark()

    def draw(self) -> None:
        xs = list(self.xs)
        for i, (k, *_rest) in enumerate(self.SERIES):
            ys = list(self.series[k])
            if any(y is not None for y in ys):
                self.figure.data[i].x, self.figure.data[i].y = xs, ys


class DeviceMonitor(widgets.VBox):
    """`profile_device(live=True)`: utilization, memory, power and temperature, updated
    every `period_s`; the header says when a GPU reports throttling."""

    def __init__(self, engine: Any = None, period_s: float = 1.0) -> None:
        import psutil

        self.engine = engine
        self.period_s = period_s
        t0 = time.monotonic()
        self.t0 = t0
        self.util = UtilizationPlot(t0)
        self.memory = MachineMemoryPlot(t0)
        self.power = PowerPlot(t0)
        self.header = widgets.HTML()
        self.stop_button = widgets.Button(description="Stop updates", icon="pause",
                                          layout=widgets.Layout(width="140px"))
        self.stop_button.on_click(lambda _b: self.stop())
        super().__init__([widgets.HBox([self.header, self.stop_button]),
                          widgets.HBox([self.util.figure, self.memory.figure]),
                          self.power.figure])
        from ..power.nvml import open_nvml
        from ..power.meter import Telemetry

        nvml = open_nvml()  # one NVML session: utilization and memory here, power in _tel
        self._nvml = _Nvml(nvml)
        self._tel = Telemetry(nvml=nvml)  # closes the session
        self._last = self._tel.read()
        psutil.cpu_percent()  # the first call only sets the baseline
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="device-monitor", daemon=True)
        self._thread.start()
        self.stop_button.disabled = False

    def stop(self) -> None:
        """Stop sampling and end the thread."""
        self._stop.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(2)
        self._thread = None
        self.stop_button.disabled = True
        self.header.value = self.header.value.replace(" (updates stopped)", "") + \
            " (updates stopped)"
        self._tel.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()
            self.refresh()

    def sample(self) -> dict[str, Any]:
        """Take one sample (what the thread does each period); returns it."""
        import psutil

        t = time.monotonic() - self.t0
        cpu = psutil.cpu_percent()
        vm = psutil.virtual_memory()
        stats = getattr(self.engine, "last_stats", None) if self.engine is not None else None
        alive = self.engine is not None and self.engine.alive
        worker = stats.rss_bytes / 2**30 if stats and alive else None
        gpu_util, gpu_used = self._nvml.sample()
        s = {"t": t, "cpu_pct": cpu, "ram_used_gib": (vm.total - vm.available) / 2**30,
             "worker_gib": worker, "gpu_pct": gpu_util, "gpu_used_gib": gpu_used}
        self.util.add(t, cpu, gpu_util)
        self.memory.add(t, s["ram_used_gib"], worker, gpu_used)
        s.update(self._power())
        self.power.add(t, s)
        parts = [f"CPU {cpu:.0f}%", f"RAM used {s['ram_used_gib']:,.1f} GiB"]
        if worker is not None:
            parts.append(f"worker {worker:,.2f} GiB")
        parts.append(f"GPU {gpu_util:.0f}%, {gpu_used:,.1f} GiB" if gpu_util is not None
                     else "no GPU")
        watts = [s[k] for k in ("gpu_w", "cpu_w") if s[k] is not None]
        parts.append(f"{sum(watts):,.0f} W" if watts else "no power reading")
        if s["throttle"]:
            parts.append("<b style='color:#b00020'>throttled: "
                         + ", ".join(s["throttle"]) + "</b>")
        self.header.value = " &nbsp;|&nbsp; ".join(parts)
        return s

    def _power(self) -> dict[str, Any]:
        from ..power.meter import cpu_power_w

        r = self._tel.read()
        last, self._last = self._last, r
        cpu_w = cpu_power_w(last, r)
        gpu_w = [g.power_w for g in r.gpus if g.power_w is not None]
        gpu_c = [g.temperature_c for g in r.gpus if g.temperature_c is not None]
        return {"gpu_w": sum(gpu_w) if gpu_w else None, "cpu_w": cpu_w,
                "gpu_c": max(gpu_c) if gpu_c else None, "cpu_c": r.cpu_temp_c,
                "throttle": sorted({x for g in r.gpus for x in g.throttle})}

    def refresh(self) -> None:
        self.util.refresh()
        self.memory.refresh()
        self.power.refresh()


class _Nvml:
    """All GPUs' utilization (mean, %) and memory used (GiB), or (None, None), through an
    NVML session the caller opened (device.nvml.open_nvml()) and closes."""

    def __init__(self, nvml: tuple[Any, list[Any]]) -> None:
        self._nv, self._handles = nvml

    def sample(self) -> tuple[float | None, float | None]:
        if not self._handles:
            return None, None
        try:
            util = [self._nv.nvmlDeviceGetUtilizationRates(h).gpu for h in self._handles]
            used = sum(self._nv.nvmlDeviceGetMemoryInfo(h).used for h in self._handles)
        except Exception:
            return None, None
        return sum(util) / len(util), used / 2**30
