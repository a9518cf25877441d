"""The public Python API. Everything the magics do goes through these functions,
which work the same in a script without IPython."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from . import _paths, chats as _chats
from ._extras import require
from .config import LoadConfig, build
from .engine.client import Engine
from .engine.stream import TokenStream
from .errors import WorkbenchError
from .progress import progress_bar
from .results import Completion, Embeddings, EngineStatus, KVReport, LoadedModel, MetricsTable
from .session import Session, check_lora, process_session
# the quality functions (compression, evaluation) are the API's too, in a module of their own
from .api_quality import (compare, distill, eval_tasks, evaluate, mixed_precision, prune,
                          quantize)

QUALITY = (quantize, mixed_precision, prune, distill, evaluate, compare, eval_tasks)

if TYPE_CHECKING:
    from .cluster.cluster import Cluster
    from .dashboards import Dashboard
    from .dashboards.device import DeviceMonitor
    from .device.calibrate import CalibrationReport
    from .device.plan import Placement
    from .device.profile import DeviceProfile
    from .device.tune import TuneResult
    from .finetune.job import FinetuneJob
    from .models.inspect import ModelInspection
    from .models.listing import ModelTable, UpdateTable
    from .serve.check import RunningService
    from .serve.deploy import Deployment

def session() -> Session:
    """This process's session (created on first use). Its engine publishes its state for
    the JupyterLab panel (`engine/status.py`); WORKBENCH_PUBLISH=0 keeps it from doing so."""
    return process_session()


def engine() -> Engine:
    """The workbench's engine in this process (created on first use)."""
    return session().engine


def resolve_model(model: str | os.PathLike[str] | None, progress: bool = False) -> Path:
    """The file `model` names: the default model, a catalog id (fetched if needed), a
    model found on this machine, or a path, in that order (see models/resolve.py). The
    result of quantize, prune or distill stands for the file it wrote."""
    return session().resolve_model(model, progress)


def load_model(model: str | os.PathLike[str] | None = None, *, progress: bool = True,
               **settings: Any) -> LoadedModel:
    """Load a GGUF model into the background worker (replacing the current one).

    `model`: a path, or None / "default" for SmolLM2-135M-Instruct.
    `settings`: fields of `LoadConfig` (device, n_ctx, n_gpu_layers, threads, ...). The
    planner fills in what is not given, from this machine's measured memory (`plan`).
    """
    return session().load(model, progress=progress, **settings)


def rpc_cluster() -> Cluster:
    """This kernel's cluster of llama.cpp RPC nodes (`cluster/cluster.py`): `.add(...)`,
    `.remove(...)`, `.status()`, `.rebalance()`, `.start_local(n)`, `.topology()`."""
    return session().cluster


def inspect_model(model: str | os.PathLike[str] | None = None) -> ModelInspection:
    """A GGUF model's shape and memory costs (weights per layer, KV bytes per token for
    each KV type), read from the file without loading it."""
    from .models.inspect import inspect_model as _inspect

    return _inspect(resolve_model(model))


def plan(model: str | os.PathLike[str] | None = None, **settings: Any) -> Placement:
    """How `model` would be placed on this machine, with the reasons (a `Placement`).
    `settings`: LoadConfig fields to keep fixed (device, n_ctx, n_gpu_layers, gpu_mem_mib,
    ram_mib, ...). Nothing is loaded: the compute buffers come from a dry run."""
    return session().plan(model, **settings)


def list_models(*, fits: bool = False, family: str | None = None,
                local: bool = False) -> ModelTable:
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
        from .device.planner import fit_tools

        place, speed, room = fit_tools(engine())
        rows = with_fits(rows, entries, place, speed, room)
    where = f" ({family})" if family else ""
    return ModelTable(rows, f"Models{where}: {sum(r.where != 'catalog' for r in rows)} on "
                            f"this machine, {sum(r.where == 'catalog' for r in rows)} to fetch")


def check_updates() -> UpdateTable:
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


def calibrate(model: str | os.PathLike | None = None, *, progress: bool = True,
              **settings: Any) -> CalibrationReport:
    """Measure how far the planner's predicted peak memory is from this machine's: load
    `model` (planned with `settings`) in a fresh worker, fill its whole context, and keep
    measured minus predicted for later plans. The model stays loaded (prefix cache off)."""
    from .device.calibrate import calibrate as _calibrate

    return _calibrate(session(), resolve_model(model), settings, progress)


def profile_device(model: str | os.PathLike | None = None, *, measure: bool = True,
                   live: bool = False, save: str | os.PathLike | None = None) -> DeviceProfile | DeviceMonitor:
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
             **settings: Any) -> TuneResult:
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
    return _autotune(session(), resolve_model(model), threads=threads, n_gpu_layers=n_gpu_layers,
                     n_prompt=n_prompt, n_gen=n_gen,
                     repeats=repeats, progress=progress, settings=settings,
                     n_ubatch=batch_sizes, power_cap=power_cap)


def unload() -> None:
    """Free the loaded model (the worker process stays up)."""
    session().unload()


def generate(prompt: str | Sequence[int], *, stream: bool = False,
             **params: Any) -> Completion | TokenStream:
    """Complete raw text, or a list of token ids taken as they are. `params` are
    `GenerationConfig` fields (max_tokens, temperature, top_p, top_k, min_p,
    repeat_penalty, seed, stop). With `stream=True`, returns a `TokenStream` to iterate
    (sync or async) instead of the finished `Completion`."""
    return session().generate(prompt, stream=stream, **params)


def chat(message: str | Sequence[Any], *, system: str | None = None, stream: bool = False,
         schema: Any = None, tools: Sequence[Any] = (), tool_choice: str = "auto",
         run_tools: bool = False, **params: Any) -> Completion | TokenStream:
    """Answer a message (or a list of {role, content} messages) with the model's own chat
    template. Parameters as for `generate`. With `schema` (a pydantic model class, a JSON
    schema dict or its text) a grammar constrains the answer to JSON valid against it,
    and the Completion's `parsed` holds it (an instance of the model class).
    With `tools` (Python functions, declared from their signatures and docstrings) the
    model may call one: `tool_choice` auto, required or a function's name; the
    Completion's `tool_calls` holds [(name, arguments)]. `run_tools=True` runs each call
    and answers its result until the model answers in text (`tool_results`)."""
    return session().chat(message, system=system, stream=stream, schema=schema, tools=tools,
                          tool_choice=tool_choice, run_tools=run_tools, **params)


def generate_many(prompts: Sequence[Any], *, chat: bool = False, system: str | None = None,
                  **params: Any) -> list[Completion]:
    """Run several prompts at once and return their completions in order. With a model
    loaded with `n_parallel` > 1 they decode together (continuous batching: one
    llama_decode per step for all of them), else one after another. With `chat=True` each
    prompt is a message (or a list of messages) answered with the chat template."""
    return session().generate_many(prompts, chat=chat, system=system, **params)


def embed(texts: str | Sequence[str] | Sequence[Sequence[int]], *,
          model: str | os.PathLike[str] | None = None,
          threads: int | None = None) -> Embeddings:
    """Sentence embeddings (L2-normalized, one row per text) by an embedding model: a
    GGUF path or catalog id, loaded in a second worker beside the chat model; None: the
    embedder loaded last. See `Session.embed`."""
    return session().embed(texts, model=model, threads=threads)


class Chat(_chats.Chat):
    __doc__ = _chats.Chat.__doc__

    def session(self) -> Session:
        return self._session or session()


_chat_sessions = _chats.Chats()


def chat_session(name: str, *, create: bool = False, system: str | None = None) -> Chat:
    """This kernel's chat called `name` (`%%chat --session NAME`). `create`: start it if
    it is new; otherwise an unknown name is an error naming the known ones."""
    if create:
        return _chat_sessions.open(name, lambda n: Chat(system=system, name=n))
    return _chat_sessions.get(name)


def chat_sessions() -> list[str]:
    """The names of this kernel's chat sessions."""
    return _chat_sessions.names()


def deploy(model: Any = None, *, device: str = "auto", quantization: str = "none",
           output: str | os.PathLike = "ai-service", force: bool = False, port: int = 8000,
           host: str = "127.0.0.1", n_parallel: int | None = None,
           n_ctx_per_request: int | None = None, kv_cache: str = "on", draft: str = "off",
           kv_ram_mib: int | None = None, kv_disk_mib: int | None = None,
           replicas: str | int | None = None, ray: str | None = None,
           router: str = "prefix") -> Deployment:
    """Write a self-contained, OpenAI-compatible service folder for `model`: quantized
    (int8 = Q8_0, int4 = Q4_K_M, or none), placed for `device` (auto, cpu, gpu, or a
    profile saved with `profile_device(save=...)`), with continuous batching of
    `n_parallel` requests and a prefix cache of KV states (`kv_cache`) within
    `kv_ram_mib` and `kv_disk_mib` (MiB; default: sized from free memory and disk),
    speculative decoding as `draft` (off, ngram or auto); with `replicas` (N or
    "MIN-MAX"), replicas on Ray Serve (at `ray`, else on a Ray started here) routed by
    `router` (prefix or default). `workbench serve FOLDER` runs it."""
    from .serve.deploy import check_arguments, deploy as _deploy

    request = check_arguments(  # before any work
        device=device, quantization=quantization, output=output, force=force,
        n_parallel=n_parallel, n_ctx_per_request=n_ctx_per_request, kv_cache=kv_cache,
        kv_ram_mib=kv_ram_mib, kv_disk_mib=kv_disk_mib, draft=draft,
        replicas=None if replicas is None else str(replicas), ray=ray, router=router)
    return _deploy(resolve_model(model), request, port=port, host=host, plan=plan,
                   quantize=lambda src, to, out: quantize(src, to=to, out=out,
                                                          overwrite=True, progress=False))


def start_service(folder: str | os.PathLike, *, port: int | None = None) -> RunningService:
    """Start the service in `folder` (written by `deploy`) in a background process on
    127.0.0.1; returns it once healthy, with its `url` and a `stop()`."""
    from .serve.check import RunningService

    return RunningService(Path(folder), port)


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


def dashboard() -> Dashboard:
    """The live dashboard widget of this engine: throughput, TTFT, worker memory, the
    prefix cache and speculative decoding."""
    from .dashboards import Dashboard

    return Dashboard.for_engine(engine())


def status() -> EngineStatus:
    """The engine's state: worker process, model, restarts."""
    return session().status()


# ---- the prefix cache and named KV sessions ------------------------------------------

def _kv_name(name: str) -> str:
    from .kvcache.cache import check_session_name

    return check_session_name(name)


def kv_save(name: str) -> KVReport:
    """Save the KV state of the last request as a named session (survives restarts)."""
    return KVReport(f"saved session {name!r}", engine().kv("save", _kv_name(name)))


def kv_load(name: str) -> KVReport:
    """Load a named session into the RAM tier: requests that start with its tokens
    restore it instead of computing them."""
    return KVReport(f"loaded session {name!r}", engine().kv("load", _kv_name(name)))


def kv_remove(name: str) -> KVReport:
    """Delete a named session."""
    return KVReport(f"removed session {name!r}", engine().kv("rm", _kv_name(name)))


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
             resume: bool = False, overwrite: bool = False, **settings: Any) -> FinetuneJob:
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
    from .finetune.checkpoint import CheckpointStore
    from .finetune.data import read_data, split
    from .finetune.job import FinetuneJob

    config: FinetuneConfig = build(FinetuneConfig, settings)
    require("train", "fine-tuning")
    if data is None:
        raise WorkbenchError("no data to fine-tune on",
                             "Pass data='examples.jsonl' (or a list of examples).")
    if config.method == "qlora" or config.device == "cuda":
        from .power.nvml import open_nvml

        gpus = Path("/proc/driver/nvidia/gpus")
        if not open_nvml()[1] and not (gpus.is_dir() and any(gpus.iterdir())):
            what = "QLoRA (4-bit base weights through bitsandbytes)" \
                if config.method == "qlora" else "device='cuda'"
            raise WorkbenchError(f"{what} needs a CUDA GPU, and this machine has none",
                                 "Use method='lora': it trains the full-precision base on the "
                                 "CPU (the default model takes a few minutes).")
        if config.method == "qlora":
            require("qlora", "QLoRA")
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
               progress: bool = True) -> Path:
    """Fold a GGUF LoRA into its base model: a full GGUF (F16, or quantized `to` a type
    `quantize` takes), which loads without --lora and which the compression tools take."""
    from . import _child
    from .compress.quantize import default_output, quant_name, temporary_output
    from .compress.quantize import quantize as _quantize
    from .finetune.export import merge_child

    path = resolve_model(base)
    lora = check_lora(getattr(adapter, "adapter", adapter))
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
