"""`workbench deploy --update MODEL --output FOLDER`: roll the running replicas of a
service onto a new model file.

The file is copied into the folder (as model-<sha256>.gguf) and Ray Serve redeploys the
replicas with it: it starts replicas of the new model, and stops each old one only once its
requests have finished, so nothing in flight is dropped. Then service.json names the new
file (a restart serves it) and the old file goes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..errors import WorkbenchError
from . import launch, service


UPDATE_FLAGS = ("update", "output", "ray")  # what an update reads; the folder fixes the rest


def check_update_flags(flags: dict[str, Any]) -> None:
    """An update takes the service folder's settings: any other deploy flag given with
    --update is refused, not ignored."""
    extra = sorted(k for k in flags if k not in UPDATE_FLAGS)
    if extra:
        names = ", ".join("--" + k.replace("_", "-") for k in extra)
        raise WorkbenchError(f"--update takes only --output and --ray, not {names}",
                             "An update keeps the service's settings (service.json); to "
                             "change them, deploy the folder again with --force.")


def update(folder: str | os.PathLike, model: str | os.PathLike,
           address: str | None = None) -> dict[str, Any]:
    """Roll the running replicas of the service in `folder` onto `model`; returns what
    happened, with the seconds until every replica served the new model. `address`: the
    Ray cluster's (default: the folder's, else the one running on this machine)."""
    import asyncio
    import concurrent.futures

    try:  # a notebook's kernel runs an event loop, where Ray's handles must not block
        asyncio.get_running_loop()
    except RuntimeError:
        return _update(folder, model, address)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_update, folder, model, address).result()


def _update(folder: str | os.PathLike, model: str | os.PathLike,
            address: str | None) -> dict[str, Any]:
    from ..models.gguf_file import read_header
    from ..models.hashing import file_sha256
    from ..serve.deploy import _link_or_copy
    from ..serve.run import read_config

    folder = Path(folder).expanduser().resolve()
    config = read_config(folder)
    server = config["server"]
    if not server.get("replicas"):
        raise WorkbenchError(f"{folder} is a service of one engine, not of replicas",
                             "Deploy it with --replicas N to update it in place; a single "
                             "engine is updated by deploying again and restarting it.")
    src = Path(model).expanduser().resolve()
    read_header(src)  # a damaged file fails here, before any replica is touched
    sha = file_sha256(src)
    name = f"model-{sha[:12]}.gguf"
    if not (folder / name).exists():
        tmp = folder / f".{name}.tmp"
        _link_or_copy(src, tmp)
        tmp.replace(folder / name)
    import ray

    joined = not ray.is_initialized()
    launch.connect(address or server.get("ray") or "auto")
    try:
        threads = _running()[0]["info"].threads  # the new replicas run as many as the old
        t0 = time.monotonic()
        count = launch.parse_replicas(server["replicas"])
        surge = launch.Replicas(count.min + 1, count.min + 1)
        if count.min == count.max and ray.available_resources().get("CPU", 0) >= threads:
            # Ray Serve's roll stops an old replica before it starts the new one: first one
            # replica more of the old model, so the roll never serves with fewer than before
            launch.run(service.app(folder, config, config["model"]["file"],
                                   config["model"]["sha256"], threads, surge))
            launch.run(service.app(folder, config, name, sha, threads, surge))
        handle = launch.run(service.app(folder, config, name, sha, threads))
        shas = {i["sha256"] for i in launch.replica_infos(handle)}
        seconds = time.monotonic() - t0
    finally:
        if joined:  # leave the cluster (it goes on serving): a kernel must not hold it
            ray.shutdown()
    if shas != {sha}:
        raise WorkbenchError("the update finished but some replicas still serve the old model",
                             "Run the update again.")
    old = config["model"]["file"]
    config["model"].update(file=name, sha256=sha)
    tmp = folder / ".service.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tmp.replace(folder / "service.json")
    if old != name and old.startswith("model-") and (folder / old).exists():
        (folder / old).unlink()
    return {"model": str(src), "sha256": sha, "replicas": server["replicas"],
            "seconds": round(seconds, 2)}


def _running() -> list[dict[str, Any]]:
    from ray import serve

    if launch.APP not in serve.status().applications:
        raise WorkbenchError("no replicated service is running on this Ray cluster",
                             "Start it with `workbench serve FOLDER` first.")
    return launch.replica_infos(serve.get_deployment_handle(launch.DEPLOYMENT, launch.APP))
