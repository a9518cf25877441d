"""The live dashboard: throughput, time to first token, worker memory, the prefix cache
and speculative decoding.

Each plot is its own class fed by the engine's events. The dashboard owns one
refresher thread, started and stopped explicitly; `refresh()` does one update by
hand, which is what the thread calls a few times a second.
"""

from __future__ import annotations

import html
import threading
import time
from typing import Any

import ipywidgets as widgets

from .cache import CachePlot
from .memory import MemoryPlot
from .speculation import SpeculationPlot
from .throughput import ThroughputPlot
from .ttft import TTFTPlot

__all__ = ["CachePlot", "Dashboard", "MemoryPlot", "SpeculationPlot", "ThroughputPlot",
           "TTFTPlot"]

REFRESH_S = 0.25


class Dashboard(widgets.VBox):
    _instances: dict[int, "Dashboard"] = {}

    @classmethod
    def for_engine(cls, engine: Any) -> "Dashboard":
        """The engine's running dashboard, or a new one (displaying it twice is fine)."""
        d = cls._instances.get(id(engine))
        if d is None or not d.running:
            d = cls(engine)
            cls._instances[id(engine)] = d
        return d

    def __init__(self, engine: Any, refresh_s: float = REFRESH_S) -> None:
        t0 = time.monotonic()
        self.engine = engine
        self.refresh_s = refresh_s
        self.throughput = ThroughputPlot(t0)
        self.ttft = TTFTPlot(t0)
        self.memory = MemoryPlot(t0)
        self.cache = CachePlot(t0)
        self.speculation = SpeculationPlot(t0)
        self.plots = (self.throughput, self.ttft, self.memory, self.cache, self.speculation)
        self.header = widgets.HTML()
        self.stop_button = widgets.Button(description="Stop updates", icon="pause",
                                          layout=widgets.Layout(width="140px"))
        self.stop_button.on_click(lambda _b: self.stop())
        super().__init__([widgets.HBox([self.header, self.stop_button]),
                          widgets.HBox([p.figure for p in self.plots[:3]]),
                          widgets.HBox([self.cache.figure, self.speculation.figure])])
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: Any = None
        self.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _on_event(self, kind: str, payload: Any) -> None:
        for p in self.plots:
            p.on_event(kind, payload)

    def start(self) -> None:
        """Subscribe to the engine and start the refresher thread."""
        if self.running:
            return
        self._stop.clear()
        self._unsubscribe = self.engine.subscribe(self._on_event)
        self._thread = threading.Thread(target=self._loop, name="workbench-dashboard",
                                        daemon=True)
        self._thread.start()
        self.stop_button.disabled = False

    def stop(self) -> None:
        """Stop updating: unsubscribe and end the refresher thread."""
        self._stop.set()
        if self._unsubscribe:
            self._unsubscribe()
            self._unsubscribe = None
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join(2)
        self._thread = None
        self.stop_button.disabled = True
        self.refresh()

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def refresh(self) -> None:
        """Draw what arrived since the last refresh."""
        self.throughput.sample()
        self.speculation.sample()
        for p in self.plots:
            p.refresh()
        self.header.value = self._header_html()

    def _header_html(self) -> str:
        e = self.engine
        m = e.model
        parts = [f"<b>{html.escape(m.name)}</b>" if m else "<b>no model loaded</b>"]
        if e.records:
            r = e.records[-1]
            parts.append(f"last request: {r.decode_tps:,.1f} tok/s · TTFT "
                         f"{r.ttft_s * 1000:,.0f} ms · prompt {r.prompt_tps:,.0f} tok/s")
            if r.draft_tokens:
                parts.append(f"drafts accepted {r.accepted_tokens / r.draft_tokens:.0%}")
        parts.append(f"requests: {len(e.records)}")
        if e.last_stats:
            parts.append(f"worker RSS {e.last_stats.rss_bytes / 2**20:,.0f} MiB")
        if not self.running:
            parts.append("(updates stopped)")
        return " &nbsp;|&nbsp; ".join(parts)
