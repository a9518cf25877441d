"""What the cluster knows of its nodes and shows: each node's state and traffic, the
events (joined, lost, re-planned, ...) and the `%cluster status` table."""

from __future__ import annotations

import collections
import dataclasses
import html
import time

from . import probe as P
from .plan import ClusterPlan


@dataclasses.dataclass
class Node:
    info: P.NodeInfo
    state: str = "ready"                      # ready | lost
    misses: int = 0
    traffic: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=120))   # (t, bytes_in, bytes_out)

    @property
    def endpoint(self) -> str:
        return self.info.endpoint

    def rate(self) -> tuple[float, float]:
        """Bytes/s in and out over the last two samples."""
        if len(self.traffic) < 2:
            return 0.0, 0.0
        (t0, i0, o0), (t1, i1, o1) = self.traffic[-2], self.traffic[-1]
        dt = max(t1 - t0, 1e-3)
        return max(0.0, (i1 - i0) / dt), max(0.0, (o1 - o0) / dt)


@dataclasses.dataclass(frozen=True)
class Event:
    time: float
    kind: str          # joined | removed | lost | replanned | rebalanced | failed
    text: str


class ClusterStatus:
    """What `%cluster status` shows."""

    headers = ("node", "state", "device", "usable", "bandwidth", "layers", "traffic", "RTT")

    def __init__(self, rows: list[tuple[str, ...]], events: list[Event],
                 plan: ClusterPlan | None, policy: str, replan_s: float | None) -> None:
        self.rows, self.events, self.plan, self.policy = rows, events, plan, policy
        self.replan_s = replan_s

    def _lines(self) -> list[str]:
        out = [f"policy on join: {self.policy}"]
        if self.plan is not None:
            out.append(f"model: {self.plan.model.name}, predicted {self.plan.predicted_tps:,.0f} "
                       f"tokens/s; local layers " + next(r[2] for r in self.plan.rows()))
        if self.replan_s is not None:
            out.append(f"last re-plan took {self.replan_s:.1f} s")
        return out + [time.strftime("%H:%M:%S ", time.localtime(e.time)) + e.text
                      for e in self.events]

    def _repr_html_(self) -> str:
        if not self.rows:
            table = "<p>No node yet: <code>%cluster add HOST:PORT</code>.</p>"
        else:
            head = "".join(f"<th>{h}</th>" for h in self.headers)
            body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>"
                                             for c in r) + "</tr>" for r in self.rows)
            table = f"<table><tr>{head}</tr>{body}</table>"
        notes = "".join(f"<li>{html.escape(x)}</li>" for x in self._lines())
        return f"<b>Cluster</b>{table}<ul>{notes}</ul>"

    def __repr__(self) -> str:
        if not self.rows:
            return "Cluster: no node yet (%cluster add HOST:PORT)\n" + "\n".join(self._lines())
        rows = [self.headers] + self.rows
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.headers))]
        return "Cluster\n" + "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                                       for r in rows) + "\n" + "\n".join(self._lines())
