"""The files of a service folder, written from its settings (deploy.py decides them).

The folder's Dockerfile follows where the model runs. For the CPU: one stage on
python:3.11-slim that compiles llama.cpp for the CPU family. For a GPU: llama.cpp is
compiled with CUDA in CUDA's devel image (nvcc), with the workbench's own CMake flags
(`scripts/llama-cmake-args.sh`, copied into the folder and run inside the build, so
that they are worked out for the platform the image is built for), and the final stage
is CUDA's runtime image with the compiled packages and the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from ..errors import WorkbenchError

CONFIG = "service.json"
MODEL_FILE = "model.gguf"
KV_DIR = "kv"  # the prefix cache's disk tier, relative to the folder
CMAKE_SCRIPT = "llama-cmake-args.sh"
# CUDA's images, pinned. 12.6 runs on drivers from 560 (and from 525 through CUDA's
# minor-version compatibility); Ubuntu 24.04's Python is 3.12.
CUDA_VERSION = "12.6.3"
UBUNTU_VERSION = "24.04"


def gpu_image() -> dict[str, str]:
    """service.json's "image" for a GPU folder: the build and run images."""
    tag = f"{CUDA_VERSION}-{{}}-ubuntu{UBUNTU_VERSION}"
    return {"device": "gpu", "cuda": CUDA_VERSION,
            "build": f"nvidia/cuda:{tag.format('devel')}",
            "run": f"nvidia/cuda:{tag.format('runtime')}"}


def cmake_script() -> Path:
    """scripts/llama-cmake-args.sh: a checkout's, else the installed package's copy."""
    package = Path(__file__).resolve().parent.parent
    for path in (package.parent / "scripts" / CMAKE_SCRIPT,
                 package / "_data" / "scripts" / CMAKE_SCRIPT):
        if path.is_file():
            return path
    raise WorkbenchError(f"the workbench's {CMAKE_SCRIPT} is missing, and a GPU image "
                         "builds llama.cpp with its flags",
                         "The installed package is incomplete: reinstall it.")


def write_files(folder: Path, config: dict[str, Any]) -> None:
    """Write every file but the model into `folder`."""
    from ..device.provenance import package_version

    _write(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    _write(folder / "start.sh", _START.replace("@PYTHON@", sys.executable), 0o755)
    _write(folder / "healthcheck.py", _HEALTHCHECK, 0o755)
    # the package's own code (its Python files only: no JupyterLab assets, no caches)
    package = Path(__file__).resolve().parent.parent
    shutil.copytree(package, folder / "app" / "workbench",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "labextension",
                                                  "_data"))
    llama = package_version("llama-cpp-python") or "0.3.36"
    _write(folder / "requirements.txt", "\n".join([
        f"llama-cpp-python=={llama}",
        f"starlette>={package_version('starlette') or '0.40'}",
        f"uvicorn>={package_version('uvicorn') or '0.30'}",
        "psutil>=5.9", "jinja2>=3.1",
        # replicas (workbench/replicas) run on Ray Serve, the same version on every machine
        *([f"ray[serve]=={package_version('ray') or '2.60.0'}"] if config["server"].get("replicas")
          else []), ""]))
    image, port = config["image"], config["server"]["port"]
    gpu = image["device"] == "gpu"
    if gpu:
        shutil.copyfile(cmake_script(), folder / CMAKE_SCRIPT)
        (folder / CMAKE_SCRIPT).chmod(0o755)
        _write(folder / "Dockerfile", _GPU_DOCKERFILE.format(
            port=port, cuda=image["cuda"], cuda_minor=_minor(image["cuda"]),
            ubuntu=UBUNTU_VERSION, script=CMAKE_SCRIPT))
    else:
        _write(folder / "Dockerfile", _DOCKERFILE.format(port=port))
    _write(folder / ".dockerignore", f"{KV_DIR}/\n.workbench/\n")
    name = config["model"]["name"]
    _write(folder / "README.md", _README.format(
        name=name, port=port, name_lower=name.lower(), quant=config["model"]["quantization"],
        docker=(_DOCKER_GPU if gpu else _DOCKER_CPU).format(
            name_lower=name.lower(), port=port, kv=KV_DIR,
            cuda_minor=_minor(image.get("cuda", "")), **image),
        cache=_cache_text(config), kv=KV_DIR,
        reasons="\n".join(f"| {k} | {v} |" for k, v in config["reasons"].items())))
    for f in folder.rglob("*"):  # everything on disk before the rename makes it visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _cache_text(config: dict[str, Any]) -> str:
    load = config["load"]
    if load.get("kv_cache") != "on":
        return ("Off (" + config["reasons"]["kv_cache"].removeprefix("off: ") + "): every "
                "prompt is computed in full. Deploy again with `--kv-cache on` to turn it on.")
    return (f"On, within **{load['kv_ram_mib']:,} MiB of RAM** and **{load['kv_disk_mib']:,} "
            f"MiB of disk** (in `{load['kv_dir']}/`, made when the service starts). A prompt "
            "that starts like an earlier one (the same system prompt, a conversation so far) "
            "restores that prefix's KV state instead of computing it again; `/metrics` counts "
            "the hits (`workbench_kv_cache_hits_total`, by tier). To change the budgets, edit "
            "`kv_ram_mib` and `kv_disk_mib` under `load` in service.json, or deploy again "
            "with `--kv-ram-mib`/`--kv-disk-mib`; `--kv-cache off` turns the cache off.")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)


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

_GPU_DOCKERFILE = """# The service as an NVIDIA GPU image: run it with `docker run --gpus all`.
# llama.cpp is compiled with CUDA (nvcc) in CUDA's devel image; the final image is CUDA's
# runtime image. The host needs an NVIDIA driver for CUDA {cuda_minor} and the NVIDIA
# Container Toolkit. The service loads the model's layers onto the GPU (service.json: load).
ARG CUDA_VERSION={cuda}
ARG UBUNTU_VERSION={ubuntu}

FROM nvidia/cuda:${{CUDA_VERSION}}-devel-ubuntu${{UBUNTU_VERSION}} AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \\
        python3 python3-dev python3-venv \\
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY requirements.txt {script} ./
# llama.cpp's CMake flags are the workbench's own ({script}, from scripts/), with
# CUDA (-DGGML_CUDA=on) and a portable build (no -march=native, no GPU needed to build),
# worked out for the platform the image is built for. The build has no NVIDIA driver:
# libcuda.so.1 comes with the host's driver at run time, so the linker lets it be missing.
# --build-arg CUDA_ARCHITECTURES=90 (an H100, say) compiles for one GPU family: faster.
ARG CUDA_ARCHITECTURES=
RUN args=$(WORKBENCH_GPU_BACKEND=cuda WORKBENCH_PORTABLE=1 bash {script}) \\
    && case "$args" in *-DGGML_CUDA=on*) ;; *) echo "no CUDA in: $args" >&2; exit 1 ;; esac \\
    && if [ -n "$CUDA_ARCHITECTURES" ]; then \\
        args="$args -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES"; fi \\
    && echo "CMAKE_ARGS=$args" \\
    && CMAKE_ARGS="$args -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined" \\
        pip install --no-cache-dir --no-binary llama-cpp-python -r requirements.txt

FROM nvidia/cuda:${{CUDA_VERSION}}-runtime-ubuntu${{UBUNTU_VERSION}}
RUN apt-get update && apt-get install -y --no-install-recommends python3 libgomp1 \\
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHON=/opt/venv/bin/python
WORKDIR /service
COPY . .
ENV WORKBENCH_HOME=/service/.workbench
EXPOSE {port}
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD python healthcheck.py
# Inside a container the service must listen on all interfaces: pass WORKBENCH_API_KEY.
CMD ["./start.sh", "--host", "0.0.0.0"]
"""

_DOCKER_CPU = """```sh
docker build -t {name_lower} .
docker run -p {port}:{port} -e WORKBENCH_API_KEY=change-me \\
    -v {name_lower}-kv:/service/{kv} {name_lower}
```
"""

_DOCKER_GPU = """The image runs the model on an NVIDIA GPU: llama.cpp is compiled for CUDA in
`{build}`, and the service runs in `{run}`. The host needs an NVIDIA driver for CUDA
{cuda_minor} (560 or newer) and the NVIDIA Container Toolkit; `--gpus all` hands the GPUs to
the container.

```sh
docker build -t {name_lower} .   # compiles llama.cpp's CUDA kernels: 20-40 minutes
docker run --gpus all -p {port}:{port} -e WORKBENCH_API_KEY=change-me \\
    -v {name_lower}-kv:/service/{kv} {name_lower}
```

`docker build --build-arg CUDA_ARCHITECTURES=90 ...` compiles for one GPU family only (90:
H100, 89: L4/RTX 40xx, 86: A10/RTX 30xx, 80: A100), which is much faster. Without a GPU
(`--gpus` left out) the service refuses to start and says so.
"""

_README = """# {name}: an OpenAI-compatible inference service

Written by `workbench deploy`. The model is `model.gguf` ({quant}); every setting is in
`service.json` with the reason it was chosen.

## Start

The folder carries the workbench's code (`app/`); the Python that runs it needs the packages in
`requirements.txt` (on a machine without the workbench: `pip install -r requirements.txt`).

```sh
./start.sh                      # http://127.0.0.1:{port}
```

To listen on other interfaces, set an API key: `WORKBENCH_API_KEY=... ./start.sh --host 0.0.0.0`.
Clients then send `Authorization: Bearer <key>`.

## In a container

{docker}
The volume keeps the prefix cache (`/service/{kv}`) across restarts.

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

## Prefix cache

{cache}

## Settings

| setting | value and reason |
|---|---|
{reasons}
"""
