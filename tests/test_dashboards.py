"""The dashboard follows a real generation: its figures fill while tokens stream."""

from __future__ import annotations

import time

import workbench
from workbench.dashboards import Dashboard


def test_dashboard_updates_during_generation(loaded):
    d = workbench.dashboard()
    assert isinstance(d, Dashboard) and d.running
    assert workbench.dashboard() is d  # one per engine
    s = workbench.generate("Once upon a time", stream=True, max_tokens=150, ignore_eos=True)
    rates = []
    for i, _ in enumerate(s):
        if i % 25 == 24:
            d.refresh()
            rates.append(d.throughput.figure.data[0].y[-1])
    # the throughput line was drawn while the request was still running
    assert len(rates) >= 5 and all(r > 0 for r in rates)
    time.sleep(1.3)  # the worker's memory report comes once a second
    d.refresh()
    ttft = d.ttft.figure.data[0]
    assert ttft.x[-1] == s.id and ttft.y[-1] == s.metrics.ttft_s * 1000
    assert d.memory.figure.data[0].y[-1] > 50  # MiB
    assert "tok/s" in d.header.value and "SmolLM2" in d.header.value
    # the prefix cache panel: tier occupancy against budgets, and hit counts
    assert d.cache.kv is not None
    assert list(d.cache.figure.data[0].x) == ["RAM", "disk"]
    assert d.cache.figure.data[1].y[0] == d.cache.kv["ram_budget"] / 2**20
    assert "misses" in d.cache.figure.layout.title.text


def test_dashboard_thread_starts_and_stops(loaded):
    d = Dashboard(workbench.engine(), refresh_s=0.05)
    assert d.running
    d.stop()
    assert not d.running and d.stop_button.disabled
    n = len(workbench.engine()._listeners)
    workbench.generate("Hi", max_tokens=2)
    assert len(workbench.engine()._listeners) == n  # unsubscribed
    d.start()
    assert d.running
    d.stop_button.click()
    assert not d.running
