"""A trained adapter as llama.cpp uses it: a GGUF LoRA (`lora_path`, `%load_model
--lora`), or merged into a full GGUF that the compression tools can quantize.

Child processes only (numpy, gguf). The adapter comes as peft's tensors
(`...q_proj.lora_A.weight` of shape (rank, in), `lora_B` of shape (out, rank)); llama.cpp
reads `blk.N.attn_q.weight.lora_a` with the same layouts, and scales by alpha / rank as
peft does. Rows of q and k are permuted to llama.cpp's rotary order, so B is too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..compress._gguf import finish, hf_to_gguf_name, permute_qk, writer_like
from ..progress import advance


def _pairs(adapter: dict[str, Any], n_head: int, n_kv_head: int) -> dict[str, tuple[Any, Any]]:
    """GGUF base tensor name -> (A, B) as float32 numpy arrays in llama.cpp's layout."""
    import numpy as np

    pairs: dict[str, list[Any]] = {}
    for key, t in adapter.items():
        for part, slot in (("lora_A", 0), ("lora_B", 1)):
            marker = f".{part}."
            if marker not in key:
                continue
            module = key.split(marker)[0].removeprefix("base_model.model.")
            name = hf_to_gguf_name(module + ".weight")
            if name is None:
                raise ValueError(f"no GGUF name for the adapted module {module}")
            arr = np.ascontiguousarray(t.float().cpu().numpy())
            if slot == 1 and module.endswith("q_proj"):
                arr = np.ascontiguousarray(permute_qk(arr, n_head))
            elif slot == 1 and module.endswith("k_proj"):
                arr = np.ascontiguousarray(permute_qk(arr, n_kv_head))
            pairs.setdefault(name, [None, None])[slot] = arr
    return {k: (a, b) for k, (a, b) in pairs.items()}


def write_lora_gguf(adapter: dict[str, Any], base: str, out: str | os.PathLike, alpha: float,
                    n_head: int, n_kv_head: int) -> Path:
    """Write `adapter` (peft tensors) as a GGUF LoRA for the `base` GGUF model."""
    import gguf

    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    reader = gguf.GGUFReader(base)
    arch = str(reader.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(alpha))
    if "general.name" in reader.fields:
        w.add_string("general.name", f"{reader.fields['general.name'].contents()} LoRA")
    try:
        for name, (a, b) in sorted(_pairs(adapter, n_head, n_kv_head).items()):
            w.add_tensor(f"{name}.lora_a", a)
            w.add_tensor(f"{name}.lora_b", b)
        _commit(w, tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def read_lora_gguf(path: str | os.PathLike) -> tuple[float, dict[str, tuple[Any, Any]]]:
    """(alpha, {base tensor name: (A, B)}) of a GGUF LoRA."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    alpha = float(r.fields["adapter.lora.alpha"].contents())
    pairs: dict[str, list[Any]] = {}
    for t in r.tensors:
        base, _, part = t.name.rpartition(".")
        shape = tuple(int(x) for x in reversed(t.shape))
        arr = np.asarray(t.data, dtype=np.float32).reshape(shape)
        pairs.setdefault(base, [None, None])[0 if part == "lora_a" else 1] = arr
    return alpha, {k: (a, b) for k, (a, b) in pairs.items()}


def merge_lora(base: str, lora: str, out: str | os.PathLike, scale: float = 1.0,
               progress: Callable[..., Any] | None = None) -> Path:
    """`base` with W + scale * alpha / rank * B @ A folded into every adapted weight,
    written as F16 (norms F32); other tensors are copied as they are. `progress`: told
    the tensors done (workbench/progress.py)."""
    import numpy as np
    from gguf.quants import dequantize

    alpha, pairs = read_lora_gguf(lora)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        reader, w = writer_like(base, str(tmp), {"general.file_type": 1})  # MOSTLY_F16
        n = len(reader.tensors)
        for i, t in enumerate(reader.tensors):
            advance(progress, 0.9 * i / n, i, n, "tensors")  # writing the file is the rest
            if t.name in pairs:
                a, b = pairs[t.name]
                weight = dequantize(t.data, t.tensor_type).astype(np.float32)
                weight = weight.reshape(b.shape[0], a.shape[1])
                weight += (scale * alpha / a.shape[0]) * (b @ a)
                w.add_tensor(t.name, np.ascontiguousarray(weight.astype(np.float16)))
            else:
                w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        _commit(w, tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _commit(w: Any, tmp: Path, out: Path) -> None:
    """Write out a GGUF writer's file at `tmp`, make it durable, rename it to `out`."""
    from .checkpoint import fsync_path

    finish(w)
    fsync_path(tmp)
    os.replace(tmp, out)
    fsync_path(out.parent)


def merge_child(base: str, lora: str, out: str, scale: float, report: Any) -> str:
    """`merge_lora` as a child process's target (`_child.run`)."""
    merge_lora(base, lora, out, scale, progress=report)
    report.progress(1.0)
    return out
