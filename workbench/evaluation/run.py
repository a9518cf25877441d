"""`eval_tasks`: lm-eval's tasks on a model through the engine, with a progress bar,
results with intervals, and a JSON file of lm-eval's results and the provenance."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator

from ..config import EvalConfig, build
from ..errors import WorkbenchError
from .results import TaskResults, scores


def eval_tasks(model: str | os.PathLike | None = None, *, tasks: str | list[str] = "wb_capitals",
               limit: int | None = None, num_fewshot: int | None = None,
               batch_size: int = 128, seed: int = 1234, output: str | os.PathLike | None = None,
               progress: bool = True, session: Any = None, **settings: Any) -> TaskResults:
    """Task accuracy of `model` with lm-evaluation-harness: `tasks` are local tasks
    (wb_capitals, wb_docstrings, wb_pasttense: no network), .jsonl task files or
    lm-eval's task names. `model`: a path or name, loaded with `settings` in an engine of
    its own; None: the model loaded in `session` (default: the notebook's), which keeps
    it. Writes lm-eval's results with the provenance to `output` (default:
    eval-results/MODEL-TIME.json) and returns them with 95% intervals."""
    from ..progress import progress_bar
    from .tasks import resolve

    cfg: EvalConfig = build(EvalConfig, {
        "tasks": ",".join(tasks) if isinstance(tasks, (list, tuple)) else tasks,
        "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "seed": seed,
        "output": str(output) if output is not None else None})
    try:
        import lm_eval
    except ImportError:
        raise WorkbenchError("lm-evaluation-harness is not installed",
                             "pip install 'gguf-workbench[eval]'") from None
    specs, manager = resolve(cfg.tasks)  # unknown tasks and bad files: before any load
    own = None
    if session is None:
        from ..api import session as notebook_session

        session = notebook_session()
    if model is not None or settings or session.engine.model is None:
        from ..session import Session

        own = session = Session()
        session.load(model, progress=progress, **settings)
    from .lm import WorkbenchLM

    info = session.engine.model
    bar = progress_bar(f"Evaluating {info.name}", enabled=progress)

    def advance(what: str, done: int, total: int) -> None:
        bar(done / max(total, 1), done, total, "requests")

    lm = WorkbenchLM(session=session, batch_size=cfg.batch_size, progress=advance)
    t0 = time.monotonic()
    try:
        with _quiet(offline=all(not isinstance(s, str) for s in specs)):
            raw = lm_eval.simple_evaluate(
                model=lm, tasks=specs, task_manager=manager, num_fewshot=cfg.num_fewshot,
                limit=cfg.limit, log_samples=False, bootstrap_iters=0,
                random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    finally:
        bar.close()
        if own is not None:
            own.close()
    seconds = time.monotonic() - t0
    result = TaskResults(info.name, scores(raw), raw,
                         provenance(info, specs, cfg, lm, seconds), seconds=seconds)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result.save(cfg.output or Path("eval-results") / f"{Path(info.name).stem}-{stamp}.json")
    return result


def provenance(info: Any, specs: list[Any], cfg: EvalConfig, lm: Any, seconds: float) -> dict[str, Any]:
    """Where and on what the accuracy was measured."""
    from .. import __version__
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
        "versions": {"workbench": __version__, "lm_eval": package_version("lm_eval"),
                     "llama_cpp_python": package_version("llama-cpp-python")},
        "machine": machine(), "seconds": round(seconds, 3),
        "scored_tokens": lm.scored_tokens, "score_seconds": round(lm.score_seconds, 3),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@contextlib.contextmanager
def _quiet(offline: bool) -> Iterator[None]:
    """lm-eval's own bars and info lines off (ours shows the progress); the Hub off when
    every task is local, so nothing waits on a network that is not there."""
    keys = ["TQDM_DISABLE"] + (["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"] if offline else [])
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


def add_task_accuracy(evaluation: Any, tasks: str | list[str], limit: int | None,
                      progress: bool) -> None:
    """Give each row of a `compare` its task accuracy: each task's first proportion
    (acc, or exact_match), with its 95% interval."""
    for row in evaluation.rows:
        result = eval_tasks(row.path, tasks=tasks, limit=limit, progress=progress)
        for s in result.scores:
            if s.low is not None and s.task not in row.tasks:
                row.tasks[s.task] = (s.value, s.low, s.high)
