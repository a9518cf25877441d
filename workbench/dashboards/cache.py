"""The prefix cache: hits by tier, tier occupancy against budgets, tokens not recomputed."""

from __future__ import annotations

from typing import Any

from ._live import LivePlot


class CachePlot(LivePlot):
    title = "KV prefix cache"
    y_title = "MiB"

    def x_title(self) -> str:
        return ""

    def setup(self) -> None:
        self.kv: dict[str, Any] | None = None
        self.figure.add_bar(name="used", marker={"color": "#9467bd"})
        self.figure.add_bar(name="budget", marker={"color": "#ddd"})
        self.figure.update_layout(barmode="overlay")

    def on_event(self, kind: str, payload: Any) -> None:
        if kind == "stats" and payload.kv is not None and payload.kv != self.kv:
            self.kv = payload.kv
            self.mark()

    def summary(self) -> str:
        k = self.kv
        if not k:
            return "prefix cache off"
        return (f"hits: {k['hits_ram']} RAM, {k['hits_disk']} disk, {k['misses']} misses · "
                f"{k['tokens_saved']:,} prompt tokens not recomputed")

    def draw(self) -> None:
        k = self.kv or {}
        tiers = ["RAM", "disk"]
        used = [k.get("ram_bytes", 0) / 2**20, k.get("disk_bytes", 0) / 2**20]
        budget = [k.get("ram_budget", 0) / 2**20, k.get("disk_budget", 0) / 2**20]
        self.figure.data[1].x, self.figure.data[1].y = tiers, budget
        self.figure.data[0].x, self.figure.data[0].y = tiers, used
        # a few MiB against a budget of GiB is invisible as a bar: say it in words too
        self.figure.data[0].text = [f"{u:,.0f} MiB used" for u in used]
        self.figure.data[0].textposition = "outside"
        self.figure.layout.title.text = f"KV prefix cache<br><sup>{self.summary()}</sup>"
