"""Tokens per second over time, from the arrival of each streamed token."""

from __future__ import annotations

import collections
import time
from typing import Any

from ._live import MAX_POINTS, LivePlot

WINDOW_S = 1.0


class ThroughputPlot(LivePlot):
    title = "Throughput"
    y_title = "tokens/s"

    def setup(self) -> None:
        self.arrivals: collections.deque[float] = collections.deque()
        self.xs: collections.deque[float] = collections.deque(maxlen=MAX_POINTS)
        self.ys: collections.deque[float] = collections.deque(maxlen=MAX_POINTS)
        self.run_start: float | None = None
        self.figure.add_scatter(mode="lines", line={"width": 2, "color": "#1f77b4"})

    def on_event(self, kind: str, payload: Any) -> None:
        if kind == "tokens":
            now = time.monotonic()
            if not self.arrivals:
                self.run_start = now
            self.arrivals.extend([now] * len(payload.pieces))

    def sample(self, now: float | None = None) -> float | None:
        """Add a point: tokens/s over the last second (None when idle)."""
        now = time.monotonic() if now is None else now
        while self.arrivals and self.arrivals[0] < now - WINDOW_S:
            self.arrivals.popleft()
        if not self.arrivals:
            if self.ys and self.ys[-1] > 0:  # show the drop to zero once
                self.xs.append(now - self.t0)
                self.ys.append(0.0)
                self.mark()
            self.run_start = None
            return None
        span = min(WINDOW_S, max(now - (self.run_start or now), 1e-3))
        rate = len(self.arrivals) / span
        self.xs.append(now - self.t0)
        self.ys.append(rate)
        self.mark()
        return rate

    def draw(self) -> None:
        self.figure.data[0].x = list(self.xs)
        self.figure.data[0].y = list(self.ys)
