"""Kernel side of the engine: spawns and supervises the worker, streams, cancels.

The kernel never holds llama.cpp objects. A receiver thread reads every reply
from the worker and routes it by request id to the call waiting for it, so any
number of requests can be in flight. If the worker dies, each outstanding call
fails with an `EngineCrashed` that says how it died and what it was serving; the
next call starts a new worker and reloads the last model.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import multiprocessing.connection as mp_connection
import os
import queue
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import _child, _paths
from ..config import GenerationConfig, LoadConfig
from .._text import check_text
from ..errors import EngineCrashed, WorkbenchError, no_model
from ..models.gguf_file import read_header
from . import protocol as P
from .stream import Call, Crash, TokenStream, to_error

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 120.0
_STOPPED = ("the engine worker was stopped", "The next call starts it again.")
class Engine:
    """A supervised worker process running one model."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._proc: Any = None
        self._requests: Any = None
        self._calls: dict[str, Call] = {}
        self._ids = itertools.count(1)
        self._listeners: list[Callable[[str, Any], None]] = []
        self._last_load: P.LoadModel | P.LoadEmbedder | None = None
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
        requests = _child.CONTEXT.Queue()
        replies, replies_writer = _child.CONTEXT.Pipe(duplex=False)
        proc = _child.start("workbench.worker.main:main", (requests, replies_writer),
                            name="workbench-engine")
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
        if isinstance(msg, Crash):
            raise msg.error
        if isinstance(msg, P.Failed):
            self._kill()
            raise to_error(msg)
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
                            P.DeviceList, P.Embeddings, P.Scores)):
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
            ready.put(Crash(stopped))
            for c in list(self._calls.values()):
                self._calls.pop(c.request.id, None)
                c.deliver(Crash(stopped))
            return
        how = _child.describe_exit(proc.exitcode)
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
        ready.put(Crash(make()))
        for c in calls:
            c.deliver(Crash(make()))
        self._emit("crashed", message)

    # ---- requests ------------------------------------------------------------------

    def _submit(self, request: P.Message, description: str) -> Call:
        call = Call(request, description)
        self._calls[request.id] = call
        self._requests.put(request)
        self._emit("submitted", request)
        return call

    @staticmethod
    def _wait(call: Call, on_progress: Callable[[float], None] | None = None) -> Any:
        while True:
            msg = call.q.get()
            if isinstance(msg, Crash):
                raise msg.error
            if isinstance(msg, P.Failed):
                raise to_error(msg)
            if isinstance(msg, P.LoadProgress):
                if on_progress:
                    on_progress(msg.fraction)
                continue
            return msg

    def load(self, path: str | os.PathLike, config: LoadConfig,
             on_progress: Callable[[float], None] | None = None) -> P.ModelInfo:
        """Load a GGUF model in the worker (replacing any loaded one), with a configuration
        the planner resolved (`device/planner.resolve`): the engine decides nothing."""
        open_ = config.unresolved()
        if open_:
            raise ValueError(f"Engine.load takes a resolved configuration; {', '.join(open_)} "
                             "left open (resolve it with workbench.device.planner.resolve)")
        header = read_header(path)  # bad files fail here, before any worker sees them
        with self._lock:
            self._ensure()
            assert self.worker is not None
            req = P.LoadModel(id=self._new_id("load"), path=str(header.path), config=config)
            return self._load(req, on_progress)

    def load_embedder(self, path: str | os.PathLike, threads: int, n_gpu_layers: int = 0,
                      n_batch: int = 0) -> P.ModelInfo:
        """Load an embedding model in this engine's worker, which then serves `embed` only
        (see `protocol.LoadEmbedder`: a session keeps a second engine for it)."""
        from ..models.embedding import pooling

        header = read_header(path)
        pooling(header)  # a chat model is refused here, before any worker starts
        with self._lock:
            self._ensure()
            req = P.LoadEmbedder(id=self._new_id("load"), path=str(header.path),
                                 threads=threads, n_gpu_layers=n_gpu_layers, n_batch=n_batch)
            return self._load(req, None)

    def embed(self, inputs: "list[str | list[int]] | tuple") -> P.Embeddings:
        """Embed `inputs` (texts or token arrays) with the loaded embedder: one
        L2-normalized row each (`Embeddings.data`, float32)."""
        from ..models.embedding import check_inputs

        check_inputs(inputs)
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                check_text(x, f"input {i}")
        items = tuple(x if isinstance(x, str) else tuple(int(t) for t in x) for x in inputs)
        with self._lock:
            if not isinstance(self._last_load, P.LoadEmbedder):
                raise WorkbenchError("no embedding model is loaded in this engine",
                                     "Load one with Engine.load_embedder(path, threads).")
            self._ensure()
            call = self._submit(P.Embed(id=self._new_id("embed"), inputs=items), "embed")
        return self._wait(call)

    def score(self, pairs: Sequence[tuple[Any, Any]], rolling: bool = False) -> P.Scores:
        """Log-likelihoods of (context, continuation) pairs under the loaded model
        (worker/score.py): texts, or token ids used as given. `rolling`: pairs are
        (text, "") and each whole text is scored."""
        items = []
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise WorkbenchError(f"pair {i} is not (context, continuation): {pair!r}",
                                     "Give a list of (context, continuation) pairs.")
            items.append(tuple(_score_part(x, f"pair {i}") for x in pair))
        with self._lock:
            if not isinstance(self._last_load, P.LoadModel):
                raise no_model()
            self._ensure()
            call = self._submit(P.Score(id=self._new_id("score"), pairs=tuple(items),
                                        rolling=rolling), "score")
        return self._wait(call)

    def _load(self, req: P.LoadModel | P.LoadEmbedder, on_progress: Callable[[float], None] | None) -> P.ModelInfo:
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
        """Load the last model with `config` (resolved) when the worker next starts (a
        re-plan)."""
        if self._last_load is not None:
            self._last_load = dataclasses.replace(self._last_load, config=config,
                                                  id=self._new_id("load"))

    def resend(self, call: Call) -> Call:
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

    def stream(self, request_kind: str, payload: Any, config: GenerationConfig,
               tools: str = "") -> TokenStream:
        """Start a generation; returns a stream of its tokens. `tools`: for a chat, the
        functions the model may call (OpenAI's tools list, JSON text)."""
        with self._lock:
            if self._last_load is None:
                raise no_model()
            self._ensure()
            _check_payload(request_kind, payload)
            rid = self._new_id(request_kind)
            if request_kind == "chat":
                req: P.Message = P.Chat(id=rid, messages=payload, config=config, tools=tools)
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
        reply, child = _child.CONTEXT.Pipe(duplex=False)
        proc = _child.start("workbench.worker.probe:main", (str(path), config, child),
                            name="workbench-probe")
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
                                f"{_child.describe_exit(proc.exitcode)}",
                                "The plan falls back to estimated compute buffers.")
        if isinstance(msg, P.Failed):
            raise to_error(msg)
        return msg.buffers

    def cancel(self, call: Call) -> None:
        if self.alive and call.request.id in self._calls:
            try:
                self._requests.put(P.Cancel(id=self._new_id("cancel"), target=call.request.id))
            except Exception:
                pass


def _check_payload(kind: str, payload: Any) -> None:
    """Refuse text UTF-8 cannot encode before it reaches the worker (see `_text`)."""
    if kind == "chat":
        for i, (role, content) in enumerate(payload):
            check_text(role, f"messages[{i}].role")
            check_text(content, f"messages[{i}].content")
    elif isinstance(payload, str):
        check_text(payload, "the prompt")


def _score_part(x: Any, where: str) -> str | tuple[int, ...]:
    if isinstance(x, str):
        check_text(x, where)
        return x
    if isinstance(x, (tuple, list)) and all(isinstance(t, int) for t in x):
        return tuple(int(t) for t in x)
    raise WorkbenchError(f"{where} holds {type(x).__name__}, not text or token ids",
                         "Contexts and continuations are strings (or lists of token ids).")
