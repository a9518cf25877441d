"""JSON schemas that decoding can be constrained to, checked before any generation.

The worker compiles a schema into a GBNF grammar with llama-cpp-python's converter
(`worker/sampling.py`). That converter silently ignores what it does not understand, so
an output could parse and still not validate. This module refuses such schemas first,
naming the construct: every keyword here is one the grammar enforces, or an annotation
that constrains nothing (title, description, ...).
"""

from __future__ import annotations

import json
from typing import Any

from .errors import GenerationError

# Keywords the grammar enforces.
_ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs",
    "definitions", "pattern", "format", "minLength", "maxLength"})
# Keywords that describe and constrain nothing.
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment",
    "deprecated", "readOnly", "writeOnly", "strict"})
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3",
                      "uuid4", "uuid5"})
_HINT = ("Constrained decoding supports type, properties, required, additionalProperties, "
         "items, prefixItems, min/maxItems, enum, const, anyOf, oneOf, allOf, local $ref "
         "without cycles, pattern, min/maxLength and the formats date, time, date-time and "
         "uuid.")


def _refuse(what: str, where: str) -> GenerationError:
    return GenerationError(f"the JSON schema is not supported: {what} at {where or '#'}",
                           _HINT)


def schema_text(schema: Any) -> str:
    """`schema` (a dict, JSON text, or a pydantic model class) checked and written as
    compact JSON text, the form `GenerationConfig.json_schema` holds."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GenerationError(f"the JSON schema is not valid JSON: {e}",
                                  "Pass a dict, a pydantic model or JSON text.") from None
    elif hasattr(schema, "model_json_schema"):  # a pydantic model class
        schema = schema.model_json_schema()
    check_schema(schema)
    return json.dumps(schema, separators=(",", ":"))


def check_schema(schema: Any) -> None:
    """Raise a GenerationError naming the first construct the grammar cannot enforce:
    an unknown keyword, a remote or dangling `$ref`, a `$ref` cycle, a bad type."""
    if not isinstance(schema, dict):
        raise _refuse(f"a schema must be an object (got {type(schema).__name__})", "#")
    defs: dict[str, Any] = {}
    stack: list[tuple[Any, str]] = [(schema, "#")]
    refs: list[tuple[str, str]] = []  # (from the schema at, to)
    while stack:
        node, where = stack.pop()
        if isinstance(node, bool):  # true / false schemas: additionalProperties only
            continue
        if not isinstance(node, dict):
            raise _refuse(f"a schema must be an object (got {json.dumps(node)[:40]})", where)
        for key, value in node.items():
            at = f"{where}/{key}"
            if key not in _ENFORCED and key not in _ANNOTATIONS:
                raise _refuse(f"the keyword '{key}'", where)
            if key in ("$defs", "definitions"):
                if not isinstance(value, dict):
                    raise _refuse(f"'{key}' must be an object", where)
                for name, sub in value.items():
                    defs[f"{where}/{key}/{name}"] = sub
                    stack.append((sub, f"{at}/{name}"))
            elif key == "properties":
                if not isinstance(value, dict):
                    raise _refuse("'properties' must be an object", where)
                stack.extend((sub, f"{at}/{name}") for name, sub in value.items())
            elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
                if not isinstance(value, list) or not value:
                    raise _refuse(f"'{key}' must be a non-empty list", where)
                stack.extend((sub, f"{at}/{i}") for i, sub in enumerate(value))
            elif key in ("items", "additionalProperties"):
                stack.append((value, at))
            elif key == "$ref":
                if not isinstance(value, str) or not value.startswith("#/"):
                    raise _refuse(f"the $ref {json.dumps(value)[:80]} (only local "
                                  "references, #/$defs/...)", where)
                refs.append((where, value))
            elif key == "type":
                kinds = value if isinstance(value, list) else [value]
                bad = [k for k in kinds if k not in _TYPES]
                if bad or not kinds:
                    raise _refuse(f"the type {json.dumps(bad[0] if bad else value)[:40]}",
                                  where)
            elif key == "format" and value not in _FORMATS:
                raise _refuse(f"the format {json.dumps(value)[:40]}", where)
            elif key == "required" and not (isinstance(value, list)
                                            and all(isinstance(x, str) for x in value)):
                raise _refuse("'required' must be a list of names", where)
    _check_refs(schema, refs, defs)


def _check_refs(schema: dict, refs: list[tuple[str, str]], defs: dict[str, Any]) -> None:
    """Every $ref resolves, and none leads back to itself (the grammar would recurse
    without end)."""
    for where, ref in refs:
        if ref not in defs and _resolve(schema, ref) is None:
            raise _refuse(f"the $ref '{ref}', which points at nothing", where)

    def targets(node: Any) -> list[str]:  # the refs inside one definition, nested too
        out, stack = [], [node]
        while stack:
            n = stack.pop()
            if isinstance(n, dict):
                if isinstance(n.get("$ref"), str):
                    out.append(n["$ref"])
                stack.extend(v for k, v in n.items() if k not in ("$defs", "definitions"))
            elif isinstance(n, list):
                stack.extend(n)
        return out

    graph: dict[str, list[str]] = {}

    def after(ref: str) -> list[str]:
        if ref not in graph:
            graph[ref] = targets(_resolve(schema, ref))
        return graph[ref]

    done: set[str] = set()
    for start in {ref for _, ref in refs}:
        path: list[str] = []
        on_path: set[str] = set()
        todo: list[tuple[str, bool]] = [(start, False)]
        while todo:
            ref, leaving = todo.pop()
            if leaving:
                on_path.discard(ref)
                path.pop()
                done.add(ref)
                continue
            if ref in on_path:
                cycle = " -> ".join(path[path.index(ref):] + [ref])
                raise _refuse(f"a $ref cycle ({cycle})", "#")
            if ref in done:
                continue
            on_path.add(ref)
            path.append(ref)
            todo.append((ref, True))
            todo.extend((t, False) for t in after(ref))


def _resolve(schema: dict, ref: str) -> Any:
    node: Any = schema
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node
