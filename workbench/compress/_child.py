"""Running llama.cpp work in a spawned child process: a crash there is an error here,
and the kernel keeps running. The child reports progress and its result through a pipe."""

from __future__ import annotations

import multiprocessing as mp
import signal
import traceback
from typing import Any, Callable

from ..errors import WorkbenchError

_MISSING = object()


class Report:
    """What the child's target gets to report with."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def progress(self, fraction: float) -> None:
        self.conn.send(("progress", float(fraction)))


def _main(target: Callable[..., Any], args: tuple[Any, ...], conn: Any) -> None:
    try:
        result = target(*args, report=Report(conn))
        conn.send(("done", result))
    except WorkbenchError as e:
        conn.send(("error", e.message, e.hint))
    except Exception:
        conn.send(("bug", traceback.format_exc()))


def run(target: Callable[..., Any], args: tuple[Any, ...], what: str,
        progress: Callable[[float], None] | None = None) -> Any:
    """Run `target(*args, report=...)` in a spawned process and return its result.
    `what` names the work in errors ("quantizing X")."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_main, args=(target, args, child), daemon=True)
    proc.start()
    child.close()
    result: Any = _MISSING
    try:
        while result is _MISSING:
            if parent.poll(0.2):
                try:
                    kind, *rest = parent.recv()
                except EOFError:
                    break
                if kind == "progress" and progress is not None:
                    progress(rest[0])
                elif kind == "done":
                    result = rest[0]
                elif kind == "error":
                    raise WorkbenchError(rest[0], rest[1])
                elif kind == "bug":
                    raise RuntimeError(f"{what} failed in its child process:\n{rest[0]}")
            elif not proc.is_alive() and not parent.poll(0):
                break
    except KeyboardInterrupt:
        proc.terminate()
        raise
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
        parent.close()
    if result is _MISSING:
        code = proc.exitcode
        how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exited with code {code}")
        raise WorkbenchError(f"{what}: the child process {how}",
                             "The kernel and the loaded model are unaffected. Run it again; if "
                             "it fails again, the model file may be unusual.")
    return result
