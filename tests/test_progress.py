"""Progress: counts, rate and time left, formatted the same in a terminal and a widget.

The bars take their clock as a parameter; these tests drive a fake one, so nothing here
depends on how fast the machine is. The ends: a download from the stand-in Hub on
loopback (bytes), and a real quantization in its child process (tensors)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re

import pytest

from workbench.progress import (Meter, TextBar, _Deferred, _WidgetBar, advance,
                                format_amount, format_duration, format_rate)

GiB, MiB = 2 ** 30, 2 ** 20


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def feed(bar, clock: FakeClock, total: float, per_s: float, seconds: float,
         start: float = 0.0, unit: str = "steps", every: float = 0.1) -> float:
    """Report `per_s` units a second for `seconds`, a report every `every` s."""
    done = start
    for _ in range(round(seconds / every)):
        clock.now += every
        done = min(total, done + per_s * every)
        bar(done / total, done, total, unit)
    return done


# ---- text ---------------------------------------------------------------------------

def test_amounts_of_bytes_items_and_percent():
    assert format_amount(1.2 * GiB, 3.4 * GiB, "B") == "1.2/3.4 GiB"
    assert format_amount(412 * MiB, 980 * MiB, "B") == "412/980 MiB"
    assert format_amount(500, 900, "B") == "500/900 B"
    assert format_amount(3.4 * GiB, None, "B") == "3.4 GiB"
    assert format_amount(412, 1000, "steps") == "412/1,000 steps"
    assert format_amount(411.6, 1000, "tensors") == "412/1,000 tensors"
    assert format_amount(7, None, "") == "7"
    assert format_amount(37.4, 100, "%") == "37%"


def test_rates_and_durations():
    assert format_rate(48 * MiB, "B") == "48 MiB/s"
    assert format_rate(1.25 * GiB, "B") == "1.2 GiB/s"
    assert format_rate(23.14, "steps") == "23.1 steps/s"
    assert format_rate(1234, "tensors") == "1,234 tensors/s"
    assert format_rate(1 / 75, "benchmarks") == "0.8 benchmarks/min"
    assert format_rate(1 / 7200, "runs") == "0.5 runs/h"
    assert format_rate(2.1, "%") == "2.1 %/s"
    assert format_duration(25.4) == "25 s"
    assert format_duration(185) == "3 min 05 s"
    assert format_duration(3700) == "1 h 01 min"


# ---- the numbers --------------------------------------------------------------------

def test_counts_rate_and_time_left_of_steps():
    clock = FakeClock()
    m = Meter(clock=clock)
    feed(m.update, clock, 1000, 20, 20, every=0.25)
    assert m.status() == "40% · 400/1,000 steps · 20.0 steps/s · 30 s left"


def test_bytes_of_a_download():
    clock = FakeClock()
    m = Meter(clock=clock)
    feed(m.update, clock, 3.4 * GiB, 48 * MiB, 1.2 * GiB / (48 * MiB), unit="B")
    assert m.status() == "35% · 1.2/3.4 GiB · 48 MiB/s · 47 s left"
    assert m.summary() == "1.2 GiB in 26 s (48 MiB/s)"


def test_the_rate_follows_the_work_as_it_is_now():
    clock = FakeClock()
    m = Meter(clock=clock)
    done = feed(m.update, clock, 10_000, 10, 60)
    feed(m.update, clock, 10_000, 40, 30, start=done)
    assert m.rate is not None and m.rate > 38  # since the start it would be 20
    assert m.seconds_left == pytest.approx((10_000 - 1800) / m.rate)


def test_only_a_fraction_still_gives_a_rate_and_time_left():
    clock = FakeClock()
    m = Meter(clock=clock)
    for i in range(38):
        m.update(i / 100)
        clock.now += 0.5
    assert m.status() == "37% · 2.0 %/s · 32 s left"
    assert m.summary() == "19 s"


def test_a_total_given_at_the_start_turns_fractions_into_counts():
    clock = FakeClock()
    m = Meter("B", 2 * GiB, clock)  # a model load: llama.cpp tells only fractions
    assert m.status() == "0% · 0.0/2.0 GiB"
    clock.now += 2
    m.update(0.25)
    assert m.status() == "25% · 0.5/2.0 GiB · 256 MiB/s · 6 s left"


def test_a_new_phase_starts_a_new_rate():
    clock = FakeClock()
    m = Meter(clock=clock)
    feed(m.update, clock, 100, 10, 5, unit="layers")
    assert m.rate == pytest.approx(10)
    clock.now += 1
    m.update(0.0, 0, 400, "tensors")
    assert m.rate is None and m.status() == "0% · 0/400 tensors"


# ---- the bars -----------------------------------------------------------------------

def test_the_text_bar_writes_counts_and_time_left_and_redraws_a_few_times_a_second():
    clock, out = FakeClock(), io.StringIO()
    bar = TextBar("Fine-tuning tiny", stream=out, clock=clock)
    feed(bar, clock, 1000, 100, 10, every=0.01)  # a thousand reports in ten seconds
    bar.close()
    text = out.getvalue()
    lines = text.split("\r")[1:]
    assert len(lines) <= 10 / 0.25 + 2  # not one line per report
    counting = re.compile(r"Fine-tuning tiny \d+% · \d+/1,000 steps · 100 steps/s · \d s left$")
    assert sum(bool(counting.match(x.rstrip())) for x in lines) > 30
    assert lines[-1] == "Fine-tuning tiny done: 1,000 steps in 10 s (100 steps/s)\n"
    assert "Fine-tuning tiny 100% · 1,000/1,000 steps" in lines[-2]  # the end is drawn


def test_a_shorter_line_clears_the_longer_one_before_it():
    clock, out = FakeClock(), io.StringIO()
    bar = TextBar("x", stream=out, clock=clock)
    bar(0.5, 5, 10, "tensors")
    bar.close("ok")
    first, second = out.getvalue().split("\r")[1:]
    assert len(second.rstrip("\n")) >= len(first) and second.startswith("x done: ok ")


def test_the_widget_shows_the_same_status_throttled():
    pytest.importorskip("ipywidgets")
    clock = FakeClock()
    bar = _WidgetBar("Quantizing tiny", clock=clock)
    feed(bar, clock, 201, 20, 5, unit="tensors", every=0.25)
    assert bar.note.value == "50% · 100/201 tensors · 20.0 tensors/s · 5 s left"
    assert bar.bar.value == pytest.approx(100 / 201)
    clock.now += 0.01
    bar(0.6, 120, 201, "tensors")  # too soon after the last redraw
    assert bar.note.value.startswith("50% ")
    bar.close()
    assert bar.bar.bar_style == "success" and bar.note.value.startswith("120 tensors in 5 s")


def test_counts_go_to_a_bar_and_a_plain_callable_gets_the_fraction():
    clock, out = FakeClock(), io.StringIO()
    bar = TextBar("t", stream=out, clock=clock)
    advance(bar, 0.25, 1, 4, "benchmarks")
    seen: list[float] = []
    advance(seen.append, 0.25, 1, 4, "benchmarks")
    advance(None, 0.5)
    assert "1/4 benchmarks" in out.getvalue() and seen == [0.25]


def test_a_lazy_bar_shows_nothing_until_work_is_reported():
    made = []
    idle = _Deferred(lambda: made.append(1))
    idle.close()
    assert not made
    out = io.StringIO()
    lazy = _Deferred(lambda: TextBar("Fetching", stream=out, clock=FakeClock()))
    lazy(0.5, 512, 1024, "B")
    lazy.close()
    assert "0.5/1.0 KiB" in out.getvalue() and "done" in out.getvalue()


# ---- the ends -----------------------------------------------------------------------

def test_a_download_shows_bytes(tmp_path, monkeypatch):
    from hub_server import HubServer
    from workbench.models.resolve import resolve

    for k in ("HF_HUB_CACHE", "OLLAMA_MODELS", "LMSTUDIO_MODELS", "WORKBENCH_MODELS"):
        monkeypatch.setenv(k, str(tmp_path / k.lower()))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    data = os.urandom(3 * MiB)
    catalog = {"schema": 1, "models": [{
        "id": "tiny-test", "name": "Tiny test model", "family": "tiny", "params": None,
        "architecture": "llama", "license": None, "context_length": 512, "shape": None,
        "variants": [{"quant": "Q4_0", "repo": "lab/tiny-GGUF", "file": "tiny.Q4_0.gguf",
                      "revision": None, "size": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()}],
        "source": "tests/test_progress.py"}]}
    (tmp_path / "catalog.json").write_text(json.dumps(catalog))
    monkeypatch.setenv("WORKBENCH_CATALOG", str(tmp_path / "catalog.json"))
    out = io.StringIO()
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        server.hub.publish("lab/tiny-GGUF", {"tiny.Q4_0.gguf": data})
        bar = TextBar("Fetching tiny-test", stream=out)
        resolve("tiny-test:q4_0", progress=bar)
        bar.close()
    text = out.getvalue()
    assert "/3.0 MiB" in text and "Fetching tiny-test done: 3.0 MiB in " in text


def test_quantization_counts_tensors(tmp_path):
    pytest.importorskip("llama_cpp")
    from workbench.compress.quantize import quantize
    from workbench.models import synthetic
    from workbench.models.gguf_file import read_header

    src = synthetic("tiny", "f16", tmp_path / "tiny.F16.gguf")
    n = len(read_header(src).tensors)
    reports: list[tuple] = []

    class Recorder:
        takes_counts = True

        def __call__(self, *report) -> None:
            reports.append(report)

    quantize(src, "Q8_0", tmp_path / "tiny.Q8_0.gguf", progress=Recorder())
    assert reports and all(r[3] == "tensors" and r[2] == n for r in reports)
    assert reports[-1][:3] == (1.0, n, n)


def test_on_a_narrow_terminal_the_label_gives_way_to_the_numbers(monkeypatch):
    class Narrow(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setenv("COLUMNS", "60")
    clock, out = FakeClock(), Narrow()
    bar = TextBar("Quantizing SmolLM2-135M-Instruct.Q4_1.gguf", stream=out, clock=clock)
    feed(bar, clock, 272, 80, 1, unit="tensors", every=0.25)
    line = out.getvalue().split("\r")[-1]
    assert len(line) < 60 and line.startswith("Quantizin… 29% · ")
    assert line.endswith("80/272 tensors · 80.0 tensors/s · 2 s left")
