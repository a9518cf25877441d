"""llama.cpp's log, kept: a failure quotes its real cause, a load records its buffers."""

from __future__ import annotations

import collections
import os
import re

import llama_cpp as L

from ..engine.protocol import Buffer

_BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|output|compute) buffer size =\s*([\d.]+) MiB")


class Log:
    """Keeps llama.cpp's recent log messages, so a failure can quote its real cause."""

    _ERROR, _CONT = 4, 5  # ggml_log_level

    def __init__(self, echo: bool) -> None:
        self.lines: collections.deque[tuple[int, str]] = collections.deque(maxlen=400)
        self.echo = echo
        self._buffers: list[Buffer] = []
        self._cb = L.llama_log_callback(self._on_log)  # keep a reference: C holds it
        if os.environ.get("WORKBENCH_LLAMA_LOG_CALLBACK", "on") != "off":
            L.llama_log_set(self._cb, None)
        # "off" leaves llama.cpp's own logger (stderr): errors then quote no cause, and
        # loads record no buffer sizes. A switch for diagnosing a build, not for users.

    def _on_log(self, level: int, text: bytes, _user: object) -> None:
        s = text.decode("utf-8", errors="replace")
        self.lines.append((level, s))
        if "buffer size" in s:  # kept apart: a load logs more lines than `lines` holds
            m = _BUFFER_LINE.search(s)
            if m:
                self._buffers.append(Buffer(device=m.group(1), kind=m.group(2),
                                            bytes=int(float(m.group(3)) * 2**20)))
        if self.echo:
            print(s, end="", flush=True)

    def clear(self) -> None:
        self.lines.clear()
        self._buffers.clear()

    def buffers(self) -> tuple[Buffer, ...]:
        """The (non-empty) buffers llama.cpp logged since the last `clear()`."""
        return tuple(b for b in self._buffers if b.bytes)

    def last_error(self) -> str:
        """The first error logged since `lines` was last cleared: the cause, where later
        errors only repeat that loading failed."""
        msgs, current = [], None
        for level, text in self.lines:
            if level == self._ERROR:
                current = [text]
                msgs.append(current)
            elif level == self._CONT and current is not None:
                current.append(text)
            else:
                current = None
        return "".join(msgs[0]).strip() if msgs else ""
