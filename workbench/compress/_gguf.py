"""Rewriting a GGUF file with the `gguf` package: the same metadata (some values
replaced), tensors given one by one. Child processes only (it imports numpy)."""

from __future__ import annotations

from typing import Any


def writer_like(src: str, dst: str, replace: dict[str, Any]) -> tuple[Any, Any]:
    """(reader of `src`, writer of `dst` holding `src`'s metadata with `replace` applied;
    a key named "{arch}" in `replace` is read as the architecture's prefix)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = str(reader.fields["general.architecture"].contents())
    replace = {k.replace("{arch}", arch): v for k, v in replace.items()}
    w = gguf.GGUFWriter(dst, arch)
    for key, fld in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = fld.types[0]
        w.add_key_value(key, replace.get(key, fld.contents()), vtype,
                        sub_type=fld.types[1] if vtype == gguf.GGUFValueType.ARRAY else None)
    return reader, w


def finish(w: Any) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def permute_qk(w: Any, n_head: int) -> Any:
    """transformers' q/k row order -> llama.cpp's (rotary pairs interleaved), for a llama
    q or k projection (or its LoRA B matrix) of `n_head` heads."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def hf_to_gguf_name(hf: str) -> str | None:
    """The GGUF tensor name of a transformers llama parameter (None: not mapped)."""
    table = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    if len(parts) >= 5 and parts[0] == "model" and parts[1] == "layers":
        key = ".".join(parts[3:-1])
        if key in table:
            return f"blk.{parts[2]}.{table[key]}.weight"
    return None
