"""The cluster's topology, live: one card per member (this machine and each node) with
its device, memory, the layers it holds and its state, and a plot of each node's
traffic. The cluster's watcher thread calls `refresh` once a second and on events."""

from __future__ import annotations

import html
import time
from typing import Any

import ipywidgets as widgets

from ._live import LivePlot

_COLORS = {"holding layers": "#2ca02c", "ready": "#1f77b4", "lost": "#d62728"}


class TrafficPlot(LivePlot):
    title = "Node traffic"
    y_title = "KiB/s"

    def setup(self) -> None:
        self.series: dict[str, tuple[list[float], list[float]]] = {}

    def add(self, node: str, t: float, kib_s: float) -> None:
        with self._lock:
            xs, ys = self.series.setdefault(node, ([], []))
            xs.append(t - self.t0)
            ys.append(kib_s)
            del xs[:-300], ys[:-300]
        self.mark()

    def draw(self) -> None:
        names = [d.name for d in self.figure.data]
        for node, (xs, ys) in self.series.items():
            if node not in names:
                self.figure.add_scatter(mode="lines", name=node)
                names.append(node)
            trace = self.figure.data[names.index(node)]
            trace.x, trace.y = list(xs), list(ys)
        self.figure.layout.showlegend = len(names) > 1


def _card(title: str, state: str, lines: list[str], used: int, usable: int) -> str:
    pct = 0 if usable <= 0 else min(100, 100 * used / usable)
    color = _COLORS.get(state, "#7f7f7f")
    body = "".join(f"<div>{html.escape(x)}</div>" for x in lines)
    return (f"<div style='display:inline-block;vertical-align:top;width:210px;margin:4px;"
            f"padding:6px;border:2px solid {color};border-radius:6px;font-size:12px'>"
            f"<b>{html.escape(title)}</b> <span style='color:{color}'>{html.escape(state)}</span>"
            f"{body}<div style='background:#eee;height:8px;border-radius:4px;margin-top:4px'>"
            f"<div style='background:{color};width:{pct:.0f}%;height:8px;border-radius:4px'>"
            f"</div></div><div style='color:#555'>{used / 2**20:,.0f} MiB of "
            f"{usable / 2**30:,.2f} GiB usable</div></div>")


class TopologyWidget(widgets.VBox):
    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        self.cards = widgets.HTML()
        self.events = widgets.HTML()
        self.traffic = TrafficPlot(time.time())
        super().__init__([self.cards, self.traffic.figure, self.events])
        self.refresh()
        self._unsubscribe = cluster.subscribe(self.refresh)

    def close(self) -> None:
        self._unsubscribe()
        super().close()

    def refresh(self) -> None:
        c = self.cluster
        plan = c.plan
        cards = []
        local = plan.shares[0] if plan is not None else None
        if local is not None:
            layers = f"layers {local.span}" if len(local.layers) \
                else "embeddings and sampling only"
            cards.append(_card("this machine", "holding layers", [local.member.kind, layers],
                               local.total, local.member.usable))
        now = time.time()
        for e, node in list(c.nodes.items()):
            share = plan.holder(e) if plan is not None else None
            state = c.state_of(e)
            lines = [f"{node.info.kind}, RPC {node.info.version}, RTT {node.info.rtt_ms:.1f} ms"]
            if share is not None:
                lines.append(f"layers {share.span}")
                rin, rout = node.rate()
                lines.append(f"traffic in {rin / 1024:,.0f} / out {rout / 1024:,.0f} KiB/s")
                self.traffic.add(e, now, (rin + rout) / 1024)
            cards.append(_card(e, state, lines, share.total if share else 0, node.info.usable))
        self.cards.value = "".join(cards) or "<i>No node yet: %cluster add HOST:PORT</i>"
        self.events.value = "<br>".join(
            html.escape(time.strftime("%H:%M:%S ", time.localtime(ev.time)) + ev.text)
            for ev in c.events[-6:])
        self.traffic.refresh()
