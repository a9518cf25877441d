"""Placement-aware mixed precision: fewer bits where the bytes are slow, more where cheap.

When a model is split, llama.cpp keeps the first layers on the CPU and offloads the
last `n_gpu_layers` to the GPU. Decoding reads every weight once per token, so the
CPU's share of the bytes sets the speed while the GPU's costs little time. A mix
quantizes the CPU's layers to `cpu_type` and the rest to `gpu_type`, with llama.cpp's
per-tensor overrides (`tt_overrides`).

The split depends on the file's size, and the file on the split: `build_mix` plans,
quantizes, plans the result again, and repeats until the layers on the CPU are the ones
it quantized for. `mixed_precision` builds several mixes and uniform quantizations,
measures each one's quality against a reference (KL divergence, top-1 agreement) and
its decode speed as the planner places it, and chooses by those measurements.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..errors import WorkbenchError
from .quantize import quant_name, tensor_type

if TYPE_CHECKING:
    from ..session import Session

DEFAULT_PAIRS = (("Q8_0", "Q4_0"), ("Q8_0", "Q3_K"), ("Q6_K", "Q4_0"), ("Q5_K_M", "Q3_K"))
DEFAULT_UNIFORM = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0")


def cpu_layer_pattern(n_layers: int, n_gpu_layers: int) -> str | None:
    """A regex on tensor names matching the repeating blocks that stay on the CPU when
    `n_gpu_layers` are offloaded (llama.cpp offloads the last ones); None if none do."""
    k = n_layers - min(max(n_gpu_layers, 0), n_layers)
    if k <= 0:
        return None
    return r"^blk\.(" + "|".join(str(i) for i in range(k)) + r")\."


@dataclass(frozen=True)
class Mix:
    """A model file whose CPU layers and GPU layers have different types."""
    path: Path
    gpu_type: str
    cpu_type: str
    n_gpu_layers: int      # the split it was built for
    cpu_layers: int        # repeating blocks quantized to cpu_type
    bytes: int

    def __repr__(self) -> str:
        return (f"{self.path.name}: layers 0-{self.cpu_layers - 1} {self.cpu_type} (CPU), the "
                f"rest {self.gpu_type} ({self.n_gpu_layers} GPU layers), "
                f"{self.bytes / 2**20:,.1f} MiB")


def _check_types(gpu_type: str, cpu_type: str) -> tuple[str, str]:
    return quant_name(gpu_type), tensor_type(cpu_type, "for the CPU layers")


def build_mix(session: Session, model: str | os.PathLike, gpu_type: str = "Q8_0", cpu_type: str = "Q4_0", *,
              n_gpu_layers: int | None = None, out: str | os.PathLike | None = None,
              overwrite: bool = False, settings: dict[str, Any] | None = None,
              progress: Callable[[float], None] | None = None) -> Mix:
    """Quantize `model` with its CPU layers at `cpu_type` and the rest at `gpu_type`.
    `n_gpu_layers`: the split to build for; by default the planner's for the result,
    with `settings` (gpu_mem_mib, n_ctx, ...), found by planning it in turn."""
    from ..models.gguf_file import read_header
    from .quantize import default_output, quantize, temporary_output

    src = Path(model).expanduser()
    gpu, cpu = _check_types(gpu_type, cpu_type)
    n = int(read_header(src).arch_value("block_count", 0))
    dst = Path(out).expanduser() if out else default_output(src, f"{gpu}-{cpu}", "-mixed")
    tmp = temporary_output(src, dst, overwrite)  # refuses an existing or unwritable output
    settings = {k: v for k, v in (settings or {}).items() if k != "n_gpu_layers"}
    ngl = n_gpu_layers
    if ngl is None:
        ngl = session.plan(src, **settings).settings["n_gpu_layers"]
        if ngl == 0:
            raise WorkbenchError(
                f"the planner runs every layer of {src.name} on the CPU here, so no layer "
                "has cheaper bytes for a mix", f"Quantize it uniformly (to {cpu} for speed), "
                "or give n_gpu_layers to build a mix for a machine with a GPU.")
    seen: list[int] = []
    try:
        while True:
            pattern = cpu_layer_pattern(n, ngl)
            if pattern is None:
                raise WorkbenchError(
                    f"with {ngl} GPU layers no layer of {src.name} stays on the CPU: a mix has "
                    "nothing to quantize harder", f"Quantize it uniformly to {gpu}, or give "
                    "n_gpu_layers (or a smaller gpu_mem_mib) for a split.")
            quantize(src, gpu, tmp, overwrite=True, overrides=[(pattern, cpu)],
                     progress=progress)
            if n_gpu_layers is not None:
                break
            seen.append(ngl)
            again = session.plan(tmp, **settings).settings["n_gpu_layers"]
            if again == ngl or again in seen:  # settled (or alternating: keep this one)
                break
            ngl = again
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return Mix(dst, gpu, cpu, ngl, n - min(ngl, n), dst.stat().st_size)


@dataclass
class Candidate:
    name: str
    path: Path
    kind: str                  # "mixed" or "uniform"
    bytes: int
    n_gpu_layers: int          # as the planner places it
    cpu_bytes: int             # weights the CPU reads per token (its layers and output)
    kl_mean: float | None = None
    top1: float | None = None
    tg_tps: float | None = None


@dataclass
class MixStudy:
    """Mixes and uniform quantizations of one model, measured; `chosen` is the fastest
    whose KL is within `max_kl_ratio` of the baseline's."""
    model: str
    candidates: list[Candidate]
    baseline: Candidate
    chosen: Candidate
    max_kl_ratio: float
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def same_size_uniform(self, c: Candidate) -> Candidate:
        """The uniform quantization nearest in size to `c`."""
        return min((u for u in self.candidates if u.kind == "uniform"),
                   key=lambda u: abs(u.bytes - c.bytes))

    def _rows(self) -> list[list[str]]:
        out = [["candidate", "kind", "size", "GPU layers", "CPU reads", "KL", "top-1",
                "decode t/s", ""]]
        for c in self.candidates:
            mark = "chosen" if c is self.chosen else "baseline" if c is self.baseline else ""
            out.append([c.name, c.kind, f"{c.bytes / 2**20:,.1f} MiB", str(c.n_gpu_layers),
                        f"{c.cpu_bytes / 2**20:,.1f} MiB",
                        "—" if c.kl_mean is None else f"{c.kl_mean:.5f}",
                        "—" if c.top1 is None else f"{c.top1:.2%}",
                        "—" if c.tg_tps is None else f"{c.tg_tps:,.1f}", mark])
        return out

    def __repr__(self) -> str:
        t = self._rows()
        w = [max(len(r[i]) for r in t) for i in range(len(t[0]))]
        return "\n".join([f"Mixed precision for {self.model}"]
                         + ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip()
                            for r in t] + self.notes)

    def _repr_html_(self) -> str:
        t = self._rows()
        head = "".join(f"<th>{html.escape(c)}</th>" for c in t[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                       for r in t[1:])
        notes = "".join(f"<p>{html.escape(n)}</p>" for n in self.notes)
        return (f"<b>Mixed precision for {html.escape(self.model)}</b><table><tr>{head}</tr>"
                f"{body}</table>{notes}")


def cpu_bytes(path: Path, n_gpu_layers: int) -> int:
    """Weight bytes a decode step reads on the CPU: its blocks, and the output layer when
    it is not offloaded."""
    from ..models.inspect import inspect_model

    m = inspect_model(path)
    k = m.n_layers - min(n_gpu_layers, m.n_layers)
    return sum(m.layer_bytes[:k]) + (m.output_bytes if n_gpu_layers <= m.n_layers else 0)


def decode_speed(session: Session, path: Path, settings: dict[str, Any], n_gen: int = 64) -> tuple[float, int]:
    """(decode tokens/s, GPU layers) of `path` as the planner places it, after a short
    prompt; the better of two runs."""
    from ..device.calibrate import probe_tokens
    from ..models.inspect import inspect_model

    loaded = session.load(path, progress=False, kv_cache="off", **settings)
    prompt = probe_tokens(inspect_model(path).n_vocab, 64)
    best = 0.0
    for _ in range(2):
        c = session.complete(prompt, max_tokens=n_gen, temperature=0.0, ignore_eos=True)
        best = max(best, c.metrics.decode_tps)
    return best, loaded.info.n_gpu_layers


def mixed_precision(session: Session, model: str | os.PathLike, reference: str | os.PathLike | None = None, *,
                    pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS,
                    uniform: Sequence[str] = DEFAULT_UNIFORM, baseline: str = "Q5_K_M",
                    max_kl_ratio: float = 1.1, n_gpu_layers: int | None = None,
                    text: str | None = None, max_chunks: int = 8,
                    measure_speed: bool = True,
                    folder: str | os.PathLike | None = None,
                    progress: Callable[[str, float], None] | None = None,
                    **settings: Any) -> MixStudy:
    """See `workbench.mixed_precision`."""
    from .. import _paths
    from .evaluate import evaluate
    from .quantize import quantize

    src = Path(model).expanduser()
    if baseline and quant_name(baseline) not in [quant_name(u) for u in uniform]:
        uniform = (*uniform, baseline)
    checked = [_check_types(g, c) for g, c in pairs]
    if not checked:
        raise WorkbenchError("no mix to try", "Give pairs=[('Q8_0', 'Q4_0')] or more.")
    if max_kl_ratio < 1:
        raise WorkbenchError(f"max_kl_ratio={max_kl_ratio} is below 1",
                             "1.1 allows 10% more KL divergence than the baseline.")
    out_dir = Path(folder).expanduser() if folder else _paths.home() / "models" / "mixed"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = src.name.removesuffix(".gguf")
    uniq = list(dict.fromkeys(quant_name(u) for u in uniform))
    steps = [0, 2 * (len(uniq) + len(checked)) + 1]

    def say(what: str) -> None:
        if progress is not None:
            progress(what, steps[0] / steps[1])
        steps[0] += 1

    cands: list[Candidate] = []
    for q in uniq:
        say(f"quantizing {q}")
        path = out_dir / f"{stem}.{q}.gguf"
        if not path.exists() or path.stat().st_mtime < src.stat().st_mtime:
            quantize(src, q, path, overwrite=True)
        cands.append(Candidate(q, path, "uniform", path.stat().st_size, -1, 0))
    for gpu, cpu in checked:
        say(f"building {gpu} on the GPU, {cpu} on the CPU")
        mix = build_mix(session, src, gpu, cpu, n_gpu_layers=n_gpu_layers,
                        out=out_dir / f"{stem}.{gpu}-gpu.{cpu}-cpu.gguf", overwrite=True,
                        settings=settings)
        cands.append(Candidate(f"{gpu} GPU / {cpu} CPU", mix.path, "mixed", mix.bytes,
                               mix.n_gpu_layers, 0))
    say("measuring quality")
    ev = evaluate([c.path for c in cands], reference if reference is not None else src, text,
                  max_chunks=max_chunks)
    for c in cands:
        r = ev.row(c.path)
        c.kl_mean, c.top1 = r.kl_mean, r.top1
    for c in cands:
        if measure_speed:
            say(f"measuring the speed of {c.name}")
            fixed = dict(settings)
            if n_gpu_layers is not None:
                fixed["n_gpu_layers"] = n_gpu_layers
            c.tg_tps, c.n_gpu_layers = decode_speed(session, c.path, fixed)
        elif c.n_gpu_layers < 0:
            c.n_gpu_layers = n_gpu_layers if n_gpu_layers is not None else 0
        c.cpu_bytes = cpu_bytes(c.path, c.n_gpu_layers)
    base = next(c for c in cands if c.kind == "uniform" and c.name == quant_name(baseline))
    limit = (base.kl_mean or 0.0) * max_kl_ratio
    good = [c for c in cands if c.kl_mean is not None and c.kl_mean <= limit] or [base]
    key = (lambda c: c.tg_tps or 0.0) if measure_speed else (lambda c: -c.cpu_bytes)
    chosen = max(good, key=key)
    notes = [f"Quality against {ev.reference.name if ev.reference else 'the first model'} on "
             f"{ev.tokens_scored:,} tokens; chosen: the fastest with KL at most "
             f"{max_kl_ratio:g}× the {base.name} baseline's ({limit:.5f})."
             + ("" if measure_speed else " Speed not measured: ranked by the bytes the CPU "
                "reads per token.")]
    return MixStudy(src.name, cands, base, chosen, max_kl_ratio, dict(settings), notes)
