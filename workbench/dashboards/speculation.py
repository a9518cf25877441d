"""Speculative decoding as it happens: how many drafted tokens the model accepts.

Each streamed `Tokens` message carries its request's running totals, `drafted` and
`accepted`. Per request, the plot draws two cumulative shares over time:
- acceptance: accepted / drafted, how good the drafts are;
- from drafts: accepted / generated, the share of the answer that drafts supplied
  (each such token skipped a decode step of its own).
A new request starts new lines. The request's final metrics close its lines, since
drafts checked after the last streamed token count there too.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any

from ._live import MAX_POINTS, LivePlot

MAX_REQUESTS = 20  # requests whose lines stay on the plot


@dataclass(frozen=True)
class SpeculationPoint:
    """One request's speculation so far. `t`: seconds since the dashboard started."""
    request_id: str
    t: float
    generated: int  # tokens generated so far
    drafted: int    # tokens drafted and checked so far
    accepted: int   # of which the model kept

    @property
    def acceptance(self) -> float | None:
        """accepted / drafted (None before anything was drafted)."""
        return self.accepted / self.drafted if self.drafted else None

    @property
    def from_drafts(self) -> float:
        """accepted / generated: the share of tokens that came from drafts."""
        return self.accepted / self.generated if self.generated else 0.0


class SpeculationPlot(LivePlot):
    title = "Speculative decoding"
    y_title = "share"

    def setup(self) -> None:
        # events only queue their numbers (receiver thread); sample() turns them into points
        # (request id, arrival, generated, drafted, accepted, whether the request finished)
        self._pending: collections.deque[tuple[str, float, int, int, int, bool]] = \
            collections.deque()
        self.requests: collections.OrderedDict[str, list[SpeculationPoint]] = \
            collections.OrderedDict()
        self.figure.add_scatter(name="acceptance", mode="lines+markers",
                                line={"width": 2, "color": "#2ca02c"}, marker={"size": 4})
        self.figure.add_scatter(name="from drafts", mode="lines",
                                line={"width": 1.5, "color": "#8c564b", "dash": "dot"})
        self.figure.update_layout(showlegend=True,
                                  legend={"x": 0.99, "xanchor": "right", "y": 0.02,
                                          "yanchor": "bottom", "font": {"size": 10},
                                          "bgcolor": "rgba(255,255,255,0.7)"},
                                  yaxis={"range": [0, 1.05], "tickformat": ".0%"})

    def on_event(self, kind: str, payload: Any) -> None:
        if kind == "tokens":
            self._pending.append((payload.id, time.monotonic(),
                                  payload.index + len(payload.token_ids),
                                  payload.drafted, payload.accepted, False))
        elif kind == "finished":
            self._pending.append((payload.request_id, time.monotonic(),
                                  payload.generated_tokens, payload.draft_tokens,
                                  payload.accepted_tokens, True))

    def sample(self) -> SpeculationPoint | None:
        """Turn the tokens received since the last call into points; return the newest
        (None when nothing arrived). The dashboard's refresher calls this."""
        newest = None
        while self._pending:
            rid, now, generated, drafted, accepted, final = self._pending.popleft()
            points = self.requests.get(rid)
            if points is None and final:  # no tokens streamed (an embedding, a prompt only)
                continue
            if points is None:  # a new request: new lines, counted from zero
                points = self.requests[rid] = []
                while len(self.requests) > MAX_REQUESTS:
                    self.requests.popitem(last=False)
            newest = SpeculationPoint(rid, now - self.t0, generated, drafted, accepted)
            points.append(newest)
            del points[:-MAX_POINTS]
        if newest is not None:
            self.mark()
        return newest

    def points(self, request_id: str | None = None) -> list[SpeculationPoint]:
        """The points of one request (default: the latest)."""
        if request_id is None:
            request_id = next(reversed(self.requests), None)
        return list(self.requests.get(request_id, ()))

    def summary(self) -> str:
        p = next((ps[-1] for ps in reversed(self.requests.values()) if ps), None)
        if p is None:
            return "no requests yet"
        if not p.drafted:
            return f"{p.request_id}: nothing drafted"
        return (f"{p.request_id}: {p.accepted}/{p.drafted} drafts accepted · "
                f"{p.from_drafts:.0%} of tokens from drafts")

    def draw(self) -> None:
        xs: list[float | None] = []
        acc: list[float | None] = []
        share: list[float | None] = []
        for points in self.requests.values():
            for p in points:
                xs.append(p.t)
                acc.append(p.acceptance)
                share.append(p.from_drafts)
            xs.append(None)  # a gap between requests
            acc.append(None)
            share.append(None)
        self.figure.data[0].x, self.figure.data[0].y = xs, acc
        self.figure.data[1].x, self.figure.data[1].y = xs, share
        self.figure.layout.title.text = f"{self.title}<br><sup>{self.summary()}</sup>"
