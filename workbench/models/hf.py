"""Loading a GGUF file with transformers (dequantized), quietly. Child processes only:
it imports torch."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


def _quiet() -> None:
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not isinstance(gguf_utils.tqdm, functools.partial):  # its own bar, imported early
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    _quiet()
    p = Path(path)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def load_model(path: str | Path, dtype: Any = None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    _quiet()
    p = Path(path)
    return AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                dtype=dtype or torch.float32)
