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
from .quantize import Quantized, check_writable, default_output


def prune_ffn(model: str | os.PathLike, keep: float = 0.75, *,
              out: str | os.PathLike | None = None, overwrite: bool = False,
              text: str | None = None, n_tokens: int = 512, threads: int | None = None,
              progress: Callable[[float], None] | None = None) -> Quantized:
    """Keep the `keep` share (0-1) of each layer's FFN channels, the most active on
    `text`, and write the smaller model."""
    import time

    from ..device.profile import usable_cores
    from . import _child
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
    if dst.exists() and not overwrite:
        raise WorkbenchError(f"{dst} exists", "Pass overwrite=True to replace it.")
    if not dst.parent.is_dir():
        raise WorkbenchError(f"the output folder {dst.parent} does not exist",
                             "Create it first, or give another out.")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.partial")
    check_writable(tmp)
    t0 = time.monotonic()
    try:
        _child.run(_prune_ffn_child, (str(src), str(tmp), k, text or calibration_text(20000),
                                      n_tokens, threads or usable_cores()),
                   f"pruning the FFN channels of {src.name}", progress)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return Quantized(dst, src, h.quantization, dst.stat().st_size, src.stat().st_size,
                     time.monotonic() - t0)


def _channel_activity(path: str, text: str, n_tokens: int, threads: int) -> dict[int, Any]:
    """Mean |activation| of each FFN channel, per layer, from a real decode."""
    import ctypes

    import llama_cpp as L
    import numpy as np

    from ..engine.devices import _load_ggml

    quiet = L.llama_log_callback(lambda *a: None)
    L.llama_log_set(quiet, None)
    L.llama_backend_init()
    g = _load_ggml()
    g.ggml_get_name.argtypes, g.ggml_get_name.restype = [ctypes.c_void_p], ctypes.c_char_p
    g.ggml_nbytes.argtypes, g.ggml_nbytes.restype = [ctypes.c_void_p], ctypes.c_size_t
    g.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                          ctypes.c_size_t]
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise WorkbenchError(f"llama.cpp could not load {path}", "Check it with inspect_model().")
    activity: dict[int, Any] = {}

    def on_tensor(t: int, ask: bool, _user: object) -> bool:
        name = (g.ggml_get_name(t) or b"").decode()
        if not name.startswith("ffn_swiglu-"):
            return not ask
        if ask:
            return True
        size = g.ggml_nbytes(t)
        buf = np.empty(size // 4, dtype=np.float32)
        g.ggml_backend_tensor_get(t, buf.ctypes.data, 0, size)
        n = int(name.split("-")[1])
        rows = buf.reshape(n_tokens_seen[0], -1)
        activity[n] = np.abs(rows).mean(axis=0)
        return True

    cb = L.ggml_backend_sched_eval_callback(on_tensor)
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = n_tokens
    cp.n_threads = cp.n_threads_batch = threads
    cp.cb_eval = cb
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_model_get_vocab(model)
    raw = text.encode()
    buf = (L.llama_token * (len(raw) + 16))()
    n = L.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, False)
    toks = list(buf[:max(0, min(n, n_tokens))])
    n_tokens_seen = [len(toks)]
    batch = L.llama_batch_init(len(toks), 0, 1)
    batch.n_tokens = len(toks)
    for i, tok in enumerate(toks):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1
    if L.llama_decode(ctx, batch) != 0:
        raise WorkbenchError("llama_decode failed while measuring activations", "Lower n_tokens.")
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    n_layer = L.llama_model_n_layer(model)
    L.llama_model_free(model)
    if sorted(activity) != list(range(n_layer)):
        raise WorkbenchError("llama.cpp did not expose every layer's FFN activation "
                             "(ffn_swiglu) for this model", "Prune whole layers instead.")
    return activity


def _prune_ffn_child(src: str, tmp: str, k: int, text: str, n_tokens: int, threads: int,
                     report: Any) -> None:
    import gguf
    import numpy as np
    from gguf import quants

    activity = _channel_activity(src, text, n_tokens, threads)
    report.progress(0.3)
    keep = {n: np.sort(np.argsort(a)[::-1][:k]) for n, a in activity.items()}
    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(tmp, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        if key == f"{arch}.feed_forward_length":
            value = k
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, value, vtype, sub_type=sub)
    out = []
    for t in reader.tensors:
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
    for name, data, qtype in out:
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    report.progress(1.0)
