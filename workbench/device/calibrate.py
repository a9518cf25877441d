"""Calibration: how far the planner's memory prediction is from this machine's real peak.

One run loads a model in a fresh worker, fills its whole context (the peak a plan must
allow for), and records measured minus predicted for the host (resident memory) and,
where NVML reports the worker's GPU memory, for the GPU. Later plans on this machine and
llama.cpp version add the median of the last five differences.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..results import Completion
    from ..session import Session

MiB = 2 ** 20


@dataclass(frozen=True)
class CalibrationReport:
    model: str
    rows: tuple[tuple[str, int, int, int], ...]   # (target, predicted, measured, residual)
    notes: tuple[str, ...] = ()

    def _lines(self) -> list[tuple[str, str]]:
        out = [(t, f"predicted {p / MiB:,.0f} MiB, measured {m / MiB:,.0f} MiB (prediction "
                   f"{p / m - 1:+.1%}); later plans add {r / MiB:+,.0f} MiB")
               for t, p, m, r in self.rows]
        return out + [("note", n) for n in self.notes]

    def _repr_html_(self) -> str:
        from .._tables import table_html

        return f"<b>Calibration with {html.escape(self.model)}</b>{table_html(self._lines())}"

    def __repr__(self) -> str:
        from .._tables import table_text

        return f"Calibration with {self.model}\n{table_text(self._lines())}"


def probe_tokens(n_vocab: int, n: int) -> list[int]:
    """`n` token ids spread over the vocabulary (past the special tokens): a prompt that
    measures speed and memory without a tokenizer."""
    first = 1000 if n_vocab > 2000 else 0
    return [first + (i * 7919) % max(1, n_vocab - first) for i in range(n)]


def fill_context(session: Session, n_ctx: int, n_vocab: int) -> Completion:
    """Fill the loaded model's context (all but 8 tokens, then 4 generated): the peak
    memory a plan must allow for. Returns the `Completion`."""
    return session.complete(probe_tokens(n_vocab, n_ctx - 8), max_tokens=4, temperature=0.0,
                        ignore_eos=True)


def calibrate(session: Session, path: Path, settings: dict[str, Any],
              progress: bool) -> CalibrationReport:
    from ..models.inspect import inspect_model
    from .profile import fingerprint
    from .tuning_db import TuningDB

    e = session.engine
    e.close()  # a fresh worker: its peak is this configuration's alone
    plan = session.load(path, progress=progress, **settings, kv_cache="off").placement
    c = fill_context(session, plan.settings["n_ctx"], inspect_model(path).n_vocab)
    over = plan.overheads
    rows, notes = [], []
    host_pred = plan.predicted("CPU") - over.host_correction
    rows.append(("host", host_pred, c.metrics.peak_rss_bytes,
                 c.metrics.peak_rss_bytes - host_pred))
    gpus = [x for x in plan.memory if x.device != "CPU" and x.total]
    if gpus and c.metrics.gpu_bytes:
        gpu_pred = sum(x.total for x in gpus) - over.gpu_correction * len(gpus)
        rows.append(("gpu", gpu_pred, c.metrics.gpu_bytes,
                     (c.metrics.gpu_bytes - gpu_pred) // len(gpus)))
    elif gpus:
        notes.append("NVML does not report this process's GPU memory here: the GPU "
                     "prediction stays uncalibrated.")
    db = TuningDB()
    try:
        fp, version = fingerprint(), e.worker.llama_cpp_version
        for target, pred, _measured, residual in rows:
            if abs(residual) > pred // 2:  # a stray measurement must not skew every plan
                notes.append(f"{target}: the difference is too large to trust; not kept")
                continue
            db.add_calibration(fp, version, target, pred, residual)
    finally:
        db.close()
    return CalibrationReport(model=path.name, rows=tuple(rows), notes=tuple(notes))
