"""The OpenAI-compatible HTTP API over the workbench engine (Starlette on uvicorn).

    POST /v1/chat/completions   chat, streamed as server-sent events with "stream": true
    POST /v1/completions        raw text completion, likewise
    POST /v1/embeddings         sentence embeddings by the service's embedding model, if
                                service.json names one (serve/embeddings.py)
    GET  /v1/models             the one model this service runs
    GET  /v1/models/{id}        that model's card (404 for any other id)
    GET  /health                200 when the engine has its model, else 503
    GET  /metrics               Prometheus text: requests, queue depth, tokens/s, TTFT,
                                the prefix cache's hits, misses and bytes by tier

Requests decode together in the engine (continuous batching). Every mistake in a
request is a 4xx with an OpenAI-style error object naming it; the service stays up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import BadText, EngineCrashed, EngineFault, PromptTooLong, WorkbenchError
from . import embeddings as _embeddings
from .admission import Admission
from .metrics import ServiceMetrics
from .request import ApiError, AsciiJSON, Limits, Parsed, parse, read_json
from .tools import CALL_TAG, Tools, parse_tools

log = logging.getLogger(__name__)
_FINISH = {"stop": "stop", "stop_string": "stop", "length": "length",
           "context_full": "length", "cancelled": "stop"}


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    model_name: str
    n_ctx_seq: int                  # context of one request (the batch shares n_ctx)
    n_parallel: int = 1
    max_queue: int = 16             # admitted requests beyond the batch; more get 429
    request_timeout_s: float = 120.0
    default_max_tokens: int = 512
    api_key: str | None = None
    limits: Limits = Limits()
    aliases: tuple[str, ...] = ("default",)  # other ids a request may name the model by
    embed_model_name: str | None = None  # the embedding model's id, when there is one


# ---- the service --------------------------------------------------------------------------

class Service:
    def __init__(self, engine: Any, settings: ServiceSettings, embedder: Any = None) -> None:
        self.engine, self.s = engine, settings
        self.embedder = embedder  # a second engine, holding the embedding model
        self.admission = Admission(settings.n_parallel, settings.max_queue)
        self.metrics = ServiceMetrics()
        self.created = int(time.time())
        # the worker's own account of each generation, cancelled ones included
        engine.subscribe(self._on_engine)

    def _on_engine(self, kind: str, payload: Any) -> None:
        if kind == "finished":
            self.metrics.generation(payload.finish_reason, payload.generated_tokens,
                                    payload.prompt_tokens, payload.draft_tokens,
                                    payload.accepted_tokens)

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
            except Exception:  # a bug: this request fails, as JSON; the service goes on
                log.exception("%s failed", name)
                response = ApiError(500, "the service failed on this request",
                                    type_="server_error", code="internal_error").response()
            self.metrics.request(name, response.status_code)
            return response
        return endpoint

    # -- endpoints --
    async def models(self, request: Request) -> Response:
        cards = [self._model_card()]
        if self.s.embed_model_name:
            cards.append(self._model_card(self.s.embed_model_name))
        return AsciiJSON({"object": "list", "data": cards})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name and name == self.s.embed_model_name:
            return AsciiJSON(self._model_card(name))
        if name != self.s.model_name and name not in self.s.aliases:
            raise ApiError(404, f"the model '{name[:80]}' does not exist; this service runs "
                           f"'{self.s.model_name}'", param="model", code="model_not_found")
        return AsciiJSON(self._model_card())

    def _model_card(self, name: str | None = None) -> dict:
        return {"id": name or self.s.model_name, "object": "model", "created": self.created,
                "owned_by": "workbench"}

    async def health(self, request: Request) -> Response:
        e = self.engine
        ok = e.alive and e.model is not None
        return AsciiJSON({"status": "ok" if ok else "unavailable",
                             "model": self.s.model_name, "worker_pid": e.pid if ok else None,
                             "in_flight": self.admission.in_service,
                             "queue_depth": self.admission.queued,
                             **getattr(e, "health_extra", dict)()},
                            status_code=200 if ok else 503)

    async def prometheus(self, request: Request) -> Response:
        stats = self.engine.last_stats  # the worker's, at most a second old
        return PlainTextResponse(
            self.metrics.render(queue_depth=self.admission.queued,
                                in_flight=self.admission.in_service,
                                model=self.s.model_name,
                                kv=stats.kv if stats is not None else None,
                                extra=getattr(self.engine, "prometheus_lines", list)()),
            media_type="text/plain; version=0.0.4")

    async def chat(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    async def embeddings(self, request: Request) -> Response:
        body = await read_json(request, self.s.limits)
        try:
            return AsciiJSON(await _embeddings.answer(
                body, self.embedder, self.s.embed_model_name, self.engine,
                (self.s.model_name, *self.s.aliases)))
        except WorkbenchError as e:
            raise _engine_error(e) from None

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
            parsed = self._parse(await read_json(request, self.s.limits), kind)
            run = _Run(self, parsed, entered)
            await run.start()
            if parsed.stream:
                handed_over = True
                return StreamingResponse(run.events(request), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache"})
            return AsciiJSON(await run.whole(request))
        finally:
            if not handed_over:
                self.admission.leave(entered)

    def _parse(self, body: Any, kind: str) -> Parsed:
        model = self.engine.model
        p = parse(body, kind, n_ctx_seq=self.s.n_ctx_seq,
                  default_max_tokens=self.s.default_max_tokens,
                  n_vocab=model.n_vocab if model is not None else 1 << 31,
                  limits=self.s.limits)
        if p.model != self.s.model_name and p.model not in self.s.aliases:
            also = f" (or {', '.join(repr(a) for a in self.s.aliases)})" \
                if self.s.aliases else ""
            raise ApiError(404, f"the model '{p.model[:80]}' does not exist; this service "
                           f"runs '{self.s.model_name}'{also}", param="model",
                           code="model_not_found")
        if p.user is not None:
            log.info("%s request from user %r", kind, p.user[:200])
        if kind == "chat":
            _with_tools(p, parse_tools(body))
        return p


def _with_tools(p: Parsed, tools: Tools | None) -> None:
    """Keep the functions for the worker (serve/tools.py); a forced call gets its grammar."""
    if tools is None:
        return
    p.tools = tools  # the worker gives them to the template, or to the system message
    forced = tools.call_schema()
    if forced is not None:
        if p.config.json_schema is not None:
            raise ApiError(400, "'response_format' cannot constrain an answer that "
                           "'tool_choice' makes a function call", param="response_format")
        p.config = dataclasses.replace(p.config, json_schema=forced)


def _engine_error(e: WorkbenchError) -> ApiError:
    if isinstance(e, EngineCrashed):
        return ApiError(503, f"{e.message}; the service restarts its engine with the next "
                        "request", type_="server_error", code="engine_crashed")
    if isinstance(e, EngineFault):  # its traceback goes to the log, not to the client
        log.error("the engine failed on a request:\n%s", e.details)
        return ApiError(500, "the engine failed on this request; other requests are not "
                        "affected", type_="server_error", code="engine_error")
    if isinstance(e, BadText):
        return ApiError(400, e.message, param=e.where, code="invalid_text")
    code = "context_length_exceeded" if isinstance(e, PromptTooLong) else None
    return ApiError(400, e.message + (f" ({e.hint})" if e.hint else ""), code=code)


class _Run:
    """One admitted request: its token stream, streamed out or gathered whole."""

    def __init__(self, service: Service, parsed: Parsed, entered: float) -> None:
        self.service, self.p, self.entered = service, parsed, entered
        self.id = ("chatcmpl-" if parsed.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.deadline = time.monotonic() + service.s.request_timeout_s
        self.stream: Any = None
        self.first: str | None = None
        self.call_id = "call_" + uuid.uuid4().hex[:24]

    async def start(self) -> None:
        """Submit, and wait for the first token, so that a prompt the engine refuses is a
        4xx before any byte of a stream is sent."""
        engine = self.service.engine
        self.stream = await asyncio.to_thread(
            engine.stream, self.p.kind, self.p.payload, self.p.config,
            self.p.tools.openai() if self.p.tools is not None else "")
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
        prompt, gen, cached = (m.prompt_tokens, m.generated_tokens, m.cached_tokens) if m \
            else (0, 0, 0)
        # cached_tokens: the prompt's prefix restored from the prefix cache, as OpenAI's
        return {"prompt_tokens": prompt, "completion_tokens": gen,
                "total_tokens": prompt + gen,
                "prompt_tokens_details": {"cached_tokens": cached}}

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
            message: dict = {"role": "assistant", "content": text}
            call = self.p.tools.call_in(text) if self.p.tools is not None else None
            if call is not None:
                message = {"role": "assistant", "content": None, "tool_calls": [{
                    "id": self.call_id, "type": "function",
                    "function": {"name": call[0], "arguments": call[1]}}]}
                reason = "tool_calls"
            return {"id": self.id, "object": "chat.completion", "created": self.created,
                    "model": self.service.s.model_name,
                    "choices": [{"index": 0, "message": message,
                                 "finish_reason": reason, "logprobs": self._logprobs()}],
                    "usage": usage}
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.service.s.model_name,
                "choices": [{"index": 0, "text": text, "finish_reason": reason,
                             "logprobs": None}],
                "usage": usage}

    def _logprobs(self) -> dict | None:
        """OpenAI's logprobs object of a chat answer, where the request asked for it."""
        if self.p.config.logprobs is None:
            return None

        def entry(token: bytes, logprob: float) -> dict:
            return {"token": token.decode("utf-8", errors="replace"), "logprob": logprob,
                    "bytes": list(token)}

        return {"content": [{**entry(t.token, t.logprob),
                             "top_logprobs": [entry(b, lp) for b, lp in t.top]}
                            for t in self.stream.logprobs], "refusal": None}

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
            # With tools, text that may be a call is held until it is known to be one.
            held: list[str] | None = [] if self.p.tools is not None else None
            async for piece in self._pieces():
                if held is not None:
                    held.append(piece)
                    lead = "".join(held).lstrip()
                    if not lead or lead.startswith(("{", CALL_TAG)) or CALL_TAG.startswith(lead):
                        continue
                    piece, held = "".join(held), None
                yield sse(self._chunk(piece, None))
            reason = self._finish_reason()
            call = self.p.tools.call_in("".join(held)) if held else None
            if call is not None:
                for delta in _call_deltas(self.call_id, *call):
                    yield sse({**self._chunk(None, None), "choices": [
                        {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}]})
                reason = "tool_calls"
            elif held:
                yield sse(self._chunk("".join(held), None))
            end = self._chunk(None, reason)
            end["choices"][0]["logprobs"] = self._logprobs()  # known once all are sampled
            yield sse(end)
            if self.p.include_usage:
                yield sse({**self._chunk(None, None), "choices": [], "usage": self._usage()})
            yield "data: [DONE]\n\n"
        except ApiError as e:  # a timeout mid-stream
            yield sse(e.body())
        except WorkbenchError as e:  # the engine failed mid-stream
            yield sse(_engine_error(e).body())
        except Exception:  # a bug: this stream ends with an error event, as JSON
            log.exception("a stream failed")
            yield sse(ApiError(500, "the service failed on this request",
                               type_="server_error", code="internal_error").body())
        finally:  # also when the client went away: the generation stops
            self.stream.cancel_nowait()
            self.service.admission.leave(self.entered)


def _call_deltas(call_id: str, name: str, arguments: str, size: int = 24) -> list[dict]:
    """A call as OpenAI streams it: id and name first, then the arguments in pieces."""
    first = {"index": 0, "id": call_id, "type": "function",
             "function": {"name": name, "arguments": ""}}
    return [{"role": "assistant", "content": None, "tool_calls": [first]}] + [
        {"tool_calls": [{"index": 0, "function": {"arguments": arguments[i:i + size]}}]}
        for i in range(0, len(arguments), size)]


async def _no_route(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    what = "no such endpoint" if status == 404 else f"{request.method} is not allowed here"
    return ApiError(status, f"{what}: {request.url.path}").response()


def create_app(engine: Any, settings: ServiceSettings, embedder: Any = None) -> Starlette:
    service = Service(engine, settings, embedder)
    r = service.route
    app = Starlette(exception_handlers={404: _no_route, 405: _no_route}, routes=[
        Route("/v1/chat/completions", r("chat", service.chat), methods=["POST"]),
        Route("/v1/completions", r("completions", service.completions), methods=["POST"]),
        Route("/v1/embeddings", r("embeddings", service.embeddings), methods=["POST"]),
        Route("/v1/models", r("models", service.models), methods=["GET"]),
        Route("/v1/models/{name:path}", r("model", service.model), methods=["GET"]),
        Route("/health", r("health", service.health, auth=False), methods=["GET"]),
        Route("/metrics", r("metrics", service.prometheus), methods=["GET"]),
    ])
    app.state.service = service
    return app
