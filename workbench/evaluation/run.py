"""lm-eval's tasks on a model through the engine: results with intervals, and a JSON
file of lm-eval's results and the provenance (`workbench.eval_tasks` is the front)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

from ..config import EvalConfig
from .results import TaskResults, scores


def run(lm: Any, specs: list[Any], manager: Any, cfg: EvalConfig) -> TaskResults:
    """lm-eval's tasks `specs` (tasks.resolve) on the model `lm` (lm.WorkbenchLM), with
    lm-eval's own bars quiet; the results, with the provenance, saved as JSON."""
    import lm_eval

    t0 = time.monotonic()
    with _quiet(offline=all(not isinstance(s, str) for s in specs)):
        raw = lm_eval.simple_evaluate(
            model=lm, tasks=specs, task_manager=manager, num_fewshot=cfg.num_fewshot,
            limit=cfg.limit, log_samples=False, bootstrap_iters=0, random_seed=cfg.seed,
            numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed)
    seconds = time.monotonic() - t0
    info = lm.info
    result = TaskResults(info.name, scores(raw), raw,
                         provenance(info, specs, cfg, lm, seconds), seconds=seconds)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result.save(cfg.output or Path("eval-results") / f"{Path(info.name).stem}-{stamp}.json")
    return result


def provenance(info: Any, specs: list[Any], cfg: EvalConfig, lm: Any, seconds: float) -> dict[str, Any]:
    """Where and on what the accuracy was measured."""
    from ..device.provenance import machine, package_version
    from ..models.hashing import file_sha256

    tasks = {}
    for s in specs:
        if isinstance(s, dict):
            src = Path(s["metadata"]["source"])
            tasks[s["task"]] = {"file": str(src), "sha256": file_sha256(src)}
        else:
            tasks[str(s)] = {"lm_eval_task": str(s)}
    return {
        "model": {"path": info.path, "sha256": file_sha256(info.path),
                  "quantization": info.quantization, "n_ctx": info.n_ctx,
                  "threads": info.threads, "lora": info.lora},
        "tasks": tasks, "limit": cfg.limit, "num_fewshot": cfg.num_fewshot, "seed": cfg.seed,
        "versions": {"workbench": package_version("gguf-workbench"), "lm_eval": package_version("lm_eval"),
                     "llama_cpp_python": package_version("llama-cpp-python")},
        "machine": machine(), "seconds": round(seconds, 3),
        "scored_tokens": lm.scored_tokens, "score_seconds": round(lm.score_seconds, 3),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@contextlib.contextmanager
def _quiet(offline: bool) -> Iterator[None]:
    """lm-eval's info lines off (ours shows the progress); the Hub off when every task is
    local, so nothing waits on a network that is not there."""
    keys = ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"] if offline else []
    saved = {k: os.environ.get(k) for k in keys}
    logger = logging.getLogger("lm_eval")
    level = logger.level
    os.environ.update({k: "1" for k in keys})
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

