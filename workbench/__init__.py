"""A Jupyter workbench for running, measuring and adapting local language models.

`%load_ext workbench` registers the magics; the same work is available as plain
functions: load_model, unload, generate, chat (and Chat, which remembers), metrics,
dashboard, status,
profile_device, inspect_model, plan, autotune, generate_many, calibrate, list_models,
check_updates, update_model, quantize, mixed_precision, prune, distill, evaluate,
compare, eval_tasks (task accuracy with lm-evaluation-harness), finetune,
merge_lora, deploy, start_service, rpc_cluster.
"""

from ._platform import check_supported as _check_supported

_check_supported()  # on Windows: says to use WSL2, before anything Linux-only is imported

# The fine-tuning package shares its name with the function: imported first, so that the
# function bound below is never replaced when a submodule of the package loads later.
from . import finetune as _finetune_package  # noqa: F401
from .api import (Chat, autotune, calibrate, chat, chat_session, check_updates, compare,
                  dashboard, deploy, distill, embed, engine, eval_tasks, evaluate, finetune,
                  generate,
                  generate_many, inspect_model, kv_evict, kv_list, kv_load, kv_remove, kv_save,
                  kv_stats, list_models, load_model, merge_lora, metrics, mixed_precision, plan,
                  profile_device, prune, quantize, rpc_cluster, start_service, status, unload,
                  update_model)
from .errors import WorkbenchError

__version__ = "0.1.0"

__all__ = ["Chat", "WorkbenchError", "autotune", "calibrate", "chat", "chat_session",
           "check_updates", "compare",
           "dashboard", "deploy", "distill", "embed", "engine", "eval_tasks", "evaluate", "finetune",
           "generate",
           "generate_many", "inspect_model", "kv_evict", "kv_list", "kv_load", "kv_remove",
           "kv_save", "kv_stats", "list_models", "load_model", "merge_lora", "metrics",
           "mixed_precision", "plan", "profile_device", "prune", "quantize", "rpc_cluster",
           "start_service", "status", "unload", "update_model", "load_ipython_extension"]


def load_ipython_extension(ipython) -> None:  # noqa: ANN001
    from .magics import register

    register(ipython)


def _register_lm_eval() -> None:
    """"workbench" as an lm-eval model name, where lm-eval is installed."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        return
    try:
        from .evaluation import register

        register()
    except Exception as e:  # a broken lm-eval must not break the workbench
        import warnings

        warnings.warn(f"lm-eval is installed but the workbench model could not be registered "
                      f"with it: {e!r}", stacklevel=2)


_register_lm_eval()
