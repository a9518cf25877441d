"""The Jupyter server extension behind the Workbench panel: a REST API under
`<base_url>/workbench/`, every route authenticated (`handlers.py`)."""

from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "workbench.labext"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    from .handlers import setup_handlers

    setup_handlers(serverapp.web_app)
    serverapp.log.info("workbench: the Workbench panel's API is at %sworkbench/",
                       serverapp.web_app.settings.get("base_url", "/"))
