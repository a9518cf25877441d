"""Function calling, on both sides of the engine: the declared functions, the system
message that describes them, the grammar of a forced call, and reading a call back.

A call is one JSON object, `{"name": ..., "arguments": {...}}`. Where a call is forced
(`required`, or a named function) a grammar built from the functions' parameter schemas
decides every token of it, so the name is a declared one and the arguments validate.
With `auto` the model answers freely; an answer that is such an object, naming a declared
function, is the call. `function_schema` writes a Python function's declaration from its
signature and docstring (`workbench.chat(..., tools=[f])`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
import typing
from typing import Any, Callable

from ._schema import schema_text
from .errors import GenerationError


CALL_TAG = "<tool_call>"  # Hermes- and Qwen-style templates wrap a call in these tags


@dataclasses.dataclass(frozen=True)
class Tools:
    functions: dict[str, dict]   # name -> {"description": ..., "parameters": schema}
    choice: str                  # "auto" | "required" | a function's name

    @classmethod
    def from_openai(cls, tools: list[dict], choice: str = "auto") -> "Tools":
        """From OpenAI's `tools` list (as `openai()` writes it)."""
        return cls({t["function"]["name"]: {"description": t["function"].get("description", ""),
                                            "parameters": t["function"]["parameters"]}
                    for t in tools}, choice)

    def openai(self) -> str:
        """The functions as OpenAI's `tools` list, in JSON text (as `Chat.tools` holds)."""
        return json.dumps([{"type": "function", "function": {"name": n, **f}}
                           for n, f in self.functions.items()])

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
        text = text.strip()
        if text.startswith(CALL_TAG):  # as templates with a tools section ask for it
            text = text[len(CALL_TAG):].removesuffix("</tool_call>")
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self.functions \
                or not isinstance(obj.get("arguments", {}), dict):
            return None
        args, params = obj.get("arguments", {}), self.functions[obj["name"]]["parameters"]
        # Unforced (auto), the grammar did not hold the arguments: an object that does
        # not fit the declaration is an answer, not a call. (Names only, not types.)
        if not set(params.get("required", ())) <= set(args) or (
                params.get("additionalProperties") is False
                and not set(args) <= set(params.get("properties", {}))):
            return None
        return obj["name"], json.dumps(args)


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean",
               dict: "object", type(None): "null"}


def _type_schema(t: Any, where: str) -> dict:
    if t in _JSON_TYPES:
        return {"type": _JSON_TYPES[t]}
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, tuple, set, frozenset) or t is list:
        return {"type": "array", "items": _type_schema(args[0], where)} if args \
            else {"type": "array"}
    if origin is dict:
        return {"type": "object"}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type_schema(a, where) for a in args]}
    raise GenerationError(f"{where}: the type {t!r} has no JSON schema here",
                          "Annotate parameters with str, int, float, bool, list[...], "
                          "dict, Literal[...] or a union of them.")


def function_schema(fn: Callable[..., Any]) -> tuple[str, dict]:
    """(name, {"description", "parameters"}) of a Python function: its signature's
    annotations as JSON types, its docstring's first paragraph as the description and
    its `name: text` lines as the parameters' descriptions."""
    name = fn.__name__
    doc = inspect.getdoc(fn) or ""
    hints = typing.get_type_hints(fn)
    props: dict[str, dict] = {}
    required = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name not in hints:
            raise GenerationError(f"{name}({p.name}): the parameter has no annotation",
                                  "Annotate every parameter, e.g. `city: str`.")
        prop = _type_schema(hints[p.name], f"{name}({p.name})")
        m = re.search(rf"^\s*{re.escape(p.name)}\s*(?:\([^)]*\))?\s*:\s*(.+)$", doc, re.M)
        if m:
            prop["description"] = m.group(1).strip()
        props[p.name] = prop
        if p.default is p.empty:
            required.append(p.name)
    params = {"type": "object", "properties": props, "required": required,
              "additionalProperties": False}
    schema_text(params)
    return name, {"description": doc.split("\n\n")[0].strip(), "parameters": params}


def declare(functions: list[Callable[..., Any]], choice: str = "auto") -> Tools:
    """The Tools of Python functions; `choice` is auto, required or a function's name."""
    declared = dict(function_schema(f) for f in functions)
    if len(declared) != len(functions):
        raise GenerationError("two tools have the same name", "Give each function its own "
                              "name.")
    if choice not in ("auto", "required") and choice not in declared:
        raise GenerationError(f"tool_choice {choice!r} is not one of the tools "
                              f"({', '.join(declared)})",
                              "Pass 'auto', 'required' or the name of a function in tools.")
    return Tools(declared, choice)


def with_system(messages: list[tuple[str, str]], text: str) -> tuple[tuple[str, str], ...]:
    """`messages` with `text` added to their system message (made first, if none)."""
    msgs = list(messages)
    if msgs and msgs[0][0] == "system":  # templates take one system message, the first
        msgs[0] = ("system", f"{msgs[0][1]}\n\n{text}")
    else:
        msgs.insert(0, ("system", text))
    return tuple(msgs)
