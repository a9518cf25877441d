"""`workbench serve FOLDER` for a folder deployed with --replicas.

The service is the same as with one engine (serve/app.py: the OpenAI-compatible API, the
API key, admission with 429, /metrics), over the replicas instead of one engine; its
capacity is the replicas' together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import launch

def _threads(replicas: launch.Replicas, address: str | None, given: int | None) -> int:
    """Threads per replica (and the CPUs each reserves from Ray): the folder's choice for a
    cluster; on this machine alone, its idle cores shared by the replicas."""
    from .._cpu import idle_cores

    if address:
        return max(1, int(given or 1))
    return max(1, idle_cores().idle // replicas.max)


def app(folder: Path, config: dict[str, Any], model_file: str, sha256: str,
        threads: int | None = None, replicas: launch.Replicas | None = None) -> Any:
    """The replicas' application for the folder's settings (or `replicas` of them),
    serving `model_file`."""
    server, load = config["server"], config["load"]
    replicas = replicas or launch.parse_replicas(server["replicas"])
    import dataclasses

    from ..config import LoadConfig

    fields = {f.name for f in dataclasses.fields(LoadConfig)} - {"threads"}
    given = {k: v for k, v in load.items() if k in fields and v is not None}
    if given.get("kv_dir"):  # each replica keeps its own disk tier, under the folder's
        given["kv_dir"] = str(folder / Path(given["kv_dir"]).expanduser())
    threads = threads or _threads(replicas, server.get("ray"), load.get("threads"))
    return launch.deployment(
        model=str(folder / model_file), sha256=sha256, load=given, replicas=replicas,
        threads=threads, n_parallel=int(load.get("n_parallel", 1)),
        max_queue=int(server.get("max_queue", 16)), router=server.get("router", "prefix"),
        request_timeout_s=float(server.get("request_timeout_s", 300)))


def serve_replicas(folder: Path, config: dict[str, Any], settings: Any, host: str, port: int,
                   ready: Any = None) -> None:
    import dataclasses

    import uvicorn

    from .._cpu import usable_cores
    from ..serve.app import create_app
    from .remote import RemoteEngine

    server = config["server"]
    replicas = launch.parse_replicas(server["replicas"])
    threads = _threads(replicas, server.get("ray"), config["load"].get("threads"))
    # A Ray started here gets one replica's cores more than the machine has: an update
    # (update.py) starts one replica more while it rolls, so capacity never drops
    launch.connect(server.get("ray"), cpus=usable_cores() + threads)
    try:
        handle = launch.run(app(folder, config, config["model"]["file"],
                                config["model"]["sha256"], threads))
        infos = launch.replica_infos(handle)
        engine = RemoteEngine(handle, infos[0]["info"], server.get("router", "prefix"))
        # the service admits what all replicas hold together
        settings = dataclasses.replace(settings, n_parallel=settings.n_parallel * replicas.max,
                                       max_queue=settings.max_queue * replicas.max)
        info = infos[0]["info"]
        print(f"workbench: serving {settings.model_name} ({info.quantization}) on "
              f"{replicas} replicas of {info.n_parallel} parallel, {info.threads} threads "
              f"each, router {engine.router}, Ray at {server.get('ray') or 'this machine'}, "
              f"on http://{host}:{port}/v1", flush=True)
        asgi = create_app(engine, settings)
        if ready is not None:
            asgi.add_event_handler("startup", ready)
        uvicorn.Server(uvicorn.Config(asgi, host=host, port=port, log_level="warning",
                                      timeout_graceful_shutdown=5)).run()
    finally:
        launch.shutdown()
