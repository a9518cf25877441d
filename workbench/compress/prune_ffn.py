"""`workbench.prune_ffn`: structured pruning of FFN channels.

Each layer's feed-forward channels are ranked by the mean magnitude of their activation
(the gated product that enters ffn_down, "ffn_swiglu-N" in llama.cpp's graph) on
calibration text, and every layer keeps the same number of its strongest channels, so
the file stays a plain model of a smaller feed-forward width. Rows of ffn_gate and ffn_up
are copied as they are (whole quantized rows); ffn_down loses columns, so it is
dequantized, cut and quantized again (to its own type where the gguf package can, else
Q8_0). Written with the gguf package under a temporary name, renamed when whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import WorkbenchError
from ..models.gguf_file import read_header
from .quantize import Quantized, default_output, temporary_output


def prune_ffn(model: str | os.PathLike, keep: float = 0.75, *,
              out: str | os.PathLike | None = None, overwrite: bool = False,
              text: str | None = None, n_tokens: int = 512, threads: int | None = None,
              progress: Callable[[float], None] | None = None) -> Quantized:
    """Keep the `keep` share (0-1) of each layer's FFN channels, the most active on
    `text`, and write the smaller model."""
    import time

    from .._cpu import idle_cores
    from .. import _child
    from .text import calibration_text

    src = Path(model).expanduser()
    h = read_header(src)
    if h.architecture != "llama":
        raise WorkbenchError(f"FFN pruning handles llama-architecture models; {src.name} is "
                             f"{h.architecture}", "Prune whole layers (workbench.prune).")
    n_ff = h.arch_value("feed_forward_length", 0)
    if isinstance(n_ff, list) or not n_ff:
        raise WorkbenchError(f"{src.name} has per-layer FFN widths", "Prune whole layers.")
    if not 0 < keep < 1:
        raise WorkbenchError(f"keep={keep} must be between 0 and 1 (the share of channels "
                             "kept)", "For example keep=0.75.")
    k = max(32, int(n_ff * keep) // 32 * 32)  # whole quantization blocks in ffn_down's rows
    if k >= n_ff:
        raise WorkbenchError(f"keep={keep} keeps all {n_ff} channels", "Use a smaller keep.")
    dst = Path(out).expanduser() if out else default_output(
        src, h.quantization.upper(), f"-ffn{k}")
    tmp = temporary_output(src, dst, overwrite)
    t0 = time.monotonic()
    try:
        _child.run(_prune_ffn_child, (str(src), str(tmp), k, text or calibration_text(20000),
                                      n_tokens, threads or idle_cores().idle),
                   f"pruning the FFN channels of {src.name}", progress)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return Quantized(dst, src, h.quantization, dst.stat().st_size, src.stat().st_size,
                     time.monotonic() - t0)


def _channel_activity(path: str, text: str, n_tokens: int, threads: int) -> dict[int, Any]:
    """Mean |activation| of each FFN channel, per layer, from a real decode."""
    import numpy as np

    from ._capture import capture

    got, _, n_layer = capture(path, text, n_tokens, threads,
                              lambda name: name.startswith("ffn_swiglu-"))
    activity = {int(k.split("-")[1]): np.abs(v).mean(axis=0) for k, v in got.items()}
    if sorted(activity) != list(range(n_layer)):
        raise WorkbenchError("llama.cpp did not expose every layer's FFN activation "
                             "(ffn_swiglu) for this model", "Prune whole layers instead.")
    return activity


def _prune_ffn_child(src: str, tmp: str, k: int, text: str, n_tokens: int, threads: int,
                     report: Any) -> None:
    import gguf
    import numpy as np
    from gguf import quants

    from ._gguf import finish, writer_like

    activity = _channel_activity(src, text, n_tokens, threads)
    report.progress(0.3)
    keep = {n: np.sort(np.argsort(a)[::-1][:k]) for n, a in activity.items()}
    reader, w = writer_like(src, tmp, {"{arch}.feed_forward_length": k})
    out = []
    n = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        data, qtype = t.data, t.tensor_type
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in ("ffn_gate", "ffn_up",
                                                                    "ffn_down"):
            rows_keep = keep[int(parts[1])]
            if parts[2] in ("ffn_gate", "ffn_up"):  # one row per channel: whole rows
                data = np.ascontiguousarray(data[rows_keep])
            else:  # a column per channel: dequantize, cut, quantize again
                full = quants.dequantize(data, qtype)[:, rows_keep]
                try:
                    data = quants.quantize(np.ascontiguousarray(full), qtype)
                except Exception:
                    qtype = gguf.GGMLQuantizationType.Q8_0
                    data = quants.quantize(np.ascontiguousarray(full), qtype)
        out.append((t.name, data, qtype))
        report.progress(0.3 + 0.6 * (i + 1) / n, i + 1, n, "tensors")
    for name, data, qtype in out:
        w.add_tensor(name, data, raw_dtype=qtype)
    finish(w)
    report.progress(1.0)
