"""The kernel's side of a fine-tuning run: the training process, its events, its end.

`FinetuneJob` starts the training process and returns at once; a reader thread takes
the process's events (steps, validation losses, checkpoints, warnings) into
`.history` and hands them to listeners (the live widget). `.wait()` blocks until the
run ends and returns a `FinetuneResult`; `.cancel()` asks the process to stop after its
current step, checkpoint and export what it has. If the process dies (killed, out of
memory), `.wait()` says so and names the newest whole checkpoint to resume from.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import _child
from ..errors import WorkbenchError
from ..progress import progress_bar


@dataclass
class FinetuneResult:
    adapter: Path                 # the GGUF LoRA
    out_dir: Path
    steps: int
    total_steps: int
    cancelled: bool
    val_loss_before: float | None
    val_loss_after: float | None
    tokens_per_s: float | None
    # bytes on the GPU once the base and the adapter are loaded, before training (None on
    # the CPU); each step's `memory` in `history["steps"]` is the peak so far
    loaded_memory: int | None = None
    checkpoints: list[Path] = field(default_factory=list)
    checkpoint_stalls_s: list[float] = field(default_factory=list)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # what the thermal watch saw over the run (device/power.PowerReport.as_dict())
    thermal: dict[str, Any] | None = None

    @property
    def val_loss_drop(self) -> float | None:
        if self.val_loss_before and self.val_loss_after is not None:
            return 1 - self.val_loss_after / self.val_loss_before
        return None

    def __repr__(self) -> str:
        how = "cancelled at" if self.cancelled else "finished"
        drop = (f"; validation loss {self.val_loss_before:.3f} → {self.val_loss_after:.3f} "
                f"({self.val_loss_drop:+.0%} drop)" if self.val_loss_drop is not None else "")
        speed = f", {self.tokens_per_s:,.0f} tokens/s" if self.tokens_per_s else ""
        t = self.thermal or {}
        power = (f"\npower: {t['mean_w']:,.0f} W mean, {t['energy_j'] / 1000:,.1f} kJ"
                 if t.get("mean_w") is not None and t.get("energy_j") is not None else "")
        hot = ("\nTHROTTLED during the run (" + "; ".join(t.get("why") or []) + "): its "
               "tokens/s is not this machine's speed" if t.get("throttled") else "")
        return (f"fine-tuning {how} step {self.steps}/{self.total_steps}{speed}{drop}{power}{hot}"
                f"\nadapter: {self.adapter}  (load it: %load_model BASE --lora {self.adapter})")

    def _repr_html_(self) -> str:
        import html

        return f"<pre>{html.escape(repr(self))}</pre>"


class FinetuneJob:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.out_dir = Path(spec["out_dir"])
        self.history: dict[str, Any] = {"train": [], "val": [], "steps": []}
        self.warnings: list[str] = []
        self.status = "starting"
        self.total_steps = 0
        self.step = 0
        self.started = time.monotonic()
        self._shown = False  # the live view is on screen: wait() needs no bar of its own
        self._listeners: list[Callable[[str, Any], None]] = []
        self._result: FinetuneResult | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._events = _child.CONTEXT.Queue()
        self._cancel = _child.CONTEXT.Event()
        self.process = _child.start("workbench.finetune.train:main",
                                    (spec, self._events, self._cancel), name="workbench-finetune")
        self._watch = _start_watch()
        self._reader = threading.Thread(target=self._read, name="finetune-events", daemon=True)
        self._reader.start()

    # ---- control ----------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop after the current step; the run checkpoints and exports what it has."""
        if not self.done:
            self.status = "cancelling"
            self._cancel.set()
            self._notify("status", self.status)

    def wait(self, timeout: float | None = None, *, progress: bool = True) -> FinetuneResult:
        """Block until the run ends, showing its steps, rate and time left (unless the
        live view shows them); an interrupt (Kernel > Interrupt) cancels it."""
        bar = progress_bar(f"Fine-tuning {Path(self.spec['base']).name}", lazy=True,
                           enabled=progress and not self._shown, unit="steps")

        def on_step(kind: str, payload: Any) -> None:
            if kind in ("start", "step") and self.total_steps:
                bar(self.step / self.total_steps, self.step, self.total_steps)

        self._listeners.append(on_step)
        try:
            if not self._done.wait(timeout):
                raise WorkbenchError(f"fine-tuning is still running after {timeout:g} s",
                                     "Wait longer, or cancel it with job.cancel().")
        except KeyboardInterrupt:
            self.cancel()
            self._done.wait()
        finally:
            self._listeners.remove(on_step)
            bar.close("" if self.status == "finished" else self.status)
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def on_event(self, listener: Callable[[str, Any], None]) -> None:
        self._listeners.append(listener)

    # ---- events -----------------------------------------------------------

    def _notify(self, kind: str, payload: Any) -> None:
        for fn in list(self._listeners):
            try:
                fn(kind, payload)
            except Exception:  # a broken widget must not stop the run
                pass

    def _read(self) -> None:
        while True:
            try:
                kind, *rest = self._events.get(timeout=0.25)
            except queue.Empty:
                if not self.process.is_alive():
                    try:  # the last events may still be in the pipe
                        kind, *rest = self._events.get(timeout=1.0)
                    except queue.Empty:
                        self._finish_dead()
                        return
                else:
                    continue
            if self._handle(kind, rest):
                self.process.join(timeout=30)
                self._done.set()
                self._notify("end", self.status)
                return

    def _handle(self, kind: str, rest: list[Any]) -> bool:
        payload = rest[0] if rest else None
        if kind == "start":
            self.total_steps = payload["total_steps"]
            self.step = payload["start_step"]
            self.history["train"] = list(payload["history"]["train"])
            self.history["val"] = list(payload["history"]["val"])
            self.status = "training"
        elif kind == "step":
            self.step = payload["step"]
            self.history["train"].append((payload["step"], payload["loss"]))
            self.history["steps"].append(payload)
        elif kind == "val":
            self.history["val"].append((payload["step"], payload["val_loss"]))
        elif kind == "warning":
            self.warnings.append(payload)
        elif kind == "status":
            self.status = payload
        elif kind == "done":
            r = payload
            thermal = self._stop_watch()
            if thermal and thermal.get("throttled"):
                self.warnings.append("the machine throttled during the run ("
                                     + "; ".join(thermal["why"]) + ")")
            self._result = FinetuneResult(
                adapter=Path(r["adapter"]), out_dir=self.out_dir, steps=r["steps"],
                total_steps=r["total_steps"], cancelled=r["cancelled"],
                val_loss_before=r["val_loss_before"], val_loss_after=r["val_loss_after"],
                tokens_per_s=r["tokens_per_s"], loaded_memory=r["loaded_memory"],
                checkpoints=[Path(p) for p in r["checkpoints"]],
                checkpoint_stalls_s=r["checkpoint_stalls_s"],
                history={**r["history"], "steps": list(self.history["steps"])},
                warnings=list(self.warnings), thermal=thermal)
            self.status = "cancelled" if r["cancelled"] else "finished"
        elif kind == "error":
            self._stop_watch()
            self._error = WorkbenchError(rest[0], rest[1])
            self.status = "failed"
        elif kind == "bug":
            self._error = RuntimeError(f"fine-tuning failed in its process:\n{rest[0]}")
            self.status = "failed"
        self._notify(kind, payload)
        return kind in ("done", "error", "bug")

    def _stop_watch(self) -> dict[str, Any] | None:
        watch, self._watch = self._watch, None
        if watch is None:
            return None
        try:
            return watch.stop().as_dict()
        except Exception:  # telemetry must never fail a run
            return None

    def _finish_dead(self) -> None:
        from .checkpoint import CheckpointStore

        self._stop_watch()
        self.process.join(timeout=5)
        how = _child.describe_exit(self.process.exitcode)
        latest = CheckpointStore(self.out_dir / "checkpoints").latest()
        where = (f"The newest whole checkpoint is {latest.name}; run the same call with "
                 "resume=True to continue from it." if latest is not None
                 else "No checkpoint was written yet; run it again.")
        self._error = WorkbenchError(f"the training process {how} at step {self.step}", where)
        self.status = "failed"
        self._done.set()
        self._notify("end", self.status)

    def __repr__(self) -> str:
        return (f"<fine-tuning {self.status}: step {self.step}/{self.total_steps or '?'}, "
                f"output in {self.out_dir}>")

    def _ipython_display_(self) -> None:
        from IPython.display import display

        from ..dashboards.finetune import FinetuneDashboard

        self._shown = True
        display(FinetuneDashboard(self).widget)


def _start_watch() -> Any:
    """The thermal watch over a run: power, temperatures and throttling, read once a
    second in this (the kernel's) process; None where telemetry cannot start."""
    from ..power.meter import Sampler

    try:
        return Sampler(period_s=1.0).start()
    except Exception:
        return None
