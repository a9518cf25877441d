"""The placement planner: how a model runs on this machine.

It prices a configuration per device from the model file (weights of each layer,
KV bytes per token: exact), the compute buffers (estimated, then measured by a dry
run in the worker that allocates nothing), and the worker's own overhead (measured
when it starts). It then picks the configuration that runs fastest and fits:

1. every layer and the output on the GPU, with an f16 KV cache, else q8_0, else q4_0
   (each first with llama.cpp's 512-token micro-batch, then 256 and 128);
2. else as many layers on the GPU as fit (the KV type that fits the most layers);
3. else everything on the CPU;
4. else, unless the user fixed the context, a shorter context, halving down to 512.

Settings the user gives are kept as given; the planner fills in the rest and says
why in a table. The worker only obeys: it never guesses a configuration.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import WorkbenchError
from ..models.inspect import ModelInspection

MiB, GiB = 2 ** 20, 2 ** 30
HOST_MARGIN = 512 * MiB     # left free for the kernel, the OS and page cache churn
GPU_MARGIN = 512 * MiB      # left free on each GPU (other processes, fragmentation)
GPU_CONTEXT = 512 * MiB     # a GPU's runtime context, where NVML cannot tell us
# A loaded model's own runtime on the host (vocabulary, graph, thread pool, buffers of
# the batch): 30-45 MiB measured on the default model, whatever the context.
MODEL_RUNTIME = 40 * MiB
# The same on a GPU, beyond the context the worker holds from its start: cuBLAS's
# workspace, kernels loaded on first use, CUDA graphs. 118-150 MiB measured on an H200
# with a 7B model, whatever the layers offloaded (benchmarks/results/placement_gpu.json).
GPU_MODEL_RUNTIME = 150 * MiB
MIN_CTX = 512
KV_CHOICES = (("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"))
_PAD = 256


@dataclass(frozen=True)
class Budget:
    """Memory the plan may use on one device, in bytes."""
    name: str      # "CPU" or llama.cpp's device name ("CUDA0")
    kind: str      # cpu | gpu
    free: int
    usable: int
    why: str


@dataclass(frozen=True)
class DeviceMemory:
    """Predicted memory of one device, in bytes."""
    device: str
    weights: int = 0
    kv: int = 0
    compute: int = 0
    overhead: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.overhead


@dataclass(frozen=True)
class Overheads:
    """What the worker costs besides weights, KV cache and compute buffers."""
    host: int               # resident memory: the worker before any model, plus MODEL_RUNTIME
    gpu: int = GPU_CONTEXT  # per GPU it uses (the runtime's context)
    # measured peak minus prediction, from `workbench.calibrate` on this machine (bytes)
    host_correction: int = 0
    gpu_correction: int = 0


@dataclass(frozen=True)
class Placement:
    """A configuration, what it is predicted to need on each device, and why."""
    model: Path
    settings: dict[str, Any]            # LoadConfig fields
    memory: tuple[DeviceMemory, ...]
    budgets: tuple[Budget, ...]
    reasons: tuple[tuple[str, str, str], ...]   # (setting, value, why)
    compute_measured: bool
    overheads: Overheads = Overheads(host=0)

    def predicted(self, device: str = "CPU") -> int:
        """Predicted peak bytes on `device` ("CPU" = the worker's resident memory)."""
        return next((m.total for m in self.memory if m.device == device), 0)

    def rows(self) -> list[tuple[str, str, str]]:
        rows = list(self.reasons)
        budgets = {b.name: b for b in self.budgets}
        for m in self.memory:
            b = budgets.get(m.device)
            fix = self.overheads.host_correction if m.device == "CPU" else \
                self.overheads.gpu_correction
            rows.append((f"memory {m.device}", f"{m.total / GiB:,.2f} GiB",
                         f"weights {m.weights / MiB:,.0f} + KV {m.kv / MiB:,.0f} + compute "
                         f"{m.compute / MiB:,.0f}{' (measured)' if self.compute_measured else ''}"
                         f" + runtime {m.overhead / MiB:,.0f} MiB"
                         + (f" (calibrated here: {fix / MiB:+,.0f})" if fix else "")
                         + (f"; may use {b.usable / GiB:,.2f} GiB ({b.why})" if b else "")))
        return rows

    def _repr_html_(self) -> str:
        body = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
            f"<td style='text-align:left'>{html.escape(v)}</td>"
            f"<td style='text-align:left;color:#555'>{html.escape(w)}</td></tr>"
            for k, v, w in self.rows())
        return (f"<b>Placement of {html.escape(self.model.name)}</b><table>"
                f"<tr><th>setting</th><th>value</th><th>why</th></tr>{body}</table>")

    def __repr__(self) -> str:
        rows = self.rows()
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        return f"Placement of {self.model.name}\n" + "\n".join(
            f"{k:<{w0}}  {v:<{w1}}  {why}" for k, v, why in rows)


@dataclass(frozen=True)
class _Choice:
    ngl: int
    n_ctx: int
    type_k: str
    type_v: str
    n_ubatch: int
    flash_attn: str


def _pad(n: int) -> int:
    return -(-n // _PAD) * _PAD


def estimate_compute(m: ModelInspection, n_ctx: int, n_ubatch: int, flash_attn: bool,
                     has_layers: bool, has_output: bool) -> int:
    """Bytes of the compute buffer llama.cpp reserves on a device: the largest stage of
    the graph that lives there (attention scores, the feed-forward, or the logits of a
    whole micro-batch). A GPU allocates all of it."""
    n_kv = _pad(n_ctx)
    stages = [0]
    if has_layers:
        scores = m.n_embd * n_ubatch * 8 if flash_attn else m.n_head * n_kv * n_ubatch * 4
        stages += [scores + n_kv * n_ubatch * 2, (m.n_ff or 4 * m.n_embd) * n_ubatch * 8]
    if has_output:
        stages.append(m.n_vocab * n_ubatch * 4)
    return max(stages) + m.n_embd * n_ubatch * 12


def estimate_host_compute(m: ModelInspection, n_ctx: int, n_ubatch: int, flash_attn: bool,
                          has_layers: bool) -> int:
    """Bytes of compute memory the CPU really touches. Host pages count only once
    written, and a request asks for the logits of its last token only, so the logits of
    a whole micro-batch that the buffer reserves are never written. Without flash
    attention the CPU also keeps an f16 copy of the attention scores (its work buffer):
    6 bytes per score in all, which measurements on the default model confirm."""
    n_kv = _pad(n_ctx)
    stages = [m.n_vocab * 4]
    if has_layers:
        scores = m.n_embd * n_ubatch * 8 if flash_attn else m.n_head * n_kv * n_ubatch * 6
        stages += [scores + n_kv * n_ubatch * 4, (m.n_ff or 4 * m.n_embd) * n_ubatch * 8]
    return max(stages) + m.n_embd * n_ubatch * 12


def _layer_devices(m: ModelInspection, ngl: int, gpus: Sequence[Budget],
                   split: Sequence[float]) -> list[int]:
    """Device index of each layer (-1: CPU; j: gpus[j]), plus the output's at the end.
    llama.cpp offloads the last layers first and spreads them by cumulative split."""
    n = m.n_layers
    on_gpu = min(ngl, n + 1)
    first = n + 1 - on_gpu
    total = sum(split) or 1.0
    cum, acc = [], 0.0
    for s in split:
        acc += s / total
        cum.append(acc)
    out = []
    for i in range(n + 1):
        if i < first or not gpus:
            out.append(-1)
            continue
        frac = (i - first) / on_gpu
        out.append(next((j for j, c in enumerate(cum) if frac < c), len(gpus) - 1))
    return out


def predict(m: ModelInspection, c: _Choice, budgets: Sequence[Budget], overheads: Overheads,
            split: Sequence[float] = (), compute: dict[str, float] | None = None
            ) -> list[DeviceMemory]:
    """Memory of choice `c` on the host (first) and on each GPU budget.
    `compute`: measured/estimated ratios by device name, from a dry run."""
    gpus = [b for b in budgets if b.kind == "gpu"]
    split = split or [b.usable for b in gpus]
    where = _layer_devices(m, c.ngl, gpus, split)
    fa = c.flash_attn == "on"
    names = ["CPU"] + [g.name for g in gpus]
    weights = dict.fromkeys(names, 0)
    kv = dict.fromkeys(names, 0)
    weights["CPU"] = m.input_bytes
    for i in range(m.n_layers):
        d = names[where[i] + 1]
        weights[d] += m.layer_bytes[i]
        kv[d] += m.kv_bytes(c.n_ctx, c.type_k, c.type_v, range(i, i + 1), c.n_ubatch)
    out_dev = names[where[-1] + 1]
    weights[out_dev] += m.output_bytes if out_dev == "CPU" else m.output_offload_bytes
    out = []
    for j, d in enumerate(names):
        has_layers = any(names[w + 1] == d for w in where[:-1])
        if j == 0:
            est = estimate_host_compute(m, c.n_ctx, c.n_ubatch, fa, has_layers)
            out.append(DeviceMemory(d, weights[d], kv[d], est,
                                    overheads.host + overheads.host_correction))
            continue
        est = estimate_compute(m, c.n_ctx, c.n_ubatch, fa, has_layers, d == out_dev)
        used = weights[d] > 0
        ratio = (compute or {}).get(d, 1.0)
        out.append(DeviceMemory(d, weights[d], kv[d], int(est * ratio) if used else 0,
                                overheads.gpu + GPU_MODEL_RUNTIME + overheads.gpu_correction
                                if used else 0))
    return out


def _fits(mem: Sequence[DeviceMemory], budgets: Sequence[Budget]) -> bool:
    by = {b.name: b for b in budgets}
    return all(x.total <= by[x.device].usable for x in mem if x.device in by)


def place(m: ModelInspection, budgets: Sequence[Budget], *, device: str = "auto",
          fixed: dict[str, Any] | None = None, cores: int = 1,
          overheads: Overheads | None = None,
          measure: Callable[[dict[str, Any]], Sequence[Any]] | None = None,
          tuned: dict[str, Any] | None = None,
          fixed_why: dict[str, str] | None = None, idle: Any = None) -> Placement:
    """Choose a configuration for model `m` within `budgets` (host first, then GPUs).

    `fixed`: LoadConfig settings the user gave; they are kept. `measure(settings)`
    runs a dry run and returns llama.cpp's buffers (engine.protocol.Buffer).
    `tuned`: the best configuration autotune measured on this machine, if any.
    `fixed_why`: why a fixed setting is fixed, where the user did not give it (setting ->
    reason; the table says "given" for the rest). `idle`: the cores idle now
    (`_cpu.IdleCores`); `cores` is then its idle count."""
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
    overheads = overheads or Overheads(host=0)
    notes: list[str] = []
    gpus = [b for b in budgets if b.kind == "gpu"]
    n = m.n_layers
    if device == "gpu" and not gpus:
        raise WorkbenchError("a GPU was asked for, but llama.cpp sees none here",
                             "Use --device auto to run on the CPU when there is no GPU "
                             "(or --device cpu). A GPU needs a CUDA build of llama.cpp: "
                             "run `make lab` on a machine with nvcc and a GPU.")
    if fixed.get("n_gpu_layers", 0) not in (0, None) and not gpus:
        if device == "auto":
            notes.append(f"asked for {fixed.pop('n_gpu_layers')} GPU layers, but llama.cpp "
                         "sees no GPU: every layer runs on the CPU")
        else:
            raise WorkbenchError(f"n_gpu_layers={fixed['n_gpu_layers']} needs a GPU, and "
                                 "llama.cpp sees none here",
                                 "Drop --n-gpu-layers, or use --device auto to fall back to "
                                 "the CPU.")
    if device == "cpu":
        if fixed.get("n_gpu_layers"):
            raise WorkbenchError("--device cpu and --n-gpu-layers contradict each other",
                                 "Give one of them.")
        gpus = []
    use_budgets = [budgets[0]] + gpus

    ngl_fixed = fixed.get("n_gpu_layers")
    if ngl_fixed is not None and (ngl_fixed == -1 or ngl_fixed > n + 1):
        if ngl_fixed > n + 1:
            notes.append(f"asked for {ngl_fixed} GPU layers; the model has {n} layers and an "
                         f"output layer, so all {n + 1} go to the GPU")
        ngl_fixed = n + 1

    train = m.n_ctx_train or 0
    if "n_ctx" in fixed:
        # batched sequences (n_parallel) each get n_ctx / n_parallel positions
        per_seq = fixed["n_ctx"] // max(1, fixed.get("n_parallel") or 1)
        if train and per_seq > train:
            raise WorkbenchError(
                f"n_ctx={per_seq:,} per sequence is above the context this model was "
                f"trained for ({train:,} tokens)",
                f"Use --n-ctx {train} or less; longer contexts give garbage without RoPE "
                "scaling.")
        contexts = [fixed["n_ctx"]]
    else:
        start = min(4096, train) if train else 4096
        contexts = [start]
        while contexts[-1] // 2 >= MIN_CTX:
            contexts.append(contexts[-1] // 2)

    if "type_k" in fixed or "type_v" in fixed:
        kv_opts = [(fixed.get("type_k", "f16"), fixed.get("type_v", "f16"))]
    else:
        kv_opts = list(KV_CHOICES)
    # A smaller micro-batch shrinks the compute buffer and costs some prompt speed only;
    # it is tried before a quantized KV cache, which costs quality (and, on the CPU, the
    # flash attention a quantized V needs).
    if "n_ubatch" in fixed or "n_batch" in fixed:
        ubatches = [min(fixed.get("n_ubatch", 512), fixed.get("n_batch", 512))]
    else:
        ubatches = [512, 256, 128]
    variants = [(kv, ub) for kv in kv_opts for ub in ubatches]

    def choice(ngl: int, n_ctx: int, variant: tuple[tuple[str, str], int]) -> _Choice:
        kv, ub = variant
        fa = fixed.get("flash_attn", "auto")
        if fa == "auto":
            fa = "on" if ngl > 0 or kv[1] != "f16" else "off"
        return _Choice(ngl, n_ctx, kv[0], kv[1], ub, fa)

    ratios: dict[str, float] = {}

    def mem(c: _Choice) -> list[DeviceMemory]:
        return predict(m, c, use_budgets, overheads, fixed.get("tensor_split", ()), ratios)

    def search() -> tuple[_Choice, str] | None:
        for n_ctx in contexts:
            if ngl_fixed is not None:
                for v in variants:
                    c = choice(ngl_fixed, n_ctx, v)
                    if _fits(mem(c), use_budgets):
                        return c, "as asked"
                continue
            if gpus:
                for v in variants:
                    c = choice(n + 1, n_ctx, v)
                    if _fits(mem(c), use_budgets):
                        return c, "everything fits on the GPU"
                best = None
                for v in variants:
                    for ngl in range(n, 0, -1):
                        c = choice(ngl, n_ctx, v)
                        if _fits(mem(c), use_budgets):
                            if best is None or _worth_it(c, best, n):
                                best = c
                            break
                if best is not None:
                    return best, "the most layers that fit on the GPU; the rest on the CPU"
            if device != "gpu":
                for v in variants:
                    c = choice(0, n_ctx, v)
                    if _fits(mem(c), use_budgets):
                        return c, "no GPU" if not gpus else "no layer fits on the GPU"
        return None

    found = search()
    measured = False
    for _ in range(3):  # price the choice with a dry run; if it no longer fits, search again
        if found is None or measure is None or found[0].ngl == 0:
            break  # host pages count when written: the dry run's reserve says too much
        c = found[0]
        try:
            buffers = measure(_settings(c, fixed, cores, tuned, idle))
        except WorkbenchError as e:
            notes.append(f"compute buffers estimated: {e.message}")
            break
        est = {x.device: x.compute for x in predict(m, c, use_budgets, overheads,
                                                    fixed.get("tensor_split", ()))}
        got = _measured_compute(buffers, [b.name for b in gpus])
        ratios = {d: got[d] / est[d] for d in got if est.get(d)}
        measured = bool(ratios)
        if _fits(mem(c), use_budgets):
            break
        found = search()
    if found is None and ngl_fixed:
        raise _pinned_layers_do_not_fit(m, use_budgets, choice(ngl_fixed, contexts[-1],
                                                               variants[-1]), mem)
    if found is None:
        raise _fits_nowhere(m, use_budgets, contexts[-1], device, overheads, fixed)
    c, why = found

    memory = mem(c)
    settings = _settings(c, fixed, cores, tuned, idle)
    if gpus and c.ngl > 0 and len(gpus) > 1 and "tensor_split" not in fixed:
        total = sum(b.usable for b in gpus)
        settings["tensor_split"] = tuple(round(b.usable / total, 3) for b in gpus)
    reasons = _explain(m, c, why, settings, fixed, gpus, contexts[0], cores, tuned, fixed_why,
                       idle)
    reasons += [("note", "", n) for n in notes]
    return Placement(model=m.path, settings=settings, memory=tuple(memory),
                     budgets=tuple(use_budgets), reasons=tuple(reasons), compute_measured=measured,
                     overheads=overheads)


def choose_threads(fixed: dict[str, Any], cores: int, tuned: dict[str, Any] | None = None,
                   idle: Any = None) -> dict[str, int]:
    """`threads` and `max_threads`: as given; else autotune's best (within the `cores` idle
    now), else those idle cores, re-chosen while decoding (worker/threads.py) from 1 up to
    autotune's best or the usable cores. `max_threads` 0: kept as chosen."""
    if "threads" in fixed:
        return {"threads": fixed["threads"], "max_threads": fixed.get("max_threads", 0)}
    threads = (min(tuned["threads"], cores) if idle else tuned["threads"]) if tuned else cores
    most = fixed.get("max_threads")
    if most is None:
        most = tuned["threads"] if tuned else idle.usable if idle else cores
    return {"threads": threads, "max_threads": most}


# With layers left on the CPU, a quantized KV cache slows their attention. On an H200
# with a 7B model (benchmarks/results/placement_gpu.json) q4_0 KV that moved 1 more layer
# of 25 to the GPU decoded 4% slower than f16; one that moved 3 of 20 was 13% faster.
PARTIAL_KV_GAIN = 0.10


def _worth_it(c: _Choice, best: _Choice, n: int) -> bool:
    """In a partial split: is `c` (found after `best`, so never a less quantized KV)
    better than `best`? More layers on the GPU are, unless c quantizes the KV cache
    further for a gain under PARTIAL_KV_GAIN of the layers left on the CPU."""
    if c.ngl <= best.ngl:
        return False
    if (c.type_k, c.type_v) == (best.type_k, best.type_v):
        return True
    return c.ngl - best.ngl >= PARTIAL_KV_GAIN * (n + 1 - best.ngl)


def _pinned_layers_do_not_fit(m: ModelInspection, budgets: Sequence[Budget], c: _Choice,
                              mem: Callable[[_Choice], list[DeviceMemory]]) -> WorkbenchError:
    """n_gpu_layers was given, and no variant of the rest fits with it."""
    by = {b.name: b for b in budgets}
    over = [(x, by[x.device]) for x in mem(c) if x.device in by
            and x.total > by[x.device].usable]
    x, b = over[0] if over else (mem(c)[0], budgets[0])
    where = "RAM" if b.kind == "cpu" else b.name
    return WorkbenchError(
        f"n_gpu_layers={c.ngl} does not fit: even with a {c.n_ctx:,}-token context and a "
        f"{c.type_k} KV cache it needs {x.total / GiB:,.2f} GiB of {where}, which has "
        f"{b.usable / GiB:,.2f} GiB usable ({b.why})",
        "Leave out --n-gpu-layers and the planner picks the most layers that fit, or give "
        "a smaller number.")


def _settings(c: _Choice, fixed: dict[str, Any], cores: int, tuned: dict[str, Any] | None,
              idle: Any) -> dict[str, Any]:
    s = dict(fixed)
    s.update(choose_threads(fixed, cores, tuned, idle))
    s.update(n_gpu_layers=c.ngl, n_ctx=c.n_ctx, type_k=c.type_k, type_v=c.type_v,
             flash_attn=c.flash_attn, n_ubatch=c.n_ubatch)
    s.setdefault("n_batch", max(512, c.n_ubatch))
    if s.get("backend_sampling", "auto") == "auto":
        s["backend_sampling"] = "on" if c.ngl > 0 else "off"
    s.pop("device", None)
    return s


def _measured_compute(buffers: Sequence[Any], gpu_names: Sequence[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in buffers:
        if b.kind not in ("compute", "output"):
            continue
        dev = next((g for g in gpu_names if b.device.startswith(g)), "CPU")
        out[dev] = out.get(dev, 0) + b.bytes
    return out


def _explain(m: ModelInspection, c: _Choice, why: str, s: dict[str, Any], fixed: dict[str, Any],
             gpus: Sequence[Budget], first_ctx: int, cores: int,
             tuned: dict[str, Any] | None, fixed_why: dict[str, str] | None = None,
             idle: Any = None) -> list[tuple[str, str, str]]:
    n = m.n_layers

    def given(*keys: str) -> str:
        """Why a fixed setting is what it is: the user gave it, unless told otherwise."""
        return next(((fixed_why or {})[k] for k in keys if k in (fixed_why or {})), "given")

    where = ("GPU" if c.ngl > n else "CPU + GPU" if c.ngl > 0 else "CPU")
    rows = [("device", where, why if "n_gpu_layers" not in fixed else given("n_gpu_layers")),
            ("n_gpu_layers", str(c.ngl),
             given("n_gpu_layers") if "n_gpu_layers" in fixed else
             f"all {n} layers and the output layer" if c.ngl > n else
             f"{c.ngl} of {n} layers; the output layer and embeddings stay on the CPU"
             if c.ngl else "no layer offloaded")]
    if "tensor_split" in s:
        rows.append(("tensor_split", ", ".join(f"{x:g}" for x in s["tensor_split"]),
                     given("tensor_split") if "tensor_split" in fixed else
                     "in proportion to each GPU's usable memory"))
    if "threads" in fixed:
        t_why = given("threads") + (f"; more than the {cores} usable cores slows decoding sharply"
                         if fixed["threads"] > cores else "")
    elif tuned:
        t_why = (f"fastest in autotune on this machine, by each configuration's latest run "
                 f"({tuned['threads']} threads, {tuned['tg_tps']:,.1f} tokens/s)")
        if s["threads"] < tuned["threads"]:
            t_why += f"; only {idle.why()}"
    elif idle is not None:
        t_why = (f"{idle.why()}: a thread without a core of its own holds up the others "
                 "at every step")
    else:
        t_why = ("usable cores (physical, within CPU affinity and the cgroup quota): "
                 "one thread more than cores decoded 3× slower here")
    if s.get("max_threads"):
        t_why += f"; re-chosen while decoding from the cores idle then (1 to {s['max_threads']})"
    rows.append(("threads", str(s["threads"]), t_why))
    ctx_why = given("n_ctx") if "n_ctx" in fixed else (
        f"{c.n_ctx:,} of the {m.n_ctx_train:,} trained" if c.n_ctx == first_ctx else
        f"shortened from {first_ctx:,} so the model fits")
    rows.append(("n_ctx", f"{c.n_ctx:,}", ctx_why))
    kv_why = given("type_k", "type_v") if ("type_k" in fixed or "type_v" in fixed) else (
        "f16 fits" if c.type_k == "f16" else f"{c.type_k} so that more fits "
        f"({m.kv_bytes_per_token(c.type_k, c.type_v) / 1024:,.1f} KiB/token against "
        f"{m.kv_bytes_per_token() / 1024:,.1f} with f16)")
    rows.append(("KV cache", f"K {c.type_k}, V {c.type_v}", kv_why))
    fa_why = given("flash_attn") if "flash_attn" in fixed else (
        "quantized V needs flash attention" if c.type_v != "f16" else
        "layers on a GPU" if c.ngl else
        "off on the CPU: it decoded 30% slower here (benchmarks/engine_overhead.py)")
    rows.append(("flash_attn", c.flash_attn, fa_why))
    rows.append(("n_batch / n_ubatch", f"{s['n_batch']} / {c.n_ubatch}",
                 given("n_ubatch", "n_batch") if "n_ubatch" in fixed or "n_batch" in fixed else
                 "llama.cpp's default micro-batch; prompt speed flattens above it"
                 if c.n_ubatch == 512 else
                 "a smaller micro-batch, so the compute buffer fits (prompts run slower)"))
    return rows


def _fits_nowhere(m: ModelInspection, budgets: Sequence[Budget], ctx: int, device: str,
                  overheads: Overheads, fixed: dict[str, Any]) -> WorkbenchError:
    host = budgets[0]
    kv = (fixed.get("type_k", "q4_0"), fixed.get("type_v", "q4_0")) \
        if ("type_k" in fixed or "type_v" in fixed) else ("q4_0", "q4_0")
    ub = min(fixed.get("n_ubatch", 128), fixed.get("n_batch", 512))  # the smallest tried
    c = _Choice(0, ctx, kv[0], kv[1], ub, "on")
    need = predict(m, c, [host], overheads)[0].total
    gpu = max((b.usable for b in budgets[1:]), default=0)
    has = f"{host.usable / GiB:,.2f} GiB usable RAM" + (
        f" and {gpu / GiB:,.2f} GiB on the GPU" if gpu else "")
    ways = []
    q4 = int(m.n_params * 4.5 / 8)
    if q4 < m.weight_bytes * 0.9:
        ways.append(f"a smaller quantization (Q4_0 weights would be about {q4 / GiB:,.2f} GiB)")
    else:
        ways.append("a smaller model")
    if "n_ctx" in fixed and fixed["n_ctx"] > MIN_CTX:
        ways.append(f"a shorter context (--n-ctx {MIN_CTX})")
    if kv != ("q4_0", "q4_0"):
        ways.append("a quantized KV cache (--type-k q8_0 --type-v q8_0)")
    if device == "cpu":
        ways.append("a GPU (--device auto)")
    return WorkbenchError(
        f"{m.path.name} fits nowhere: with a {ctx:,}-token context and a KV cache of {kv[0]} it "
        f"needs {need / GiB:,.2f} GiB (weights {m.weight_bytes / GiB:,.2f} GiB), and this "
        f"machine has {has}",
        f"Needs {max(0, need - host.usable) / GiB:,.2f} GiB less. Try " + ", or ".join(ways)
        + "; or free memory.")
