"""IPython magics. Each one parses its line into settings, calls the public API and
returns a result that displays itself; errors show as one message and a hint."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from . import api
from ._schema import schema_text
from .config import (DeployConfig, EvalConfig, FinetuneConfig, GenerationConfig, LoadConfig,
                     add_flags, build, given)
from .errors import WorkbenchError
from .results import Completion

_FLUSH_S = 0.05


class _HelpShown(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise WorkbenchError(f"{self.prog}: {message}", f"Run `{self.prog} --help` for usage.")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore
        if message:
            sys.stdout.write(message)
        raise _HelpShown


def _parser(prog: str, description: str, *configs: type) -> _Parser:
    p = _Parser(prog=prog, description=description, add_help=True)
    for cls in configs:
        add_flags(p, cls)
    return p


_settings = given


def _load_parser() -> _Parser:
    p = _parser("%load_model", "Load a GGUF model into the background worker.", LoadConfig)
    p.add_argument("model", nargs="?", default=None,
                   help="a catalog id (ID or ID:QUANT, fetched if needed), a model `%%models` "
                        "found on this machine, or a path to a .gguf file; 'default' or "
                        "nothing: SmolLM2-135M-Instruct Q4_1")
    return p


def _quantize_parser() -> _Parser:
    p = _Parser(prog="%quantize", description="Quantize a model with llama.cpp's quantizer "
                "(in a child process). The file goes next to the source.")
    p.add_argument("model", nargs="?", default=None,
                   help="what %%load_model takes (default: the default model)")
    p.add_argument("--to", default="int8",
                   help="int8 (= Q8_0), int4 (= Q4_K_M), Q6_K, Q5_K_M, Q4_0, Q2_K or F16")
    p.add_argument("--out", default=None, help="output path (default: <name>.<QUANT>.gguf)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--imatrix", action="store_true", help="measure an importance matrix on "
                   "calibration text and quantize with it")
    p.add_argument("--tensor-type", dest="tensor_type", action="append", default=None,
                   metavar="PATTERN=TYPE", help="give tensors whose name matches the regular "
                   "expression PATTERN the type TYPE (repeatable; the first match wins)")
    p.add_argument("--min-top1", dest="min_top1", type=float, default=None,
                   help="a quality target: keep the most sensitive tensors at F16 until top-1 "
                   "agreement with the model's F16 copy reaches this share on held-out text")
    p.add_argument("--max-kl", dest="max_kl", type=float, default=None,
                   help="a quality target: ... until the KL divergence from the F16 copy is "
                   "at most this (nats)")
    p.add_argument("--max-size", dest="max_size", type=float, default=None,
                   help="with a target: the most bytes, as a multiple of the uniform file's")
    return p


def _eval_parser() -> _Parser:
    p = _parser("%eval", "Task accuracy with lm-evaluation-harness through the engine, with "
                "95% intervals; writes lm-eval's results and the provenance as JSON. Without "
                "MODEL: the loaded model (it stays loaded).", EvalConfig, LoadConfig)
    p.add_argument("model", nargs="?", default=None,
                   help="what %%load_model takes, loaded in an engine of its own")
    return p


def _finetune_parser() -> _Parser:
    p = _parser("%finetune", "Fine-tune a model with LoRA/QLoRA in a background process, with "
                "a live loss chart and crash-safe checkpoints.", FinetuneConfig)
    p.add_argument("data", help="a .jsonl file (messages, prompt/completion or text per line) "
                   "or a .txt file (one example per paragraph)")
    p.add_argument("--base", default=None, help="what %%load_model takes (default: the "
                   "default model)")
    p.add_argument("--out", default=None, help="the run's folder (default: under "
                   "$WORKBENCH_HOME/finetune)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in a used folder")
    p.add_argument("--wait", action="store_true", help="block until the run ends")
    return p


def _models_parser() -> _Parser:
    p = _Parser(prog="%models", description="The model catalog and the GGUF models on this "
                "machine (the Hugging Face cache, Ollama, LM Studio, ./models).")
    p.add_argument("--fits", action="store_true",
                   help="ask the planner where each model would run here, and how fast "
                        "autotune measured it")
    p.add_argument("--family", default=None, help="only this family (e.g. qwen2.5)")
    p.add_argument("--local", action="store_true", help="only models on this machine")
    p.add_argument("--updates", action="store_true",
                   help="compare models from the Hub with the Hub's newest revision")
    p.add_argument("--update", metavar="NAME", default=None,
                   help="fetch the newest revision of NAME, verified; the old file stays")
    return p


def _gen_parser(prog: str, description: str) -> _Parser:
    p = _parser(prog, description, GenerationConfig)
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop at this text (repeatable)")
    p.add_argument("--dashboard", action="store_true",
                   help="show the live dashboard above the answer")
    if prog == "%%chat":
        p.add_argument("--system", default=None, metavar="TEXT", help="system prompt")
        p.add_argument("--session", default=None, metavar="NAME", help="keep the history "
                       "under NAME: later cells with the same NAME continue the chat")
        p.add_argument("--json-schema", dest="json_schema", default=None, metavar="FILE|NAME",
                       help="answer in JSON valid against this schema: a .json file, or the "
                       "name of a pydantic model class or dict in the notebook; the result's "
                       "`parsed` holds the decoded answer")
    return p


def _history_parser() -> _Parser:
    p = _Parser(prog="%chat_history", description="Show a chat kept with `%%chat --session "
                "NAME`; reset it or save it as JSON (Chat.load reads it back).")
    p.add_argument("name", nargs="?", default=None, help="the session (none: list them)")
    p.add_argument("--reset", action="store_true", help="forget its turns")
    p.add_argument("--save", metavar="PATH", default=None, help="write it to PATH as JSON")
    return p


def _kv_parser() -> _Parser:
    p = _Parser(prog="%kv", description="Named KV sessions and the prefix cache: save the "
                "last request's KV state, load it back (also after a restart), list, remove.")
    p.add_argument("op", choices=("save", "load", "ls", "rm", "stats", "evict"),
                   help="evict moves the RAM tier to disk")
    p.add_argument("name", nargs="?", default=None, help="session name (save, load, rm)")
    return p


def _profile_parser() -> _Parser:
    p = _Parser(prog="%profile_device", description="Profile this machine (CPU, RAM, memory "
                "bandwidth, disk, GPUs, llama.cpp's devices); --live watches it; --tune "
                "measures configurations of a model and keeps the fastest.")
    p.add_argument("--quick", action="store_true", help="skip the bandwidth and disk runs")
    p.add_argument("--live", action="store_true",
                   help="a live view of CPU/GPU utilization and memory")
    p.add_argument("--tune", metavar="MODEL", default=None,
                   help="autotune MODEL (a path or 'default') and load the fastest setting")
    p.add_argument("--threads", type=_int_list, default=None, metavar="N,N,...",
                   help="thread counts to try with --tune")
    p.add_argument("--n-gpu-layers", dest="n_gpu_layers", type=_int_list, default=None,
                   metavar="N,N,...", help="GPU layer counts to try with --tune")
    p.add_argument("--batch-sizes", dest="batch_sizes", type=_int_list, default=None,
                   metavar="N,N,...", help="micro-batch sizes (n_ubatch) to try with --tune")
    p.add_argument("--power-cap", dest="power_cap", type=float, default=None, metavar="WATTS",
                   help="with --tune: measure each candidate's power draw and load the fastest "
                        "that stays under WATTS")
    p.add_argument("--repeats", type=int, default=2, help="runs of each candidate (--tune)")
    p.add_argument("--save", metavar="PATH", default=None,
                   help="also save the profile as JSON (for `workbench deploy --device PATH` "
                        "on another machine)")
    p.add_argument("--calibrate", metavar="MODEL", nargs="?", const="default", default=None,
                   help="measure the planner's memory prediction against this machine with "
                        "MODEL (default: the default model) and correct later plans")
    return p


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}") from None


def _plan_parser() -> _Parser:
    p = _parser("%plan", "Show how a model would be placed here, and why (nothing is loaded).",
                LoadConfig)
    p.add_argument("model", nargs="?", default=None, help="path of a .gguf file, or 'default'")
    return p


def _deploy_parser() -> _Parser:
    return _parser("%deploy", "Write a tuned, OpenAI-compatible service folder (or, with "
                   "--check FOLDER, smoke-test one).", DeployConfig)


def _cluster_parser() -> _Parser:
    p = _Parser(prog="%cluster", description="Nodes that hold layers of a model loaded with "
                "`%load_model MODEL --cluster` (llama.cpp's RPC backend).")
    sub = p.add_subparsers(dest="op", required=True, parser_class=_Parser)
    a = sub.add_parser("add", help="probe nodes and add them")
    a.add_argument("nodes", nargs="+", metavar="HOST:PORT")
    r = sub.add_parser("remove", help="forget nodes")
    r.add_argument("nodes", nargs="+", metavar="HOST:PORT")
    sub.add_parser("status", help="the nodes, the layers each holds, and recent events")
    sub.add_parser("rebalance", help="re-plan the loaded model onto the nodes there are now")
    sub.add_parser("topology", help="a live widget of the nodes and their traffic")
    pol = sub.add_parser("policy", help="what a joining node does: manual (wait for "
                         "`%%cluster rebalance`) or auto (rebalance at once)")
    pol.add_argument("policy", choices=("manual", "auto"))
    loc = sub.add_parser("local", help="start N rpc-workers on this machine's loopback and "
                         "add them (for trying the cluster on one machine)")
    loc.add_argument("n", type=int)
    loc.add_argument("--threads", type=int, default=None)
    loc.add_argument("--mem-limit", type=float, default=None, metavar="GiB")
    sub.add_parser("stop-local", help="stop the workers `%%cluster local` started")
    return p


PARSERS = {
    "cluster": _cluster_parser(),
    "deploy": _deploy_parser(),
    "profile_device": _profile_parser(),
    "plan": _plan_parser(),
    "load_model": _load_parser(),
    "chat": _gen_parser("%%chat", "Answer the cell's text with the model's chat template, "
                        "streaming the answer."),
    "generate": _gen_parser("%%generate", "Continue the cell's text (no chat template), "
                            "streaming the output."),
    "chat_history": _history_parser(),
    "unload_model": _Parser(prog="%unload_model", description="Free the loaded model."),
    "workbench": _Parser(prog="%workbench", description="Show the engine's status."),
    "kv": _kv_parser(),
    "models": _models_parser(),
    "quantize": _quantize_parser(),
    "eval": _eval_parser(),
    "finetune": _finetune_parser(),
}


def parse(name: str, line: str) -> argparse.Namespace | None:
    """Parse a magic's line; None when --help was shown."""
    try:
        return PARSERS[name].parse_args(shlex.split(line))
    except _HelpShown:
        return None
    except ValueError as e:  # shlex: unbalanced quotes
        raise WorkbenchError(f"%{name}: cannot parse the line: {e}",
                             "Check the quotes in the line.") from None


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class _MarkdownOut:
    """A stream's text as Markdown in one display, updated in place (throttled: a
    re-render of the whole answer per token would be quadratic)."""

    def __init__(self) -> None:
        from IPython.display import Markdown, display

        self._md = Markdown
        self._text, self._shown = "", ""
        self._handle = display(Markdown(""), display_id=True)

    def write(self, piece: str) -> None:
        self._text += piece

    def flush(self) -> None:
        if self._text != self._shown and self._handle is not None:
            self._handle.update(self._md(self._text))
            self._shown = self._text


def show_stream(stream: Any, dashboard: bool = False, markdown: bool | None = None) -> Completion:
    """Write a stream's text as it arrives; interrupting cancels it and keeps the text.
    `markdown`: render it as Markdown, updated in place (default: in a notebook)."""
    if dashboard:
        from IPython.display import display

        display(api.dashboard())
    if markdown is None:
        markdown = _in_notebook()
    if markdown:
        md = _MarkdownOut()
        try:
            return _show(stream, md, 0.15)
        finally:
            md.flush()
    return _show(stream, sys.stdout, _FLUSH_S)


def _show(stream: Any, out: Any, every_s: float) -> Completion:
    last_flush = time.monotonic()
    try:
        for piece in stream:
            out.write(piece)
            now = time.monotonic()
            if now - last_flush > every_s:
                out.flush()
                last_flush = now
    except KeyboardInterrupt:
        stream.cancel()
        out.write(f"\n[cancelled after {stream.metrics.generated_tokens if stream.metrics else 0}"
                  " tokens]\n")
        out.flush()
        return Completion(stream.text, stream.metrics, streamed=True, finish_reason="cancelled")
    out.write("\n")
    out.flush()
    return Completion(stream.text, stream.metrics, streamed=True)


@magics_class
class WorkbenchMagics(Magics):
    @line_magic
    def load_model(self, line: str) -> Any:
        """%load_model [PATH | default] [--n-ctx N] [--n-gpu-layers N] [--threads N] ..."""
        ns = parse("load_model", line)
        if ns is None:
            return None
        return api.load_model(ns.model, **_settings(ns, LoadConfig))

    @line_magic
    def profile_device(self, line: str) -> Any:
        """%profile_device [--quick] [--live] [--tune MODEL [--threads 1,2] ...] [--calibrate]"""
        ns = parse("profile_device", line)
        if ns is None:
            return None
        if ns.tune:
            return api.autotune(ns.tune, threads=ns.threads, n_gpu_layers=ns.n_gpu_layers,
                                batch_sizes=ns.batch_sizes, power_cap=ns.power_cap,
                                repeats=ns.repeats)
        if ns.power_cap is not None:
            raise WorkbenchError("--power-cap goes with --tune MODEL",
                                 "For example: %profile_device --tune default --power-cap 60")
        if ns.calibrate:
            return api.calibrate(ns.calibrate)
        return api.profile_device(measure=not ns.quick, live=ns.live, save=ns.save)

    @line_magic
    def deploy(self, line: str) -> Any:
        """%deploy --output DIR [--model M] [--device auto|cpu|gpu|PROFILE] [--quantization int8]"""
        ns = parse("deploy", line)
        if ns is None:
            return None
        if ns.check:
            from pathlib import Path

            from .serve.check import check

            check(Path(ns.check))
            return None
        if not ns.output:
            raise WorkbenchError("%deploy: --output is required",
                                 "For example: %deploy --quantization int8 --output ai-service")
        if ns.update:  # roll the service's running replicas onto another model
            from .replicas.update import check_update_flags, update

            check_update_flags(_settings(ns, DeployConfig))
            return update(ns.output, api.resolve_model(ns.update), ns.ray)
        return api.deploy(**build(DeployConfig, _settings(ns, DeployConfig)).deploy_arguments())

    @line_magic
    def plan(self, line: str) -> Any:
        """%plan [PATH | default] [--device auto|cpu|gpu] [--gpu-mem-mib N] [--n-ctx N] ..."""
        ns = parse("plan", line)
        if ns is None:
            return None
        return api.plan(ns.model, **_settings(ns, LoadConfig))

    @line_magic
    def models(self, line: str) -> Any:
        """%models [--fits] [--family X] [--local] [--updates] [--update NAME]"""
        ns = parse("models", line)
        if ns is None:
            return None
        if ns.update:
            return api.update_model(ns.update)
        if ns.updates:
            return api.check_updates()
        return api.list_models(fits=ns.fits, family=ns.family, local=ns.local)

    @line_magic
    def quantize(self, line: str) -> Any:
        """%quantize [MODEL] [--to int8|int4|Q6_K|...] [--out PATH] [--overwrite]
        [--tensor-type PATTERN=TYPE ...] [--min-top1 0.98 | --max-kl NATS] [--max-size 1.25]"""
        ns = parse("quantize", line)
        if ns is None:
            return None
        overrides = []
        for item in ns.tensor_type or ():
            pattern, eq, kind = item.rpartition("=")
            if not eq or not pattern:
                raise WorkbenchError(f"--tensor-type takes PATTERN=TYPE, got {item!r}",
                                     r"For example --tensor-type 'blk\.(0|1)\.=Q4_0'.")
            overrides.append((pattern, kind))
        return api.quantize(ns.model, ns.to, ns.out, overwrite=ns.overwrite, imatrix=ns.imatrix,
                            overrides=overrides or None, min_top1=ns.min_top1, max_kl=ns.max_kl,
                            max_size=ns.max_size)

    @line_magic
    def eval(self, line: str) -> Any:
        """%eval [MODEL] [--tasks wb_capitals,...] [--limit N] [--num-fewshot K] [--output F]"""
        ns = parse("eval", line)
        if ns is None:
            return None
        return api.eval_tasks(ns.model, **given(ns, EvalConfig), **given(ns, LoadConfig))

    @line_magic
    def finetune(self, line: str) -> Any:
        """%finetune DATA [--base MODEL] [--method lora|qlora] [--epochs N] [--resume] ..."""
        ns = parse("finetune", line)
        if ns is None:
            return None
        job = api.finetune(ns.base, ns.data, out=ns.out, resume=ns.resume,
                           overwrite=ns.overwrite, **_settings(ns, FinetuneConfig))
        if not ns.wait:
            return job
        from IPython.display import display

        display(job)
        return job.wait()

    @line_magic
    def cluster(self, line: str) -> Any:
        """%cluster add|remove HOST:PORT ..., %cluster status|rebalance|topology,
        %cluster policy manual|auto, %cluster local N, %cluster stop-local"""
        ns = parse("cluster", line)
        if ns is None:
            return None
        c = api.rpc_cluster()
        if ns.op == "add":
            return c.add(ns.nodes)
        if ns.op == "remove":
            return c.remove(ns.nodes)
        if ns.op == "rebalance":
            return c.rebalance()
        if ns.op == "topology":
            return c.topology()
        if ns.op == "policy":
            c.policy = ns.policy
            return c.status()
        if ns.op == "local":
            c.start_local(ns.n, threads=ns.threads, mem_limit_gib=ns.mem_limit)
            return c.status()
        if ns.op == "stop-local":
            c.stop_local()
        return c.status()

    @line_magic
    def unload_model(self, line: str) -> None:
        """%unload_model: free the loaded model."""
        if parse("unload_model", line) is not None:
            api.unload()
            print("model unloaded")

    @line_magic
    def workbench(self, line: str) -> Any:
        """%workbench: the engine's status."""
        if parse("workbench", line) is None:
            return None
        return api.status()

    @line_magic
    def kv(self, line: str) -> Any:
        """%kv save|load|rm NAME, %kv ls, %kv stats, %kv evict"""
        ns = parse("kv", line)
        if ns is None:
            return None
        if ns.op in ("save", "load", "rm"):
            if not ns.name:
                raise WorkbenchError(f"%kv {ns.op} needs a session name",
                                     f"Write `%kv {ns.op} NAME`.")
            return {"save": api.kv_save, "load": api.kv_load, "rm": api.kv_remove}[ns.op](ns.name)
        return {"ls": api.kv_list, "stats": api.kv_stats, "evict": api.kv_evict}[ns.op]()

    def _stream(self, name: str, line: str, cell: str) -> Any:
        ns = parse(name, line)
        if ns is None:
            return None
        params = _settings(ns, GenerationConfig)
        if ns.stop:
            params["stop"] = tuple(ns.stop)
        schema = self._schema(ns.json_schema) if name == "chat" and ns.json_schema else None
        if schema is not None:  # a grammar in the worker holds the answer to it
            params["json_schema"] = schema_text(schema)
        if name == "chat" and ns.session:
            chat = api.chat_session(ns.session, create=True, system=ns.system)
            if ns.system is not None:
                chat.system = ns.system
            s = chat.send(cell.strip(), stream=True, **params)
        elif name == "chat":
            s = api.chat(cell.strip(), system=ns.system, stream=True, **params)
        else:
            s = api.generate(cell, stream=True, **params)
        c = show_stream(s, dashboard=ns.dashboard)
        if schema is not None:
            c.parse(schema)
        return c

    def _schema(self, where: str) -> Any:
        """A schema named by `--json-schema`: a variable of the notebook, or a JSON file."""
        import json
        from pathlib import Path

        ns = self.shell.user_ns if self.shell is not None else {}
        if where in ns:
            return ns[where]
        path = Path(where).expanduser()
        if not path.is_file():
            raise WorkbenchError(f"--json-schema {where}: no such file, nor a variable of "
                                 "that name", "Give a .json file of a JSON schema, or the "
                                 "name of a pydantic model class or dict defined above.")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise WorkbenchError(f"--json-schema {where} is not valid JSON: {e}",
                                 "Fix the file, or pass a pydantic model's name.") from None

    @line_magic
    def chat_history(self, line: str) -> Any:
        """%chat_history [NAME] [--reset] [--save PATH]"""
        ns = parse("chat_history", line)
        if ns is None:
            return None
        if ns.name is None:
            if ns.reset or ns.save:
                raise WorkbenchError("--reset and --save need a session name",
                                     "Write `%chat_history NAME --save chat.json`.")
            return api.chat_sessions()
        chat = api.chat_session(ns.name)
        if ns.save:
            print(f"saved to {chat.save(ns.save)}")
        if ns.reset:
            chat.reset()
        return chat

    @cell_magic
    def chat(self, line: str, cell: str) -> Any:
        """%%chat [--session NAME] [--max-tokens N] [--temperature T] [--system TEXT] ..."""
        return self._stream("chat", line, cell)

    @cell_magic
    def generate(self, line: str, cell: str) -> Any:
        """%%generate [--max-tokens N] [--temperature T] [--dashboard] ..."""
        return self._stream("generate", line, cell)


def register(ipython: Any) -> None:
    ipython.register_magics(WorkbenchMagics)
