"""Reading one completion request: bounded, checked field by field, nothing ignored.

The limits (`Limits`) hold before any field is read: the body's size, its JSON nesting,
the length of every list and object. Every string in the body, keys included, must be
valid Unicode (`workbench/_text.py`). Each field the OpenAI API defines is either
honored or refused with a 400 that names it; a field set to null counts as absent, and a
field that asks for nothing (`"logprobs": false`, `"n": 1`) is accepted. Unknown fields
are refused too: a client must not believe it asked for something that did not happen.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from .._schema import schema_text
from .._text import check_text
from ..config import GenerationConfig
from ..errors import BadText, WorkbenchError


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may hold (the README's service section lists these)."""
    max_body_bytes: int = 1 << 20   # the whole body
    max_depth: int = 32             # JSON nesting: objects and arrays inside each other
    max_items: int = 4096           # entries of any one list or object
    max_messages: int = 1024
    max_stop: int = 4               # as OpenAI
    max_logit_bias: int = 1024      # entries of logit_bias


class ApiError(Exception):
    """A request the service refuses, as OpenAI would: status, message, type, param."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = \
            status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return AsciiJSON(self.body(), status_code=self.status, headers=self.headers)


class AsciiJSON(JSONResponse):
    """JSON with non-ASCII characters escaped: any text a request carried back into an
    error (even one that is not valid Unicode) can always be written out."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode("ascii")


# ---- the body -------------------------------------------------------------------------------

async def read_json(request: Request, limits: Limits) -> Any:
    """The body as JSON within `limits`: size refused before it is all read, then nesting,
    list lengths and text checked before any field is."""
    limit = limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared):,} bytes; the limit is "
                       f"{limit:,}", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is larger than the limit of {limit:,} "
                           "bytes", code="request_too_large")
    try:
        value = json.loads(body)
    except RecursionError:  # Python's parser recurses; far deeper than max_depth anyway
        raise ApiError(400, f"the request body nests deeper than {limits.max_depth} levels",
                       code="too_deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    _check_tree(value, limits)
    return value


def _check_tree(value: Any, limits: Limits) -> None:
    """Depth, sizes and text of every value, without recursion; errors name the path."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        v, path, depth = stack.pop()
        if isinstance(v, str):
            _text(v, path or "the body")
            continue
        if not isinstance(v, (dict, list)):
            continue
        if depth >= limits.max_depth:
            raise ApiError(400, f"{path or 'the body'} nests deeper than {limits.max_depth} "
                           "levels", param=path or None, code="too_deep")
        if len(v) > limits.max_items:
            raise ApiError(400, f"{path or 'the body'} has {len(v):,} entries; the limit is "
                           f"{limits.max_items:,}", param=path or None)
        if isinstance(v, dict):
            for k, x in v.items():
                where = f"{path}.{k}" if path else k
                _text(k, f"a key in {path or 'the body'}")
                stack.append((x, where, depth + 1))
        else:
            stack.extend((x, f"{path}[{i}]", depth + 1) for i, x in enumerate(v))


def _text(s: str, where: str) -> str:
    try:
        return check_text(s, where)
    except BadText as e:
        raise ApiError(400, e.message, param=e.where, code="invalid_text") from None


# ---- the fields -----------------------------------------------------------------------------

# developer: OpenAI's newer "system"; tool: a function's result (serve/tools.py)
_ROLES = ("system", "user", "assistant", "developer", "tool")
# Fields accepted only with a value that asks for nothing: (value, or values) -> accepted.
_ONLY_OFF: dict[str, tuple[Any, ...]] = {
    "n": (1,), "logprobs": (False,), "echo": (False,), "best_of": (1,),
    "store": (False,), "suffix": ("",),
}
_HONORED = {
    "chat": {"model", "messages", "max_tokens", "max_completion_tokens", "temperature",
             "top_p", "seed", "stop", "stream", "stream_options", "presence_penalty",
             "frequency_penalty", "logit_bias", "user", "response_format", "tools",
             "tool_choice", "parallel_tool_calls", "logprobs", "top_logprobs"},
    "generate": {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop",
                 "stream", "stream_options", "presence_penalty", "frequency_penalty",
                 "logit_bias", "user"},
}
_NOT_FOR = {"chat": {"echo", "best_of", "suffix"},
            "generate": {"store", "tools", "tool_choice", "parallel_tool_calls",
                         "response_format", "top_logprobs"}}


@dataclasses.dataclass
class Parsed:
    kind: str                 # "chat" | "generate"
    payload: Any
    config: GenerationConfig
    stream: bool
    include_usage: bool
    model: str
    user: str | None
    tools: Any = None         # serve/tools.py's Tools, where a function may be called


def _number(body: dict, name: str, default: Any, lo: float, hi: float,
            kind: type = float) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (kind is int and not float(value).is_integer()):
        raise ApiError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'} "
                       f"(got {json.dumps(value)[:40]})", param=name)
    if not lo <= value <= hi:
        raise ApiError(400, f"'{name}' must be between {lo:g} and {hi:g} (got {value})",
                       param=name)
    return kind(value)


def _stops(body: dict, limits: Limits) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) \
            or len(stop) > limits.max_stop:
        raise ApiError(400, f"'stop' must be a string or a list of up to {limits.max_stop} "
                       "non-empty strings", param="stop")
    return tuple(stop)


def _logit_bias(body: dict, n_vocab: int, limits: Limits) -> tuple[tuple[int, float], ...]:
    """{"token id": bias, ...}: ids within the vocabulary, biases within -100..100."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise ApiError(400, "'logit_bias' must be an object of token id -> bias",
                       param="logit_bias")
    if len(bias) > limits.max_logit_bias:
        raise ApiError(400, f"'logit_bias' has {len(bias):,} entries; the limit is "
                       f"{limits.max_logit_bias:,}", param="logit_bias")
    out = []
    for key, value in bias.items():
        where = f"logit_bias.{key}"
        if not (key.isascii() and key.isdigit()):
            raise ApiError(400, f"'logit_bias' keys must be token ids (non-negative integers); "
                           f"got {json.dumps(key)[:40]}", param="logit_bias")
        token = int(key)
        if token >= n_vocab:
            raise ApiError(400, f"'logit_bias': token id {token} is outside this model's "
                           f"vocabulary (0..{n_vocab - 1})", param=where)
        out.append((token, _number({where: value}, where, 0.0, -100.0, 100.0)))
    return tuple(sorted(out))


def _content(message: Any, i: int) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'",
                       param=f"messages[{i}]")
    role = message.get("role")
    allowed = {"assistant": ("role", "content", "tool_calls"),
               "tool": ("role", "content", "tool_call_id", "name")}.get(role, ("role", "content"))
    unknown = sorted(k for k, v in message.items() if k not in allowed and v is not None)
    if unknown:
        raise ApiError(400, f"messages[{i}].{unknown[0]} is not supported by this service",
                       param=f"messages[{i}].{unknown[0]}")
    role, content = message.get("role"), message.get("content")
    if role not in _ROLES:
        raise ApiError(400, f"messages[{i}].role must be one of {', '.join(_ROLES)} "
                       f"(got {json.dumps(role)[:40]})", param=f"messages[{i}].role")
    if role == "developer":  # chat templates know only "system"
        role = "system"
    if role == "assistant" and message.get("tool_calls"):
        # the call as the model wrote it (serve/tools.py), so it sees its own calls
        return role, _calls_text(message["tool_calls"], i)
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                           param=f"messages[{i}].content")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string",
                       param=f"messages[{i}].content")
    return role, content


def _calls_text(calls: Any, i: int) -> str:
    where = f"messages[{i}].tool_calls"
    out = []
    for call in calls if isinstance(calls, list) else [None]:
        f = call.get("function") if isinstance(call, dict) else None
        try:
            args = json.loads(f["arguments"])
            if not isinstance(f["name"], str):
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise ApiError(400, f"{where} must be calls {{\"id\", \"type\": \"function\", "
                           "\"function\": {\"name\", \"arguments\": JSON text}}",
                           param=where) from None
        out.append(json.dumps({"name": f["name"], "arguments": args}))
    return "\n".join(out)


def _logprobs(body: dict) -> int | None:
    """How many alternatives to return with each token's logprob (None: no logprobs)."""
    on = body.get("logprobs")
    if on not in (None, True, False):
        raise ApiError(400, "'logprobs' must be true or false", param="logprobs")
    top = _number(body, "top_logprobs", None, 0, 20, int)
    if top is not None and not on:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if on else None


def _response_format(body: dict) -> str | None:
    """The JSON schema a `response_format` constrains the answer to (JSON text), if any."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    keys = {"text": {"type"}, "json_object": {"type"},
            "json_schema": {"type", "json_schema"}}.get(kind)
    if keys is None:
        raise ApiError(400, "'response_format.type' must be text, json_object or json_schema "
                       f"(got {json.dumps(kind)[:40]})", param="response_format.type")
    extra = sorted(set(fmt) - keys)
    if extra:
        raise ApiError(400, f"response_format.{extra[0]} is not supported with type {kind}",
                       param=f"response_format.{extra[0]}")
    if kind == "text":
        return None
    if kind == "json_object":
        return '{"type":"object"}'
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ApiError(400, "'response_format.json_schema' must be an object with a 'name'",
                       param="response_format.json_schema")
    extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if extra:
        raise ApiError(400, f"response_format.json_schema.{extra[0]} is not supported",
                       param=f"response_format.json_schema.{extra[0]}")
    if spec.get("strict") not in (None, True, False):
        raise ApiError(400, "'response_format.json_schema.strict' must be true or false",
                       param="response_format.json_schema.strict")
    # strict or not, the grammar enforces the whole schema: it is always strict here
    try:
        return schema_text(spec.get("schema", {"type": "object"}))
    except WorkbenchError as e:
        raise ApiError(400, e.message, param="response_format.json_schema.schema",
                       code="unsupported_schema") from None


def _fields(body: dict, kind: str) -> None:
    """Every field set is one this service honors, or asks for nothing."""
    for name, value in body.items():
        if value is None or name in _HONORED[kind]:
            continue
        if name in _ONLY_OFF and name not in _NOT_FOR[kind]:
            if value in _ONLY_OFF[name]:
                continue
            raise ApiError(400, f"'{name}' is not supported by this service (got "
                           f"{json.dumps(value)[:60]})", param=name, code="unsupported")
        raise ApiError(400, f"unknown field '{name}' for this endpoint", param=name,
                       code="unknown_field")


def parse(body: Any, kind: str, *, n_ctx_seq: int, default_max_tokens: int, n_vocab: int,
          limits: Limits) -> Parsed:
    """Check a completion request's fields and types; ApiError names the first problem.
    The model name is read but not judged here (the service knows its ids)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required (a string)", param="model")
    _fields(body, kind)
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        if len(messages) > limits.max_messages:
            raise ApiError(400, f"'messages' has {len(messages):,} entries; the limit is "
                           f"{limits.max_messages:,}", param="messages")
        payload: Any = tuple(_content(m, i) for i, m in enumerate(messages))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
        payload = prompt
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    raw = body.get(name)
    if raw is not None and isinstance(raw, (int, float)) and not isinstance(raw, bool) \
            and raw > n_ctx_seq:
        raise ApiError(400, f"'{name}' is {raw}, more than this service's context of "
                       f"{n_ctx_seq} tokens per request", param=name,
                       code="context_length_exceeded")
    max_tokens = _number(body, name, min(default_max_tokens, n_ctx_seq), 1, n_ctx_seq, int)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    extra = sorted(set(options) - {"include_usage"})
    if extra:
        raise ApiError(400, f"stream_options.{extra[0]} is not supported by this service",
                       param=f"stream_options.{extra[0]}")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, "'user' must be a string", param="user")
    seed = body.get("seed")
    try:
        config = GenerationConfig(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
            seed=None if seed is None else _number(body, "seed", None, 0, 2**32 - 1, int),
            stop=_stops(body, limits),
            presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
            logit_bias=_logit_bias(body, n_vocab, limits),
            json_schema=_response_format(body) if kind == "chat" else None,
            logprobs=_logprobs(body) if kind == "chat" else None).validate()
    except WorkbenchError as e:  # what only the shared config checks
        raise ApiError(400, e.message) from None
    return Parsed(kind, payload, config, stream, bool(options.get("include_usage")), model,
                  user)
