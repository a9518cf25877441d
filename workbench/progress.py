"""One progress protocol for long work: a callable taking a fraction in [0, 1].

`progress_bar(label)` gives a widget in a notebook, a line on a terminal's
stderr, and nothing elsewhere; every long operation reports through it.
"""

from __future__ import annotations

import sys
from typing import Callable, Protocol


class ProgressBar(Protocol):
    def __call__(self, fraction: float) -> None: ...
    def close(self, message: str = "") -> None: ...


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


class _WidgetBar:
    def __init__(self, label: str) -> None:
        import ipywidgets as w
        from IPython.display import display

        self.bar = w.FloatProgress(value=0.0, min=0.0, max=1.0, description=label,
                                   style={"description_width": "initial"},
                                   layout=w.Layout(width="480px"))
        self.note = w.HTML("")
        self.box = w.HBox([self.bar, self.note])
        display(self.box)

    def __call__(self, fraction: float) -> None:
        self.bar.value = max(0.0, min(1.0, fraction))
        self.note.value = f"{fraction:.0%}"

    def close(self, message: str = "") -> None:
        self.bar.value = 1.0
        self.bar.bar_style = "success"
        self.note.value = message


class _TextBar:
    def __init__(self, label: str) -> None:
        self.label, self.shown = label, -1

    def __call__(self, fraction: float) -> None:
        pct = int(fraction * 100)
        if pct != self.shown:
            self.shown = pct
            sys.stderr.write(f"\r{self.label} {pct:3d}%")
            sys.stderr.flush()

    def close(self, message: str = "") -> None:
        sys.stderr.write(f"\r{self.label} done{': ' + message if message else ''}\n")


class _Silent:
    def __call__(self, fraction: float) -> None:
        pass

    def close(self, message: str = "") -> None:
        pass


def progress_bar(label: str, enabled: bool = True) -> ProgressBar:
    if not enabled:
        return _Silent()
    if _in_notebook():
        return _WidgetBar(label)
    if sys.stderr.isatty():
        return _TextBar(label)
    return _Silent()


ProgressCallback = Callable[[float], None]
