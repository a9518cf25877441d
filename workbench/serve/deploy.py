"""`workbench deploy`: a self-contained service folder, tuned for the target machine.

    ai-service/
      model.gguf          the model, quantized as asked
      service.json        every setting, and why it was chosen
      app/workbench/      the workbench's Python code, so the folder needs no install of it
      start.sh            runs the service (`python3 -m workbench.cli serve .`, from app/)
      healthcheck.py      exits 0 when /health answers 200 (Docker's HEALTHCHECK uses it)
      Dockerfile          an image that builds llama.cpp for its CPU and runs start.sh
      requirements.txt    what the service needs besides app/ (llama-cpp-python, starlette,
                          uvicorn, psutil, jinja2)
      README.md           how to start it and call it (curl, Python)

The folder is built under a temporary name next to the output and renamed into place,
so a failed deploy leaves nothing half-written.
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

CONFIG = "service.json"
MODEL_FILE = "model.gguf"
QUANTIZATIONS = {"none": None, "int8": "Q8_0", "int4": "Q4_K_M"}
DEVICES = ("auto", "cpu", "gpu")
PER_REQUEST_CTX = 2048
# Sequences decoded together. On 2 CPU cores a bare batched llama_decode loop gave 16
# sequences 1.9x the tokens/s of one; on a GPU the gain keeps growing past 16.
N_PARALLEL = {"cpu": 8, "gpu": 16}


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


def check_arguments(*, device: str, quantization: str, output: str | os.PathLike,
                    force: bool, n_parallel: int | None,
                    n_ctx_per_request: int | None) -> Request:
    quant = quant_type(quantization)
    if not 1 <= (n_parallel or 1) <= 256:
        raise WorkbenchError(f"n_parallel must be between 1 and 256 (got {n_parallel})",
                             "Use --n-parallel 8, for example.")
    if n_ctx_per_request is not None and not 64 <= n_ctx_per_request <= 1 << 20:
        raise WorkbenchError(f"n_ctx_per_request must be between 64 and {1 << 20} "
                             f"(got {n_ctx_per_request})", "Use 2048, for example.")
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
                   n_ctx_per_request)


def deploy(model: Path, r: Request, *, port: int, host: str, quantize: Callable[..., Any],
           plan: Callable[..., Any]) -> Deployment:
    """Write the service folder. `quantize(path, to, out)` and `plan(path, **settings)`
    are the workbench's own (passed in, so this module stays free of the engine)."""
    quant, target, settings, output = r.quant, r.target, r.settings, r.output
    n_parallel, n_ctx_per_request, quantization = r.n_parallel, r.n_ctx_per_request, \
        r.quantization
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
            reasons["quantization"] = f"{quant} from {source_quant} ({quantization})"
        per_req = n_ctx_per_request or PER_REQUEST_CTX
        # where the model goes decides how many requests to batch; the batch's context
        # (KV memory) then decides the final placement
        first = plan(model_out, device=target, n_ctx=per_req, **settings)
        on_gpu = bool(first.settings.get("n_gpu_layers"))
        par = n_parallel or N_PARALLEL["gpu" if on_gpu else "cpu"]
        placement = plan(model_out, device=target, n_ctx=par * per_req, n_parallel=par,
                         **settings)
        load = dict(placement.settings)
        on_gpu = bool(load.get("n_gpu_layers"))
        load.update(n_parallel=par, n_ctx=par * per_req, kv_cache="off")
        for key, value, why in placement.reasons:
            if key not in ("n_ctx",):
                reasons[key] = f"{value}: {why}"
        # Threads: the service's machine as it is when it starts, not this one now.
        load.pop("threads", None)
        load.pop("max_threads", None)
        reasons["threads"] = ("chosen when the service starts, from the cores idle then, "
                              "and re-chosen while it serves (worker/threads.py)")
        reasons["n_parallel"] = (f"{par}: requests decoded together in one batch "
                                 + ("(given)" if n_parallel else
                                    "(a GPU keeps gaining past 16 sequences)" if on_gpu else
                                    "(on a few CPU cores the gain levels off near 8-16)"))
        reasons["n_ctx"] = (f"{par * per_req}: {per_req} tokens for each of the {par} "
                            "parallel requests")
        config = {
            "version": 1,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "model": {"file": MODEL_FILE, "name": _served_name(model, quant or source_quant),
                      "source": str(model), "quantization": quant or source_quant},
            "target": r.device,
            "load": load,
            "server": {"host": host, "port": port, "max_queue": 2 * par,
                       "request_timeout_s": 300, "max_body_bytes": 1 << 20,
                       "aliases": ["default"],
                       "default_max_tokens": min(512, per_req),
                       "api_key_env": "WORKBENCH_API_KEY"},
            "reasons": reasons,
            "versions": _versions(),
        }
        from ..models.hashing import file_sha256

        config["model"]["sha256"] = file_sha256(model_out)
        _write_files(staging, config)
        _swap_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Deployment(output, config)


def _served_name(model: Path, quant: str) -> str:
    from ..compress.quantize import _QUANT_SUFFIX

    return f"{_QUANT_SUFFIX.sub('', model.name.removesuffix('.gguf'))}-{quant}"


def _versions() -> dict[str, str | None]:
    from ..device.provenance import package_version

    return {p: package_version(p) for p in ("workbench", "llama-cpp-python")}


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


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)


def _write_files(folder: Path, config: dict[str, Any]) -> None:
    from ..device.provenance import package_version

    _write(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    import sys

    _write(folder / "start.sh", _START.replace("@PYTHON@", sys.executable), 0o755)
    _write(folder / "healthcheck.py", _HEALTHCHECK, 0o755)
    # the package's own code (its Python files only: no JupyterLab assets, no caches)
    package = Path(__file__).resolve().parent.parent
    shutil.copytree(package, folder / "app" / "workbench",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "labextension"))
    llama = package_version("llama-cpp-python") or "0.3.36"
    _write(folder / "requirements.txt", "\n".join([
        f"llama-cpp-python=={llama}",
        f"starlette>={package_version('starlette') or '0.40'}",
        f"uvicorn>={package_version('uvicorn') or '0.30'}",
        "psutil>=5.9", "jinja2>=3.1", ""]))
    _write(folder / "Dockerfile", _DOCKERFILE.format(port=config["server"]["port"]))
    name, port = config["model"]["name"], config["server"]["port"]
    _write(folder / "README.md", _README.format(
        name=name, port=port, name_lower=name.lower(), quant=config["model"]["quantization"],
        reasons="\n".join(f"| {k} | {v} |" for k, v in config["reasons"].items())))
    for f in folder.rglob("*"):  # everything on disk before the rename makes it visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


_START = """#!/bin/sh
# Starts the service on the host and port in service.json (pass --host/--port to change).
# Binding anything but 127.0.0.1 needs an API key: export WORKBENCH_API_KEY first.
# The code is in app/; the packages in requirements.txt must be installed for the Python
# that runs it: $PYTHON, else the one that wrote this folder (if it is here), else python3.
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-}
[ -z "$py" ] && [ -x "@PYTHON@" ] && py="@PYTHON@"
PYTHONPATH="$here/app${PYTHONPATH:+:$PYTHONPATH}" exec "${py:-python3}" -m workbench.cli \\
    serve "$here" "$@"
"""

_HEALTHCHECK = """#!/usr/bin/env python3
\"\"\"Exit 0 when the service's /health answers 200, else 1.\"\"\"
import json, sys, urllib.request
from pathlib import Path

server = json.loads((Path(__file__).parent / "service.json").read_text())["server"]
host = "127.0.0.1" if server["host"] in ("0.0.0.0", "::") else server["host"]
try:
    with urllib.request.urlopen(f"http://{host}:{server['port']}/health", timeout=5) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
"""

_DOCKERFILE = """# The service as an image. llama.cpp compiles for the building machine's CPU family.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \\
    && rm -rf /var/lib/apt/lists/*
WORKDIR /service
COPY requirements.txt .
RUN CMAKE_ARGS="-DGGML_NATIVE=off" pip install --no-cache-dir -r requirements.txt
COPY . .
ENV WORKBENCH_HOME=/service/.workbench
EXPOSE {port}
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD python healthcheck.py
# Inside a container the service must listen on all interfaces: pass WORKBENCH_API_KEY.
CMD ["./start.sh", "--host", "0.0.0.0"]
"""

_README = """# {name}: an OpenAI-compatible inference service

Written by `workbench deploy`. The model is `model.gguf` ({quant}); every setting is in
`service.json` with the reason it was chosen.

## Start

The folder carries the workbench's code (`app/`); the Python that runs it needs the packages in
`requirements.txt` (on a machine without the workbench: `pip install -r requirements.txt`), or
build the image: `docker build -t {name_lower} .`

```sh
./start.sh                      # http://127.0.0.1:{port}
```

To listen on other interfaces, set an API key: `WORKBENCH_API_KEY=... ./start.sh --host 0.0.0.0`.
Clients then send `Authorization: Bearer <key>`.

## Call it

```sh
curl http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "{name}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
curl http://127.0.0.1:{port}/v1/models
curl http://127.0.0.1:{port}/health
curl http://127.0.0.1:{port}/metrics
```

```python
from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="unused-on-loopback")
reply = client.chat.completions.create(
    model="{name}", messages=[{{"role": "user", "content": "Hello!"}}])
print(reply.choices[0].message.content)

for chunk in client.chat.completions.create(
        model="{name}", messages=[{{"role": "user", "content": "Count to 5."}}], stream=True):
    print(chunk.choices[0].delta.content or "", end="")
```

Requests beyond the batch and its queue get `429` with `Retry-After`; a client that
disconnects stops its generation.

## Settings

| setting | value and reason |
|---|---|
{reasons}
"""
