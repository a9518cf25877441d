"""Task accuracy: lm-evaluation-harness through the engine (`lm.py`), offline tasks
over local files (`tasks.py`), results with intervals and provenance (`results.py`).
lm-eval is the optional extra `eval`; nothing here imports it until it is used."""

from __future__ import annotations


def register() -> None:
    """Make "workbench" an lm-eval model name. Lazy: lm-eval imports `lm.py` only when
    the name is asked for."""
    from lm_eval.api.registry import model_registry

    model_registry.register("workbench", target="workbench.evaluation.lm:WorkbenchLM")
