"""Defaults a teacher sets once for every kernel on a machine: a TOML file in the workbench
home (`$WORKBENCH_HOME/config.toml`, or the file `$WORKBENCH_CONFIG` names), with
`WORKBENCH_*` environment variables over it, and arguments given in a call over both.

    # ~/.workbench/config.toml
    model = "SmolLM2-135M-Instruct"   # what %load_model loads when no model is named
    threads = 2                       # any %load_model setting, by its name ...
    n_ctx = 2048
    kv_ram_mib = 512                  # ... the prefix cache's budgets among them
    kv_disk_mib = 2048

    [service]
    api_key = "change-me"             # the key `workbench serve` asks clients for

The same settings as variables: WORKBENCH_MODEL, WORKBENCH_THREADS, WORKBENCH_N_CTX,
WORKBENCH_KV_RAM_MIB, ..., WORKBENCH_API_KEY. An unknown name or a value of the wrong
type is an error that names it: nothing in the file is silently ignored.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any

from .errors import WorkbenchError

# %load_model settings that are per model or per run, not a machine's defaults
_NOT_DEFAULTS = ("lora", "lora_scale", "cluster", "rpc_servers", "tensor_split",
                 "set_gpu_power_limit")
_SERVICE_KEYS = ("api_key",)


def path() -> Path:
    """The settings file (it need not exist)."""
    given = os.environ.get("WORKBENCH_CONFIG")
    if given:
        return Path(given).expanduser()
    home = os.environ.get("WORKBENCH_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".workbench") / "config.toml"


def _load_fields() -> dict[str, Any]:
    from .config import LoadConfig

    hints = typing.get_type_hints(LoadConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(LoadConfig)
            if f.name not in _NOT_DEFAULTS}


def _parse_toml(text: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


def _read_file(p: Path) -> dict[str, Any]:
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise WorkbenchError(f"cannot read the settings file {p}: {e}",
                             "Fix its permissions or encoding (UTF-8), or remove it.") from None
    try:
        return _parse_toml(text)
    except ValueError as e:  # tomllib.TOMLDecodeError
        raise WorkbenchError(f"the settings file {p} is not valid TOML: {e}",
                             "See the example at the top of workbench/settings.py.") from None


def _coerce(name: str, value: Any, kind: Any, where: str) -> Any:
    """`value` (from TOML, or a variable's text) as the setting's type."""
    allowed = {a for a in typing.get_args(kind) if a is not type(None)} or {kind}
    text = isinstance(value, str) and where.startswith("$")
    for t in (int, float, str):
        if t not in allowed:
            continue
        if t is str and isinstance(value, str):
            return value
        if t is int and (isinstance(value, int) and not isinstance(value, bool)):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if text:
            try:
                return t(value)
            except ValueError:
                pass
    names = " or ".join(sorted(t.__name__ for t in allowed if isinstance(t, type)))
    raise WorkbenchError(f"{where}: {name} must be {names}, not {value!r}",
                         f"Set {name} to a {names}, or remove it.")


def defaults() -> dict[str, Any]:
    """Everything set in the file and the variables: `model`, the %load_model settings
    by name, and `service` (a dict with `api_key`)."""
    p = path()
    data = _read_file(p)
    fields = _load_fields()
    out: dict[str, Any] = {}
    service: dict[str, Any] = {}
    for key, value in data.items():
        where = str(p)
        if key == "service" and isinstance(value, dict):
            for k, v in value.items():
                if k not in _SERVICE_KEYS:
                    raise WorkbenchError(f"{where}: unknown setting [service] {k}",
                                         f"[service] takes: {', '.join(_SERVICE_KEYS)}.")
                service[k] = _coerce(k, v, str, where)
        elif key == "model":
            out["model"] = _coerce(key, value, str, where)
        elif key in fields:
            out[key] = _coerce(key, value, fields[key], where)
        else:
            raise WorkbenchError(f"{where}: unknown setting {key!r}",
                                 "Settings: model, [service] api_key, and the %load_model "
                                 f"settings: {', '.join(fields)}.")
    for key, kind in {"model": str, **fields}.items():
        var = f"WORKBENCH_{key.upper()}"
        if os.environ.get(var):
            out[key] = _coerce(key, os.environ[var], kind, f"${var}")
    if os.environ.get("WORKBENCH_API_KEY"):
        service["api_key"] = os.environ["WORKBENCH_API_KEY"]
    if service:
        out["service"] = service
    return out


def load_defaults() -> dict[str, Any]:
    """The %load_model settings set for this machine (not the model)."""
    return {k: v for k, v in defaults().items() if k not in ("model", "service")}


def default_model() -> str | None:
    return defaults().get("model")


def service_key() -> str | None:
    return defaults().get("service", {}).get("api_key")
