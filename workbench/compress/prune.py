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
    from .._cpu import idle_cores
    from .. import _child
    from .text import calibration_text

    path = Path(model).expanduser()
    read_header(path)
    dist, n = _child.run(_rank_child, (str(path), text or calibration_text(20000), n_tokens,
                                       threads or idle_cores().idle),
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
    return quantize(path, keep_type, target, overwrite=overwrite, prune_layers=drop,
                    same_type=to is None, ranking=ranking, progress=progress)


def _rank_child(path: str, text: str, n_tokens: int, threads: int,
                report: Any) -> tuple[list[float], int]:
    import numpy as np

    from ._capture import capture

    got, n_tok, n_layer = capture(path, text, n_tokens, threads, lambda name: name.startswith(
        "l_out-") or name in ("inp_embd", "attn_out-0", "ffn_inp-0"))
    report.progress(1.0)
    states = {int(k[6:]): v for k, v in got.items() if k.startswith("l_out-")}
    # Layer 0's input is the token embeddings. llama.cpp does not pass "inp_embd" to the
    # callback on this build; the residual stream gives it back: ffn_inp = attn_out + input.
    if "inp_embd" in got:
        states[-1] = got["inp_embd"]
    elif "ffn_inp-0" in got and "attn_out-0" in got:
        states[-1] = got["ffn_inp-0"] - got["attn_out-0"]
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
    return dist, n_tok
