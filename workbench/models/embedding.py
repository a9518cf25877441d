"""Whether a GGUF model gives sentence embeddings, and how it pools them.

A model embeds sentences when its GGUF declares `<arch>.pooling_type` (llama.cpp's
`LLAMA_POOLING_TYPE_*`): mean, CLS or last token. A chat model (a causal LM without
an embedding head) declares none; llama.cpp would hand back per-token hidden states,
which are no sentence embedding, so it is refused here with the reason.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import WorkbenchError

if TYPE_CHECKING:
    from .gguf_file import GGUFHeader

POOLING = {1: "mean", 2: "cls", 3: "last"}  # llama.cpp: 0 none, 4 rank (a reranker)

# Most inputs one embeddings request may carry (OpenAI's limit is 2,048 as well).
MAX_INPUTS = 2048


def pooling(header: "GGUFHeader | str | os.PathLike[str]") -> str:
    """The pooling the model declares ("mean", "cls" or "last"); a WorkbenchError naming
    the missing key for a model that gives no sentence embeddings."""
    if not hasattr(header, "arch_value"):
        from .gguf_file import read_header

        header = read_header(header)
    key = f"{header.architecture}.pooling_type"
    value = header.arch_value("pooling_type")
    name = os.path.basename(str(header.path))
    if value is None or int(value) == 0:
        raise WorkbenchError(
            f"{name} is not an embedding model: its GGUF declares no pooling ({key}), "
            f"so a {header.architecture} model without an embedding head has no sentence "
            "embeddings",
            "Use an embedding model, e.g. workbench.models.bert_gguf.minilm_gguf() or "
            "nomic-embed-text from the catalog.")
    if int(value) not in POOLING:
        raise WorkbenchError(f"{name} declares pooling {int(value)} ({key}), which gives "
                             "scores, not embeddings (a reranker)",
                             "Use an embedding model.")
    return POOLING[int(value)]


def check_inputs(inputs: "list[str | list[int]] | tuple") -> None:
    """Refuse what no model can embed: no inputs, too many, an empty one. Names it."""
    if not inputs:
        raise WorkbenchError("no inputs to embed", "Pass one text or a list of texts.")
    if len(inputs) > MAX_INPUTS:
        raise WorkbenchError(f"{len(inputs):,} inputs in one request; at most "
                             f"{MAX_INPUTS:,} are allowed",
                             f"Send them in requests of up to {MAX_INPUTS:,}.")
    for i, x in enumerate(inputs):
        if isinstance(x, str):
            if not x:
                raise WorkbenchError(f"input {i} is an empty string",
                                     "Every input must hold some text.")
        elif not x:
            raise WorkbenchError(f"input {i} is an empty token array",
                                 "Every input must hold at least one token.")
