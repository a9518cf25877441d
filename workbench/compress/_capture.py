"""Hidden tensors of a real llama.cpp decode: the graph callback (`cb_eval`) hands over
each named node as it is computed ("l_out-5", "ffn_swiglu-3", ...). Child processes only."""

from __future__ import annotations

import ctypes
from typing import Any, Callable

from ..errors import WorkbenchError


def capture(path: str, text: str, n_tokens: int, threads: int,
            wanted: Callable[[str], bool]) -> tuple[dict[str, Any], int, int]:
    """Decode up to `n_tokens` of `text` with every position's logits (so no layer drops
    rows) and return ({node name: float32 array of shape (tokens, -1)}, tokens decoded,
    the model's layer count) for the nodes `wanted` accepts."""
    import llama_cpp as L
    import numpy as np

    from ..engine.devices import _load_ggml

    quiet = L.llama_log_callback(lambda *a: None)  # kept referenced: C holds the pointer
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
    vocab = L.llama_model_get_vocab(model)
    raw = text.encode()
    buf = (L.llama_token * (len(raw) + 16))()
    n = L.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, False)
    toks = list(buf[:max(0, min(n, n_tokens))])
    if len(toks) < 16:
        raise WorkbenchError("the calibration text is too short", "Give a longer text.")
    got: dict[str, Any] = {}

    def on_tensor(t: int, ask: bool, _user: object) -> bool:
        name = (g.ggml_get_name(t) or b"").decode()
        if not wanted(name):
            return not ask  # ask: "do you want this one?" no; else: "go on": yes
        if ask:
            return True
        size = g.ggml_nbytes(t)
        data = np.empty(size // 4, dtype=np.float32)
        g.ggml_backend_tensor_get(t, data.ctypes.data, 0, size)
        got[name] = data.reshape(len(toks), -1)
        return True

    cb = L.ggml_backend_sched_eval_callback(on_tensor)
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = len(toks)
    cp.n_threads = cp.n_threads_batch = threads
    cp.cb_eval = cb
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise WorkbenchError(f"llama.cpp could not make a context for {path}", "Lower n_tokens.")
    batch = L.llama_batch_init(len(toks), 0, 1)
    batch.n_tokens = len(toks)
    for i, tok in enumerate(toks):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1
    status = L.llama_decode(ctx, batch)
    n_layer = L.llama_model_n_layer(model)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    if status != 0:
        raise WorkbenchError("llama_decode failed on the calibration text", "Lower n_tokens.")
    return got, len(toks), n_layer
