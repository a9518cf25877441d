"""A dry run in a process of its own: the buffers llama.cpp would allocate for a
configuration, with nothing allocated. It runs apart from the worker, so a failure in
llama.cpp's dry-run path costs the plan its measurement, never the loaded model."""

from __future__ import annotations

import os
import traceback
from typing import Any

from ..config import LoadConfig
from ..errors import WorkbenchError
from ..engine import protocol as P


def main(path: str, config: LoadConfig, reply: Any) -> None:
    try:
        from .runtime import Runtime

        buffers = Runtime(echo_log=bool(os.environ.get("WORKBENCH_LLAMA_LOG"))
                          ).measure_buffers(path, config)
        reply.send(P.Buffers(id="probe", buffers=buffers))
    except WorkbenchError as e:
        reply.send(P.Failed(id="probe", kind=type(e).__name__, message=e.message, hint=e.hint))
    except Exception:
        reply.send(P.Failed(id="probe", kind="bug", message=traceback.format_exc(), hint=""))
