"""`workbench deploy`: a self-contained service folder, tuned for the target machine.

    ai-service/
      model.gguf          the model, quantized as asked
      service.json        every setting, and why it was chosen
      app/workbench/      the workbench's Python code, so the folder needs no install of it
      start.sh            runs the service (`python3 -m workbench.cli serve .`, from app/)
      healthcheck.py      exits 0 when /health answers 200 (Docker's HEALTHCHECK uses it)
      Dockerfile          an image that builds llama.cpp and runs start.sh: for the CPU, or
                          with CUDA where the model runs on a GPU
      llama-cmake-args.sh the workbench's CMake flags for llama.cpp (GPU images only)
      .dockerignore       keeps the prefix cache (kv/) out of an image
      requirements.txt    what the service needs besides app/ (llama-cpp-python, starlette,
                          uvicorn, psutil, jinja2)
      README.md           how to start it and call it (curl, Python), and its budgets

The service keeps a prefix cache of KV states (`kv/` in the folder, made when it starts)
within the RAM and disk budgets that service.json states (`kv_budget`).

This module decides; `bundle.py` writes the files. The folder is built under a temporary
name next to the output and renamed into place, so a failed deploy leaves nothing
half-written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from ..errors import WorkbenchError
from .bundle import KV_DIR, MODEL_FILE, gpu_image, write_files

QUANTIZATIONS = {"none": None, "int8": "Q8_0", "int4": "Q4_K_M"}
DEVICES = ("auto", "cpu", "gpu")
PER_REQUEST_CTX = 2048
# Sequences decoded together. On 2 CPU cores a bare batched llama_decode loop gave 16
# sequences 1.9x the tokens/s of one; on a GPU the gain keeps growing past 16.
N_PARALLEL = {"cpu": 8, "gpu": 16}
MiB = 1 << 20
# The prefix cache's default budgets (`kv_budget`), MiB.
KV_RAM_MIN, KV_RAM_MAX, KV_RAM_OFF_BELOW = 256, 8192, 64
KV_DISK_MIN, KV_DISK_MAX = 1024, 16384


def quant_type(name: str) -> str | None:
    """int8 -> Q8_0, int4 -> Q4_K_M, none -> None; llama.cpp names pass through."""
    from ..compress.quantize import QUANT_TYPES

    key = name.strip()
    if key.lower() in QUANTIZATIONS:
        return QUANTIZATIONS[key.lower()]
    for q in QUANT_TYPES:
        if q.lower() == key.lower():
            return q
    valid = ", ".join([*QUANTIZATIONS, *QUANT_TYPES])
    raise WorkbenchError(f"unknown quantization {name!r}", f"Use one of: {valid}.")


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"{out} exists and is not a folder",
                             "Choose another --output.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise WorkbenchError(f"{out} exists and is not empty",
                             "Choose another --output, or pass --force to replace it.")


def target_from_profile(path: Path) -> dict[str, Any]:
    """Planner settings for the machine a saved profile (`%profile_device --save`)
    describes: its device, cores and free memory."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        gpus = data["gpus"]
        settings: dict[str, Any] = {
            "device": "gpu" if gpus else "cpu",
            "threads": int(data["physical_cores"]),
            "ram_mib": max(256, int(data["ram_available"]) // 2**20 - 512)}
        if gpus:
            settings["gpu_mem_mib"] = max(256, int(gpus[0]["memory_free"]) // 2**20 - 512)
        return settings
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise WorkbenchError(f"{path} is not a saved device profile ({type(e).__name__}: {e})",
                             "Save one on the target machine with "
                             "`%profile_device --save target.json`.") from None


@dataclasses.dataclass
class Deployment:
    folder: Path
    config: dict[str, Any]

    def rows(self) -> list[tuple[str, str]]:
        return [("folder", str(self.folder)), ("start", f"{self.folder}/start.sh"),
                *self.config["reasons"].items()]

    def _repr_html_(self) -> str:
        from .._tables import table_html

        return f"<b>Service written</b>{table_html(self.rows())}"

    def __repr__(self) -> str:
        from .._tables import table_text

        return f"Service written\n{table_text(self.rows())}"


@dataclasses.dataclass(frozen=True)
class Request:
    """A deploy's arguments, checked: nothing is read or written before they are."""
    quantization: str             # as the user gave it
    quant: str | None             # the llama.cpp type, None: keep the source's
    device: str                   # as the user gave it
    target: str                   # auto, cpu or gpu
    settings: dict[str, Any]      # planner settings from a saved profile
    output: Path
    n_parallel: int | None
    n_ctx_per_request: int | None
    kv_cache: str = "on"          # the service's prefix cache: on or off
    kv_ram_mib: int | None = None   # its budgets; None: chosen by `kv_budget`
    kv_disk_mib: int | None = None
    draft: str = "off"            # speculative decoding: off, ngram or auto
    # replicas on Ray Serve (workbench/replicas): replicas, ray, router; {}: one engine
    replicas: dict[str, Any] = dataclasses.field(default_factory=dict)


def check_arguments(*, device: str, quantization: str, output: str | os.PathLike,
                    force: bool, n_parallel: int | None, n_ctx_per_request: int | None,
                    kv_cache: str = "on", kv_ram_mib: int | None = None,
                    kv_disk_mib: int | None = None, draft: str = "off",
                    replicas: str | None = None, ray: str | None = None,
                    router: str = "prefix") -> Request:
    quant = quant_type(quantization)
    scaled = _check_replicas(replicas, ray, router)
    if not 1 <= (n_parallel or 1) <= 256:
        raise WorkbenchError(f"n_parallel must be between 1 and 256 (got {n_parallel})",
                             "Use --n-parallel 8, for example.")
    if n_ctx_per_request is not None and not 64 <= n_ctx_per_request <= 1 << 20:
        raise WorkbenchError(f"n_ctx_per_request must be between 64 and {1 << 20} "
                             f"(got {n_ctx_per_request})", "Use 2048, for example.")
    if kv_cache not in ("on", "off"):
        raise WorkbenchError(f"kv_cache must be on or off (got {kv_cache!r})",
                             "Use --kv-cache on or --kv-cache off.")
    if draft not in ("off", "ngram", "auto"):
        raise WorkbenchError(f"a service's draft must be off, ngram or auto (got {draft!r})",
                             "A draft model is not packed into a service folder; use "
                             "--draft ngram (n-gram lookup needs no file).")
    for name, value in (("kv_ram_mib", kv_ram_mib), ("kv_disk_mib", kv_disk_mib)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 0):
            raise WorkbenchError(f"{name} must be a whole number of MiB, 0 or more "
                                 f"(got {value!r})", f"Use --{name.replace('_', '-')} 1024, "
                                 "for example.")
    settings: dict[str, Any] = {}
    target = device
    if device not in DEVICES:
        profile = Path(device).expanduser()
        if not profile.is_file():
            raise WorkbenchError(f"--device {device!r} is neither auto, cpu, gpu nor a "
                                 "saved profile file",
                                 "Use auto, cpu, gpu, or a file from `%profile_device --save`.")
        settings = target_from_profile(profile)
        target = settings.pop("device")
    out = Path(output).expanduser().resolve()
    check_output(out, force)
    from .._paths import check_writable

    check_writable(out.parent, "Choose another --output.", create=True)
    return Request(quantization, quant, device, target, settings, out, n_parallel,
                   n_ctx_per_request, kv_cache, kv_ram_mib, kv_disk_mib, draft, scaled)


def _check_replicas(replicas: str | None, ray: str | None, router: str) -> dict[str, Any]:
    from ..replicas.launch import check_router, parse_replicas

    check_router(router)
    if replicas is None:
        if ray:
            raise WorkbenchError("--ray needs --replicas",
                                 "Add --replicas 2 (or MIN-MAX) to serve replicas on Ray.")
        return {}
    return {"replicas": str(parse_replicas(replicas)), "ray": ray or None, "router": router}


def deploy(model: Path, r: Request, *, port: int, host: str, quantize: Callable[..., Any],
           plan: Callable[..., Any]) -> Deployment:
    """Write the service folder. `quantize(path, to, out)` and `plan(path, **settings)`
    are the workbench's own (passed in, so this module stays free of the engine)."""
    quant, output = r.quant, r.output
    staging = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir()
    try:
        model_out = staging / MODEL_FILE
        reasons: dict[str, str] = {}
        from ..models.gguf_file import read_header

        source_quant = read_header(model).quantization
        if quant is None or quant == source_quant:
            _link_or_copy(model, model_out)
            reasons["quantization"] = (f"{source_quant}, as the source file"
                                       + ("" if quant is None else f" (already {quant})"))
        else:
            quantize(model, quant, model_out)
            reasons["quantization"] = f"{quant} from {source_quant} ({r.quantization})"
        load, placement = _place(model_out, r, plan, reasons)
        on_gpu = r.target == "gpu" or bool(load.get("n_gpu_layers"))
        kv, reasons["kv_cache"] = kv_budget(
            placement, r, disk_free=shutil.disk_usage(output.parent).free)
        load.update(kv)
        if r.draft != "off":
            load["draft"] = r.draft
        config = {
            "version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"file": MODEL_FILE, "name": _served_name(model, quant or source_quant),
                      "source": str(model), "quantization": quant or source_quant},
            "target": r.device,
            "load": load,
            "server": {"host": host, "port": port, "max_queue": 2 * load["n_parallel"],
                       "request_timeout_s": 300, "max_body_bytes": 1 << 20,
                       "aliases": ["default"],
                       "default_max_tokens": min(512, load["n_ctx"] // load["n_parallel"]),
                       "api_key_env": "WORKBENCH_API_KEY", **r.replicas},
            "image": gpu_image() if on_gpu else {"device": "cpu"},
            "reasons": reasons,
            "versions": _versions(),
        }
        from ..models.hashing import file_sha256

        config["model"]["sha256"] = file_sha256(model_out)
        write_files(staging, config)
        _swap_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Deployment(output, config)


def _place(model: Path, r: Request, plan: Callable[..., Any],
           reasons: dict[str, str]) -> tuple[dict[str, Any], Any]:
    """The service's load settings, and the placement whose memory sizes the prefix cache.

    A GPU target that this machine cannot see (a folder written on a laptop for a GPU
    server) gets its GPU layers chosen when the service starts there, from that GPU's
    free memory; the placement is then this machine's, a cautious stand-in for the
    host's RAM."""
    per_req = r.n_ctx_per_request or PER_REQUEST_CTX
    settings = {**r.settings, "kv_cache": "off"}  # the cache's RAM is sized after the fit
    # where the model goes decides how many requests to batch; the batch's context
    # (KV memory) then decides the final placement
    first = plan(model, device="auto" if r.target == "gpu" else r.target, n_ctx=per_req,
                 **settings)
    gpu_here = any(b.kind == "gpu" for b in first.budgets)
    on_gpu = r.target == "gpu" or bool(first.settings.get("n_gpu_layers"))
    par = r.n_parallel or N_PARALLEL["gpu" if on_gpu else "cpu"]
    elsewhere = r.target == "gpu" and not gpu_here
    placement = plan(model, device="auto" if elsewhere else r.target, n_ctx=par * per_req,
                     n_parallel=par, **settings)
    load: dict[str, Any] = {}
    if elsewhere:
        reasons["n_gpu_layers"] = ("chosen when the service starts, from the target GPU's "
                                   "free memory (all layers where they fit beside the "
                                   "context): no GPU is visible where this folder was written")
    else:
        load = dict(placement.settings)
        for key, value, why in placement.reasons:
            if key not in ("n_ctx",):
                reasons[key] = f"{value}: {why}"
    if r.target == "gpu":  # a GPU image without a GPU fails at start, not on the CPU
        load["device"] = "gpu"
        reasons["device"] = "gpu: the service refuses to start where llama.cpp sees no GPU"
    load.update(n_parallel=par, n_ctx=par * per_req)
    # Threads: the service's machine as it is when it starts, not this one now.
    load.pop("threads", None)
    load.pop("max_threads", None)
    reasons["threads"] = ("chosen when the service starts, from the cores idle then, "
                          "and re-chosen while it serves (worker/threads.py)")
    reasons["n_parallel"] = (f"{par}: requests decoded together in one batch "
                             + ("(given)" if r.n_parallel else
                                "(a GPU keeps gaining past 16 sequences)" if on_gpu else
                                "(on a few CPU cores the gain levels off near 8-16)"))
    reasons["n_ctx"] = (f"{par * per_req}: {per_req} tokens for each of the {par} "
                        "parallel requests")
    return load, placement


def kv_budget(placement: Any, r: Request, *, disk_free: int) -> tuple[dict[str, Any], str]:
    """The service's prefix cache (LoadConfig's kv_* fields) and the reason, in words.

    RAM: twice the batch's KV memory (room for every sequence's state and as many more),
    at least 256 MiB, at most a quarter of the RAM the placement leaves beside the model
    and its context, and at most 8 GiB; off below 64 MiB. Disk (in the folder's kv/):
    4 times the RAM budget, at least 1 GiB, at most a tenth of the free disk where the
    folder is written, and at most 16 GiB. Budgets given (--kv-ram-mib, --kv-disk-mib)
    are kept."""
    if r.kv_cache == "off":
        return {"kv_cache": "off"}, "off: deployed with --kv-cache off"
    host = placement.budgets[0]
    left = max(0, host.usable - placement.predicted("CPU")) // MiB
    batch_kv = sum(m.kv for m in placement.memory) // MiB
    if r.kv_ram_mib is not None:
        ram, ram_why = r.kv_ram_mib, "given"
    else:
        ram = min(max(2 * batch_kv, KV_RAM_MIN), left // 4, KV_RAM_MAX)
        ram_why = (f"twice the batch's {batch_kv:,} MiB of KV, at least {KV_RAM_MIN}, "
                   f"within a quarter of the {left:,} MiB of RAM left beside the model")
        if ram < KV_RAM_OFF_BELOW:
            return {"kv_cache": "off"}, (f"off: only {left:,} MiB of RAM are left beside the "
                                         "model (give --kv-ram-mib to turn it on)")
    if r.kv_disk_mib is not None:
        disk, disk_why = r.kv_disk_mib, "given"
    else:
        disk = max(0, min(max(4 * ram, KV_DISK_MIN), disk_free // MiB // 10, KV_DISK_MAX))
        disk_why = (f"4 times the RAM budget, at least {KV_DISK_MIN:,}, within a tenth of "
                    f"the {disk_free // MiB:,} MiB free on this disk")
    return ({"kv_cache": "on", "kv_ram_mib": ram, "kv_disk_mib": disk, "kv_dir": KV_DIR},
            f"on: {ram:,} MiB of RAM ({ram_why}); {disk:,} MiB of disk in {KV_DIR}/ "
            f"({disk_why})")


def _served_name(model: Path, quant: str) -> str:
    from ..compress.quantize import _QUANT_SUFFIX

    return f"{_QUANT_SUFFIX.sub('', model.name.removesuffix('.gguf'))}-{quant}"


def _versions() -> dict[str, str | None]:
    from ..device.provenance import package_version

    # the distribution is named gguf-workbench (formerly workbench); the import name stays
    return {"workbench": package_version("gguf-workbench") or package_version("workbench"),
            "llama-cpp-python": package_version("llama-cpp-python")}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _swap_into_place(staging: Path, output: Path) -> None:
    """Rename the finished folder into place; an old one (with --force) goes only after."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.rename(output, old)
    try:
        os.rename(staging, output)
    except BaseException:
        if old is not None:
            os.rename(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
