"""Tool (function) calling for the service: `tools` and `tool_choice` read from a
request, checked field by field. What a call is, and its grammar: `workbench/_tools.py`.
"""

from __future__ import annotations

import json
import re

from .._schema import schema_text
from .._tools import CALL_TAG, Tools

__all__ = ["CALL_TAG", "Tools", "parse_tools"]
from ..errors import WorkbenchError
from .request import ApiError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def parse_tools(body: dict) -> Tools | None:
    """The request's tools and tool_choice, checked; None where no tool may be called."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' names a tool, but the request declares no "
                           "'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list", param="tools")
    functions: dict[str, dict] = {}
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict):
            raise ApiError(400, f"{where} must be {{\"type\": \"function\", \"function\": "
                           "{...}}", param=where)
        extra = sorted(set(f) - {"name", "description", "parameters", "strict"})
        if extra:
            raise ApiError(400, f"{where}.function.{extra[0]} is not supported",
                           param=f"{where}.function.{extra[0]}")
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.match(name) or name in functions:
            raise ApiError(400, f"{where}.function.name must be a new name of 1 to 64 letters, "
                           "digits, _ or -", param=f"{where}.function.name")
        params = f.get("parameters", {"type": "object", "properties": {}})
        try:
            params = json.loads(schema_text(params))
        except WorkbenchError as e:
            raise ApiError(400, f"{where}.function.parameters: {e.message}",
                           param=f"{where}.function.parameters",
                           code="unsupported_schema") from None
        if "$ref" in json.dumps(params):
            raise ApiError(400, f"{where}.function.parameters: $ref is not supported in a "
                           "tool's parameters (write the schema out)",
                           param=f"{where}.function.parameters", code="unsupported_schema")
        description = f.get("description") or ""
        if not isinstance(description, str):
            raise ApiError(400, f"{where}.function.description must be a string",
                           param=f"{where}.function.description")
        functions[name] = {"description": description, "parameters": params}
    if choice is None or choice == "auto":
        return Tools(functions, "auto")
    if choice == "none":
        return None
    if choice == "required":
        return Tools(functions, "required")
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) \
        and choice.get("type") == "function" and isinstance(choice.get("function"), dict) \
        else None
    if not isinstance(named, str):
        raise ApiError(400, "'tool_choice' must be none, auto, required or {\"type\": "
                       "\"function\", \"function\": {\"name\": ...}}", param="tool_choice")
    if named not in functions:
        raise ApiError(400, f"'tool_choice' names the function '{named[:64]}', which 'tools' "
                       f"does not declare (it declares {', '.join(functions)})",
                       param="tool_choice")
    return Tools(functions, named)
