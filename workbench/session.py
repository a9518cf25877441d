"""A session: one engine and the path from a model's name to its answers.

`resolve_model` → `plan` (device/planner.py, the one planner) → `load` → `generate` /
`chat`. The public API (`api.py`) holds one session per process; the features below it
(autotune, calibration, mixed precision) receive a session as a parameter and never
import the API back. A script or a test may make a session of its own, with an engine
of its own.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ._schema import schema_text
from ._tools import declare
from .config import GenerationConfig, LoadConfig, build
from .engine.client import Engine
from .engine.stream import TokenStream
from .errors import GenerationError, WorkbenchError
from .models.default import default_model_path
from .progress import progress_bar
from .results import Completion, Embeddings, EngineStatus, LoadedModel

if TYPE_CHECKING:
    from .cluster.cluster import Cluster
    from .device.plan import Placement
    from .engine.status import StatusPublisher


class Session:
    """One engine (started on first use), this kernel's cluster, and loading and
    generating through them. `publish`: show the engine in the JupyterLab panel."""

    def __init__(self, engine: Engine | None = None, *, publish: bool = False) -> None:
        self._engine = engine
        self._publish = publish
        self.publisher: StatusPublisher | None = None
        self._cluster: Cluster | None = None
        self._lock = threading.Lock()
        self._embedder: Engine | None = None  # a second engine, for embeddings only

    @property
    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = Engine()
                atexit.register(self._engine.close)
                if self._publish:
                    from .engine.status import StatusPublisher

                    # registered after close, so it runs first: the entry goes before the worker
                    self.publisher = StatusPublisher(self._engine)
                    atexit.register(self.publisher.close)
            return self._engine

    @property
    def started_engine(self) -> Engine | None:
        """The engine, if something has started it (None: nothing has run yet)."""
        return self._engine

    @property
    def cluster(self) -> Cluster:
        """This session's cluster of llama.cpp RPC nodes (created on first use)."""
        engine = self.engine
        with self._lock:
            if self._cluster is None:
                from .cluster.cluster import Cluster

                self._cluster = Cluster(engine)
            return self._cluster

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        if self._embedder is not None:
            self._embedder.close()

    # ---- embeddings: a second engine --------------------------------------------------

    def embed(self, texts: str | Sequence[str] | Sequence[Sequence[int]], *,
              model: str | os.PathLike[str] | None = None,
              threads: int | None = None) -> Embeddings:
        """Sentence embeddings of `texts` (one text, texts, or token arrays), by the
        embedding model `model` (a path or catalog id; None: the one loaded last).

        The embedder runs in a second worker of its own, beside the chat model's: an
        embedding context pools and batches many short sequences, settings a chat
        context must not get, and a crash in one worker leaves the other running."""
        if isinstance(texts, str):
            texts = [texts]
        engine = self._embedder
        if model is not None:
            path = str(self.resolve_model(model, progress=True))
            if engine is None:
                engine = self._embedder = Engine()
                atexit.register(engine.close)
            if engine.model is None or engine.model.path != path:
                from ._cpu import usable_cores

                engine.load_embedder(path, threads or usable_cores())
        elif engine is None:  # (after a crash, the engine reloads its embedder itself)
            raise WorkbenchError("no embedding model is loaded",
                                 "Name one: workbench.embed(texts, model=PATH_OR_ID), e.g. "
                                 "workbench.models.bert_gguf.minilm_gguf().")
        import numpy as np

        r = engine.embed(list(texts))
        assert engine.model is not None
        return Embeddings(np.frombuffer(r.data, np.float32).reshape(r.n, r.dim),
                          engine.model.name, r.pooling, r.prompt_tokens, r.seconds)

    # ---- from a name to a loaded model ------------------------------------------------

    def resolve_model(self, model: str | os.PathLike[str] | None,
                      progress: bool = False) -> Path:
        """The file `model` names: the default model, a catalog id (fetched if needed), a
        model found on this machine, or a path, in that order (see models/resolve.py). The
        result of quantize, prune or distill stands for the file it wrote."""
        from .models.resolve import resolve

        model = getattr(model, "path", model)
        if model is None:  # the machine's default (settings file, $WORKBENCH_MODEL), if set
            from .settings import default_model

            model = default_model()
        if model is None or str(model) in ("", "default"):
            return default_model_path()
        bar = progress_bar(f"Fetching {model}", enabled=progress, lazy=True)  # if it must
        try:
            return resolve(model, progress=bar)
        finally:
            bar.close()

    def plan(self, model: str | os.PathLike[str] | None = None, **settings: Any) -> Placement:
        """How `model` would be placed on this machine, with the reasons."""
        from .device.planner import plan
        from .settings import load_defaults

        settings = {**load_defaults(), **settings}
        config: LoadConfig = build(LoadConfig, settings)
        return plan(self.engine, self.resolve_model(model), config, settings)

    def load(self, model: str | os.PathLike[str] | None = None, *, progress: bool = True,
             **settings: Any) -> LoadedModel:
        """Load a GGUF model into the worker (replacing the current one). `settings`:
        fields of `LoadConfig`; the planner decides the rest."""
        from .device.planner import resolve
        from .drafts import MODES, DraftError, resolve_draft
        from .settings import load_defaults

        settings = {**load_defaults(), **settings}  # the machine's defaults, then the call's
        config: LoadConfig = build(LoadConfig, settings)
        if config.lora:
            config = dataclasses.replace(config, lora=str(check_lora(config.lora)))
        path = self.resolve_model(model, progress=progress)
        if config.cluster and config.power_cap is not None:
            raise WorkbenchError("--power-cap chooses among configurations measured on this "
                                 "machine; a model split across RPC nodes draws power on each",
                                 "Leave out --power-cap with --cluster.")
        if config.cluster:
            bar = progress_bar(f"Loading {path.name} across the cluster", enabled=progress,
                               unit="B", total=path.stat().st_size)
            info, cluster_plan = self.cluster.load(path, config, settings, on_progress=bar)
            bar.close(f"{info.load_seconds:.1f} s")
            return LoadedModel(info, cluster_plan)
        self.leave_cluster()
        if config.set_gpu_power_limit and config.power_cap is None:
            raise WorkbenchError("--set-gpu-power-limit needs --power-cap",
                                 "Give the cap in watts, for example --power-cap 250.")
        if config.draft not in MODES:  # a file's problems show before anything unloads
            bar = progress_bar(f"Making the draft {config.draft}", enabled=progress,
                               lazy=True)
            try:
                config = dataclasses.replace(config, draft=resolve_draft(config.draft, path,
                                                                         bar))
            finally:
                bar.close()
        config, placement = resolve(self.engine, path, config, settings)
        if config.set_gpu_power_limit:
            from .power.cap import set_gpu_power_limit

            placement = dataclasses.replace(placement, reasons=placement.reasons + (
                set_gpu_power_limit(config.power_cap),))
        bar = progress_bar(f"Loading {path.name}", enabled=progress, unit="B",
                           total=path.stat().st_size)  # llama.cpp tells fractions of it
        info = self.engine.load(path, config, on_progress=bar)
        bar.close(f"{info.load_seconds:.1f} s")
        if info.draft_error:
            raise DraftError(f"{info.name} is loaded and works, with n-gram lookup but "
                             f"without the draft model: {info.draft_error}", info.draft_hint)
        return LoadedModel(info, placement)

    def leave_cluster(self) -> None:
        """A model loaded on this machine alone: the cluster stops watching for it."""
        if self._cluster is not None:
            self._cluster.detach()

    def unload(self) -> None:
        """Free the loaded model (the worker process stays up)."""
        self.leave_cluster()
        self.engine.unload()

    # ---- answers ----------------------------------------------------------------------

    def generate(self, prompt: str | Sequence[int], *, stream: bool = False,
                 **params: Any) -> Completion | TokenStream:
        """Complete raw text, or token ids taken as they are (`GenerationConfig` fields)."""
        config: GenerationConfig = build(GenerationConfig, params)
        s = self.engine.stream("generate", _prompt(prompt), config)
        return s if stream else finish(s)

    def chat(self, message: str | Sequence[Any], *, system: str | None = None,
             stream: bool = False, schema: Any = None, tools: Sequence[Any] = (),
             tool_choice: str = "auto", run_tools: bool = False,
             **params: Any) -> Completion | TokenStream:
        """Answer a message (or {role, content} messages) with the model's chat template.
        With `schema` (a pydantic model class, a dict or JSON text) a grammar constrains
        the answer to JSON valid against it, and the Completion's `parsed` holds it.
        With `tools` (Python functions) the model may call one (see `_chat_tools`)."""
        if tools:
            if stream or schema is not None:
                raise GenerationError("tools cannot be combined with stream or schema",
                                      "Leave stream and schema out when passing tools.")
            return self._chat_tools(messages(message, system), list(tools), tool_choice,
                                    run_tools, params)
        if schema is not None:
            params["json_schema"] = schema_text(schema)
        config: GenerationConfig = build(GenerationConfig, params)
        s = self.engine.stream("chat", messages(message, system), config)
        if stream:
            return s
        c = finish(s)
        if schema is not None:
            c.parse(schema)
        return c

    def _chat_tools(self, msgs: tuple[tuple[str, str], ...], tools: list[Any], choice: str,
                    run: bool, params: dict[str, Any]) -> Completion:
        """A chat that may call `tools`: their declarations come from their signatures and
        docstrings; `choice` auto, required (a grammar forces a call) or a function's
        name. The Completion's `tool_calls` holds the call, as [(name, arguments)]; with
        `run`, each call is made and its result answered, until the model answers in
        text (at most 8 rounds), and `tool_results` holds [(name, arguments, result)]."""
        import json

        spec = declare(tools, choice)
        functions = {f.__name__: f for f in tools}
        history, results = list(msgs), []
        for _ in range(8):
            config = build(GenerationConfig, {**params, "json_schema": spec.call_schema()})
            c = finish(self.engine.stream("chat", tuple(history), config, spec.openai()))
            call = spec.call_in(c.text)
            c.tool_calls = [] if call is None else [(call[0], json.loads(call[1]))]
            c.tool_results = results
            if call is None or not run:
                return c
            name, args = c.tool_calls[0]
            value = functions[name](**args)  # the user's own code: its errors are theirs
            results.append((name, args, value))
            history += [("assistant", c.text), ("tool", json.dumps(value, default=str))]
            spec = dataclasses.replace(spec, choice="auto")  # after a result, free to answer
        raise GenerationError("the model was still calling tools after 8 rounds",
                              "Pass run_tools=False and run the calls yourself.")

    def complete(self, prompt: str | Sequence[int], **params: Any) -> Completion:
        """`generate`, finished: its `Completion`."""
        return finish(self.engine.stream("generate", _prompt(prompt),
                                         build(GenerationConfig, params)))

    def generate_many(self, prompts: Sequence[Any], *, chat: bool = False,
                      system: str | None = None, **params: Any) -> list[Completion]:
        """Several prompts at once, decoded together where the model has `n_parallel` > 1."""
        config: GenerationConfig = build(GenerationConfig, params)
        if isinstance(prompts, (str, bytes)):
            raise GenerationError("generate_many takes a list of prompts",
                                  "Pass a list, e.g. generate_many(['a', 'b']); for one prompt "
                                  "use generate().")
        if not prompts:
            return []
        e = self.engine
        streams: list[TokenStream] = []
        try:
            for p in prompts:
                if chat:
                    streams.append(e.stream("chat", messages(p, system), config))
                else:
                    streams.append(e.stream("generate", _prompt(p), config))
            return [finish(s) for s in streams]
        except BaseException:  # an interrupt or an error: stop the others too
            for s in streams:
                s.cancel()
            raise

    def status(self) -> EngineStatus:
        """The engine's state: worker process, model, restarts."""
        e = self.engine
        w, m, st = e.worker, e.model, e.last_stats
        stopped = self.publisher is not None and self.publisher.stopped_from_panel
        return EngineStatus(
            state="ready" if e.alive and m else "no model" if e.alive else
            "stopped from the Workbench panel" if stopped
            else "crashed (restarts on next call)" if e.last_crash else "not started",
            worker_pid=e.pid if e.alive else None,
            model=m.name if m else None,
            context=f"{m.n_ctx:,} tokens" if m else None,
            threads=m.threads if m else None,
            gpu_layers=m.n_gpu_layers if m else None,
            worker_memory=f"{st.rss_bytes / 2**20:,.0f} MiB" if st and e.alive else None,
            requests=len(e.records),
            restarts=e.restarts,
            last_crash=e.last_crash,
            llama_cpp_python=w.llama_cpp_version if w else None,
            gpu_offload=w.supports_gpu_offload if w else None,
        )


def check_lora(path: str | os.PathLike[str]) -> Path:
    """A LoRA adapter GGUF, checked: it exists and is an adapter, not a model."""
    from .models.gguf_file import read_header

    p = Path(path).expanduser()
    if not p.is_file():
        raise WorkbenchError(f"no LoRA adapter at {p}",
                             "Give the adapter.gguf that %finetune wrote (its result names it).")
    kind = read_header(p).metadata.get("general.type")
    if kind != "adapter":
        raise WorkbenchError(f"{p.name} is a model, not a LoRA adapter",
                             "Load it as the model, or give an adapter GGUF to --lora.")
    return p.resolve()


def messages(message: str | Sequence[Any], system: str | None) -> tuple[tuple[str, str], ...]:
    """A message, or a list of {role, content} dicts or (role, content) pairs, as the
    engine takes them; `system` replaces any system message."""
    if isinstance(message, str):
        msgs: list[tuple[str, str]] = [("user", message)]
    else:
        msgs = []
        for m in message:
            if isinstance(m, dict):
                msgs.append((str(m["role"]), str(m["content"])))
            else:
                role, content = m
                msgs.append((str(role), str(content)))
    if not msgs:
        raise GenerationError("no messages to answer", "Pass a string or a list of "
                              "{'role': ..., 'content': ...} messages.")
    if system is not None:
        msgs = [("system", system)] + [m for m in msgs if m[0] != "system"]
    return tuple(msgs)


def _prompt(prompt: str | Sequence[int]) -> str | tuple[int, ...]:
    return str(prompt) if isinstance(prompt, str) else tuple(int(t) for t in prompt)


def finish(s: TokenStream) -> Completion:
    """Wait for a stream's end; its text and metrics."""
    s.result()
    c = Completion(s.text, s.metrics)
    c.logprobs = s.logprobs
    c.token_ids = tuple(s.token_ids)
    return c


_process_session: Session | None = None
_process_lock = threading.Lock()


def process_session() -> Session:
    """The process's session, made on first use (`workbench.api.session`)."""
    global _process_session
    with _process_lock:
        if _process_session is None:
            _process_session = Session(publish=os.environ.get("WORKBENCH_PUBLISH", "1") != "0")
        return _process_session
