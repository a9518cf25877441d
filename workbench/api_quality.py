"""The quality functions of the public API (re-exported by `workbench.api`): quantize,
mixed_precision, prune, distill, evaluate, compare and eval_tasks, each resolving its
models and showing a progress bar around the work of `compress/` and `evaluation/`."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

from ._extras import require
from .errors import WorkbenchError
from .progress import progress_bar
from .session import process_session as session

if TYPE_CHECKING:
    from .compress.distill import Distilled
    from .compress.evaluate import Evaluation
    from .compress.mixed import MixStudy
    from .compress.quantize import Quantized
    from .compress.target import TargetedQuantization
    from .evaluation.results import TaskResults


def resolve_model(model: Any, progress: bool = False) -> Any:
    return session().resolve_model(model, progress)


def quantize(model: str | os.PathLike | None = None, to: str = "int8",
             out: str | os.PathLike | None = None, *, overwrite: bool = False,
             imatrix: bool | str = False, overrides: Any = None,
             min_top1: float | None = None, max_kl: float | None = None,
             max_size: float | None = None, check_tokens: int | None = None,
             threads: int | None = None, progress: bool = True) -> Quantized | TargetedQuantization:
    """Quantize a model with llama.cpp's quantizer, in a child process. `to`: int8
    (= Q8_0), int4 (= Q4_K_M), Q6_K, Q5_K_M, Q4_0, Q2_K or F16. The file goes next to
    the source as `<name>.<QUANT>.gguf` (the bundled model's: ~/.workbench/models).
    `imatrix`: True (calibration text) or a text of your own: weigh each weight's
    rounding by how large its inputs are on that text (llama.cpp's importance matrix).
    `overrides`: per-tensor types, {regex on tensor names: type}, the first match wins
    (`mixed_precision` builds them from a placement). `min_top1` / `max_kl`: a quality
    target instead: per-tensor types are chosen, the most sensitive tensors kept at F16,
    until top-1 agreement with (or KL from) the model's F16 copy holds on held-out text,
    within `max_size` x the uniform file's bytes (checked on `check_tokens` held-out
    tokens, default 16,320); the result says what it costs. `threads`: CPU threads (default: the idle cores)."""
    from .compress.quantize import quantize as _quantize

    path = resolve_model(model)
    bar = progress_bar(f"Quantizing {path.name}", enabled=progress)
    try:
        result = _quantize(path, to, out, overwrite=overwrite, imatrix=imatrix,
                           overrides=overrides, min_top1=min_top1, max_kl=max_kl,
                           max_size=max_size, check_tokens=check_tokens, threads=threads,
                           progress=bar)
    finally:
        bar.close()
    return result


def mixed_precision(model: str | os.PathLike | None = None, reference: Any = None, *,
                    pairs: Sequence[tuple[str, str]] | None = None,
                    uniform: Sequence[str] | None = None, baseline: str = "Q5_K_M",
                    max_kl_ratio: float = 1.1, n_gpu_layers: int | None = None,
                    max_chunks: int = 8, measure_speed: bool = True, progress: bool = True,
                    **settings: Any) -> MixStudy:
    """Placement-aware mixed precision. For each (gpu_type, cpu_type) pair, quantize the
    layers the planner leaves on the CPU to cpu_type and the rest to gpu_type (llama.cpp's
    per-tensor overrides), re-planning until the split and the file agree; quantize the
    `uniform` types too. Measure each one's KL divergence and top-1 agreement against
    `reference` (default: `model` itself) and its decode speed as the planner places it
    (`settings`: gpu_mem_mib, n_ctx, ...), and choose the fastest whose KL is at most
    `max_kl_ratio` × the `baseline` quantization's. `n_gpu_layers`: build for that split
    instead (for another machine). `max_chunks`: the quality is measured on up to that many
    512-token chunks of calibration text. Returns a `MixStudy`; `.chosen.path` is the
    file."""
    from .compress import mixed

    path = resolve_model(model)
    ref = resolve_model(reference) if reference is not None else None
    bar = progress_bar(f"Mixed precision for {path.name}", enabled=progress)
    try:
        return mixed.mixed_precision(
            session(), path, ref, pairs=mixed.DEFAULT_PAIRS if pairs is None else pairs,
            uniform=mixed.DEFAULT_UNIFORM if uniform is None else uniform, baseline=baseline,
            max_kl_ratio=max_kl_ratio, n_gpu_layers=n_gpu_layers, max_chunks=max_chunks,
            measure_speed=measure_speed, progress=lambda _what, fraction: bar(fraction),
            **settings)
    finally:
        bar.close()


def prune(model: str | os.PathLike | None = None, layers: Any = None, *,
          ffn_keep: float | None = None, out: str | os.PathLike | None = None,
          overwrite: bool = False, progress: bool = True) -> Quantized:
    """Structured pruning, in one of two forms:
    - `layers`: remove whole layers, as a count (those that change their input least,
      measured on calibration text) or as indices;
    - `ffn_keep`: keep that share (0-1) of every layer's FFN channels, the most active.
    Returns the written file's summary."""
    from .compress.prune import prune as _prune
    from .compress.prune_ffn import prune_ffn

    if (layers is None) == (ffn_keep is None):
        raise WorkbenchError("give either layers (whole layers) or ffn_keep (a share of the "
                             "FFN channels)", "For example prune(layers=2) or "
                             "prune(ffn_keep=0.75).")
    path = resolve_model(model)
    bar = progress_bar(f"Pruning {path.name}", enabled=progress)
    try:
        if ffn_keep is not None:
            return prune_ffn(path, ffn_keep, out=out, overwrite=overwrite, progress=bar)
        return _prune(path, layers, out=out, overwrite=overwrite, progress=bar)
    finally:
        bar.close()


def distill(student: Any, teacher: Any = None, *, steps: int = 40, seq_len: int = 256,
            lr: float = 5e-4, train_from: int | str = "auto", to: str | None = None,
            out: str | os.PathLike | None = None, overwrite: bool = False,
            progress: bool = True) -> Distilled:
    """Train a pruned `student` toward `teacher` (default: the default model) by minimizing
    the KL divergence from the teacher's next-token distributions on calibration text
    (PyTorch, CPU, in a child process); write it back as GGUF, in the student's type or
    `to`. `train_from`: the first layer trained; "auto" is three layers before the first
    removed one when `student` is what `prune(layers=...)` returned, else 0 (all layers).
    Small updates do not survive a coarse type: distil an F16 student (prune the F16
    reference), then quantize. `.figure()` plots the loss."""
    require("train", "distillation")
    from .compress.distill import distill as _distill

    s = resolve_model(student)
    t = resolve_model(teacher)
    if train_from == "auto":
        removed = getattr(student, "pruned_layers", ())
        train_from = max(0, min(removed) - 3) if removed else 0
    bar = progress_bar(f"Distilling {s.name}", enabled=progress)
    try:
        return _distill(s, t, out=out, steps=steps, seq_len=seq_len, lr=lr, to=to,
                        train_from=int(train_from), overwrite=overwrite, progress=bar)
    finally:
        bar.close()


def evaluate(models: Sequence[Any], reference: Any = None, *, text: str | None = None,
             n_ctx: int = 512, max_chunks: int = 8, progress: bool = True) -> Evaluation:
    """Perplexity, KL divergence and top-1 agreement against `reference` (all on the same
    tokens), load time and speed of each model; `.figure()` plots quality against size."""
    from .compress.evaluate import evaluate as _evaluate

    paths = [resolve_model(m) for m in models]
    ref = resolve_model(reference) if reference is not None else None
    note = ""
    source = getattr(reference, "source", None)  # a `quantize` result knows where it came from
    if source is not None and getattr(reference, "quant", "") == "F16":
        from .models.gguf_file import read_header

        was = read_header(source).quantization
        if was.upper() not in ("F16", "F32", "BF16"):
            note = (f"The reference is an F16 copy of {source.name}, which is itself {was}: the "
                    "deltas measure requantization loss, not loss against the original "
                    "weights.")
    bar = progress_bar("Evaluating", enabled=progress)
    try:
        return _evaluate(paths, ref, text, n_ctx=n_ctx, max_chunks=max_chunks, note=note,
                         progress=bar)
    finally:
        bar.close()


def compare(models: Sequence[Any], reference: Any = None, *, tasks: Any = None,
            limit: int | None = None, **kwargs: Any) -> Evaluation:
    """`evaluate`, for a comparison: its result shows the table; `.figure()` the chart of
    quality against size with the Pareto front. `tasks` (e.g. "wb_capitals"): also each
    model's task accuracy (`eval_tasks`, `limit` documents a task), with 95% intervals."""
    result = evaluate(models, reference, **kwargs)
    if tasks:
        for row in result.rows:  # each task's first proportion (acc or exact_match)
            scored = eval_tasks(row.path, tasks=tasks, limit=limit,
                                progress=kwargs.get("progress", True))
            for s in scored.scores:
                if s.low is not None and s.task not in row.tasks:
                    row.tasks[s.task] = (s.value, s.low, s.high)
    return result


def eval_tasks(model: str | os.PathLike | None = None, *, tasks: str | Sequence[str] = "wb_capitals",
               limit: int | None = None, num_fewshot: int | None = None,
               batch_size: int = 512, seed: int = 1234, output: str | os.PathLike | None = None,
               progress: bool = True, **settings: Any) -> TaskResults:
    """Task accuracy of `model` with lm-evaluation-harness through the engine: `tasks`
    are local tasks (wb_capitals, wb_docstrings, wb_pasttense: no network), .jsonl task
    files or lm-eval's task names. `model`: a path or name, loaded with `settings` in an
    engine of its own; None: the model loaded in this notebook, which stays loaded.
    Writes lm-eval's results with the provenance (sha256, versions, machine) to `output`
    (default: eval-results/MODEL-TIME.json); returns the scores with 95% intervals."""
    from .config import EvalConfig, build
    from .evaluation.tasks import resolve

    cfg: EvalConfig = build(EvalConfig, {
        "tasks": tasks if isinstance(tasks, str) else ",".join(tasks), "limit": limit,
        "num_fewshot": num_fewshot, "batch_size": batch_size, "seed": seed,
        "output": None if output is None else str(output)})
    require("eval", "task accuracy")
    specs, manager = resolve(cfg.tasks)  # unknown tasks and bad files: before any load
    from .evaluation.lm import WorkbenchLM
    from .evaluation.run import run
    from .session import Session

    own = None
    s = session()
    if model is not None or settings or s.engine.model is None:
        own = s = Session()
        s.load(model, progress=progress, **settings)
    bar = progress_bar(f"Evaluating {s.engine.model.name}", enabled=progress)
    try:
        lm = WorkbenchLM(session=s, batch_size=cfg.batch_size,
                         progress=lambda what, done, total: bar(done / max(total, 1), done,
                                                                total, "requests"))
        return run(lm, specs, manager, cfg)
    finally:
        bar.close()
        if own is not None:
            own.close()
