"""What a GGUF model is and what it costs in memory, read from the file alone.

`inspect_model` reads the metadata and the tensor table (nothing is loaded or
dequantized): architecture, parameters, quantization, the bytes of each layer's
weights, and the KV cache bytes per token for each KV type. The planner prices
placements from these numbers.

The table comes from our header reader, which skips the vocabulary: the `gguf`
package's reader parses it too and took 1.9 s on the 98 MB default model, against
0.1 s. The `gguf` package still names the tensor types.
"""

from __future__ import annotations

import html
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .gguf_file import GGUFHeader, ggml_type_name, read_header

KV_TYPE_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}  # bytes per element
_BLOCK = re.compile(r"^blk\.(\d+)\.")
# llama.cpp sizes a sliding-window layer's cache to the window, padded (llama-kv-cache.cpp)
_KV_PAD = 256


@dataclass(frozen=True)
class ModelInspection:
    path: Path
    name: str
    architecture: str
    quantization: str
    n_params: int
    file_bytes: int
    n_layers: int
    n_ctx_train: int
    n_embd: int
    n_ff: int
    n_head: int
    n_vocab: int
    layer_bytes: tuple[int, ...]       # weights of each repeating block
    input_bytes: int                   # token embeddings: llama.cpp keeps them on the CPU
    output_bytes: int                  # output norm and output matrix (the last "layer")
    output_tied: bool                  # no output matrix: the embeddings are reused
    kv_heads: tuple[int, ...]          # KV heads of each layer (0: no KV cache there)
    head_dim_k: int
    head_dim_v: int
    sliding_window: int                # 0: every layer attends to the whole context
    swa_layers: tuple[bool, ...]       # which layers use the sliding window
    tensor_types: dict[str, int]       # ggml type -> number of tensors

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.input_bytes + self.output_bytes

    @property
    def output_offload_bytes(self) -> int:
        """Bytes the output layer takes on a GPU: with tied embeddings llama.cpp puts a
        copy of the embedding matrix there."""
        return self.output_bytes + (self.input_bytes if self.output_tied else 0)

    def kv_bytes_per_token(self, type_k: str = "f16", type_v: str = "f16") -> int:
        """KV cache bytes per token of context, all layers (global attention)."""
        return int(sum(self.layer_kv_bytes_per_token(i, type_k, type_v)
                       for i in range(self.n_layers)))

    def layer_kv_bytes_per_token(self, i: int, type_k: str, type_v: str) -> float:
        h = self.kv_heads[i]
        return h * (self.head_dim_k * KV_TYPE_BYTES[type_k]
                    + self.head_dim_v * KV_TYPE_BYTES[type_v])

    def kv_cells(self, i: int, n_ctx: int, n_ubatch: int = 512) -> int:
        """Cells layer `i` keeps for a context of n_ctx tokens."""
        n = -(-n_ctx // _KV_PAD) * _KV_PAD
        if self.swa_layers[i] and self.sliding_window:
            window = -(-(self.sliding_window + n_ubatch) // _KV_PAD) * _KV_PAD
            return min(n, window)
        return n

    def kv_bytes(self, n_ctx: int, type_k: str = "f16", type_v: str = "f16",
                 layers: range | None = None, n_ubatch: int = 512) -> int:
        """KV cache bytes of a context of n_ctx tokens, over `layers` (default all)."""
        layers = layers if layers is not None else range(self.n_layers)
        return int(sum(self.layer_kv_bytes_per_token(i, type_k, type_v) *
                       self.kv_cells(i, n_ctx, n_ubatch) for i in layers))

    def rows(self) -> list[tuple[str, str]]:
        mib = 2 ** 20
        per_layer = sorted(set(self.layer_bytes))
        layers = (f"{per_layer[0] / mib:,.1f} MiB each" if len(per_layer) == 1 else
                  f"{per_layer[0] / mib:,.1f} to {per_layer[-1] / mib:,.1f} MiB")
        types = ", ".join(f"{t} ×{n}" for t, n in sorted(self.tensor_types.items(),
                                                         key=lambda x: -x[1]))
        return [
            ("model", self.name), ("architecture", self.architecture),
            ("parameters", f"{self.n_params / 1e6:,.1f} M"),
            ("quantization", f"{self.quantization} (tensors: {types})"),
            ("file", f"{self.file_bytes / mib:,.1f} MiB"),
            ("trained context", f"{self.n_ctx_train:,} tokens"),
            ("layers", f"{self.n_layers}: {layers}"),
            ("embeddings (CPU)", f"{self.input_bytes / mib:,.1f} MiB"),
            ("output layer", f"{self.output_bytes / mib:,.1f} MiB"
             + (" (tied to the embeddings)" if self.output_tied else "")),
            ("attention", f"{self.n_head} heads, {max(self.kv_heads)} KV heads, head size "
                          f"{self.head_dim_k}" + (f", sliding window {self.sliding_window} on "
                                                  f"{sum(self.swa_layers)} layers"
                                                  if self.sliding_window else "")),
        ] + [(f"KV cache, {t}", f"{self.kv_bytes_per_token(t, t) / 1024:,.1f} KiB/token")
             for t in KV_TYPE_BYTES]

    def _repr_html_(self) -> str:
        from .._tables import table_html

        return f"<b>{html.escape(self.name)}</b>{table_html(self.rows())}"

    def __repr__(self) -> str:
        from .._tables import table_text

        return f"{self.name}\n{table_text(self.rows())}"


def _swa_layers(arch: str, n_layers: int, window: int, meta: dict) -> tuple[bool, ...]:
    if not window:
        return (False,) * n_layers
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # per-layer flags
        return tuple(bool(x) for x in pattern[:n_layers])
    # Gemma 2 alternates; Gemma 3 has one global layer in six (llama-model.cpp).
    period = {"gemma2": 2, "gemma3": 6, "gemma3n": 5}.get(arch, int(pattern or 0))
    if not period:
        return (True,) * n_layers
    return tuple((i + 1) % period != 0 for i in range(n_layers))


def inspect_model(path: str | os.PathLike) -> ModelInspection:
    """Read a GGUF model's shape and memory costs without loading it."""
    return inspect_header(read_header(path))  # clear errors for missing or broken files


def inspect_header(header: GGUFHeader) -> ModelInspection:
    """`inspect_model` for a header already read."""
    meta = header.metadata
    arch = header.architecture

    def value(key: str, default: int = 0) -> int:
        v = meta.get(f"{arch}.{key}", default)
        return max(v) if isinstance(v, list) else int(v)

    n_layers = value("block_count")
    n_embd = value("embedding_length")
    n_head = value("attention.head_count", 1)
    kv = meta.get(f"{arch}.attention.head_count_kv", n_head)
    kv_heads = tuple(int(x) for x in kv) if isinstance(kv, list) else (int(kv),) * n_layers
    head_k = value("attention.key_length") or n_embd // max(1, n_head)
    head_v = value("attention.value_length") or head_k

    layer = [0] * n_layers
    input_bytes = output_bytes = 0
    types: Counter[str] = Counter()
    names = set()
    for t in header.tensors:
        names.add(t.name)
        types[ggml_type_name(t.ggml_type)] += 1
        m = _BLOCK.match(t.name)
        if m and int(m.group(1)) < n_layers:
            layer[int(m.group(1))] += t.nbytes
        elif t.name.startswith("token_embd"):
            input_bytes += t.nbytes
        else:
            output_bytes += t.nbytes
    tokens = meta.get("tokenizer.ggml.tokens")
    n_vocab = value("vocab_size") or (getattr(tokens, "length", 0) if tokens is not None else 0)
    window = value("attention.sliding_window")
    return ModelInspection(
        path=header.path, name=str(meta.get("general.name") or header.path.name),
        architecture=arch, quantization=header.quantization, n_params=header.n_params,
        file_bytes=header.file_size, n_layers=n_layers, n_ctx_train=value("context_length"),
        n_embd=n_embd, n_ff=value("feed_forward_length"), n_head=n_head, n_vocab=int(n_vocab),
        layer_bytes=tuple(layer),
        input_bytes=input_bytes, output_bytes=output_bytes,
        output_tied="output.weight" not in names, kv_heads=kv_heads, head_dim_k=head_k,
        head_dim_v=head_v, sliding_window=window,
        swa_layers=_swa_layers(arch, n_layers, window, meta), tensor_types=dict(types))
