"""The worker's memory over time: resident set, and GPU memory where there is a GPU."""

from __future__ import annotations

import collections
import time
from typing import Any

from ._live import MAX_POINTS, LivePlot


class MemoryPlot(LivePlot):
    title = "Worker memory"
    y_title = "MiB"

    def setup(self) -> None:
        self.xs: collections.deque[float] = collections.deque(maxlen=MAX_POINTS)
        self.rss: collections.deque[float] = collections.deque(maxlen=MAX_POINTS)
        self.gpu: collections.deque[float | None] = collections.deque(maxlen=MAX_POINTS)
        self.figure.add_scatter(mode="lines", name="RAM (RSS)", line={"color": "#2ca02c"})
        self.figure.add_scatter(mode="lines", name="GPU", line={"color": "#d62728"})

    def on_event(self, kind: str, payload: Any) -> None:
        if kind == "stats":
            self.xs.append(time.monotonic() - self.t0)
            self.rss.append(payload.rss_bytes / 2**20)
            self.gpu.append(None if payload.gpu_bytes is None else payload.gpu_bytes / 2**20)
            self.mark()

    def draw(self) -> None:
        xs = list(self.xs)
        self.figure.data[0].x, self.figure.data[0].y = xs, list(self.rss)
        if any(g is not None for g in self.gpu):
            self.figure.data[1].x, self.figure.data[1].y = xs, list(self.gpu)
