"""Synthetic GGUF models: a real architecture's shape with random weights.

They measure speed and memory as the real model would, where the real weights
cannot travel (a GPU machine with no network) or are not needed (tests of
shapes). The tokenizer is copied from another GGUF file (a full model or a
vocab-only file), so the synthetic model tokenizes like that one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import WorkbenchError


@dataclass(frozen=True)
class LlamaShape:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int = 8192
    rope_freq_base: float = 100000.0
    tied_embeddings: bool = True


SHAPES = {
    # SmolLM2-135M (the default model's shape)
    "smollm2-135m": LlamaShape(n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3),
    "tiny": LlamaShape(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_ctx_train=512),
}


def make_synthetic(out: str | os.PathLike, shape: str | LlamaShape, tokenizer_from: str | os.PathLike,
                   seed: int = 0) -> Path:
    """Write an F16 llama-architecture GGUF of `shape` with random weights to `out`."""
    import gguf

    s = SHAPES.get(shape) if isinstance(shape, str) else shape
    if s is None:
        raise WorkbenchError(f"unknown model shape {shape!r}",
                             f"Known shapes: {', '.join(SHAPES)}.")
    reader = gguf.GGUFReader(str(tokenizer_from))
    tok_fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in tok_fields:
        raise WorkbenchError(f"{tokenizer_from} has no tokenizer to copy",
                             "Use a GGUF model or a vocab-only GGUF file.")
    n_vocab = len(tok_fields["tokenizer.ggml.tokens"].contents())
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"synthetic {shape if isinstance(shape, str) else 'llama'}")
    w.add_block_count(s.n_layer)
    w.add_context_length(s.n_ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_rope_freq_base(s.rope_freq_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(s.n_embd // s.n_head)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, field in tok_fields.items():
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)

    rng = np.random.default_rng(seed)
    hd = s.n_embd // s.n_head

    def weight(rows: int, cols: int) -> np.ndarray:
        # small random values, like a trained model's scale; float16 as the F16 file type
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    ones = np.ones(s.n_embd, dtype=np.float32)
    w.add_tensor("token_embd.weight", weight(n_vocab, s.n_embd))
    for i in range(s.n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones)
        w.add_tensor(p + "attn_q.weight", weight(s.n_head * hd, s.n_embd))
        w.add_tensor(p + "attn_k.weight", weight(s.n_head_kv * hd, s.n_embd))
        w.add_tensor(p + "attn_v.weight", weight(s.n_head_kv * hd, s.n_embd))
        w.add_tensor(p + "attn_output.weight", weight(s.n_embd, s.n_head * hd))
        w.add_tensor(p + "ffn_norm.weight", ones)
        w.add_tensor(p + "ffn_gate.weight", weight(s.n_ff, s.n_embd))
        w.add_tensor(p + "ffn_up.weight", weight(s.n_ff, s.n_embd))
        w.add_tensor(p + "ffn_down.weight", weight(s.n_embd, s.n_ff))
    w.add_tensor("output_norm.weight", ones)
    if not s.tied_embeddings:
        w.add_tensor("output.weight", weight(n_vocab, s.n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out
