"""Every child process the workbench starts: the engine worker, the dry-run probe,
compression and merge runs, fine-tuning.

Children are spawned (never forked: the kernel's threads and llama.cpp's must not be
copied) and daemonic (they end with the kernel). A target is named as "module:function"
and imported in the child, so the kernel need not import the code that runs there; that
is how `llama_cpp` stays out of the kernel. `run` adds the request-reply protocol of a
one-shot job: progress, a result, or an error that fails the job and not the kernel.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import signal
import traceback
from typing import Any, Callable

from .errors import WorkbenchError
from .progress import advance

CONTEXT = mp.get_context("spawn")  # queues, pipes and events for children come from here
_MISSING = object()



def _target(target: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _enter(target: str | Callable[..., Any], args: tuple[Any, ...]) -> None:
    _target(target)(*args)


def start(target: str | Callable[..., Any], args: tuple[Any, ...], *, name: str) -> Any:
    """Start `target(*args)` in a spawned daemon process named `name`; returns it."""
    proc = CONTEXT.Process(target=_enter, args=(target, args), name=name, daemon=True)
    proc.start()
    return proc


def describe_exit(code: int | None) -> str:
    """How a child ended, in words ("was killed by SIGKILL (...)")."""
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        extra = " (the system sends this when memory runs out, or someone killed it)" \
            if -code == signal.SIGKILL else ""
        return f"was killed by {name}{extra}"
    return f"exited with code {code}"


class Report:
    """What a `run` target gets to report with; itself a progress callback (see
    workbench/progress.py) that takes counts."""
    takes_counts = True

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def progress(self, fraction: float, done: float | None = None, total: float | None = None,
                 unit: str | None = None) -> None:
        """The fraction done, and where known the count `done` of `total` `unit`s."""
        self.conn.send(("progress", float(fraction), done, total, unit))

    __call__ = progress


def _job(target: str | Callable[..., Any], args: tuple[Any, ...], conn: Any) -> None:
    try:
        result = _target(target)(*args, report=Report(conn))
        conn.send(("done", result))
    except WorkbenchError as e:
        conn.send(("error", e.message, e.hint))
    except Exception:
        conn.send(("bug", traceback.format_exc()))


def run(target: str | Callable[..., Any], args: tuple[Any, ...], what: str,
        progress: Callable[[float], None] | None = None) -> Any:
    """Run `target(*args, report=...)` in a child process and return its result. `what`
    names the work in errors ("quantizing X"). A crash there is an error here."""
    parent, child = CONTEXT.Pipe(duplex=False)
    proc = start(_job, (target, args, child), name="workbench-job")
    child.close()
    result: Any = _MISSING
    try:
        while result is _MISSING:
            if parent.poll(0.2):
                try:
                    kind, *rest = parent.recv()
                except EOFError:
                    break
                if kind == "progress":
                    advance(progress, *rest)
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
        raise WorkbenchError(f"{what}: the child process {describe_exit(proc.exitcode)}",
                             "The kernel and the loaded model are unaffected. Run it again; if "
                             "it fails again, the model file may be unusual.")
    return result
