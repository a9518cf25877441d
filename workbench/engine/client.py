"""Kernel side of the engine: spawns and supervises the worker, streams, cancels.

The kernel never holds llama.cpp objects. A receiver thread reads every reply
from the worker and routes it by request id to the call waiting for it, so any
number of requests can be in flight. If the worker dies, each outstanding call
fails with an `EngineCrashed` that says how it died and what it was serving; the
next call starts a new worker and reloads the last model.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import queue
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

from .. import _paths
from ..config import GenerationConfig, LoadConfig
from .._cpu import idle_cores, usable_cores
from .._text import check_text
from ..errors import (EngineCrashed, EngineFault, GenerationError, ModelFileError,
                      PromptTooLong, WorkbenchError, no_model)
from ..models.gguf_file import read_header
from . import protocol as P

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 120.0
_CANCEL_WAIT_S = 30.0
_STOPPED = ("the engine worker was stopped", "The next call starts it again.")
_ERRORS: dict[str, type[WorkbenchError]] = {
    c.__name__: c for c in (WorkbenchError, ModelFileError, GenerationError, EngineCrashed,
                          PromptTooLong, EngineFault)}


@dataclasses.dataclass(frozen=True)
class _Crash:
    error: EngineCrashed


class _Call:
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


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        extra = " (the system sends this when memory runs out, or someone killed it)" \
            if -code == signal.SIGKILL else ""
        return f"was killed by {name}{extra}"
    return f"exited with code {code}"


class Engine:
    """A supervised worker process running one model."""

    def __init__(self) -> None:
        self._mp = mp.get_context("spawn")
        self._lock = threading.RLock()
        self._proc: Any = None
        self._requests: Any = None
        self._calls: dict[str, _Call] = {}
        self._ids = itertools.count(1)
        self._listeners: list[Callable[[str, Any], None]] = []
        self._last_load: P.LoadModel | None = None
        self.worker: P.WorkerReady | None = None
        self.model: P.ModelInfo | None = None
        self.records: list[P.RequestMetrics] = []
        self.last_stats: P.WorkerStats | None = None
        self.restarts = 0
        self.last_crash: str | None = None
        self.notices: list[str] = []
        self._closing: Any = None  # the process close() is stopping
        self._stop_reason = _STOPPED
        # Asked when the worker dies, before requests hear of it: (how, serving) -> an
        # error that explains the death better, or None (the cluster names a lost node).
        self.crash_hook: Callable[[str, str], WorkbenchError | None] | None = None

    # ---- events for dashboards -------------------------------------------

    def subscribe(self, fn: Callable[[str, Any], None]) -> Callable[[], None]:
        """Call `fn(kind, payload)` for events: "submitted", "tokens", "finished", "stats",
        "crashed".
        Runs on the receiver thread; returns a function that unsubscribes."""
        self._listeners.append(fn)
        return lambda: self._listeners.remove(fn) if fn in self._listeners else None

    def _emit(self, kind: str, payload: Any) -> None:
        for fn in list(self._listeners):
            try:
                fn(kind, payload)
            except Exception:  # a broken widget must not stop the engine
                log.exception("engine listener failed")

    # ---- worker lifecycle --------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids)}"

    def _start(self) -> None:
        from . import worker

        requests = self._mp.Queue()
        replies, replies_writer = self._mp.Pipe(duplex=False)
        proc = self._mp.Process(target=worker.main, args=(requests, replies_writer),
                                name="workbench-engine", daemon=True)
        proc.start()
        replies_writer.close()  # only the worker writes: its death then reads as EOF
        ready: queue.Queue[Any] = queue.Queue()
        self._proc, self._requests = proc, requests
        threading.Thread(target=self._receive, args=(proc, replies, ready),
                         name="workbench-receiver", daemon=True).start()
        try:
            msg = ready.get(timeout=_START_TIMEOUT_S)
        except queue.Empty:
            self._kill()
            raise EngineCrashed("the engine worker did not start within "
                                f"{_START_TIMEOUT_S:.0f} s", "Check the kernel's log.") from None
        if isinstance(msg, _Crash):
            raise msg.error
        if isinstance(msg, P.Failed):
            self._kill()
            raise _to_error(msg)
        self.worker = msg

    def _ensure(self) -> None:
        """Start the worker if needed; after a crash, reload the last model."""
        with self._lock:
            if self.alive:
                return
            restarting = self._proc is not None
            self._start()
            if restarting:
                self.restarts += 1
                if self._last_load is not None:
                    self._load(self._last_load, None)

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()
            proc.join(5)

    def close(self, reason: tuple[str, str] | None = None) -> None:
        """Stop the worker (politely, then by force). A request in flight fails with
        `reason` (message, hint)."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            self._closing = proc
            self._stop_reason = reason or _STOPPED
            if proc.is_alive():
                try:
                    self._requests.put(P.Shutdown(id=self._new_id("shutdown")))
                    proc.join(5)
                except Exception:
                    pass
            self._kill()
            self._proc = None
            self.model = None

    def stop(self, reason: str = "the engine was stopped from the Workbench panel") -> None:
        """Stop the worker and forget the model: a request in flight ends with `reason`,
        and the next generation asks for a `load_model` first."""
        with self._lock:
            self._last_load = None
            self.close((reason, "Load a model to go on (`%load_model`)."))

    def activity(self) -> str | None:
        """"loading" or "generating" while such a request is in flight, else None."""
        kinds = {type(c.request) for c in list(self._calls.values())}
        if P.LoadModel in kinds:
            return "loading"
        if kinds & {P.Chat, P.Generate}:
            return "generating"
        return None

    def kill_worker(self) -> None:
        """Kill the worker with SIGKILL, as a crash would (for tests and the stop button)."""
        if self.alive:
            os.kill(self._proc.pid, signal.SIGKILL)

    # ---- the receiver thread ---------------------------------------------------

    def _receive(self, proc: Any, replies: Any, ready: queue.Queue[Any]) -> None:
        while True:
            try:
                ready_now = mp_connection.wait([replies, proc.sentinel])
                if replies not in ready_now:
                    raise EOFError  # the process ended and left nothing to read
                msg = replies.recv()
            except (EOFError, OSError):
                replies.close()
                self._on_death(proc, ready)
                return
            try:
                self._dispatch(P.check(msg, P.REPLIES), ready)
            except Exception:  # never let one bad reply end the receiver
                log.exception("engine receiver could not handle %r", msg)

    def _dispatch(self, msg: P.Message, ready: queue.Queue[Any]) -> None:
        if isinstance(msg, P.WorkerReady) or (isinstance(msg, P.Failed) and not msg.id):
            ready.put(msg)
        elif isinstance(msg, P.WorkerStats):
            self.last_stats = msg
            self._emit("stats", msg)
        elif isinstance(msg, P.Notice):
            warnings.warn(msg.text, RuntimeWarning, stacklevel=1)
            self.notices.append(msg.text)
            self._emit("notice", msg.text)
        else:
            self._route(msg)

    def _route(self, msg: P.Message) -> None:
        call = self._calls.get(msg.id)
        if call is None:
            return  # a reply to a call that gave up waiting (e.g. a Cancel's ack)
        if isinstance(msg, P.Tokens):
            if call.first_token_at is None:
                call.first_token_at = time.monotonic()
            self._emit("tokens", msg)
        elif isinstance(msg, P.Finished):
            ttft = (call.first_token_at or time.monotonic()) - call.submitted
            msg = dataclasses.replace(msg, metrics=dataclasses.replace(msg.metrics, ttft_s=ttft))
            self._record(msg.metrics)
        if isinstance(msg, (P.Finished, P.Failed, P.Done, P.ModelLoaded, P.KVResult,
                            P.DeviceList)):
            self._calls.pop(msg.id, None)
        call.deliver(msg)

    def _record(self, m: P.RequestMetrics) -> None:
        self.records.append(m)
        try:
            with open(_paths.metrics_log(), "a", encoding="utf-8") as f:
                f.write(json.dumps(dataclasses.asdict(m)) + "\n")
        except OSError as e:
            log.warning("could not append to the metrics log: %s", e)
        self._emit("finished", m)

    def _on_death(self, proc: Any, ready: queue.Queue[Any]) -> None:
        proc.join(1)
        if self._closing is proc:  # stopped on purpose: not a crash
            stopped = EngineCrashed(*self._stop_reason)
            ready.put(_Crash(stopped))
            for c in list(self._calls.values()):
                self._calls.pop(c.request.id, None)
                c.deliver(_Crash(stopped))
            return
        how = _describe_exit(proc.exitcode)
        calls = [c for c in list(self._calls.values())]
        self._calls.clear()
        serving = ", ".join(f"{c.request.id} ({c.description})" for c in calls)
        explained = None
        if self.crash_hook is not None:
            try:
                explained = self.crash_hook(how, serving)
            except Exception:  # a broken hook must not hide the crash
                log.exception("crash hook failed")
        if explained is not None:
            message = explained.message
            make: Callable[[], WorkbenchError] = lambda: explained  # noqa: E731
        else:
            model = self._last_load.path if self._last_load else None
            hint = ("The next call restarts the worker" +
                    (f" and reloads {Path(model).name}." if model else "."))
            message = f"the engine worker (pid {proc.pid}) {how}"
            message += f" while serving request {serving}" if serving else ""
            make = lambda: EngineCrashed(message, hint)  # noqa: E731
        self.last_crash = message
        self.model = None
        ready.put(_Crash(make()))
        for c in calls:
            c.deliver(_Crash(make()))
        self._emit("crashed", message)

    # ---- requests ------------------------------------------------------------------

    def _submit(self, request: P.Message, description: str) -> _Call:
        call = _Call(request, description)
        self._calls[request.id] = call
        self._requests.put(request)
        self._emit("submitted", request)
        return call

    @staticmethod
    def _wait(call: _Call, on_progress: Callable[[float], None] | None = None) -> Any:
        while True:
            msg = call.q.get()
            if isinstance(msg, _Crash):
                raise msg.error
            if isinstance(msg, P.Failed):
                raise _to_error(msg)
            if isinstance(msg, P.LoadProgress):
                if on_progress:
                    on_progress(msg.fraction)
                continue
            return msg

    def load(self, path: str | os.PathLike, config: LoadConfig,
             on_progress: Callable[[float], None] | None = None) -> P.ModelInfo:
        """Load a GGUF model in the worker (replacing any loaded one)."""
        header = read_header(path)  # bad files fail here, before any worker sees them
        with self._lock:
            self._ensure()
            assert self.worker is not None
            resolved = self._resolve(config)
            req = P.LoadModel(id=self._new_id("load"), path=str(header.path), config=resolved)
            return self._load(req, on_progress)

    def _resolve(self, config: LoadConfig) -> LoadConfig:
        """What the worker runs with: the settings left to the engine filled in."""
        gpu = self.worker.supports_gpu_offload if self.worker is not None else False
        ngl = config.n_gpu_layers if config.n_gpu_layers is not None else (-1 if gpu else 0)
        # Flash attention "auto" is on where layers run on a GPU and off on the CPU,
        # where it decoded 30% slower at depth 512 (benchmarks/engine_overhead.py,
        # --flash-attn on vs off).
        fa = config.flash_attn if config.flash_attn != "auto" else ("on" if ngl else "off")
        if config.type_v != "f16":  # llama.cpp quantizes V only with flash attention
            if config.flash_attn == "off":
                raise WorkbenchError(
                    f"a {config.type_v} V cache needs flash attention, which is off",
                    "Drop --flash-attn off, or keep --type-v f16.")
            fa = "on"
        # Backend sampling pays where the logits live on a GPU; on the CPU the sampler
        # chain on the host was as fast or faster.
        bs = config.backend_sampling if config.backend_sampling != "auto" \
            else ("on" if ngl else "off")
        # Threads left open: the cores idle now, re-chosen while decoding (engine/threads.py).
        threads = config.threads or idle_cores().idle
        max_threads = config.max_threads if config.max_threads is not None else \
            (0 if config.threads else usable_cores())
        return dataclasses.replace(config, threads=threads, max_threads=max_threads,
                                   n_gpu_layers=ngl, flash_attn=fa, backend_sampling=bs)

    def _load(self, req: P.LoadModel, on_progress: Callable[[float], None] | None) -> P.ModelInfo:
        call = self._submit(req, f"load {Path(req.path).name}")
        try:
            msg = self._wait(call, on_progress)
        except WorkbenchError as e:
            if getattr(e, "replanned", False):  # a lost cluster node: a new plan is set
                raise
            # The worker frees the old model before loading a new one, to need memory for
            # one model only; say so.
            previous = self.model
            self.model, self._last_load = None, None
            if previous is not None and previous.path != req.path and e.hint:
                e.hint += f" ({previous.name} was unloaded first: load it again to go on.)"
            raise
        self.model = msg.info
        self._last_load = req
        return msg.info

    def replace_load(self, config: LoadConfig) -> None:
        """Load the last model with `config` when the worker next starts (a re-plan)."""
        if self._last_load is not None:
            self._last_load = dataclasses.replace(self._last_load, config=self._resolve(config),
                                                  id=self._new_id("load"))

    def resend(self, call: _Call) -> _Call:
        """Send a call's request again, starting the worker if needed."""
        with self._lock:
            self._ensure()
            return self._submit(call.request, call.description)

    def forget_load(self) -> None:
        self._last_load = None

    def ensure_loaded(self) -> None:
        """Start the worker and reload the last model, if it is not running."""
        with self._lock:
            self._ensure()

    def unload(self) -> None:
        with self._lock:
            self._last_load = None
            if self.alive and self.model is not None:
                self._wait(self._submit(P.Unload(id=self._new_id("unload")), "unload"))
            self.model = None

    def stream(self, request_kind: str, payload: Any, config: GenerationConfig) -> "TokenStream":
        """Start a generation; returns a stream of its tokens."""
        with self._lock:
            if self._last_load is None:
                raise no_model()
            self._ensure()
            _check_payload(request_kind, payload)
            rid = self._new_id(request_kind)
            if request_kind == "chat":
                req: P.Message = P.Chat(id=rid, messages=payload, config=config)
            else:
                req = P.Generate(id=rid, prompt=payload, config=config)
            call = self._submit(req, request_kind)
        return TokenStream(self, call)

    def kv(self, op: str, name: str = "") -> dict:
        """Run a prefix cache / named session operation in the worker."""
        check_text(name, "the KV session name")
        with self._lock:
            if self._last_load is None:
                raise no_model()
            self._ensure()
            call = self._submit(P.KVCommand(id=self._new_id("kv"), op=op, name=name), f"kv {op}")
        return self._wait(call).data

    def devices(self) -> tuple[P.Device, ...]:
        """The devices llama.cpp sees in the worker, with their free memory now."""
        with self._lock:
            self._ensure()
            call = self._submit(P.ListDevices(id=self._new_id("devices")), "list devices")
        return self._wait(call).devices

    def measure_buffers(self, path: str | os.PathLike, config: LoadConfig,
                        timeout_s: float = 300.0) -> tuple[P.Buffer, ...]:
        """The buffers llama.cpp would allocate to load `path` with `config`: a dry run
        that allocates nothing, in a short-lived process of its own."""
        from . import probe

        reply, child = self._mp.Pipe(duplex=False)
        proc = self._mp.Process(target=probe.main, args=(str(path), config, child),
                                name="workbench-probe", daemon=True)
        proc.start()
        child.close()
        msg = None
        try:
            if reply.poll(timeout_s):
                msg = reply.recv()
        except (EOFError, OSError):
            pass
        finally:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            reply.close()
        if msg is None:
            raise EngineCrashed(f"the dry run of {Path(path).name} "
                                f"{_describe_exit(proc.exitcode)}",
                                "The plan falls back to estimated compute buffers.")
        if isinstance(msg, P.Failed):
            raise _to_error(msg)
        return msg.buffers

    def cancel(self, call: _Call) -> None:
        if self.alive and call.request.id in self._calls:
            try:
                self._requests.put(P.Cancel(id=self._new_id("cancel"), target=call.request.id))
            except Exception:
                pass


def _to_error(msg: P.Failed) -> Exception:
    if msg.kind == "bug":  # the worker's traceback, kept on the error
        log.debug("the engine worker failed on a request:\n%s", msg.message)
        last = msg.message.strip().splitlines()[-1] if msg.message.strip() else "unknown"
        return EngineFault(f"the engine failed on this request ({last})",
                           "The worker is still running and other requests are not "
                           "affected. This is a bug in the workbench: please report it with "
                           "the traceback in the error's `details`.", details=msg.message)
    return _ERRORS.get(msg.kind, WorkbenchError)(msg.message, msg.hint)


def _check_payload(kind: str, payload: Any) -> None:
    """Refuse text UTF-8 cannot encode before it reaches the worker (see `_text`)."""
    if kind == "chat":
        for i, (role, content) in enumerate(payload):
            check_text(role, f"messages[{i}].role")
            check_text(content, f"messages[{i}].content")
    elif isinstance(payload, str):
        check_text(payload, "the prompt")


class TokenStream:
    """The tokens of one request as they are produced.

    Iterate it (`for text in stream`: one decoded piece per token) or iterate it
    asynchronously (`async for`). Interrupting the iteration (KeyboardInterrupt, or
    cancelling the task) cancels the request in the worker, which stops before its
    next token. When the stream ends, `text` and `metrics` hold the result.
    """

    def __init__(self, engine: Engine, call: _Call) -> None:
        self._engine = engine
        self._call = call
        self.id = call.request.id
        self.text = ""
        self.metrics: P.RequestMetrics | None = None
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
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
            self._ready.extend(msg.pieces)
            return
        self._done = True
        if isinstance(msg, P.Finished):
            self.text, self.metrics = msg.text, msg.metrics
            self.finish_reason = msg.metrics.finish_reason
            return
        self.text = "".join(self._parts)
        if isinstance(msg, _Crash) and self._retry(msg.error):
            return
        if isinstance(msg, _Crash):
            raise msg.error
        if isinstance(msg, P.Failed):
            raise _to_error(msg)
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
