"""Settings, defined once.

Each field carries its help text and bounds; the magics' flags, the CLI's options
and the validation errors are all derived from these definitions.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ._schema import schema_text
from ._text import check_text
from .errors import GenerationError, WorkbenchError


def setting(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False, flag: bool = True) -> Any:
    """A dataclass field with help text and inclusive bounds (`lo_open` excludes `lo`)."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi,
                                            "lo_open": lo_open, "flag": flag})


KV_TYPES = ("f16", "q8_0", "q4_0")
SPECULATIVE = ("auto", "ngram", "model", "off")
DEVICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class LoadConfig:
    """How the worker loads a model and builds its context."""

    device: str = setting("auto", "where the model runs: auto (planned from the model's size "
                          "and this machine's free memory), cpu, or gpu")
    n_ctx: int = setting(4096, "context length in tokens", lo=16, hi=1 << 20)
    n_gpu_layers: int | None = setting(
        None, "layers offloaded to the GPU (-1 = all; default: all with a GPU build, else 0)",
        lo=-1)
    threads: int | None = setting(None, "CPU threads (default: the usable cores idle now; "
                                  "re-chosen while decoding unless given)", lo=1, hi=1024)
    max_threads: int | None = setting(
        None, "most threads the worker may re-choose while decoding, from the cores idle "
        "then (0: keep `threads` fixed; default: the usable cores, 0 when threads is given)",
        lo=0, hi=1024, flag=False)
    n_batch: int = setting(512, "prompt tokens per llama_decode call", lo=1, hi=1 << 16)
    n_ubatch: int = setting(512, "physical micro-batch size", lo=1, hi=1 << 16)
    n_parallel: int = setting(1, "requests decoded together in one batch (continuous "
                              "batching); each gets n_ctx / n_parallel tokens of context",
                              lo=1, hi=256)
    flash_attn: str = setting("auto", "flash attention: auto, on or off")
    backend_sampling: str = setting(
        "auto", "sample on the backend, so only the token id leaves the GPU: auto, on or off")
    type_k: str = setting("f16", "KV cache type of keys: f16, q8_0 or q4_0")
    type_v: str = setting("f16", "KV cache type of values: f16, q8_0 or q4_0 (needs flash "
                          "attention)")
    kv_cache: str = setting("on", "prefix cache of KV states in RAM and on disk: on or off")
    kv_ram_mib: int = setting(1024, "RAM budget of the prefix cache, MiB", lo=0)
    kv_disk_mib: int = setting(4096, "disk budget of the prefix cache, MiB (0: RAM only)", lo=0)
    kv_dir: str | None = setting(None, "folder of the prefix cache's disk tier "
                                 "(default: $WORKBENCH_HOME/kv)")
    tensor_split: tuple[float, ...] = setting((), "share of the layers on each GPU", flag=False)
    cluster: bool = setting(False, "split the layers across this machine and the nodes added "
                            "with %cluster add (llama.cpp's RPC backend)")
    rpc_servers: tuple[str, ...] = setting((), "RPC nodes (HOST:PORT) holding layers, in "
                                           "tensor_split's order after local GPUs", flag=False)
    lora: str | None = setting(None, "a GGUF LoRA adapter to apply (what %finetune writes)")
    draft: str = setting("off", "speculative decoding: auto or ngram (n-gram lookup where "
                         "the text repeats, adaptive), a draft model's GGUF path (same "
                         "vocabulary, smaller) or pruned:K (this model less K layers), or off")
    lora_scale: float = setting(1.0, "strength of the LoRA adapter (1 = as trained)",
                                lo=-100.0, hi=100.0)
    gpu_mem_mib: int | None = setting(None, "most memory the planner may use on each GPU, MiB "
                                      "(default: free memory less 512 MiB)", lo=0)
    ram_mib: int | None = setting(None, "most RAM the planner may use, MiB (default: "
                                  "available RAM less 512 MiB)", lo=0)
    power_cap: float | None = setting(None, "watts the machine may draw while the model runs: "
                                      "the fastest configuration autotune measured under "
                                      "this cap is chosen", lo=0.0, lo_open=True)
    set_gpu_power_limit: bool = setting(False, "with --power-cap, also set the GPU's power "
                                        "limit to the cap (needs root; restored at exit)")

    def validate(self) -> "LoadConfig":
        _check_bounds(self, WorkbenchError)
        for name, allowed in (("device", DEVICES), ("flash_attn", ("auto", "on", "off")),
                              ("backend_sampling", ("auto", "on", "off")),
                              ("kv_cache", ("on", "off")),
                              ("type_k", KV_TYPES), ("type_v", KV_TYPES)):
            value = getattr(self, name)
            if value not in allowed:
                raise WorkbenchError(f"{name} must be {', '.join(allowed)} (got {value!r})",
                                     f"Use --{name.replace('_', '-')} {' or '.join(allowed)}.")
        if not isinstance(self.draft, str) or not self.draft.strip():
            raise WorkbenchError(f"draft must be auto, ngram, off, a GGUF path or pruned:K "
                                 f"(got {self.draft!r})", "Use --draft auto.")
        return self

    def unresolved(self) -> list[str]:
        """The settings still left for the planner (`device/planner.py`) to decide; a
        configuration the engine loads has none."""
        return [name for name, open_ in (
            ("n_gpu_layers", self.n_gpu_layers is None), ("threads", not self.threads),
            ("max_threads", self.max_threads is None), ("flash_attn", self.flash_attn == "auto"),
            ("backend_sampling", self.backend_sampling == "auto")) if open_]


@dataclass(frozen=True)
class DeployConfig:
    """A service folder to write (`workbench deploy`, `%deploy`), or one to check."""

    model: str | None = setting(None, "a GGUF path, a model name, or default")
    device: str = setting("auto", "auto, cpu, gpu, or a profile saved with "
                          "%profile_device --save")
    quantization: str = setting("none", "int8 (Q8_0), int4 (Q4_K_M), none, or a llama.cpp "
                                "type (Q6_K, ...)")
    output: str | None = setting(None, "the service folder to write")
    force: bool = setting(False, "replace a non-empty --output")
    host: str = setting("127.0.0.1", "where the service listens")
    port: int = setting(8000, "the port it listens on")
    n_parallel: int | None = setting(None, "requests decoded together (default: 8 on a CPU, "
                                     "16 on a GPU)")
    n_ctx_per_request: int | None = setting(None, "context of each request, tokens "
                                            "(default: 2048)")
    kv_cache: str = setting("on", "the service's prefix cache of KV states (a prompt that "
                            "starts like an earlier one reuses its prefix): on or off")
    kv_ram_mib: int | None = setting(
        None, "RAM budget of the service's prefix cache, MiB (default: twice the batch's KV "
        "memory, at least 256, at most a quarter of the RAM left beside the model)", lo=0)
    kv_disk_mib: int | None = setting(
        None, "disk budget of the service's prefix cache, MiB (default: 4 times the RAM "
        "budget, at least 1024, at most a tenth of the free disk; 0: RAM only)", lo=0)
    draft: str = setting("off", "the service's speculative decoding: ngram or auto (n-gram "
                         "lookup, adaptive, within the batch) or off")
    replicas: str | None = setting(None, "serve N replicas of the engine (or MIN-MAX, "
                                   "autoscaled on queue depth) on Ray Serve behind one "
                                   "endpoint")
    ray: str | None = setting(None, "the Ray cluster's head, HOST:PORT (default: start Ray "
                              "on this machine)")
    router: str = setting("prefix", "how replicas are chosen: prefix (the replica holding "
                          "the longest cached prefix, guarded by load) or default (Ray's)")
    update: str | None = setting(None, "roll the running replicas of the service in "
                                 "--output onto this model, dropping no request")
    check: str | None = setting(None, "start the service in this folder, run a smoke test, "
                                "stop it")

    def validate(self) -> "DeployConfig":
        _check_bounds(self, WorkbenchError)  # the rest is checked where it is used
        return self

    def deploy_arguments(self) -> dict[str, Any]:
        """The keyword arguments of `workbench.deploy`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("check", "update")}


@dataclass(frozen=True)
class EvalConfig:
    """Task accuracy through the engine (`workbench eval`, `%eval`): lm-eval's tasks."""

    tasks: str = setting("wb_capitals", "comma-separated tasks: local ones that need no "
                         "network (wb_capitals, wb_docstrings, wb_pasttense), .jsonl task "
                         "files, or lm-eval's task names")
    limit: int | None = setting(None, "documents per task (default: all)", lo=1)
    num_fewshot: int | None = setting(None, "solved examples before each document "
                                      "(default: the task's own)", lo=0, hi=64)
    batch_size: int = setting(512, "(context, continuation) pairs per scoring request "
                              "(the worker decodes each shared prefix of a request once)",
                              lo=1, hi=1 << 16)
    seed: int = setting(1234, "seed of lm-eval's choices (few-shot examples, sampling)",
                        lo=0, hi=2**32 - 1)
    output: str | None = setting(None, "the JSON file of lm-eval's results and the "
                                 "provenance (default: eval-results/MODEL-TIME.json)")

    def validate(self) -> "EvalConfig":
        _check_bounds(self, WorkbenchError)
        return self


@dataclass(frozen=True)
class GenerationConfig:
    """How one request samples. temperature=0 means greedy decoding."""

    max_tokens: int = setting(256, "largest number of tokens to generate", lo=1)
    temperature: float = setting(0.7, "sampling temperature (0 = greedy)", lo=0.0, hi=100.0)
    top_p: float = setting(0.95, "nucleus sampling mass, in (0, 1]", lo=0.0, hi=1.0, lo_open=True)
    top_k: int = setting(40, "sample among the k most likely tokens (0 = all)", lo=0)
    min_p: float = setting(0.05, "drop tokens below this fraction of the top probability",
                           lo=0.0, hi=1.0)
    repeat_penalty: float = setting(1.0, "penalty for repeated tokens (1 = off)", lo=0.0,
                                    lo_open=True, hi=10.0)
    frequency_penalty: float = setting(0.0, "lower a token's logit by this much for each "
                                       "time it was generated (last 64 tokens)", lo=-2.0,
                                       hi=2.0)
    presence_penalty: float = setting(0.0, "lower a token's logit by this much once it was "
                                      "generated (last 64 tokens)", lo=-2.0, hi=2.0)
    logit_bias: tuple[tuple[int, float], ...] = setting(
        (), "added to the logits of these token ids before sampling, each in -100..100 "
        "(-100 bans a token, 100 forces it)", flag=False)
    seed: int | None = setting(None, "sampling seed (default: random)", lo=0, hi=2**32 - 1)
    stop: tuple[str, ...] = setting((), "stop when any of these strings is generated",
                                    flag=False)
    ignore_eos: bool = setting(False, "keep generating past end-of-sequence (benchmarks)")
    logprobs: int | None = setting(
        None, "return each generated token's log-probability and this many of the most "
        "likely tokens at its place (0..20)", lo=0, hi=20, flag=False)
    json_schema: str | None = setting(
        None, "constrain the output to JSON valid against this schema (JSON text; "
        "'{\"type\": \"object\"}' for any object): a grammar decides every token",
        flag=False)
    speculative: str = setting(
        "auto", "speculative decoding for this request: auto (as the model was loaded with "
        "--draft), ngram, model (its draft model), or off")

    def validate(self) -> "GenerationConfig":
        _check_bounds(self, GenerationError)
        if self.speculative not in SPECULATIVE:
            raise GenerationError(f"speculative must be {', '.join(SPECULATIVE)} "
                                  f"(got {self.speculative!r})", "Use --speculative off.")
        if self.json_schema is not None:
            schema_text(self.json_schema)
        if any(not isinstance(x, str) or not x for x in self.stop):
            raise GenerationError(f"stop must be non-empty strings (got {self.stop!r})",
                                  "Pass stop='text' or stop=['a', 'b'].")
        for i, x in enumerate(self.stop):
            check_text(x, f"stop[{i}]")
        for entry in self.logit_bias:
            token, bias = entry if isinstance(entry, tuple) and len(entry) == 2 else (-1, 0)
            if isinstance(token, bool) or not isinstance(token, int) or token < 0 \
                    or isinstance(bias, bool) or not isinstance(bias, (int, float)) \
                    or not -100 <= bias <= 100:
                raise GenerationError(f"logit_bias entries must be token id -> bias in "
                                      f"-100..100 (got {entry!r})",
                                      "Pass logit_bias={token_id: bias}, e.g. {42: -100}.")
        return self


FINETUNE_METHODS = ("lora", "qlora")


@dataclass(frozen=True)
class FinetuneConfig:
    """How a fine-tuning run trains."""

    method: str = setting("lora", "lora (full-precision base, CPU or GPU) or qlora (4-bit base "
                          "weights with bitsandbytes; needs a CUDA GPU)")
    rank: int = setting(8, "LoRA rank (width of the adapter matrices)", lo=1, hi=1024)
    alpha: float = setting(16.0, "LoRA alpha: the update is scaled by alpha / rank", lo=0.0,
                           lo_open=True)
    dropout: float = setting(0.05, "dropout on the adapter's input", lo=0.0, hi=0.9)
    lr: float = setting(5e-4, "peak learning rate (warm-up, then cosine decay)", lo=0.0,
                        lo_open=True, hi=1.0)
    epochs: int = setting(3, "passes over the training examples", lo=1, hi=10_000)
    steps: int | None = setting(None, "optimizer steps (overrides epochs)", lo=1)
    batch_size: int = setting(4, "examples per step", lo=1, hi=4096)
    max_len: int = setting(512, "longest example in tokens (capped at the model's context)",
                           lo=8, hi=1 << 20)
    truncate: bool = setting(True, "truncate longer examples with a warning (else refuse)",
                             flag=False)
    val_fraction: float = setting(0.1, "share of the examples held out for validation",
                                  lo=0.0, hi=1.0, lo_open=True)
    eval_every: int = setting(10, "steps between validation losses", lo=1)
    ckpt_every: int = setting(20, "steps between checkpoints", lo=1)
    keep: int = setting(3, "checkpoints kept (the newest)", lo=1, hi=1000)
    seed: int = setting(0, "seed of the data split, the order and the initialization", lo=0)
    threads: int | None = setting(None, "CPU threads (default: the usable cores idle at the "
                                  "start)", lo=1, hi=1024)
    device: str = setting("auto", "where training runs: auto (a CUDA GPU if PyTorch sees one), "
                          "cpu or cuda")
    async_checkpoints: bool = setting(True, "write checkpoints from a background thread",
                                      flag=False)

    def validate(self) -> "FinetuneConfig":
        _check_bounds(self, WorkbenchError)
        if self.method not in FINETUNE_METHODS:
            raise WorkbenchError(f"method must be lora or qlora (got {self.method!r})",
                                 "Use --method lora.")
        if self.device not in ("auto", "cpu", "cuda"):
            raise WorkbenchError(f"device must be auto, cpu or cuda (got {self.device!r})",
                                 "Use --device auto.")
        return self


def _check_bounds(cfg: Any, error: type[WorkbenchError]) -> None:
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            continue
        base = _base_type(hints[f.name])
        if base in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                     or (base is int and not float(value).is_integer())):
            raise error(f"{f.name} must be {'an integer' if base is int else 'a number'} "
                        f"(got {value!r})", f"Pass a number for {f.name}.")
        if base not in (int, float):
            continue
        lo, hi, lo_open = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("lo_open")
        bad = (isinstance(value, float) and math.isnan(value)) \
            or (lo is not None and (value <= lo if lo_open else value < lo)) \
            or (hi is not None and value > hi)
        if bad:
            raise error(f"{f.name} must be {_describe_range(lo, hi, lo_open)} (got {value!r})",
                        f"{f.name}: {f.metadata['help']}.")


def _describe_range(lo: float | None, hi: float | None, lo_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"<= {hi:g}"


def _base_type(tp: Any) -> Any:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return args[0] if args else tp
    return typing.get_origin(tp) or tp


def flag_fields(cls: type) -> list[tuple[str, type, dataclasses.Field]]:
    """(flag name, python type, field) for each field shown as a command-line flag."""
    hints = typing.get_type_hints(cls)
    return [("--" + f.name.replace("_", "-"), _base_type(hints[f.name]), f)
            for f in dataclasses.fields(cls) if f.metadata.get("flag", True)]


def add_flags(parser: Any, cls: type) -> None:
    """Add `cls`'s fields to an argparse parser as --flags, each defaulting to None (unset),
    so that `given(namespace, cls)` holds only what was typed."""
    for flag, typ, f in flag_fields(cls):
        text = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        if typ is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", default=None, help=text)
            continue
        parser.add_argument(flag, dest=f.name, type=typ, default=None, metavar=f.name.upper(),
                            help=text + (f" (default: {f.default})"
                                         if f.default is not None else ""))


def given(namespace: Any, cls: type) -> dict[str, Any]:
    """The fields of `cls` set on an argparse namespace that `add_flags` filled."""
    return {f.name: getattr(namespace, f.name) for _, _, f in flag_fields(cls)
            if getattr(namespace, f.name) is not None}


def build(cls: type, values: dict[str, Any]) -> Any:
    """Make a config from keyword values, rejecting unknown names with a clear error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise WorkbenchError(f"unknown setting {unknown[0]!r} for {cls.__name__}",
                             f"Known settings: {', '.join(sorted(names))}.")
    if "stop" in values and isinstance(values["stop"], str):
        values = {**values, "stop": (values["stop"],)}
    if isinstance(values.get("logit_bias"), dict):  # {token id: bias}, as OpenAI's
        values = {**values, "logit_bias": tuple(sorted(values["logit_bias"].items()))}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**{k: v for k, v in values.items() if v is not None or k == "seed"}).validate()
