"""The public Python API. Everything the magics do goes through these functions,
which work the same in a script without IPython."""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Any, Sequence

from . import _paths
from .config import GenerationConfig, LoadConfig, build
from .engine.client import Engine, TokenStream
from .errors import GenerationError
from .models.default import default_model_path
from .errors import WorkbenchError
from .progress import progress_bar
from .results import Completion, EngineStatus, KVReport, LoadedModel, MetricsTable

_engine: Engine | None = None
_publisher: Any = None  # the engine's StatusPublisher, when it publishes
_engine_lock = threading.Lock()


def engine() -> Engine:
    """The workbench's engine in this process (created on first use). It publishes its
    state for the JupyterLab panel (`engine/status.py`); WORKBENCH_PUBLISH=0 keeps it
    from doing so."""
    global _engine, _publisher
    with _engine_lock:
        if _engine is None:
            _engine = Engine()
            atexit.register(_engine.close)
            if os.environ.get("WORKBENCH_PUBLISH", "1") != "0":
                from .engine.status import StatusPublisher

                # registered after close, so it runs first: the entry goes before the worker
                _publisher = StatusPublisher(_engine)
                atexit.register(_publisher.close)
        return _engine


def resolve_model(model: str | os.PathLike | None, progress: bool = False) -> Path:
    """The file `model` names: the default model, a catalog id (fetched if needed), a
    model found on this machine, or a path, in that order (see models/resolve.py). The
    result of quantize, prune or distill stands for the file it wrote."""
    from .models.resolve import resolve

    model = getattr(model, "path", model)
    if model is None or str(model) in ("", "default"):
        return default_model_path()
    bars: list[Any] = []

    def fetching(fraction: float) -> None:  # a bar only once a download starts
        if not bars:
            bars.append(progress_bar(f"Fetching {model}", enabled=progress))
        bars[0](fraction)

    try:
        return resolve(model, progress=fetching)
    finally:
        for bar in bars:
            bar.close()


PLACEMENT_SETTINGS = ("n_ctx", "n_gpu_layers", "threads", "n_batch", "n_ubatch", "flash_attn",
                      "type_k", "type_v", "tensor_split", "backend_sampling", "n_parallel", "max_threads")


def load_model(model: str | os.PathLike | None = None, *, progress: bool = True,
               **settings: Any) -> LoadedModel:
    """Load a GGUF model into the background worker (replacing the current one).

    `model`: a path, or None / "default" for SmolLM2-135M-Instruct.
    `settings`: fields of `LoadConfig` (device, n_ctx, n_gpu_layers, threads, ...). The
    planner fills in what is not given, from this machine's measured memory (`plan`).
    """
    config: LoadConfig = build(LoadConfig, settings)
    if config.lora:
        config = dataclasses.replace(config, lora=str(_check_lora(config.lora)))
    path = resolve_model(model, progress=progress)
    if config.cluster and config.power_cap is not None:
        raise WorkbenchError("--power-cap chooses among configurations measured on this "
                             "machine; a model split across RPC nodes draws power on each",
                             "Leave out --power-cap with --cluster.")
    if config.cluster:
        bar = progress_bar(f"Loading {path.name} across the cluster", enabled=progress)
        info, cluster_plan = rpc_cluster().load(path, config, settings, on_progress=bar)
        bar.close(f"{info.load_seconds:.1f} s")
        return LoadedModel(info, cluster_plan)
    _leave_cluster()
    if config.set_gpu_power_limit and config.power_cap is None:
        raise WorkbenchError("--set-gpu-power-limit needs --power-cap",
                             "Give the cap in watts, for example --power-cap 250.")
    placement = _plan(path, config, settings)
    config = dataclasses.replace(config, **placement.settings).validate()
    if config.set_gpu_power_limit:
        from .device.telemetry import set_gpu_power_limit

        placement = dataclasses.replace(placement, reasons=placement.reasons + (
            set_gpu_power_limit(config.power_cap),))
    bar = progress_bar(f"Loading {path.name}", enabled=progress)
    info = engine().load(path, config, on_progress=bar)
    bar.close(f"{info.load_seconds:.1f} s")
    return LoadedModel(info, placement)


def rpc_cluster() -> Any:
    """This kernel's cluster of llama.cpp RPC nodes (`cluster/manager.py`): `.add(...)`,
    `.remove(...)`, `.status()`, `.rebalance()`, `.start_local(n)`, `.topology()`."""
    from .cluster.manager import cluster

    return cluster()


def _leave_cluster() -> None:
    """A model loaded on this machine alone: the cluster stops watching for it."""
    from .cluster import manager

    if manager._cluster is not None:
        manager._cluster.detach()


def _check_lora(path: str | os.PathLike) -> Path:
    from .models.gguf_file import read_header

    p = Path(path).expanduser()
    if not p.is_file():
        raise WorkbenchError(f"no LoRA adapter at {p}",
                             "Give the adapter.gguf that %finetune wrote (its result names it).")
    kind = read_header(p).metadata.get("general.type")
    if kind != "adapter":
        raise WorkbenchError(f"{p.name} is a model, not a LoRA adapter",
                             "Load it as the model, or give an adapter GGUF to --lora.")
    return p.resolve()


def inspect_model(model: str | os.PathLike | None = None) -> Any:
    """A GGUF model's shape and memory costs (weights per layer, KV bytes per token for
    each KV type), read from the file without loading it."""
    from .models.inspect import inspect_model as _inspect

    return _inspect(resolve_model(model))


def plan(model: str | os.PathLike | None = None, **settings: Any) -> Any:
    """How `model` would be placed on this machine, with the reasons (a `Placement`).
    `settings`: LoadConfig fields to keep fixed (device, n_ctx, n_gpu_layers, gpu_mem_mib,
    ram_mib, ...). Nothing is loaded: the compute buffers come from a dry run."""
    config: LoadConfig = build(LoadConfig, settings)
    return _plan(resolve_model(model), config, settings)


def _plan(path: Path, config: LoadConfig, given: dict[str, Any]) -> Any:
    from .device import budget
    from .device.plan import place
    from .models.inspect import inspect_model as _inspect

    inspection = _inspect(path)
    e = engine()
    budgets = budget.budgets(e, config)
    fixed = {k: config_value for k in PLACEMENT_SETTINGS
             if (config_value := getattr(config, k)) is not None and given.get(k) is not None}

    def measure(chosen: dict[str, Any]) -> Any:
        return e.measure_buffers(path, dataclasses.replace(config, **chosen))

    from ._cpu import idle_cores
    from .device.profile import fingerprint
    from .device.tune import TuningDB
    from .models.hashing import file_sha256

    db = TuningDB()  # this machine's calibration and autotune runs
    try:
        machine = fingerprint()
        over = budget.overheads(e, db, machine)
        tuned = None if "threads" in fixed else db.best(machine, file_sha256(path),
                                                         e.worker.llama_cpp_version)
        capped, fixed_why = None, {}
        if config.power_cap is not None:
            from .device.tune import under_cap

            capped = under_cap(db, machine, file_sha256(path), e.worker.llama_cpp_version,
                               path.name, config.power_cap, fixed)
            fixed_why = {k: "chosen under the power cap (below)" for k in capped.settings
                         if k not in fixed}
            fixed.update(capped.settings)
            tuned = None
    finally:
        db.close()
    idle = idle_cores()
    placement = place(inspection, budgets, device=config.device, fixed=fixed,
                      cores=idle.idle, overheads=over, measure=measure, tuned=tuned,
                      fixed_why=fixed_why, idle=idle)
    if capped is not None:
        placement = dataclasses.replace(placement, reasons=placement.reasons + capped.reasons)
    return placement


def list_models(*, fits: bool = False, family: str | None = None,
                local: bool = False) -> Any:
    """The catalog's models and the GGUF models found on this machine, one row per file
    (a `ModelTable`). `fits`: ask the planner where each would run here (this starts
    the worker); `family`: only that family; `local`: only files on this machine."""
    from .models.catalog import load_catalog
    from .models.discover import discover
    from .models.listing import ModelTable, build_rows, with_fits
    from .models.resolve import cached_copy, from_bundle

    entries = load_catalog()

    def on_disk(v: Any) -> Path | None:
        return from_bundle(v) or cached_copy(v)

    rows = build_rows(entries, discover(), family=family, local_only=local, cached=on_disk)
    if fits:
        place, speed, room = _fit_tools()
        rows = with_fits(rows, entries, place, speed, room)
    where = f" ({family})" if family else ""
    return ModelTable(rows, f"Models{where}: {sum(r.where != 'catalog' for r in rows)} on "
                            f"this machine, {sum(r.where == 'catalog' for r in rows)} to fetch")


def _fit_tools() -> tuple[Any, Any, int]:
    """The planner with this machine's budgets (no dry runs), autotune's best decode
    speed of a file measured here, and the most bytes any one device may use."""
    from .device import budget
    from .device.plan import place
    from .device.profile import fingerprint, usable_cores
    from .device.tune import TuningDB
    from .models.hashing import file_sha256

    e = engine()
    budgets = budget.budgets(e, LoadConfig())
    machine = fingerprint()
    cores = usable_cores()
    version = e.worker.llama_cpp_version
    db = TuningDB()
    try:  # the calibration here, and autotune's best decode speed of each model measured
        over = budget.overheads(e, db, machine)
        fastest = {sha: db.best(machine, sha, version)["tg_tps"]
                   for sha in db.measured_models(machine, version)}
    finally:
        db.close()

    def planned(m: Any) -> Any:
        return place(m, budgets, cores=cores, overheads=over)

    def speed(path: Path) -> float | None:
        if not fastest:  # nothing measured here: no file needs hashing
            return None
        from .models.fetch import _blob_sha

        return fastest.get(_blob_sha(path) or file_sha256(path))  # Hub files: named by it

    return planned, speed, max(b.usable for b in budgets)


def check_updates() -> Any:
    """Models in the Hugging Face cache whose repository has a newer revision on the Hub
    (one HEAD request each), with what changed."""
    from .models.discover import discover
    from .models.fetch import check_updates as _check
    from .models.listing import UpdateTable

    return UpdateTable(_check(discover()))


def update_model(name: str, *, progress: bool = True) -> Path:
    """Fetch the newest revision of a model from the Hub (`name` as `%models` lists it).
    The old file stays until the new one is verified, and in its snapshot afterwards."""
    from .models.discover import discover, find_local
    from .models.fetch import Update, apply_update, remote_info

    m = find_local(name, discover())
    if m is None or m.source != "huggingface":
        raise WorkbenchError(f"{name!r} is not a model from the Hugging Face cache",
                             "`%models --updates` lists the models that can be updated.")
    u = Update(m, remote_info(m.repo or "", m.file or ""))
    if not u.changed:
        return m.path
    bar = progress_bar(f"Updating {m.name}", enabled=progress)
    try:
        return apply_update(u, progress=bar)
    finally:
        bar.close()


def quantize(model: str | os.PathLike | None = None, to: str = "int8",
             out: str | os.PathLike | None = None, *, overwrite: bool = False,
             imatrix: bool | str = False, overrides: Any = None,
             progress: bool = True) -> Any:
    """Quantize a model with llama.cpp's quantizer, in a child process. `to`: int8
    (= Q8_0), int4 (= Q4_K_M), Q6_K, Q5_K_M, Q4_0, Q2_K or F16. The file goes next to
    the source as `<name>.<QUANT>.gguf` (the bundled model's: ~/.workbench/models).
    `imatrix`: True (calibration text) or a text of your own: weigh each weight's
    rounding by how large its inputs are on that text (llama.cpp's importance matrix).
    `overrides`: per-tensor types, {regex on tensor names: type}, the first match wins
    (`mixed_precision` builds them from a placement)."""
    from .compress.quantize import quantize as _quantize

    path = resolve_model(model)
    bar = progress_bar(f"Quantizing {path.name}", enabled=progress)
    try:
        result = _quantize(path, to, out, overwrite=overwrite, imatrix=imatrix,
                           overrides=overrides, progress=bar)
    finally:
        bar.close()
    return result


def mixed_precision(model: str | os.PathLike | None = None, reference: Any = None, *,
                    pairs: Sequence[tuple[str, str]] | None = None,
                    uniform: Sequence[str] | None = None, baseline: str = "Q5_K_M",
                    max_kl_ratio: float = 1.1, n_gpu_layers: int | None = None,
                    measure_speed: bool = True, progress: bool = True,
                    **settings: Any) -> Any:
    """Placement-aware mixed precision. For each (gpu_type, cpu_type) pair, quantize the
    layers the planner leaves on the CPU to cpu_type and the rest to gpu_type (llama.cpp's
    per-tensor overrides), re-planning until the split and the file agree; quantize the
    `uniform` types too. Measure each one's KL divergence and top-1 agreement against
    `reference` (default: `model` itself) and its decode speed as the planner places it
    (`settings`: gpu_mem_mib, n_ctx, ...), and choose the fastest whose KL is at most
    `max_kl_ratio` × the `baseline` quantization's. `n_gpu_layers`: build for that split
    instead (for another machine). Returns a `MixStudy`; `.chosen.path` is the file."""
    from .compress import mixed

    path = resolve_model(model)
    ref = resolve_model(reference) if reference is not None else None
    bar = progress_bar(f"Mixed precision for {path.name}", enabled=progress)
    try:
        return mixed.mixed_precision(
            path, ref, pairs=mixed.DEFAULT_PAIRS if pairs is None else pairs,
            uniform=mixed.DEFAULT_UNIFORM if uniform is None else uniform, baseline=baseline,
            max_kl_ratio=max_kl_ratio, n_gpu_layers=n_gpu_layers, measure_speed=measure_speed,
            progress=lambda _what, fraction: bar(fraction),
            **settings)
    finally:
        bar.close()


def prune(model: str | os.PathLike | None = None, layers: Any = None, *,
          ffn_keep: float | None = None, out: str | os.PathLike | None = None,
          overwrite: bool = False, progress: bool = True) -> Any:
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
            progress: bool = True) -> Any:
    """Train a pruned `student` toward `teacher` (default: the default model) by minimizing
    the KL divergence from the teacher's next-token distributions on calibration text
    (PyTorch, CPU, in a child process); write it back as GGUF, in the student's type or
    `to`. `train_from`: the first layer trained; "auto" is three layers before the first
    removed one when `student` is what `prune(layers=...)` returned, else 0 (all layers).
    Small updates do not survive a coarse type: distil an F16 student (prune the F16
    reference), then quantize. `.figure()` plots the loss."""
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
             n_ctx: int = 512, max_chunks: int = 8, progress: bool = True) -> Any:
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


def compare(models: Sequence[Any], reference: Any = None, **kwargs: Any) -> Any:
    """`evaluate`, for a comparison: its result shows the table; `.figure()` the chart of
    quality against size with the Pareto front."""
    return evaluate(models, reference, **kwargs)


def calibrate(model: str | os.PathLike | None = None, *, progress: bool = True,
              **settings: Any) -> Any:
    """Measure how far the planner's predicted peak memory is from this machine's: load
    `model` (planned with `settings`) in a fresh worker, fill its whole context, and keep
    measured minus predicted for later plans. The model stays loaded (prefix cache off)."""
    from .device.calibrate import calibrate as _calibrate

    return _calibrate(resolve_model(model), settings, progress)


def profile_device(model: str | os.PathLike | None = None, *, measure: bool = True,
                   live: bool = False, save: str | os.PathLike | None = None) -> Any:
    """This machine: CPU, RAM, measured memory bandwidth and disk read speed (of the
    model's folder), GPUs through NVML, and the devices llama.cpp sees. With `live=True`,
    a widget of CPU/GPU utilization and memory, updated every second while it runs.
    `save`: also write the profile as JSON, for `deploy(device=PATH)` elsewhere."""
    if live:
        from .dashboards.device import DeviceMonitor

        return DeviceMonitor(engine())
    from .device.profile import profile_device as _profile

    if save is not None:
        _paths.check_writable(Path(save).expanduser().resolve().parent,
                              "Choose another place for the profile.")
    profile = _profile(resolve_model(model).parent, measure=measure,
                       llama_devices=engine().devices())
    if save is not None:
        profile.save(save)
    return profile


def autotune(model: str | os.PathLike | None = None, *, threads: Sequence[int] | None = None,
             n_gpu_layers: Sequence[int] | None = None,
             batch_sizes: Sequence[int] | None = None, power_cap: float | None = None,
             n_prompt: int = 128, n_gen: int = 32, repeats: int = 2, progress: bool = True,
             **settings: Any) -> Any:
    """Measure prompt and decode speed (tokens/s) of candidate (n_gpu_layers, threads,
    micro-batch) configurations, with their power draw and joules per token where this
    machine reports power; store every run in the tuning database, and load the fastest.
    `power_cap` (watts): load the fastest whose measured draw (95th percentile) stays
    under it. Later loads on this machine use what was measured. Candidates run in turn,
    `repeats` times, and each keeps its best run (the machine may be noisy); a run the
    thermal watch saw throttled is marked and never chosen over one that was not."""
    from .device.tune import autotune as _autotune

    if power_cap is not None:
        build(LoadConfig, {"power_cap": power_cap})  # the same bounds as --power-cap
    return _autotune(resolve_model(model), threads=threads, n_gpu_layers=n_gpu_layers,
                     n_prompt=n_prompt, n_gen=n_gen,
                     repeats=repeats, progress=progress, settings=settings,
                     n_ubatch=batch_sizes, power_cap=power_cap)


def unload() -> None:
    """Free the loaded model (the worker process stays up)."""
    _leave_cluster()
    engine().unload()


def _messages(message: str | Sequence[Any], system: str | None) -> tuple[tuple[str, str], ...]:
    if isinstance(message, str):
        msgs: list[tuple[str, str]] = [("user", message)]
    else:
        msgs = []
        for m in message:
            if isinstance(m, dict):
                msgs.append((str(m["role"]), str(m["content"])))
            else:
                role, content = m
                msgs.append((str(role), str(content)))
    if not msgs:
        raise GenerationError("no messages to answer", "Pass a string or a list of "
                              "{'role': ..., 'content': ...} messages.")
    if system is not None:
        msgs = [("system", system)] + [m for m in msgs if m[0] != "system"]
    return tuple(msgs)


def generate(prompt: str | Sequence[int], *, stream: bool = False,
             **params: Any) -> Completion | TokenStream:
    """Complete raw text, or a list of token ids taken as they are. `params` are
    `GenerationConfig` fields (max_tokens, temperature, top_p, top_k, min_p,
    repeat_penalty, seed, stop). With `stream=True`, returns a `TokenStream` to iterate
    (sync or async) instead of the finished `Completion`."""
    config: GenerationConfig = build(GenerationConfig, params)
    payload = str(prompt) if isinstance(prompt, str) else tuple(int(t) for t in prompt)
    s = engine().stream("generate", payload, config)
    return s if stream else _finish(s)


def chat(message: str | Sequence[Any], *, system: str | None = None, stream: bool = False,
         **params: Any) -> Completion | TokenStream:
    """Answer a message (or a list of {role, content} messages) with the model's own chat
    template. Parameters as for `generate`."""
    config: GenerationConfig = build(GenerationConfig, params)
    s = engine().stream("chat", _messages(message, system), config)
    return s if stream else _finish(s)


def generate_many(prompts: Sequence[Any], *, chat: bool = False, system: str | None = None,
                  **params: Any) -> list[Completion]:
    """Run several prompts at once and return their completions in order. With a model
    loaded with `n_parallel` > 1 they decode together (continuous batching: one
    llama_decode per step for all of them), else one after another. With `chat=True` each
    prompt is a message (or a list of messages) answered with the chat template."""
    config: GenerationConfig = build(GenerationConfig, params)
    if isinstance(prompts, (str, bytes)):
        raise GenerationError("generate_many takes a list of prompts",
                              "Pass a list, e.g. generate_many(['a', 'b']); for one prompt "
                              "use generate().")
    if not prompts:
        return []
    e = engine()
    streams: list[TokenStream] = []
    try:
        for p in prompts:
            if chat:
                streams.append(e.stream("chat", _messages(p, system), config))
            else:
                payload = str(p) if isinstance(p, str) else tuple(int(t) for t in p)
                streams.append(e.stream("generate", payload, config))
        return [_finish(s) for s in streams]
    except BaseException:  # an interrupt or an error: stop the others too
        for s in streams:
            s.cancel()
        raise


def deploy(model: Any = None, *, device: str = "auto", quantization: str = "none",
           output: str | os.PathLike = "ai-service", force: bool = False, port: int = 8000,
           host: str = "127.0.0.1", n_parallel: int | None = None,
           n_ctx_per_request: int | None = None) -> Any:
    """Write a self-contained, OpenAI-compatible service folder for `model`: quantized
    (int8 = Q8_0, int4 = Q4_K_M, or none), placed for `device` (auto, cpu, gpu, or a
    profile saved with `profile_device(save=...)`), with continuous batching of
    `n_parallel` requests. `workbench serve FOLDER` runs it."""
    from .serve.bundle import check_arguments, deploy as _deploy

    request = check_arguments(device=device, quantization=quantization, output=output,
                              force=force, n_parallel=n_parallel,
                              n_ctx_per_request=n_ctx_per_request)  # before any work
    path = resolve_model(model)

    def quantize_to(src: Path, to: str, out: Path) -> None:
        quantize(src, to=to, out=out, overwrite=True, progress=False)

    return _deploy(path, request, port=port, host=host, quantize=quantize_to, plan=plan)


def start_service(folder: str | os.PathLike, *, port: int | None = None) -> Any:
    """Start the service in `folder` (written by `deploy`) in a background process on
    127.0.0.1; returns it once healthy, with its `url` and a `stop()`."""
    from .serve.check import RunningService

    return RunningService(Path(folder), port)


def _finish(s: TokenStream) -> Completion:
    s.result()
    return Completion(s.text, s.metrics)


def metrics(all_sessions: bool = False) -> MetricsTable:
    """Per-request metrics: this session's, or with `all_sessions` every record in the
    metrics log ($WORKBENCH_HOME/metrics.jsonl)."""
    if not all_sessions:
        return MetricsTable(engine().records)
    path = _paths.metrics_log()
    if not path.exists():
        return MetricsTable([])
    with open(path, encoding="utf-8") as f:
        return MetricsTable(json.loads(line) for line in f if line.strip())


def dashboard() -> Any:
    """The live dashboard widget of this engine: throughput, TTFT and worker memory."""
    from .dashboards import Dashboard

    return Dashboard.for_engine(engine())


def status() -> EngineStatus:
    """The engine's state: worker process, model, restarts."""
    e = engine()
    w, m, st = e.worker, e.model, e.last_stats
    return EngineStatus(
        state="ready" if e.alive and m else "no model" if e.alive else
        "stopped from the Workbench panel" if _publisher and _publisher.stopped_from_panel
        else "crashed (restarts on next call)" if e.last_crash else "not started",
        worker_pid=e.pid if e.alive else None,
        model=m.name if m else None,
        context=f"{m.n_ctx:,} tokens" if m else None,
        threads=m.threads if m else None,
        gpu_layers=m.n_gpu_layers if m else None,
        worker_memory=f"{st.rss_bytes / 2**20:,.0f} MiB" if st and e.alive else None,
        requests=len(e.records),
        restarts=e.restarts,
        last_crash=e.last_crash,
        llama_cpp_python=w.llama_cpp_version if w else None,
        gpu_offload=w.supports_gpu_offload if w else None,
    )


# ---- the prefix cache and named KV sessions ------------------------------------------

def _session(name: str) -> str:
    from .kvcache.cache import check_session_name

    return check_session_name(name)


def kv_save(name: str) -> KVReport:
    """Save the KV state of the last request as a named session (survives restarts)."""
    return KVReport(f"saved session {name!r}", engine().kv("save", _session(name)))


def kv_load(name: str) -> KVReport:
    """Load a named session into the RAM tier: requests that start with its tokens
    restore it instead of computing them."""
    return KVReport(f"loaded session {name!r}", engine().kv("load", _session(name)))


def kv_remove(name: str) -> KVReport:
    """Delete a named session."""
    return KVReport(f"removed session {name!r}", engine().kv("rm", _session(name)))


def kv_list() -> KVReport:
    """The named sessions, and the prefix cache's tiers and hit counts."""
    return KVReport("KV cache", engine().kv("ls"))


def kv_stats() -> KVReport:
    """The prefix cache's occupancy, hits and measured rates."""
    return KVReport("KV cache", engine().kv("stats"))


def kv_evict() -> KVReport:
    """Move the RAM tier's entries to the disk tier (named sessions stay in RAM)."""
    return KVReport("KV cache", engine().kv("clear_ram"))


def finetune(base: Any = None, data: Any = None, *, out: str | os.PathLike | None = None,
             resume: bool = False, overwrite: bool = False, **settings: Any) -> Any:
    """Fine-tune `base` (a GGUF model; default: the default model) on `data` with LoRA or
    QLoRA, in a background process. Returns the running job at once: it shows a live
    widget (loss curves, tokens/s, ETA, memory, cancel); `.wait()` gives the result.

    `data`: a .jsonl file (one {"messages": [...]}, {"prompt", "completion"} or {"text"}
    per line), a .txt file (one example per paragraph), or a list of such dicts.
    `out`: the run's folder (checkpoints/, adapter.gguf); default under
    $WORKBENCH_HOME/finetune. `resume=True` continues from its newest whole checkpoint.
    `settings`: fields of `FinetuneConfig` (method, rank, lr, epochs, batch_size, ...).
    """
    from .config import FinetuneConfig
    from ._cpu import idle_cores
    from .training.checkpoint import CheckpointStore
    from .training.data import read_data, split
    from .training.job import FinetuneJob

    config: FinetuneConfig = build(FinetuneConfig, settings)
    if data is None:
        raise WorkbenchError("no data to fine-tune on",
                             "Pass data='examples.jsonl' (or a list of examples).")
    if config.method == "qlora" or config.device == "cuda":
        from .device.nvml import open_nvml

        gpus = Path("/proc/driver/nvidia/gpus")
        if not open_nvml()[1] and not (gpus.is_dir() and any(gpus.iterdir())):
            what = "QLoRA (4-bit base weights through bitsandbytes)" \
                if config.method == "qlora" else "device='cuda'"
            raise WorkbenchError(f"{what} needs a CUDA GPU, and this machine has none",
                                 "Use method='lora': it trains the full-precision base on the "
                                 "CPU (the default model takes a few minutes).")
    path = resolve_model(base)
    records = read_data(data)
    train, val = split(records, config.val_fraction, config.seed)
    if out is None:
        stem = Path(str(data)).stem if isinstance(data, (str, os.PathLike)) else "data"
        out = _paths.home() / "finetune" / f"{path.name.removesuffix('.gguf')}-{stem}"
    out_dir = Path(out).expanduser()
    store = CheckpointStore(out_dir / "checkpoints")
    if store.paths() and not (resume or overwrite):
        raise WorkbenchError(f"{out_dir} holds the checkpoints of an earlier run",
                             "Pass resume=True to continue it, overwrite=True to start over, "
                             "or another out=.")
    if overwrite and not resume:
        for p in store.paths():
            p.unlink()
    _paths.check_writable(out_dir, "Choose a writable folder with out=.", create=True)
    spec = {**dataclasses.asdict(config), "base": str(path), "train": train, "val": val,
            "out_dir": str(out_dir), "resume": resume,
            "threads": config.threads or idle_cores().idle}
    return FinetuneJob(spec)


def merge_lora(base: Any, adapter: str | os.PathLike, *, out: str | os.PathLike | None = None,
               to: str | None = None, scale: float = 1.0, overwrite: bool = False,
               progress: bool = True) -> Any:
    """Fold a GGUF LoRA into its base model: a full GGUF (F16, or quantized `to` a type
    `quantize` takes), which loads without --lora and which the compression tools take."""
    from .compress import _child
    from .compress.quantize import default_output, quant_name, temporary_output
    from .compress.quantize import quantize as _quantize
    from .training.export import merge_child

    path = resolve_model(base)
    lora = _check_lora(getattr(adapter, "adapter", adapter))
    quant = quant_name(to) if to else "F16"
    dst = Path(out).expanduser() if out else default_output(path, quant, "-lora")
    # the merged F16, before any quantizing: not the quantizer's own temporary name
    f16 = temporary_output(path, dst, overwrite).with_suffix(".f16")
    bar = progress_bar(f"Merging {lora.name} into {path.name}", enabled=progress)
    try:
        _child.run(merge_child, (str(path), str(lora), str(f16), scale), f"merging {lora.name}",
                   bar)
        if quant == "F16":
            os.replace(f16, dst)
            return dst
        return _quantize(f16, quant, dst, overwrite=True).path
    finally:
        f16.unlink(missing_ok=True)
        bar.close()
