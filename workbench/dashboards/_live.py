"""Base of the live plots: a plotly FigureWidget fed by engine events.

Events arrive on the engine's receiver thread and only record data; `refresh()`
(called by the dashboard's timer, or directly by tests) draws what changed.
"""

from __future__ import annotations

import threading
from typing import Any

MAX_POINTS = 600


class LivePlot:
    title = ""
    y_title = ""

    def __init__(self, t0: float) -> None:
        import plotly.graph_objects as go

        self.t0 = t0
        self._lock = threading.Lock()
        self._dirty = False
        self.figure = go.FigureWidget(layout=go.Layout(
            title={"text": self.title, "font": {"size": 13}}, height=240, width=330,
            margin={"l": 50, "r": 10, "t": 36, "b": 36}, showlegend=False,
            yaxis={"title": {"text": self.y_title}, "rangemode": "tozero"},
            xaxis={"title": {"text": self.x_title()}}))
        self.setup()

    def x_title(self) -> str:
        return "seconds"

    def setup(self) -> None:
        """Add the traces."""

    def on_event(self, kind: str, payload: Any) -> None:
        """Record data from an engine event (receiver thread; keep it cheap)."""

    def draw(self) -> None:
        """Copy the recorded data into the figure (called under the lock)."""

    def mark(self) -> None:
        self._dirty = True

    def refresh(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            with self.figure.batch_update():
                self.draw()
