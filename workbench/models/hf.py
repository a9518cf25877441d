"""Loading a GGUF file with transformers (dequantized), quietly. Child processes only:
it imports torch.

transformers dequantizes a GGUF file in Python: for the default model that takes some
20 s for the weights and 7 s for the tokenizer, every time. The result is kept, keyed by
the file's sha256, in $WORKBENCH_HOME/cache/hf (the newest `KEEP` models; each takes
about 4 bytes a parameter), so the next fine-tune or distillation of the same file
starts in a second or two. A cache that cannot be written or read is skipped, never an
error: the file is converted again.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from .. import _paths

KEEP = 3  # converted models kept in the cache


def _quiet() -> None:
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not isinstance(gguf_utils.tqdm, functools.partial):  # its own bar, imported early
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)


def cache_folder(path: str | Path) -> Path:
    """Where the converted copy of the GGUF file at `path` is kept."""
    from .hashing import file_sha256

    return _paths.home() / "cache" / "hf" / file_sha256(path)[:24]


def _cached(folder: Path, load: Callable[[str], Any]) -> Any:
    if not (folder / "complete").exists():
        return None
    try:
        found = load(str(folder))
    except Exception:  # a damaged copy: convert again
        shutil.rmtree(folder, ignore_errors=True)
        return None
    try:
        os.utime(folder.parent)  # the newest used stays
    except OSError:
        pass
    return found


def _keep(folder: Path, save: Callable[[str], None]) -> None:
    """Save into a temporary folder, then rename it into place: a reader never sees half
    a copy. Then drop the least recently used models past `KEEP`."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save(str(tmp))
        (tmp / "complete").touch()
        os.replace(tmp, folder)
    except Exception:  # a full disk, another process won the race: no copy, no harm
        shutil.rmtree(tmp, ignore_errors=True)
        return
    models = sorted((p for p in folder.parent.parent.iterdir() if p.is_dir()),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in models[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    _quiet()
    p = Path(path)
    folder = cache_folder(p) / "tokenizer"
    tok = _cached(folder, AutoTokenizer.from_pretrained)
    if tok is None:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        _keep(folder, tok.save_pretrained)
    return tok


def load_model(path: str | Path, dtype: Any = None, keep: bool = True) -> Any:
    """The model in a GGUF file as a transformers model (float32 unless `dtype`). `keep`:
    keep the dequantized copy for the next load of the same file."""
    import torch
    from transformers import AutoModelForCausalLM

    _quiet()
    p = Path(path)
    dtype = dtype or torch.float32
    folder = cache_folder(p) / f"model-{str(dtype).removeprefix('torch.')}"
    model = _cached(folder, lambda f: AutoModelForCausalLM.from_pretrained(f, dtype=dtype))
    if model is None:
        t0 = time.monotonic()
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                     dtype=dtype)
        if keep and time.monotonic() - t0 > 2.0:  # worth keeping
            _keep(folder, functools.partial(_save_model, model))
    return model


def _save_model(model: Any, folder: str) -> None:
    """The dequantized weights and the config: transformers will not `save_pretrained` a
    model it loaded from GGUF, though what it holds is plain tensors by then."""
    from safetensors.torch import save_model

    model.config.save_pretrained(folder)
    save_model(model, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
