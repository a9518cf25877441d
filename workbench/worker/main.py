"""The worker process: owns the llama.cpp runtime and serves requests from a queue.

Threads here:
- the main thread runs one request at a time (load, generate, chat), or, for a model
  loaded with n_parallel > 1, every generation request together (`batch.py`);
- a reader thread takes requests off the queue, so a Cancel is seen while a
  generation runs and stops it before the next token;
- a stats thread reports the process's memory once a second.

Import order matters here: llama.cpp's library is loaded (by `runtime`) before numpy.
With numpy 2.5's wheel (its OpenBLAS and gfortran libraries) or torch loaded first,
loading a model in a CUDA build segfaulted inside llama.cpp's loader. So importing the
`workbench` package and this module imports neither numpy nor the `gguf` package
(tests/test_models_bad_files.py checks it); `runtime` imports llama_cpp, which loads its
library before it imports numpy.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import threading
import time
import traceback
from typing import Any

from .._platform import peak_rss, reset_peak_rss
from ..errors import WorkbenchError, no_model
from ..engine import protocol as P

_STATS_PERIOD_S = 1.0
# Tokens produced within _GROUP_S of the last send travel together, unless tokens come
# slower than one per _HOLD_MAX_S: holding one then would delay it visibly.
_GROUP_S = 0.03
_HOLD_MAX_S = 0.05


class _GpuMemory:
    """GPU memory used by this process, where NVML sees an NVIDIA GPU; else None."""

    def __init__(self, nvml: tuple[Any, list[Any]]) -> None:
        self._nvml, self._handles = nvml  # device.nvml.open_nvml()

    def used(self) -> int | None:
        if not self._handles:
            return None
        pid, used = os.getpid(), 0
        for h in self._handles:
            try:
                for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(h):
                    if p.pid == pid and p.usedGpuMemory:
                        used += p.usedGpuMemory
            except Exception:
                return None
        return used


class Worker:
    def __init__(self, requests: Any, replies: Any) -> None:
        # ggml's abort (a lost RPC node, a failed assertion) would otherwise attach gdb to
        # print a backtrace, which takes seconds; the kernel reports the death itself.
        os.environ.setdefault("GGML_NO_BACKTRACE", "1")
        import llama_cpp
        import psutil

        from .libs import has_gpu
        from .runtime import Runtime

        self.requests, self.replies = requests, replies
        self.runtime = Runtime(echo_log=bool(os.environ.get("WORKBENCH_LLAMA_LOG")))
        self.runtime.notice = lambda text: self.send(P.Notice(id="", text=text))
        self.pending: queue.Queue[P.Message] = queue.Queue()
        # requests taken off `pending` that wait for a batch to drain
        self.deferred: collections.deque[P.Message] = collections.deque()
        self.cancelled: set[str] = set()
        self.proc = psutil.Process()
        from ..power.nvml import open_nvml
        from ..power.meter import Telemetry

        nvml = open_nvml()  # one NVML session for memory and energy readings
        self.gpu = _GpuMemory(nvml)
        self.meter = Telemetry(nvml=nvml)
        self.stopping = threading.Event()
        self._send_lock = threading.Lock()
        self.fault = _Fault(os.environ.get("WORKBENCH_FAULT", ""))
        self.embedder: Any = None  # worker/embed.py's Embedder, in an embeddings worker
        self.send(P.WorkerReady(
            id="", pid=os.getpid(), llama_cpp_version=llama_cpp.__version__,
            supports_gpu_offload=has_gpu(),
            system_info=llama_cpp.llama_print_system_info().decode(errors="replace"),
            rss_bytes=self.proc.memory_info().rss, gpu_bytes=self.gpu.used()))

    def send(self, msg: P.Message) -> None:
        # One pipe, written by three threads; no feeder thread, so no extra wake-up.
        with self._send_lock:
            self.replies.send(msg)

    # ---- threads ----------------------------------------------------------

    def _read(self) -> None:
        while not self.stopping.is_set():
            try:
                msg = P.check(self.requests.get(), P.REQUESTS)
            except (EOFError, OSError):
                os._exit(0)  # the kernel is gone
            except Exception:  # one bad message must not stop the reader
                traceback.print_exc()
                continue
            if isinstance(msg, P.Cancel):
                self.cancelled.add(msg.target)
                self.send(P.Done(id=msg.id))
                continue
            self.pending.put(msg)
            if isinstance(msg, P.Shutdown):
                return

    def _stats(self) -> None:
        parent = os.getppid()
        while not self.stopping.wait(_STATS_PERIOD_S):
            if os.getppid() != parent:
                os._exit(0)  # the kernel died: do not hold the model (and its GPU memory)
            try:
                cache = self.runtime.cache
                self.send(P.WorkerStats(id="", rss_bytes=self.proc.memory_info().rss,
                                        gpu_bytes=self.gpu.used(), t=time.monotonic(),
                                        kv=cache.occupancy() if cache is not None else None))
            except (BrokenPipeError, EOFError):
                os._exit(0)
            except Exception:
                traceback.print_exc()

    # ---- main loop --------------------------------------------------------

    def serve(self) -> None:
        threading.Thread(target=self._read, name="requests", daemon=True).start()
        threading.Thread(target=self._stats, name="stats", daemon=True).start()
        while True:
            msg = self.deferred.popleft() if self.deferred else self.pending.get()
            if isinstance(msg, (P.Generate, P.Chat)) and self.runtime.info is not None \
                    and self.runtime.info.n_parallel > 1:
                try:
                    self._batched(msg)
                except Exception:  # its requests have failed with the traceback; go on
                    traceback.print_exc()
                continue
            if isinstance(msg, P.Shutdown):
                self.stopping.set()
                self.runtime.unload()
                self.send(P.Done(id=msg.id))
                return
            try:
                self._handle(msg)
            except Exception as e:
                self.send(_failed(msg.id, e, traceback.format_exc()))
            finally:
                self.cancelled.discard(msg.id)

    def _handle(self, msg: P.Message) -> None:
        if isinstance(msg, P.LoadModel):
            last = [-1.0]

            def progress(fraction: float) -> None:
                if fraction - last[0] >= 0.02 or fraction >= 1.0:
                    last[0] = fraction
                    self.send(P.LoadProgress(id=msg.id, fraction=fraction))

            info = self.runtime.load(msg.path, msg.config, progress)
            peak = peak_rss()
            if reset_peak_rss():
                info = dataclasses.replace(info, load_peak_rss_bytes=peak)
            self.runtime.info = info
            self.send(P.ModelLoaded(id=msg.id, info=info))
        elif isinstance(msg, P.Unload):
            self.runtime.unload()
            self.send(P.Done(id=msg.id))
        elif isinstance(msg, (P.Generate, P.Chat)):
            try:
                self._generate(msg)
            finally:
                try:  # after the reply: the request never waits for this
                    self.runtime.offer_last()
                except Exception:
                    traceback.print_exc()
        elif isinstance(msg, P.KVCommand):
            self.send(P.KVResult(id=msg.id, data=self._kv(msg)))
        elif isinstance(msg, (P.LoadEmbedder, P.Embed)):
            self._embedding(msg)
        elif isinstance(msg, P.Score):
            self._score(msg)
        elif isinstance(msg, P.ListDevices):
            from .libs import backend_devices

            self.send(P.DeviceList(id=msg.id, devices=tuple(backend_devices())))

        else:
            raise TypeError(f"unhandled request {msg!r}")

    def _embedding(self, msg: P.LoadEmbedder | P.Embed) -> None:
        """An embedder's requests (worker/embed.py): this worker then serves no chat."""
        from .embed import Embedder

        if self.embedder is None:
            self.embedder = Embedder(self.runtime.log)
        if isinstance(msg, P.LoadEmbedder):
            self.runtime.unload()
            info = self.embedder.load(msg.path, msg.threads, msg.n_gpu_layers, msg.n_batch)
            self.send(P.ModelLoaded(id=msg.id, info=info))
            return
        t0 = time.monotonic()
        rows, tokens = self.embedder.embed(msg.inputs)
        self.send(P.Embeddings(id=msg.id, data=rows.tobytes(), n=rows.shape[0],
                               dim=rows.shape[1], prompt_tokens=tokens,
                               seconds=time.monotonic() - t0, pooling=self.embedder.pooling))

    def _score(self, msg: P.Score) -> None:
        """Log-likelihoods on a scoring context of the loaded model's (worker/score.py),
        made on the first request and kept until the model goes."""
        from .score import Scorer

        rt = self.runtime
        if rt.info is None:
            raise no_model()
        if rt.scorer is None:
            rt.scorer = Scorer(rt)
        items = rt.scorer.items(msg.pairs, msg.rolling)
        logps, greedy, decoded, seconds = rt.scorer.score(
            items, rt.threads, lambda: msg.id in self.cancelled)
        n = len(msg.pairs)
        toks: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        best = [True] * n
        for it, lp, g in zip(items, logps, greedy):  # a rolling text's windows join up
            toks[it.index] += it.continuation
            lps[it.index] += lp
            best[it.index] &= g
        self.send(P.Scores(id=msg.id, tokens=tuple(map(tuple, toks)),
                           logprobs=tuple(map(tuple, lps)), greedy=tuple(best),
                           decoded=decoded, seconds=seconds))

    def _kv(self, msg: P.KVCommand) -> dict:
        rt = self.runtime
        cache = rt.cache
        if cache is None:
            raise WorkbenchError("the prefix cache is off" if rt.info else "no model is loaded",
                                 "Load a model with `%load_model ... --kv-cache on`.")
        if msg.op == "save":
            if not rt.last_tokens:
                raise WorkbenchError("there is no KV state to save yet",
                                     "Run a request (%%chat or %%generate) first.")
            return cache.save_session(msg.name, rt.last_tokens, rt.snapshot())
        if msg.op == "load":
            return cache.load_session(msg.name)
        if msg.op == "ls":
            return {"sessions": cache.list_sessions(), **cache.occupancy()}
        if msg.op == "rm":
            cache.remove_session(msg.name)
            return {"removed": msg.name}
        if msg.op == "clear_ram":
            cache.clear_ram()
            return cache.occupancy()
        if msg.op == "stats":
            cache.flush()
            return cache.occupancy()
        raise WorkbenchError(f"unknown KV operation {msg.op!r}",
                             "Use save, load, ls, rm, clear_ram or stats.")

    def _prompt(self, msg: P.Generate | P.Chat) -> tuple[list[int], str]:
        """The request's prompt tokens and its kind ("chat" or "generate")."""
        rt = self.runtime
        if rt.info is None:
            raise no_model()
        self.fault.check(msg, "prompt")
        if isinstance(msg, P.Chat):
            text, add_bos = rt.chat_prompt([{"role": r, "content": c} for r, c in msg.messages],
                                            msg.tools)
            return rt.tokenize(text, add_special=add_bos), "chat"
        if isinstance(msg.prompt, tuple):
            return rt.check_tokens(msg.prompt), "generate"
        return rt.tokenize(msg.prompt, add_special=True), "generate"

    def _generate(self, msg: P.Generate | P.Chat) -> None:
        t_received = time.monotonic()
        energy = self.meter.energy_j()
        tokens, kind = self._prompt(msg)
        out = _Emitter(self.send, msg.id)
        try:
            r = self.runtime.run(tokens, msg.config, t_received, self.fault.emit(msg, out.emit),
                                 lambda: msg.id in self.cancelled, out.drafts)
        finally:
            out.flush_rest()
        self._finished(msg.id, kind, r, t_received, energy)

    def _finished(self, rid: str, kind: str, r: Any, t_received: float,
                  energy0: float | None = None) -> None:
        """`energy0`: the meter before the request (requests decoded alone only: in a
        batch the machine's energy is not one request's)."""
        energy1 = self.meter.energy_j() if energy0 is not None else None
        decode_s = r.t_last - r.t_first
        info = self.runtime.info
        metrics = P.RequestMetrics(
            request_id=rid, kind=kind, model=info.name, prompt_tokens=r.prompt_tokens,
            prompt_seconds=r.prompt_seconds,
            prompt_tps=r.prompt_tokens / r.prompt_seconds if r.prompt_seconds > 0 else 0.0,
            ttft_s=r.t_first - t_received, generated_tokens=r.generated,
            decode_seconds=decode_s,
            decode_tps=(r.generated - 1) / decode_s if r.generated > 1 and decode_s > 0 else 0.0,
            total_s=time.monotonic() - t_received, finish_reason=r.finish_reason,
            rss_bytes=self.proc.memory_info().rss, gpu_bytes=self.gpu.used(),
            peak_rss_bytes=peak_rss(),
            n_threads=self.runtime.threads, n_ctx=info.n_ctx, wall_time=time.time(),
            cached_tokens=r.cached_tokens, cache_tier=r.cache_tier,
            draft_tokens=r.draft_tokens, accepted_tokens=r.accepted_tokens,
            speculative=r.speculative,
            energy_j=energy1 - energy0 if energy0 is not None and energy1 is not None else None)
        self.send(P.Finished(id=rid, text=r.text, metrics=metrics, logprobs=r.logprobs))

    # ---- continuous batching -------------------------------------------------

    def _batched(self, first: P.Generate | P.Chat) -> None:
        """Serve generation requests together until none is left (n_parallel > 1).

        Requests that arrive meanwhile join between steps; other requests (a load, a KV
        command) wait until the batch has drained; a Shutdown ends it at once."""
        from .batch import Batch

        batch = Batch(self.runtime)
        waiting: collections.deque[P.Message] = collections.deque([first])
        outs: dict[str, tuple[_Emitter, str, float]] = {}
        try:
            while True:
                while True:  # take what has arrived, without waiting
                    try:
                        waiting.append(self.pending.get_nowait())
                    except queue.Empty:
                        break
                kept: collections.deque[P.Message] = collections.deque()
                while waiting:
                    msg = waiting.popleft()
                    if isinstance(msg, P.Shutdown):
                        self.deferred.appendleft(msg)
                        return
                    if not isinstance(msg, (P.Generate, P.Chat)):
                        self.deferred.append(msg)
                    elif batch.full:
                        kept.append(msg)
                    else:
                        self._join(batch, msg, outs)
                waiting = kept
                if not batch.live:
                    if not waiting:
                        return
                    continue
                for seq in batch.step():
                    out, kind, t_received = outs.pop(seq.request_id)
                    self.cancelled.discard(seq.request_id)
                    if seq.error is not None:
                        out.flush_rest()
                        self.send(_failed(seq.request_id, seq.error, seq.trace))
                    else:
                        r = seq.result()  # emits text held back for a stop string
                        out.flush_rest()
                        self._finished(seq.request_id, kind, r, t_received)
        finally:
            for rid in list(outs):  # a bug ended the loop: no request waits forever
                self.send(P.Failed(id=rid, kind="bug", message=traceback.format_exc(),
                                   hint=""))
            self.pending_front(waiting)
            batch.close()

    def _join(self, batch: Any, msg: P.Generate | P.Chat,
              outs: dict[str, tuple["_Emitter", str, float]]) -> None:
        t_received = time.monotonic()
        try:
            tokens, kind = self._prompt(msg)
            out = _Emitter(self.send, msg.id)
            batch.join(msg.id, tokens, msg.config, t_received, self.fault.emit(msg, out.emit),
                       lambda rid=msg.id: rid in self.cancelled, out.drafts)
        except Exception as e:  # this request fails; the batch goes on
            self.cancelled.discard(msg.id)
            self.send(_failed(msg.id, e, traceback.format_exc()))
            return
        outs[msg.id] = (out, kind, t_received)

    def pending_front(self, msgs: "collections.deque[P.Message]") -> None:
        """Put requests that were taken but not served back before the deferred ones."""
        for msg in reversed(msgs):
            self.deferred.appendleft(msg)


def _failed(rid: str, e: BaseException, trace: str) -> P.Failed:
    """The reply for a request that raised `e`: typed for a WorkbenchError; for anything
    else (a bug) its traceback, which the kernel side keeps and logs."""
    if isinstance(e, WorkbenchError):
        return P.Failed(id=rid, kind=type(e).__name__, message=e.message, hint=e.hint)
    return P.Failed(id=rid, kind="bug", message=trace, hint="")


class _Fault:
    """A test hook that makes one request fail inside the worker, so tests can show that
    a failure there fails that request only. WORKBENCH_FAULT="STAGE:TEXT" raises an
    exception in every request whose prompt holds TEXT: at STAGE "prompt" while its
    prompt is read, at "decode" when its third token is handed on. Unset: no cost."""

    def __init__(self, spec: str) -> None:
        self.stage, _, self.text = spec.partition(":")

    def _hits(self, msg: P.Generate | P.Chat) -> bool:
        if not self.text:
            return False
        if isinstance(msg, P.Chat):
            return any(self.text in c for _, c in msg.messages)
        return isinstance(msg.prompt, str) and self.text in msg.prompt

    def check(self, msg: P.Generate | P.Chat, stage: str) -> None:
        if self.stage == stage and self._hits(msg):
            raise RuntimeError(f"fault injected at {stage} (WORKBENCH_FAULT)")

    def emit(self, msg: P.Generate | P.Chat, emit: Any) -> Any:
        if self.stage != "decode" or not self._hits(msg):
            return emit

        def failing(piece: str, token: int, index: int, t: float) -> None:
            if index == 2:
                raise RuntimeError("fault injected at decode (WORKBENCH_FAULT)")
            emit(piece, token, index, t)
        return failing


class _Emitter:
    """Sends a request's tokens as they come: tokens produced within _GROUP_S of the
    last send travel together, unless they come slower than one per _HOLD_MAX_S."""

    def __init__(self, send: Any, rid: str) -> None:
        self.send, self.rid = send, rid
        self.pieces: list[str] = []
        self.ids: list[int] = []
        self.first = 0
        self.last_send = 0.0
        self.prev = 0.0
        self.drafted = self.accepted = 0

    def drafts(self, drafted: int, accepted: int) -> None:
        """The request's speculative-decoding counts so far, sent with its next tokens."""
        self.drafted, self.accepted = drafted, accepted

    def flush(self, t: float) -> None:
        self.send(P.Tokens(id=self.rid, pieces=tuple(self.pieces), token_ids=tuple(self.ids),
                           index=self.first, t=t, drafted=self.drafted,
                           accepted=self.accepted))
        self.first += len(self.pieces)
        self.last_send = t
        self.pieces.clear()
        self.ids.clear()

    def emit(self, piece: str, token: int, index: int, t: float) -> None:
        self.pieces.append(piece)
        if token >= 0:  # held-back text at the end has no token of its own
            self.ids.append(token)
        dt, self.prev = t - self.prev, t
        if index == 0 or dt >= _HOLD_MAX_S or t - self.last_send >= _GROUP_S:
            self.flush(t)

    def flush_rest(self) -> None:
        if self.pieces:
            self.flush(time.monotonic())


def main(requests: Any, replies: Any) -> None:
    """Entry point of the spawned worker process."""
    import faulthandler

    faulthandler.enable()  # a segfault in llama.cpp leaves a Python stack in the log
    from .._cpu import SPINCOUNT

    # before llama.cpp and its OpenMP runtime load: threads waiting for work sleep soon
    # rather than spin on cores that other processes (or our other threads) need
    os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)
    try:
        worker = Worker(requests, replies)
    except Exception:  # report why the worker could not start, then exit
        replies.send(P.Failed(id="", kind="bug", message=traceback.format_exc(), hint=""))
        raise SystemExit(1) from None
    worker.serve()
