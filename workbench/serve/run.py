"""`workbench serve FOLDER`: load the folder's model in an engine and serve it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .._net import is_loopback
from ..errors import WorkbenchError
from .bundle import CONFIG


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        config["model"]["file"], config["load"], config["server"]  # noqa: B018
    except FileNotFoundError:
        raise WorkbenchError(f"{folder} is not a service folder (no {CONFIG})",
                             "Write one with `workbench deploy --output FOLDER`.") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WorkbenchError(f"{path} is damaged: {e}",
                             "Deploy again with `workbench deploy ... --force`.") from None
    return config


def settings_for(folder: Path, host: str | None, port: int | None,
                 api_key: str | None) -> tuple[dict[str, Any], Any, str, int]:
    """The config, the service's settings and where it listens, after the security check:
    an address other than loopback needs an API key."""
    from ..settings import service_key
    from .app import ServiceSettings
    from .request import Limits

    config = read_config(folder)
    server = config["server"]
    host = host or server.get("host", "127.0.0.1")
    port = port if port is not None else int(server.get("port", 8000))
    key = (api_key or os.environ.get(server.get("api_key_env") or "WORKBENCH_API_KEY")
           or service_key() or None)  # the last: the machine's settings file
    if not is_loopback(host) and not key:
        raise WorkbenchError(
            f"refusing to listen on {host} without an API key",
            f"Set {server.get('api_key_env') or 'WORKBENCH_API_KEY'} (or pass --api-key); "
            "clients then send 'Authorization: Bearer <key>'. On 127.0.0.1 none is needed.")
    load = config["load"]
    n_parallel = int(load.get("n_parallel", 1))
    settings = ServiceSettings(
        model_name=config["model"]["name"], n_ctx_seq=int(load["n_ctx"]) // n_parallel,
        n_parallel=n_parallel, max_queue=int(server.get("max_queue", 16)),
        request_timeout_s=float(server.get("request_timeout_s", 300)),
        limits=Limits(max_body_bytes=int(server.get("max_body_bytes", 1 << 20))),
        aliases=tuple(str(a) for a in server.get("aliases", ["default"])),
        default_max_tokens=int(server.get("default_max_tokens", 512)), api_key=key,
        embed_model_name=(config.get("embedding") or {}).get("name"))
    return config, settings, host, port


def serve(folder: str | os.PathLike, *, host: str | None = None, port: int | None = None,
          api_key: str | None = None, ready: Any = None) -> None:
    """Run the service until interrupted (SIGINT/SIGTERM). `ready()` is called once it
    listens."""
    import dataclasses

    import uvicorn

    from ..config import LoadConfig, build
    from ..device.planner import resolve
    from ..engine.client import Engine
    from .app import create_app

    folder = Path(folder).expanduser().resolve()
    config, settings, host, port = settings_for(folder, host, port, api_key)
    if config["server"].get("replicas"):  # replicas on Ray Serve behind this service
        from ..replicas.service import serve_replicas

        return serve_replicas(folder, config, settings, host, port, ready)
    import logging

    # the service's own log (a request's `user`, failures with their tracebacks) on stderr
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("workbench %(asctime)s %(levelname)s %(message)s"))
    service_log = logging.getLogger("workbench.serve")
    service_log.addHandler(handler)
    service_log.setLevel(logging.INFO)
    model = folder / config["model"]["file"]
    fields = {f.name for f in dataclasses.fields(LoadConfig)}
    given = {k: v for k, v in config["load"].items() if k in fields and v is not None}
    if given.get("kv_dir"):  # the prefix cache's folder, relative to the service's
        given["kv_dir"] = str(folder / Path(given["kv_dir"]).expanduser())
    engine = Engine()
    embedder = None
    try:  # what the folder fixes is kept; threads are chosen here, from the cores idle now
        load, _ = resolve(engine, model, build(LoadConfig, given), given)
        info = engine.load(model, load)
        cache = (f"prefix cache {load.kv_ram_mib:,} MiB RAM + {load.kv_disk_mib:,} MiB disk"
                 if load.kv_cache == "on" else "no prefix cache")
        print(f"workbench: serving {settings.model_name} ({info.quantization}, "
              f"{info.n_parallel} parallel, {info.threads} threads, "
              f"{info.n_gpu_layers} GPU layers, {cache}) on http://{host}:{port}/v1",
              flush=True)
        if settings.embed_model_name:  # a second worker: see protocol.LoadEmbedder
            from .._cpu import usable_cores

            embedder = Engine()
            e = embedder.load_embedder(folder / config["embedding"]["file"],
                                       threads=int(config["embedding"].get("threads") or
                                                   usable_cores()))
            print(f"workbench: embedding with {settings.embed_model_name} ({e.architecture}, "
                  f"{e.threads} threads) on http://{host}:{port}/v1/embeddings", flush=True)
        app = create_app(engine, settings, embedder)
        cfg = uvicorn.Config(app, host=host, port=port, log_level="warning",
                             timeout_graceful_shutdown=5, limit_concurrency=None)
        server = uvicorn.Server(cfg)
        if ready is not None:
            app.add_event_handler("startup", ready)
        server.run()
    finally:
        engine.close()
        if embedder is not None:
            embedder.close()
