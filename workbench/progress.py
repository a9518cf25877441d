"""One progress protocol for long work, and the bars that show it.

A progress callback takes the fraction done, in [0, 1], and may take counts too:
`progress(fraction, done=None, total=None, unit=None)`, where `unit` is "B" for bytes
or a plural noun ("tensors", "steps", "runs"). Code that knows counts reports through
`advance`, which gives them to a callback that takes them (one with a true
`takes_counts`, as every bar here has) and the fraction alone to any other callable,
so `progress=list.append` keeps working.

`progress_bar(label)` gives a widget in a notebook, a line on a terminal's stderr, and
nothing elsewhere. Both show the same status, redrawn at most every REDRAW_S seconds:

    41% · 412/1,000 steps · 23.1 steps/s · 25 s left
    35% · 1.2/3.4 GiB · 48 MiB/s · 46 s left
    37% · 2.1 %/s · 30 s left          (only a fraction known)

The rate is a moving average with a time constant of RATE_S seconds, so it follows the
work as it is now (a download that slows down, a phase that speeds up), not since the
start; the time left is what remains divided by it.
"""

from __future__ import annotations

import html
import math
import shutil
import sys
import time
from typing import Any, Callable, Protocol, TextIO

REDRAW_S = 0.25  # a bar redraws at most this often (seconds)
SAMPLE_S = 0.5   # the rate takes a sample at most this often (seconds)
RATE_S = 5.0     # the moving average's time constant (seconds)

Clock = Callable[[], float]


class ProgressBar(Protocol):
    takes_counts: bool

    def __call__(self, fraction: float, done: float | None = None,
                 total: float | None = None, unit: str | None = None) -> None: ...
    def close(self, message: str = "") -> None: ...


ProgressCallback = Callable[[float], None]  # any callable taking the fraction done


def advance(progress: Callable[..., Any] | None, fraction: float, done: float | None = None,
            total: float | None = None, unit: str | None = None) -> None:
    """Report to `progress`: the counts too where it takes them, else the fraction."""
    if progress is None:
        return
    if done is not None and getattr(progress, "takes_counts", False):
        progress(fraction, done, total, unit)
    else:
        progress(fraction)


# ---- text ---------------------------------------------------------------------------

_BINARY = ("B", "KiB", "MiB", "GiB", "TiB")


def _scale(n: float) -> tuple[float, str]:
    i = 0
    while abs(n) >= 1024 and i < len(_BINARY) - 1:
        n, i = n / 1024, i + 1
    return n, _BINARY[i]


def format_amount(done: float, total: float | None, unit: str) -> str:
    """"412/1,000 steps", "1.2/3.4 GiB" (both in the larger one's scale), "37%"."""
    if unit == "%":
        return f"{done:.0f}%"
    if unit == "B":
        big, name = _scale(max(done, total or 0))
        div = max(done, total or 0) / big if big else 1
        places = 0 if name == "B" or big >= 100 else 1
        d = f"{done / div:.{places}f}"
        return f"{d}/{total / div:.{places}f} {name}" if total is not None else f"{d} {name}"
    d = f"{round(done):,}"
    text = f"{d}/{round(total):,}" if total is not None else d
    return f"{text} {unit}" if unit else text


def format_rate(per_s: float, unit: str) -> str:
    """"48 MiB/s", "23.1 steps/s"; a slow count per minute or hour: "0.8 runs/min"."""
    if unit == "B":
        v, name = _scale(per_s)
        return f"{v:.{1 if v < 10 and name != 'B' else 0}f} {name}/s"
    v, per = per_s, "s"
    if 0 < v < 0.1:
        v, per = v * 60, "min"
        if v < 0.1:
            v, per = v * 60, "h"
    number = f"{v:,.0f}" if v >= 100 else f"{v:.1f}"
    return f"{number} %/{per}" if unit == "%" else f"{number} {unit or 'items'}/{per}"


def format_duration(seconds: float) -> str:
    """"25 s", "3 min 05 s", "1 h 12 min"."""
    s = max(0, int(seconds + 0.5))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


# ---- the numbers --------------------------------------------------------------------

class Meter:
    """How far one piece of work is: counts, a smoothed rate (units per second) and
    the time left (seconds). `clock` gives seconds; tests pass a fake one.

    Only a fraction known: the counts are percent. A bar given a `total` at the start
    turns a bare fraction into that many units (a model load: bytes of the file), and
    starts its clock at 0 done; one without starts it at the first report (a resumed
    download's first report is not all done since then)."""

    def __init__(self, unit: str | None = None, total: float | None = None,
                 clock: Clock = time.monotonic) -> None:
        self.unit, self.total, self.clock = unit, total, clock
        self.fraction = 0.0
        self.done: float | None = None       # in `shown_unit`
        self.shown_unit = unit if unit is not None and total is not None else "%"
        self.rate: float | None = None        # shown_unit per second
        self.first: tuple[float, float] | None = (clock(), 0.0) if total is not None else None
        self.last = self.first
        if self.first is not None:
            self.done = 0.0
        self._mark = self.first                # the last rate sample: (time, done)

    def update(self, fraction: float, done: float | None = None, total: float | None = None,
               unit: str | None = None) -> None:
        self.fraction = max(0.0, min(1.0, float(fraction)))
        if unit is not None:
            self.unit = unit
        if total is not None:
            self.total = total
        if done is not None:
            shown, value = self.unit or "", float(done)
        elif self.total is not None and self.unit is not None:
            shown, value = self.unit, self.fraction * self.total
        else:
            shown, value = "%", self.fraction * 100
        now = self.clock()
        if shown != self.shown_unit or (self.done is not None and value < self.done):
            self.first = self._mark = None  # another unit, or a new phase: a new rate
            self.rate = None
        self.shown_unit, self.done = shown, value
        if self._mark is None:
            self.first = self._mark = (now, value)
        elif now - self._mark[0] >= SAMPLE_S:
            dt = now - self._mark[0]
            now_rate = (value - self._mark[1]) / dt
            weight = 1 - math.exp(-dt / RATE_S)
            self.rate = now_rate if self.rate is None else \
                self.rate + weight * (now_rate - self.rate)
            self._mark = (now, value)
        self.last = (now, value)

    @property
    def shown_total(self) -> float | None:
        return 100.0 if self.shown_unit == "%" else self.total

    @property
    def seconds_left(self) -> float | None:
        total = self.shown_total
        if self.rate is None or self.rate <= 0 or total is None or self.done is None:
            return None
        return max(0.0, total - self.done) / self.rate

    def status(self) -> str:
        """"41% · 412/1,000 steps · 23.1 steps/s · 25 s left"."""
        parts = [f"{self.fraction * 100:.0f}%"]
        if self.shown_unit != "%" and self.done is not None:
            parts.append(format_amount(self.done, self.total, self.shown_unit))
        if self.rate is not None:
            parts.append(format_rate(self.rate, self.shown_unit))
        left = self.seconds_left
        if left is not None and self.fraction < 1.0:
            parts.append(f"{format_duration(left)} left")
        return " · ".join(parts)

    def summary(self) -> str:
        """What was done, in how long, at what mean rate: "3.4 GiB in 1 min 11 s (48 MiB/s)"."""
        if self.first is None or self.last is None or self.done is None:
            return ""
        seconds = self.last[0] - self.first[0]
        if self.shown_unit == "%":
            return format_duration(seconds)
        text = f"{format_amount(self.done, None, self.shown_unit)} in {format_duration(seconds)}"
        if seconds > 0 and self.done > self.first[1]:
            text += f" ({format_rate((self.done - self.first[1]) / seconds, self.shown_unit)})"
        return text


# ---- the bars -----------------------------------------------------------------------

class _Shown:
    """A bar that draws its meter's status, at most every REDRAW_S (and at the end)."""
    takes_counts = True

    def __init__(self, label: str, unit: str | None, total: float | None, clock: Clock) -> None:
        self.label, self.clock = label, clock
        self.meter = Meter(unit, total, clock)
        self._drawn: float | None = None
        self._full = False

    def __call__(self, fraction: float, done: float | None = None,
                 total: float | None = None, unit: str | None = None) -> None:
        self.meter.update(fraction, done, total, unit)
        now = self.clock()
        full = self.meter.fraction >= 1.0
        if self._drawn is None or now - self._drawn >= REDRAW_S or (full and not self._full):
            self._drawn = now
            self.draw()
        self._full = full  # the end of each phase is drawn

    def close(self, message: str = "") -> None:
        self.finish(message or self.meter.summary())

    def draw(self) -> None:
        raise NotImplementedError

    def finish(self, message: str) -> None:
        raise NotImplementedError


class TextBar(_Shown):
    """One line on a terminal, rewritten in place ("\\r"), never wider than the terminal."""

    def __init__(self, label: str, *, unit: str | None = None, total: float | None = None,
                 stream: TextIO | None = None, clock: Clock = time.monotonic) -> None:
        super().__init__(label, unit, total, clock)
        self.stream = stream if stream is not None else sys.stderr
        self._width = len(label)

    def _columns(self) -> int | None:
        isatty = getattr(self.stream, "isatty", None)
        return shutil.get_terminal_size().columns if isatty and isatty() else None

    def _write(self, text: str, end: str = "") -> None:
        """`label text`; where it would wrap, the label gives way before the numbers."""
        label, columns = self.label, self._columns()
        if columns and len(label) + 1 + len(text) >= columns:
            room = max(8, columns - 2 - len(text))
            label = label if len(label) <= room else label[:room - 1] + "…"
        line = f"{label} {text}"
        if columns and len(line) >= columns:
            line = line[:columns - 2] + "…"
        self.stream.write("\r" + line.ljust(self._width) + end)
        self.stream.flush()
        self._width = 0 if end else len(line)

    def draw(self) -> None:
        self._write(self.meter.status())

    def finish(self, message: str) -> None:
        self._write(f"done{': ' + message if message else ''}", end="\n")


class _WidgetBar(_Shown):
    def __init__(self, label: str, *, unit: str | None = None, total: float | None = None,
                 clock: Clock = time.monotonic) -> None:
        import ipywidgets as w
        from IPython.display import display

        super().__init__(label, unit, total, clock)
        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, description=label,
                                   style={"description_width": "initial"},
                                   layout=w.Layout(width="480px"))
        self.note = w.HTML("")
        self.box = w.HBox([self.bar, self.note])
        display(self.box)

    def draw(self) -> None:
        self.bar.value = self.meter.fraction
        self.note.value = html.escape(self.meter.status())

    def finish(self, message: str) -> None:
        self.bar.value = 1.0
        self.bar.bar_style = "success"
        self.note.value = html.escape(message)


class _Silent:
    takes_counts = True

    def __call__(self, fraction: float, done: float | None = None,
                 total: float | None = None, unit: str | None = None) -> None:
        pass

    def close(self, message: str = "") -> None:
        pass


class _Deferred:
    """A bar made at the first report: nothing shows for work that turns out not to
    be needed (a model already in the cache)."""
    takes_counts = True

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make, self.bar = make, None

    def __call__(self, fraction: float, done: float | None = None,
                 total: float | None = None, unit: str | None = None) -> None:
        if self.bar is None:
            self.bar = self.make()
        self.bar(fraction, done, total, unit)

    def close(self, message: str = "") -> None:
        if self.bar is not None:
            self.bar.close(message)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def progress_bar(label: str, enabled: bool = True, *, unit: str | None = None,
                 total: float | None = None, lazy: bool = False) -> ProgressBar:
    """A bar for `label`: a widget in a notebook, a line on a terminal's stderr, else
    nothing. `unit` and `total` (in that unit: bytes for "B") turn bare fractions into
    counts; reports with counts name their own. `lazy`: show nothing until the first
    report."""
    if not enabled:
        return _Silent()
    if lazy:
        return _Deferred(lambda: progress_bar(label, unit=unit, total=total))
    if _in_notebook():
        return _WidgetBar(label, unit=unit, total=total)
    if sys.stderr.isatty():
        return TextBar(label, unit=unit, total=total)
    return _Silent()
