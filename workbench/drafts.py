"""Draft models for speculative decoding, resolved on the kernel side before a load.

`--draft` is a mode (auto, ngram, off), a GGUF path, or `pruned:K`: the model itself
less its K least important layers (`workbench.prune`), which always shares the model's
vocabulary. A pruned draft is written once per model and K, into
`$WORKBENCH_HOME/drafts`, and found there next time.

What can be checked from the files is checked here, before the worker unloads anything:
a missing or corrupt draft, or one no smaller than the model, fails with the loaded
model untouched. The worker checks the rest (vocabulary, memory) after loading.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from . import _paths
from .errors import ModelFileError, WorkbenchError
from .models.gguf_file import read_header

MODES = ("auto", "ngram", "off")
_PRUNED = re.compile(r"pruned:(\d+)")


class DraftError(WorkbenchError):
    """The draft model could not be used; the model it was for is loaded without it."""


def resolve_draft(draft: str, target: Path,
                  progress: Callable[[float], None] | None = None) -> str:
    """`draft` as the worker takes it: a mode, or the absolute path of a checked file."""
    if draft in MODES:
        return draft
    m = _PRUNED.fullmatch(draft.strip())
    if m:
        return str(pruned_draft(target, int(m.group(1)), progress))
    if draft.startswith("pruned"):
        raise WorkbenchError(f"draft {draft!r}: pruned takes a layer count, as pruned:K",
                             "For example --draft pruned:20 (the model less 20 layers).")
    path = Path(draft).expanduser()
    if not path.is_file():
        raise ModelFileError(f"the draft model {draft!r} is not a file",
                             "Give a GGUF path, pruned:K, or one of auto, ngram, off.")
    header = read_header(path)  # a corrupt draft fails here, with the file's problem
    size = target.stat().st_size
    if header.file_size >= size:
        raise ModelFileError(
            f"the draft {path.name} ({header.file_size / 2**20:,.0f} MiB) is not smaller than "
            f"the model it drafts for, {target.name} ({size / 2**20:,.0f} MiB)",
            "A draft must be cheaper to run than the model: use a smaller model with the "
            "same vocabulary, or --draft pruned:K.")
    return str(path.resolve())


def pruned_draft(target: Path, layers: int,
                 progress: Callable[[float], None] | None = None) -> Path:
    """`target` less its `layers` least important layers, written once."""
    from .compress.prune import prune
    from .models.hashing import file_sha256

    n_layers = int(read_header(target).arch_value("block_count", 0))
    if not 1 <= layers < n_layers:
        raise WorkbenchError(f"pruned:{layers}: {target.name} has {n_layers} layers",
                             f"Remove from 1 to {n_layers - 1} layers, e.g. "
                             f"pruned:{max(1, n_layers * 2 // 3)}.")
    folder = _paths.home() / "drafts"
    folder.mkdir(exist_ok=True)
    out = folder / f"{target.name.removesuffix('.gguf')}-{file_sha256(target)[:12]}-less{layers}.gguf"
    if not out.exists():
        tmp = out.with_suffix(".part.gguf")
        prune(target, layers, out=tmp, overwrite=True, progress=progress)
        tmp.replace(out)
    return out
