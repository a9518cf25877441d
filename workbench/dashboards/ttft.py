"""Time to first token of each request, as bars."""

from __future__ import annotations

import collections
from typing import Any

from ._live import LivePlot

MAX_BARS = 40


class TTFTPlot(LivePlot):
    title = "Time to first token"
    y_title = "ms"

    def x_title(self) -> str:
        return "request"

    def setup(self) -> None:
        self.ids: collections.deque[str] = collections.deque(maxlen=MAX_BARS)
        self.ms: collections.deque[float] = collections.deque(maxlen=MAX_BARS)
        self.figure.add_bar(marker={"color": "#ff7f0e"})

    def on_event(self, kind: str, payload: Any) -> None:
        if kind == "finished" and payload.generated_tokens > 0:
            self.ids.append(payload.request_id)
            self.ms.append(payload.ttft_s * 1000.0)
            self.mark()

    def draw(self) -> None:
        self.figure.data[0].x = list(self.ids)
        self.figure.data[0].y = list(self.ms)
