"""Importance matrices for quantization, measured on calibration text.

For each weight matrix, the mean square of every input column's activation over the
text: the quantizer then spends its precision where the inputs are large (what
llama.cpp's own imatrix tool collects). The inputs of a llama layer's matmuls are named
nodes of its graph: attn_norm-N feeds q, k and v; kqv_out-N feeds the attention output;
ffn_norm-N feeds gate and up; ffn_swiglu-N feeds down; result_norm feeds the output
head. They are captured from a real decode through llama.cpp's graph callback.
"""

from __future__ import annotations

import re
from typing import Any

FEEDS = {"attn_norm": ("attn_q", "attn_k", "attn_v"), "kqv_out": ("attn_output",),
         "ffn_norm": ("ffn_gate", "ffn_up"), "ffn_swiglu": ("ffn_down",)}
_NODE = re.compile(r"^(attn_norm|kqv_out|ffn_norm|ffn_swiglu)-(\d+)$")


def importance_child(path: str, text: str, n_tokens: int, threads: int,
                     report: Any) -> dict[str, Any]:
    """{weight name: float32 mean squares of its input columns} (a child's target)."""
    from ._capture import capture

    got, _, _ = capture(path, text, n_tokens, threads,
                        lambda name: bool(_NODE.match(name)) or name == "result_norm")
    out: dict[str, Any] = {}
    for name, acts in got.items():
        sq = (acts.astype("float64") ** 2).mean(axis=0).astype("float32")
        if name == "result_norm":
            out["output.weight"] = sq
            continue
        m = _NODE.match(name)
        for weight in FEEDS[m.group(1)]:
            out[f"blk.{m.group(2)}.{weight}.weight"] = sq
    report.progress(1.0)
    return out


def as_params(imatrix: dict[str, Any]) -> tuple[Any, Any]:
    """(ctypes array for llama_model_quantize_params.imatrix, what must stay referenced)."""
    import ctypes

    import llama_cpp as L
    import numpy as np

    arrays = [(name.encode(), np.ascontiguousarray(v, dtype=np.float32))
              for name, v in sorted(imatrix.items())]
    entries = (L.llama_model_imatrix_data * (len(arrays) + 1))()
    for e, (name, a) in zip(entries, arrays):
        e.name, e.size = name, a.size
        e.data = a.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    entries[len(arrays)].name = None  # the end
    return entries, arrays
