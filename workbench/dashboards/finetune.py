"""The live view of a fine-tuning run: training and validation loss curves, tokens/s,
ETA and memory, a progress bar and a cancel button.

Events arrive on the job's reader thread and only mark the view stale; a timer thread
redraws at most every REFRESH_S, so a fast run never floods the front end.
"""

from __future__ import annotations

import html
import threading
import time
from typing import Any

from ..progress import format_amount, format_duration, format_rate

REFRESH_S = 0.5


class FinetuneDashboard:
    def __init__(self, job: Any, refresh_s: float = REFRESH_S) -> None:
        import ipywidgets as w
        import plotly.graph_objects as go

        self.job = job
        self.refresh_s = refresh_s
        self._dirty = threading.Event()
        self.figure = go.FigureWidget(layout=go.Layout(
            title={"text": "Loss per token", "font": {"size": 13}}, height=300, width=560,
            margin={"l": 50, "r": 10, "t": 36, "b": 36},
            xaxis={"title": {"text": "step"}}, yaxis={"title": {"text": "loss (nats)"}},
            legend={"orientation": "h", "y": 1.12, "x": 0.5}))
        self.figure.add_scatter(name="training", mode="lines", line={"width": 1.5})
        self.figure.add_scatter(name="validation", mode="lines+markers")
        self.progress = w.IntProgress(value=0, min=0, max=1, description="starting",
                                      layout=w.Layout(width="560px"),
                                      style={"description_width": "90px"})
        self.stats = w.HTML()
        self.notes = w.HTML()
        self.cancel_button = w.Button(description="Cancel", icon="stop", button_style="warning")
        self.cancel_button.on_click(lambda _: job.cancel())
        self.widget = w.VBox([w.HBox([self.progress, self.cancel_button]), self.stats,
                              self.figure, self.notes])
        job.on_event(lambda kind, payload: self._dirty.set())
        self.refresh()
        threading.Thread(target=self._loop, name="finetune-dashboard", daemon=True).start()

    def _loop(self) -> None:
        while not self.job.done:
            if self._dirty.wait(self.refresh_s):
                self._dirty.clear()
                self.refresh()
            time.sleep(self.refresh_s)
        self.refresh()

    def refresh(self) -> None:
        job = self.job
        train, val = list(job.history["train"]), list(job.history["val"])
        with self.figure.batch_update():
            self.figure.data[0].x = [s for s, _ in train]
            self.figure.data[0].y = [v for _, v in train]
            self.figure.data[1].x = [s for s, _ in val]
            self.figure.data[1].y = [v for _, v in val]
        total = max(1, job.total_steps)
        self.progress.max, self.progress.value = total, min(job.step, total)
        self.progress.description = job.status if len(job.status) < 14 else "working"
        self.progress.bar_style = {"finished": "success", "failed": "danger",
                                   "cancelled": "warning"}.get(job.status, "")
        self.cancel_button.disabled = job.done
        self.stats.value = self._stats_html()
        notes = [html.escape(x) for x in job.warnings]
        if len(job.status) >= 14:
            notes.insert(0, html.escape(job.status))
        self.notes.value = "<br>".join(f"<small>{n}</small>" for n in notes)

    def _stats_html(self) -> str:
        job = self.job
        steps = job.history["steps"][-20:]
        if not steps:
            return "<small>loading the model…</small>"
        seconds = max(1e-9, sum(s["seconds"] for s in steps))  # the last 20 steps'
        rate = sum(s["tokens"] for s in steps) / seconds
        left = max(0, job.total_steps - job.step) * seconds / len(steps)
        val = job.history["val"]
        vtxt = f" · validation {val[-1][1]:.3f}" if val else ""
        mem = steps[-1]["memory"] / 2**20
        return (f"<small>{format_amount(job.step, job.total_steps, 'steps')} · "
                f"{format_rate(len(steps) / seconds, 'steps')} · {rate:,.0f} tokens/s · "
                f"ETA {format_duration(left)} · loss {steps[-1]['loss']:.3f}{vtxt} · "
                f"memory {mem:,.0f} MiB</small>")
