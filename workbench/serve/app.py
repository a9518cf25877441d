"""The OpenAI-compatible HTTP API over the workbench engine (Starlette on uvicorn).

    POST /v1/chat/completions   chat, streamed as server-sent events with "stream": true
    POST /v1/completions        raw text completion, likewise
    GET  /v1/models             the one model this service runs
    GET  /health                200 when the engine has its model, else 503
    GET  /metrics               Prometheus text: requests, queue depth, tokens/s, TTFT

Requests decode together in the engine (continuous batching). Every mistake in a
request is a 4xx with an OpenAI-style error object naming it; the service stays up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..config import GenerationConfig
from ..errors import EngineCrashed, PromptTooLong, WorkbenchError
from .admission import Admission
from .metrics import ServiceMetrics

_ROLES = ("system", "user", "assistant")
_FINISH = {"stop": "stop", "stop_string": "stop", "length": "length",
           "context_full": "length", "cancelled": "stop"}


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    model_name: str
    n_ctx_seq: int                  # context of one request (the batch shares n_ctx)
    n_parallel: int = 1
    max_queue: int = 16             # admitted requests beyond the batch; more get 429
    request_timeout_s: float = 120.0
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 512
    api_key: str | None = None


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
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- reading requests --------------------------------------------------------------------

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


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) \
            or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings",
                       param="stop")
    return tuple(stop)


def _content(message: Any, i: int) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'",
                       param=f"messages[{i}]")
    role, content = message.get("role"), message.get("content")
    if role not in _ROLES:
        raise ApiError(400, f"messages[{i}].role must be one of {', '.join(_ROLES)} "
                       f"(got {json.dumps(role)[:40]})", param=f"messages[{i}].role")
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


@dataclasses.dataclass
class _Parsed:
    kind: str                 # "chat" | "generate"
    payload: Any
    config: GenerationConfig
    stream: bool
    include_usage: bool


def parse(body: Any, kind: str, s: ServiceSettings) -> _Parsed:
    """Check a completion request's fields and types; ApiError names the first problem."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required (a string)", param="model")
    if model != s.model_name:
        raise ApiError(404, f"the model '{model[:80]}' does not exist; this service runs "
                       f"'{s.model_name}'", param="model", code="model_not_found")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        payload: Any = tuple(_content(m, i) for i, m in enumerate(messages))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
        payload = prompt
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    raw = body.get(name)
    if raw is not None and isinstance(raw, (int, float)) and not isinstance(raw, bool) \
            and raw > s.n_ctx_seq:
        raise ApiError(400, f"'{name}' is {raw}, more than this service's context of "
                       f"{s.n_ctx_seq} tokens per request", param=name,
                       code="context_length_exceeded")
    max_tokens = _number(body, name, min(s.default_max_tokens, s.n_ctx_seq), 1, s.n_ctx_seq,
                         int)
    for ignored in ("presence_penalty", "frequency_penalty"):
        _number(body, ignored, 0.0, -2.0, 2.0)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    seed = body.get("seed")
    config = GenerationConfig(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1.0),
        seed=None if seed is None else _number(body, "seed", None, 0, 2**32 - 1, int),
        stop=_stops(body))
    return _Parsed(kind, payload, config, stream, bool(options.get("include_usage")))


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing one larger than `limit` bytes before reading it all."""
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
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None


# ---- the service --------------------------------------------------------------------------

class Service:
    def __init__(self, engine: Any, settings: ServiceSettings) -> None:
        self.engine, self.s = engine, settings
        self.admission = Admission(settings.n_parallel, settings.max_queue)
        self.metrics = ServiceMetrics()
        self.created = int(time.time())
        # the worker's own account of each generation, cancelled ones included
        engine.subscribe(self._on_engine)

    def _on_engine(self, kind: str, payload: Any) -> None:
        if kind == "finished":
            self.metrics.generation(payload.finish_reason, payload.generated_tokens,
                                    payload.prompt_tokens)

    # -- plumbing --
    def _authorize(self, request: Request) -> None:
        key = self.s.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                   key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           type_="invalid_request_error", code="invalid_api_key")

    def route(self, name: str, handler: Callable[[Request], Any], auth: bool = True):
        async def endpoint(request: Request) -> Response:
            try:
                if auth:
                    self._authorize(request)
                response = await handler(request)
            except ApiError as e:
                response = e.response()
            self.metrics.request(name, response.status_code)
            return response
        return endpoint

    # -- endpoints --
    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    def _model_card(self) -> dict:
        return {"id": self.s.model_name, "object": "model", "created": self.created,
                "owned_by": "workbench"}

    async def health(self, request: Request) -> Response:
        e = self.engine
        ok = e.alive and e.model is not None
        return JSONResponse({"status": "ok" if ok else "unavailable",
                             "model": self.s.model_name, "worker_pid": e.pid if ok else None,
                             "in_flight": self.admission.in_service,
                             "queue_depth": self.admission.queued},
                            status_code=200 if ok else 503)

    async def prometheus(self, request: Request) -> Response:
        return PlainTextResponse(
            self.metrics.render(queue_depth=self.admission.queued,
                                in_flight=self.admission.in_service,
                                model=self.s.model_name),
            media_type="text/plain; version=0.0.4")

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "generate")

    async def _complete(self, request: Request, kind: str) -> Response:
        entered = self.admission.try_enter()
        if entered is None:
            wait = self.admission.retry_after_s()
            raise ApiError(429, f"the service is full ({self.admission.capacity} requests "
                           f"in progress or queued); retry in {wait} s",
                           type_="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(wait)})
        handed_over = False
        try:
            parsed = parse(await read_json(request, self.s.max_body_bytes), kind, self.s)
            run = _Run(self, parsed, entered)
            await run.start()
            if parsed.stream:
                handed_over = True
                return StreamingResponse(run.events(request), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return JSONResponse(await run.whole(request))
        finally:
            if not handed_over:
                self.admission.leave(entered)


def _engine_error(e: WorkbenchError) -> ApiError:
    if isinstance(e, EngineCrashed):
        return ApiError(503, f"{e.message}; the service restarts its engine with the next "
                        "request", type_="server_error", code="engine_crashed")
    code = "context_length_exceeded" if isinstance(e, PromptTooLong) else None
    return ApiError(400, e.message + (f" ({e.hint})" if e.hint else ""), code=code)


class _Run:
    """One admitted request: its token stream, streamed out or gathered whole."""

    def __init__(self, service: Service, parsed: _Parsed, entered: float) -> None:
        self.service, self.p, self.entered = service, parsed, entered
        self.id = ("chatcmpl-" if parsed.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.deadline = time.monotonic() + service.s.request_timeout_s
        self.stream: Any = None
        self.first: str | None = None

    async def start(self) -> None:
        """Submit, and wait for the first token, so that a prompt the engine refuses is a
        4xx before any byte of a stream is sent."""
        engine = self.service.engine
        self.stream = await asyncio.to_thread(engine.stream, self.p.kind, self.p.payload,
                                              self.p.config)
        self.it = self.stream.__aiter__()
        try:
            self.first = await self._next()
        except WorkbenchError as e:
            raise _engine_error(e) from None
        if self.first is not None:
            self.service.metrics.ttft(time.monotonic() - self.entered)

    async def _next(self) -> str | None:
        left = self.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(self.it.__anext__(), timeout=max(left, 0.001))
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            self.stream.cancel_nowait()
            raise ApiError(504, f"the request took longer than "
                           f"{self.service.s.request_timeout_s:g} s and was stopped",
                           type_="timeout_error", code="timeout") from None

    async def _pieces(self) -> AsyncIterator[str]:
        if self.first is not None:
            yield self.first
            while (piece := await self._next()) is not None:
                yield piece

    def _usage(self) -> dict:
        m = self.stream.metrics
        prompt, gen = (m.prompt_tokens, m.generated_tokens) if m else (0, 0)
        return {"prompt_tokens": prompt, "completion_tokens": gen,
                "total_tokens": prompt + gen}

    def _finish_reason(self) -> str:
        return _FINISH.get(self.stream.finish_reason or "stop", "stop")

    async def whole(self, request: Request) -> dict:
        async def gather() -> str:
            return "".join([p async for p in self._pieces()])

        task = asyncio.ensure_future(gather())
        try:
            while not task.done():  # a client that went away cancels its generation
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    self.stream.cancel_nowait()
            text = await task
        except WorkbenchError as e:
            raise _engine_error(e) from None
        except asyncio.CancelledError:
            self.stream.cancel_nowait()
            raise
        usage, reason = self._usage(), self._finish_reason()
        if self.p.kind == "chat":
            return {"id": self.id, "object": "chat.completion", "created": self.created,
                    "model": self.service.s.model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": reason, "logprobs": None}],
                    "usage": usage}
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.service.s.model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": reason,
                             "logprobs": None}],
                "usage": usage}

    def _chunk(self, piece: str | None, reason: str | None, role: bool = False) -> dict:
        if self.p.kind == "chat":
            delta: dict = {"role": "assistant", "content": ""} if role else \
                ({"content": piece} if piece is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": reason,
                      "logprobs": None}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created,
                "model": self.service.s.model_name, "choices": [choice]}

    async def events(self, request: Request) -> AsyncIterator[str]:
        def sse(data: Any) -> str:
            return f"data: {json.dumps(data)}\n\n"

        try:
            if self.p.kind == "chat":
                yield sse(self._chunk(None, None, role=True))
            async for piece in self._pieces():
                yield sse(self._chunk(piece, None))
            yield sse(self._chunk(None, self._finish_reason()))
            if self.p.include_usage:
                yield sse({**self._chunk(None, None), "choices": [], "usage": self._usage()})
            yield "data: [DONE]\n\n"
        except ApiError as e:  # a timeout mid-stream
            yield sse(e.body())
        except WorkbenchError as e:  # the engine failed mid-stream
            yield sse(_engine_error(e).body())
        finally:  # also when the client went away: the generation stops
            self.stream.cancel_nowait()
            self.service.admission.leave(self.entered)


async def _no_route(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    what = "no such endpoint" if status == 404 else f"{request.method} is not allowed here"
    return ApiError(status, f"{what}: {request.url.path}").response()


def create_app(engine: Any, settings: ServiceSettings) -> Starlette:
    service = Service(engine, settings)
    r = service.route
    app = Starlette(exception_handlers={404: _no_route, 405: _no_route}, routes=[
        Route("/v1/chat/completions", r("chat", service.chat), methods=["POST"]),
        Route("/v1/completions", r("completions", service.completions), methods=["POST"]),
        Route("/v1/models", r("models", service.models), methods=["GET"]),
        Route("/health", r("health", service.health, auth=False), methods=["GET"]),
        Route("/metrics", r("metrics", service.prometheus), methods=["GET"]),
    ])
    app.state.service = service
    return app
