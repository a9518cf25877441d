"""`workbench.prune`: structured pruning by whole layers.

Layers are ranked by how little each changes its input: the mean angular distance
(arccos of the cosine similarity, over π) between the hidden state entering a layer and
the one leaving it, per token of calibration text. llama.cpp's graph callback hands
over each layer's output ("l_out-N") while the text is decoded, so the ranking runs on
the same weights and arithmetic as inference. The pruned model is written by llama.cpp's
quantizer, which drops the layers and renumbers the rest, copying every other tensor as
it is (or converting it, when a quantization is asked for).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import WorkbenchError
from ..models.gguf_file import read_header


@dataclass(frozen=True)
class LayerRanking:
    model: Path
    distances: tuple[float, ...]   # per layer: mean angular distance, input to output
    tokens: int

    def least_important(self, n: int) -> tuple[int, ...]:
        order = sorted(range(len(self.distances)), key=lambda i: self.distances[i])
        return tuple(sorted(order[:n]))

    def figure(self) -> Any:
        import plotly.graph_objects as go

        fig = go.Figure(go.Bar(x=list(range(len(self.distances))), y=list(self.distances)))
        fig.update_layout(title=f"How much each layer of {self.model.name} changes its input",
                          xaxis_title="layer", yaxis_title="angular distance (0-1)",
                          height=320, margin=dict(l=50, r=20, t=50, b=40))
        return fig

    def __repr__(self) -> str:
        cells = ", ".join(f"{i}: {d:.3f}" for i, d in enumerate(self.distances))
        return f"angular distance per layer of {self.model.name} ({self.tokens} tokens): {cells}"


def rank_layers(model: str | os.PathLike, text: str | None = None, *, n_tokens: int = 512,
                threads: int | None = None,
                progress: Callable[[float], None] | None = None) -> LayerRanking:
    """Each layer's mean angular distance between its input and output on `text`."""
    from ..device.profile import usable_cores
    from . import _child
    from .text import calibration_text

    path = Path(model).expanduser()
    read_header(path)
    dist, n = _child.run(_rank_child, (str(path), text or calibration_text(20000), n_tokens,
                                       threads or usable_cores()),
                         f"ranking the layers of {path.name}", progress)
    return LayerRanking(path, tuple(dist), n)


def prune(model: str | os.PathLike, layers: int | Sequence[int] = 1, *,
          out: str | os.PathLike | None = None, to: str | None = None, overwrite: bool = False,
          text: str | None = None, progress: Callable[[float], None] | None = None) -> Any:
    """Remove `layers` (a count: the least important by `rank_layers`; or indices) and
    write the pruned model (`Quantized`, with `.ranking` when layers were ranked)."""
    from .quantize import QUANT_TYPES, default_output, quantize

    path = Path(model).expanduser()
    h = read_header(path)
    n_layers = int(h.arch_value("block_count", 0))
    ranking = None
    if isinstance(layers, int):
        if layers < 1 or layers >= n_layers:
            raise WorkbenchError(f"cannot prune {layers} of {path.name}'s {n_layers} layers",
                                 f"Give a count from 1 to {n_layers - 1}.")
        ranking = rank_layers(path, text, progress=progress)
        drop = ranking.least_important(layers)
    else:
        drop = tuple(layers)
    keep_type = (to or h.quantization).upper()
    if to is not None and keep_type not in QUANT_TYPES:
        from .quantize import quant_name

        keep_type = quant_name(to)
    target = out or default_output(path, keep_type, f"-pruned{len(set(drop))}")
    result = quantize(path, keep_type, target, overwrite=overwrite, prune_layers=drop,
                      same_type=to is None)
    object.__setattr__(result, "ranking", ranking)
    return result


def _rank_child(path: str, text: str, n_tokens: int, threads: int,
                report: Any) -> tuple[list[float], int]:
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
    n_layer = L.llama_model_n_layer(model)
    n_embd = L.llama_model_n_embd(model)
    states: dict[int, Any] = {}
    parts: dict[str, Any] = {}  # layer 0's residual pieces, for its input (see below)

    def on_tensor(t: int, ask: bool, _user: object) -> bool:
        name = (g.ggml_get_name(t) or b"").decode()
        if name in ("inp_embd", "attn_out-0", "ffn_inp-0"):
            layer = -1
        elif name.startswith("l_out-"):
            layer = int(name[6:])
        else:
            return not ask  # ask: "do you want this one?" no; else: "go on": yes
        if ask:
            return True
        size = g.ggml_nbytes(t)
        buf = np.empty(size // 4, dtype=np.float32)
        g.ggml_backend_tensor_get(t, buf.ctypes.data, 0, size)
        rows = buf.reshape(-1, n_embd).copy()
        if layer == -1:
            parts[name] = rows
        else:
            states[layer] = rows
        return True

    cb = L.ggml_backend_sched_eval_callback(on_tensor)
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = n_tokens
    cp.n_threads = cp.n_threads_batch = threads
    cp.cb_eval = cb
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise WorkbenchError(f"llama.cpp could not make a context for {path}", "Lower n_tokens.")
    vocab = L.llama_model_get_vocab(model)
    raw = text.encode()
    buf = (L.llama_token * (len(raw) + 16))()
    n = L.llama_tokenize(vocab, raw, len(raw), buf, len(buf), True, False)
    toks = list(buf[:max(0, min(n, n_tokens))])
    if len(toks) < 16:
        raise WorkbenchError("the calibration text is too short", "Give a longer text.")
    batch = L.llama_batch_init(len(toks), 0, 1)
    batch.n_tokens = len(toks)
    for i, tok in enumerate(toks):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1  # every position, so the last layer keeps every row
    if L.llama_decode(ctx, batch) != 0:
        raise WorkbenchError("llama_decode failed while ranking layers", "Lower n_tokens.")
    report.progress(1.0)
    # Layer 0's input is the token embeddings. llama.cpp does not pass "inp_embd" to the
    # callback on this build; the residual stream gives it back: ffn_inp = attn_out + input.
    if "inp_embd" in parts:
        states[-1] = parts["inp_embd"]
    elif "ffn_inp-0" in parts and "attn_out-0" in parts:
        states[-1] = parts["ffn_inp-0"] - parts["attn_out-0"]
    missing = [i for i in range(-1, n_layer) if i not in states]
    if missing:
        raise WorkbenchError(f"llama.cpp did not expose the hidden states around layers "
                             f"{missing} of this architecture",
                             "Give the layers to remove as indices instead of a count.")
    dist = []
    for i in range(n_layer):
        a, b = states[i - 1], states[i]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        dist.append(float(np.mean(np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi)))
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return dist, len(toks)
