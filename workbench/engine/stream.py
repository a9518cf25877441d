"""The kernel side of one request: its call (replies routed to it by id), its token
stream, and the errors the worker's replies become."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

from ..errors import (EngineCrashed, EngineFault, GenerationError, ModelFileError,
                      PromptTooLong, WorkbenchError)
from . import protocol as P

if TYPE_CHECKING:
    from .client import Engine

log = logging.getLogger("workbench.engine.client")

_CANCEL_WAIT_S = 30.0

_ERRORS: dict[str, type[WorkbenchError]] = {
    c.__name__: c for c in (WorkbenchError, ModelFileError, GenerationError, EngineCrashed,
                          PromptTooLong, EngineFault)}


@dataclasses.dataclass(frozen=True)
class Crash:
    error: EngineCrashed


class Call:
    """One request in flight: its replies arrive on `q` (or on an asyncio queue)."""

    def __init__(self, request: P.Message, description: str) -> None:
        self.request = request
        self.description = description
        self.q: queue.Queue[Any] = queue.Queue()
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aq: asyncio.Queue[Any] | None = None
        self._lock = threading.Lock()

    def deliver(self, msg: Any) -> None:
        with self._lock:
            if self._loop is not None:
                aq = self._aq
                try:
                    self._loop.call_soon_threadsafe(self._put_async, aq, msg)
                    return
                except RuntimeError:  # the event loop has closed: fall back to the queue
                    self._loop = self._aq = None
            self.q.put(msg)

    def _put_async(self, aq: asyncio.Queue[Any], msg: Any) -> None:
        """On the event loop: deliver, unless the consumer went back to the plain queue
        since this was scheduled (then the message must not be lost in `aq`)."""
        with self._lock:
            if self._aq is aq:
                aq.put_nowait(msg)
            else:
                self.q.put(msg)

    def to_sync(self) -> None:
        """Deliver to the plain queue again (after an async consumer went away)."""
        with self._lock:
            if self._aq is not None:
                while not self._aq.empty():
                    self.q.put(self._aq.get_nowait())
            self._loop = self._aq = None

    def to_asyncio(self) -> asyncio.Queue[Any]:
        with self._lock:
            if self._aq is None:
                self._loop = asyncio.get_running_loop()
                self._aq = asyncio.Queue()
                while not self.q.empty():
                    self._aq.put_nowait(self.q.get_nowait())
            return self._aq


def to_error(msg: P.Failed) -> Exception:
    if msg.kind == "bug":  # the worker's traceback, kept on the error
        log.debug("the engine worker failed on a request:\n%s", msg.message)
        last = msg.message.strip().splitlines()[-1] if msg.message.strip() else "unknown"
        return EngineFault(f"the engine failed on this request ({last})",
                           "The worker is still running and other requests are not "
                           "affected. This is a bug in the workbench: please report it with "
                           "the traceback in the error's `details`.", details=msg.message)
    return _ERRORS.get(msg.kind, WorkbenchError)(msg.message, msg.hint)


class TokenStream:
    """The tokens of one request as they are produced.

    Iterate it (`for text in stream`: one decoded piece per token) or iterate it
    asynchronously (`async for`). Interrupting the iteration (KeyboardInterrupt, or
    cancelling the task) cancels the request in the worker, which stops before its
    next token. When the stream ends, `text` and `metrics` hold the result.
    """

    def __init__(self, engine: Engine, call: Call) -> None:
        self._engine = engine
        self._call = call
        self.id = call.request.id
        self.text = ""
        self.metrics: P.RequestMetrics | None = None
        self.logprobs: tuple[P.TokenLogprob, ...] = ()  # with GenerationConfig.logprobs
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
        self.drafted = self.accepted = 0  # speculative decoding so far: drafted, kept
        self._done = False
        self._parts: list[str] = []
        self._ready: collections.deque[str] = collections.deque()
        self._retried = False
        self._cancelling = False
        self._async = False

    def _handle(self, msg: Any) -> None:
        if isinstance(msg, P.Tokens):
            self._parts.extend(msg.pieces)
            self.token_ids.extend(msg.token_ids)
            self.drafted, self.accepted = msg.drafted, msg.accepted
            self._ready.extend(msg.pieces)
            return
        self._done = True
        if isinstance(msg, P.Finished):
            self.text, self.metrics = msg.text, msg.metrics
            self.finish_reason = msg.metrics.finish_reason
            self.logprobs = msg.logprobs
            return
        self.text = "".join(self._parts)
        if isinstance(msg, Crash) and self._retry(msg.error):
            return
        if isinstance(msg, Crash):
            raise msg.error
        if isinstance(msg, P.Failed):
            raise to_error(msg)
        raise TypeError(f"unexpected reply {msg!r}")

    def _retry(self, error: Exception) -> bool:
        """After a lost cluster node, send a request that had produced nothing again, once
        the model is re-planned and loaded (a request that streamed text fails)."""
        retry = getattr(error, "retry", None)
        # Not while cancelling, and not on an event loop, which must not wait for a reload.
        if retry is None or self._parts or self._retried or self._cancelling or self._async \
                or not retry():
            return False
        self._retried = True
        self._call, self._done = self._engine.resend(self._call), False
        return True

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while not self._ready:
            if self._done:
                raise StopIteration
            try:
                msg = self._call.q.get()
            except KeyboardInterrupt:
                self.cancel()
                raise
            self._handle(msg)
        return self._ready.popleft()

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        while not self._ready:
            if self._done:
                raise StopAsyncIteration
            self._async = True
            aq = self._call.to_asyncio()
            try:
                msg = await aq.get()
            except asyncio.CancelledError:
                self._engine.cancel(self._call)
                self._call.to_sync()
                raise
            self._handle(msg)
        return self._ready.popleft()

    def cancel_nowait(self) -> None:
        """Ask the worker to stop the request, without waiting (for an event loop)."""
        if not self._done:
            self._engine.cancel(self._call)

    def cancel(self) -> None:
        """Stop the request and wait until the worker has stopped it."""
        if self._done:
            return
        self._cancelling = True
        self._engine.cancel(self._call)
        deadline = time.monotonic() + _CANCEL_WAIT_S
        while not self._done and time.monotonic() < deadline:
            try:
                msg = self._call.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            try:
                self._handle(msg)
            except WorkbenchError:
                break
        self._ready.clear()

    def result(self) -> "TokenStream":
        """Consume the rest of the stream; returns self with `text` and `metrics` set."""
        for _ in self:
            pass
        return self
