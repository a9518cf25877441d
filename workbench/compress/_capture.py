"""llama.cpp in the compression children: quiet set-up, model and context, tokens and
batches; and hidden tensors of a real decode, which the graph callback (`cb_eval`) hands
over as each named node is computed ("l_out-5", "ffn_swiglu-3", ...). Child processes only."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import WorkbenchError


def init_llama() -> Any:
    """Silence llama.cpp's log and start its backends. Keep what it returns referenced:
    C holds the callback's pointer."""
    import llama_cpp as L

    quiet = L.llama_log_callback(lambda *a: None)
    L.llama_log_set(quiet, None)
    L.llama_backend_init()
    return quiet


def load(path: str, n_ctx: int, threads: int, cb_eval: Any = None) -> tuple[Any, Any]:
    """(model, context) on the CPU, with a batch of n_ctx tokens."""
    import llama_cpp as L

    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(path.encode(), mp)
    if not model:
        raise WorkbenchError(f"llama.cpp could not load {path}", "Check it with inspect_model().")
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
    cp.n_threads = cp.n_threads_batch = threads
    cp.no_perf = True
    if cb_eval is not None:
        cp.cb_eval = cb_eval
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        L.llama_model_free(model)
        raise WorkbenchError(f"llama.cpp could not make a context for {path}",
                             "Use a shorter context.")
    return model, ctx


def tokenize(model: Any, text: str) -> list[int]:
    import llama_cpp as L

    vocab = L.llama_model_get_vocab(model)
    raw = text.encode()
    buf = (L.llama_token * (len(raw) + 16))()
    n = L.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, False)
    if n < 0:
        raise WorkbenchError("the text could not be tokenized", "Try a shorter text.")
    return list(buf[:n])


def fill(batch: Any, toks: list[int], pos0: int = 0, all_logits: bool = True) -> Any:
    """One sequence's tokens in `batch`, with logits at every position (or the last)."""
    batch.n_tokens = len(toks)
    for i, tok in enumerate(toks):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos0 + i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1 if all_logits or i == len(toks) - 1 else 0
    return batch


def capture(path: str, text: str, n_tokens: int, threads: int,
            wanted: Callable[[str], bool]) -> tuple[dict[str, Any], int, int]:
    """Decode up to `n_tokens` of `text` with every position's logits (so no layer drops
    rows) and return ({node name: float32 array of shape (tokens, -1)}, tokens decoded,
    the model's layer count) for the nodes `wanted` accepts."""
    import llama_cpp as L
    import numpy as np

    from ..worker.libs import lib

    keep = init_llama()
    g = lib().ggml
    got: dict[str, Any] = {}
    n_rows = [0]

    def on_tensor(t: int, ask: bool, _user: object) -> bool:
        name = (g.ggml_get_name(t) or b"").decode()
        if not wanted(name):
            return not ask  # ask: "do you want this one?" no; else: "go on": yes
        if ask:
            return True
        size = g.ggml_nbytes(t)
        data = np.empty(size // 4, dtype=np.float32)
        g.ggml_backend_tensor_get(t, data.ctypes.data, 0, size)
        got[name] = data.reshape(n_rows[0], -1)
        return True

    cb = L.ggml_backend_sched_eval_callback(on_tensor)
    model, ctx = load(path, n_tokens, threads, cb)
    toks = tokenize(model, text)[:n_tokens]
    if len(toks) < 16:
        raise WorkbenchError("the calibration text is too short", "Give a longer text.")
    n_rows[0] = len(toks)
    batch = fill(L.llama_batch_init(len(toks), 0, 1), toks)
    status = L.llama_decode(ctx, batch)
    n_layer = L.llama_model_n_layer(model)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    del keep, cb
    if status != 0:
        raise WorkbenchError("llama_decode failed on the calibration text", "Lower n_tokens.")
    return got, len(toks), n_layer
