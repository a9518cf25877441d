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
    "smollm2-360m": LlamaShape(n_layer=32, n_embd=960, n_ff=2560, n_head=15, n_head_kv=5),
    # Llama-3.2-1B's blocks (16 layers, 2048 wide, grouped-query attention)
    "llama-3.2-1b": LlamaShape(n_layer=16, n_embd=2048, n_ff=8192, n_head=32, n_head_kv=8,
                               rope_freq_base=500000.0),
    "llama-2-7b": LlamaShape(n_layer=32, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32,
                             n_ctx_train=4096, rope_freq_base=10000.0, tied_embeddings=False),
    "llama-2-13b": LlamaShape(n_layer=40, n_embd=5120, n_ff=13824, n_head=40, n_head_kv=40,
                              n_ctx_train=4096, rope_freq_base=10000.0, tied_embeddings=False),
    "tiny": LlamaShape(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, n_ctx_train=512),
}
# Quantized blocks are written directly: random quants under a small scale give weights of
# about a trained model's spread (~0.02), with no F16 file and no quantizer pass.
# name -> (file type, ggml type, bytes per block of 32, scale)
QUANTS = {"f16": ("MOSTLY_F16", "F16", 64, 0.0), "q8_0": ("MOSTLY_Q8_0", "Q8_0", 34, 2.7e-4),
          "q4_0": ("MOSTLY_Q4_0", "Q4_0", 18, 4.3e-3)}


def synthetic(shape: str | LlamaShape, quant: str = "q4_0", path: str | os.PathLike | None = None,
              *, tokenizer_from: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Write a llama-architecture GGUF with random weights in the exact shape of a named
    architecture (see SHAPES) and return its path.

    `quant`: f16, q8_0 or q4_0. `tokenizer_from`: a GGUF (a model or a vocab-only file)
    whose tokenizer is copied, so the file tokenizes like that one; default: the bundled
    default model's. The file is written under a temporary name and renamed when whole.
    """
    import gguf
    import numpy as np  # here, not at import: see worker/main.py on import order

    from .default import default_model_path

    s = SHAPES.get(shape) if isinstance(shape, str) else shape
    if s is None:
        raise WorkbenchError(f"unknown model shape {shape!r}",
                             f"Known shapes: {', '.join(SHAPES)}.")
    if quant not in QUANTS:
        raise WorkbenchError(f"unknown quantization {quant!r} for a synthetic model",
                             f"Use one of {', '.join(QUANTS)}.")
    if s.n_embd % 32 or s.n_ff % 32:
        raise WorkbenchError("a synthetic model's widths must be multiples of 32",
                             "Change n_embd or n_ff.")
    label = shape if isinstance(shape, str) else "llama"
    out = Path(path) if path else Path.cwd() / f"synthetic-{label}.{quant.upper()}.gguf"
    tokenizer_from = tokenizer_from or default_model_path()
    from .gguf_file import read_header

    read_header(tokenizer_from)  # a clear error for a missing or broken file
    reader = gguf.GGUFReader(str(tokenizer_from))
    tok_fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in tok_fields:
        raise WorkbenchError(f"{tokenizer_from} has no tokenizer to copy",
                             "Use a GGUF model or a vocab-only GGUF file.")
    n_vocab = len(tok_fields["tokenizer.ggml.tokens"].contents())
    file_type, ggml_name, block_bytes, scale = QUANTS[quant]
    qtype = gguf.GGMLQuantizationType[ggml_name]
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"synthetic {label}")
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
    w.add_file_type(getattr(gguf.LlamaFileType, file_type))
    for key, field in tok_fields.items():
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)

    hd = s.n_embd // s.n_head
    # In the order a converted model has them, layer by layer: llama.cpp unmaps the part
    # of the file that only GPU layers use, and that needs each layer's tensors together.
    # (name, rows, cols); cols 0 marks a norm vector of n_embd float32.
    tensors = [("token_embd.weight", n_vocab, s.n_embd)]
    for i in range(s.n_layer):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", s.n_embd, 0),
                    (p + "attn_q.weight", s.n_head * hd, s.n_embd),
                    (p + "attn_k.weight", s.n_head_kv * hd, s.n_embd),
                    (p + "attn_v.weight", s.n_head_kv * hd, s.n_embd),
                    (p + "attn_output.weight", s.n_embd, s.n_head * hd),
                    (p + "ffn_norm.weight", s.n_embd, 0),
                    (p + "ffn_gate.weight", s.n_ff, s.n_embd),
                    (p + "ffn_up.weight", s.n_ff, s.n_embd),
                    (p + "ffn_down.weight", s.n_embd, s.n_ff)]
    tensors.append(("output_norm.weight", s.n_embd, 0))
    if not s.tied_embeddings:
        tensors.append(("output.weight", n_vocab, s.n_embd))

    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> "np.ndarray":
        n_blocks = rows * cols // 32
        raw = np.frombuffer(rng.bytes(n_blocks * block_bytes), dtype=np.uint8)
        if quant == "f16":
            # random bits masked to float16 values of magnitude 2^-7..2^-6, random sign
            bits = raw.view(np.uint16) & np.uint16(0x83FF) | np.uint16(0x2000)
            return bits.view(np.float16).reshape(rows, cols)
        blocks = raw.reshape(n_blocks, block_bytes).copy()
        blocks[:, :2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
        return blocks.reshape(rows, cols // 32 * block_bytes)

    ones = np.ones(s.n_embd, dtype=np.float32)
    for name, rows, cols in tensors:
        if not cols:
            w.add_tensor_info(name, (s.n_embd,), np.dtype(np.float32), ones.nbytes)
        elif quant == "f16":
            w.add_tensor_info(name, (rows, cols), np.dtype(np.float16), rows * cols * 2)
        else:
            w.add_tensor_info(name, (rows, cols // 32 * block_bytes), np.dtype(np.uint8),
                              rows * cols // 32 * block_bytes, raw_dtype=qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _name, rows, cols in tensors:  # one tensor in memory at a time
            w.write_tensor_data(matrix(rows, cols) if cols else ones)
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def make_synthetic(out: str | os.PathLike, shape: str | LlamaShape,
                   tokenizer_from: str | os.PathLike, seed: int = 0) -> Path:
    """An F16 synthetic model (see `synthetic`)."""
    return synthetic(shape, "f16", out, tokenizer_from=tokenizer_from, seed=seed)
