"""Tool (function) calling for the service: `tools`, `tool_choice`, and the call itself.

The declared functions are described to the model in a system message, and a call is one
JSON object, `{"name": ..., "arguments": {...}}`. Where the request forces a call
(`required`, or a named function) a grammar built from the functions' parameter schemas
decides every token of it, so the name is a declared one and the arguments validate.
With `auto` the model answers freely; an answer that is such an object, naming a declared
function, is the call.
"""

from __future__ import annotations

import dataclasses
import json
import re

from .._schema import schema_text
from ..errors import WorkbenchError
from .request import ApiError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclasses.dataclass(frozen=True)
class Tools:
    functions: dict[str, dict]   # name -> {"description": ..., "parameters": schema}
    choice: str                  # "auto" | "required" | a function's name

    def system_text(self) -> str:
        """The functions, as the system message that describes them to the model."""
        lines = ["You can call these functions. To call one, reply with only a JSON object "
                 '{"name": FUNCTION, "arguments": {...}} and nothing else.']
        for name, f in self.functions.items():
            lines.append(f"- {name}: {f['description'] or '(no description)'}; arguments: "
                         f"{json.dumps(f['parameters'])}")
        return "\n".join(lines)

    def call_schema(self) -> str | None:
        """The JSON schema of a call, where the request forces one (else None)."""
        if self.choice == "auto":
            return None
        names = list(self.functions) if self.choice == "required" else [self.choice]
        calls = [{"type": "object", "properties": {
            "name": {"const": n}, "arguments": self.functions[n]["parameters"]},
            "required": ["name", "arguments"], "additionalProperties": False}
            for n in names]
        return schema_text(calls[0] if len(calls) == 1 else {"anyOf": calls})

    def call_in(self, text: str) -> tuple[str, str] | None:
        """(name, arguments as JSON text) where `text` is a call of a declared function."""
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self.functions \
                or not isinstance(obj.get("arguments", {}), dict):
            return None
        return obj["name"], json.dumps(obj.get("arguments", {}))


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
