"""A replicated service watched live: per replica, its streams in progress, the share of
prompt tokens it restored from its prefix cache, and its mean time to first token.

It reads the service's own endpoints once a second (`/health` for the streams each replica
is serving, `/metrics` for the router's and the replicas' counters), so it works for a
service in another process or on another machine. `sample()` takes one reading (the
timer's, or a test's); `start()` and `stop()` run the timer.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from typing import Any

_FAMILIES = ("workbench_replica_requests_total", "workbench_replica_prompt_tokens_total",
             "workbench_replica_cached_tokens_total", "workbench_replica_ttft_seconds_sum")


def parse_metrics(text: str) -> dict[str, dict[str, float]]:
    """Prometheus text -> {family: {replica label (or ""): value}} for the families read
    here and the router's hit rate."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, _, value = line.rpartition(" ")
        name, _, labels = key.partition("{")
        if name not in _FAMILIES and name != "workbench_router_prefix_hit_rate":
            continue
        replica = ""
        if 'replica="' in labels:
            replica = labels.split('replica="', 1)[1].split('"', 1)[0]
        out.setdefault(name, {})[replica] = float(value)
    return out


class ReplicaMonitor:
    def __init__(self, url: str, api_key: str | None = None, period_s: float = 1.0) -> None:
        import ipywidgets as widgets
        import plotly.graph_objects as go

        self.url, self.api_key, self.period_s = url.rstrip("/"), api_key, period_s
        self.t0 = time.monotonic()
        self.history: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.figures = {}
        for key, title, y in (("streams", "Streams in progress", "streams"),
                              ("hit", "Prompt restored from cache", "share"),
                              ("ttft", "Mean TTFT", "seconds")):
            self.figures[key] = go.FigureWidget(layout=go.Layout(
                title={"text": title, "font": {"size": 13}}, height=240, width=330,
                margin={"l": 50, "r": 10, "t": 36, "b": 36}, showlegend=key == "streams",
                legend={"font": {"size": 9}}, xaxis={"title": {"text": "seconds"}},
                yaxis={"title": {"text": y}, "rangemode": "tozero",
                       **({"range": [0, 1.05], "tickformat": ".0%"} if key == "hit" else {})}))
        self.widget = widgets.HBox(list(self.figures.values()))

    def _get(self, path: str) -> str:
        req = urllib.request.Request(self.url + path, headers={
            "Authorization": f"Bearer {self.api_key}"} if self.api_key else {})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()

    def sample(self) -> dict[str, Any]:
        """One reading: {"t", "replicas": {replica: {streams, requests, hit, ttft}},
        "router_hit_rate"}; the plots are redrawn with it."""
        health = json.loads(self._get("/health"))
        m = parse_metrics(self._get("/metrics"))
        reps: dict[str, dict[str, float | None]] = {}
        names = {r["replica"] for r in health.get("replicas", [])} | \
            set(m.get("workbench_replica_requests_total", {}))
        for r in sorted(names):
            n = m.get("workbench_replica_requests_total", {}).get(r, 0.0)
            prompt = m.get("workbench_replica_prompt_tokens_total", {}).get(r, 0.0)
            cached = m.get("workbench_replica_cached_tokens_total", {}).get(r, 0.0)
            ttft = m.get("workbench_replica_ttft_seconds_sum", {}).get(r, 0.0)
            streams = sum(x["streams"] for x in health.get("replicas", []) if x["replica"] == r)
            reps[r] = {"streams": streams, "requests": n,
                       "hit": cached / prompt if prompt else None,
                       "ttft": ttft / n if n else None}
        point = {"t": time.monotonic() - self.t0, "replicas": reps,
                 "router_hit_rate": m.get("workbench_router_prefix_hit_rate", {}).get("")}
        with self._lock:
            self.history.append(point)
            self._draw()
        return point

    def _draw(self) -> None:
        names = sorted({r for p in self.history for r in p["replicas"]})
        for key, fig in self.figures.items():
            series = []
            for r in names:
                pts = [(p["t"], p["replicas"][r][key]) for p in self.history
                       if r in p["replicas"] and p["replicas"][r][key] is not None]
                series.append((r, [t for t, _ in pts], [v for _, v in pts]))
            with fig.batch_update():
                while len(fig.data) < len(series):
                    fig.add_scatter(mode="lines+markers", marker={"size": 4})
                for trace, (r, xs, ys) in zip(fig.data, series):
                    trace.name, trace.x, trace.y = f"replica {r}", xs, ys

    def start(self) -> "ReplicaMonitor":
        def loop() -> None:
            while not self._stop.wait(self.period_s):
                try:
                    self.sample()
                except OSError:  # the service is restarting or gone: try again
                    pass

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="replica-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
