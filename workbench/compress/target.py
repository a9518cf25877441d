"""Quantization held to a quality target: per-tensor types chosen until top-1 agreement
(or KL divergence) against the model's F16 copy holds on held-out text.

On a CPU, llama.cpp multiplies a quantized weight by inputs rounded to 8 bits (Q8_0/Q8_1
activations); float16 weights take float16 inputs. So every quantized tensor adds two
errors, its own rounding and its inputs', and a file of one type has a floor no setting
lifts: the default model's Q8_0 agrees with its F16 copy on 96.8% of next tokens.

The search:
1. The base: every float tensor at the asked type; a tensor the source already holds
   quantized, at no more bits than that type, stays as it is (requantizing it adds
   rounding and takes more bytes; it cannot restore what was lost).
2. Sensitivity: each group (the output/embedding matrix, and each kind of layer matrix
   across the layers) alone at F16, measured by KL on calibration text; groups are
   promoted in order of KL removed per byte, one at a time, until the target holds on
   the calibration text and then on held-out text (the standard-library evaluation
   text, disjoint from the calibration text). Every matrix at F16 is the reference
   itself, so without a size limit some mix always reaches the target; `max_size` (a
   multiple of the uniform file's bytes) bounds the search, and a target no mix within
   it reaches is an error that names the best mix found.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import WorkbenchError
from ..models.gguf_file import GGML_TYPES, read_header

_FLOAT = ("F32", "F16", "BF16")
# 512-token chunks (255 tokens scored in each): ranking groups, trying a mix
SENSITIVITY_CHUNKS, SEARCH_CHUNKS = 3, 6
CHECK_TOKENS = 16320  # held-out tokens a mix must meet the target on (64 chunks)


@dataclass(frozen=True)
class Step:
    """A mix tried: the groups at F16, its size and its quality on `text`."""
    promoted: tuple[str, ...]
    bytes: int
    top1: float
    kl_mean: float
    text: str            # calibration | held-out


@dataclass
class TargetedQuantization:
    """What `quantize(..., min_top1=, max_kl=)` wrote: the file, the types it holds, its
    quality on held-out text and what it costs against the uniform quantization."""
    path: Path
    source: Path
    quant: str
    bytes: int
    uniform_bytes: int           # the same model at `quant` everywhere
    overrides: dict[str, str]    # tensor-name pattern -> type, the first match wins
    promoted: tuple[str, ...]
    top1: float
    kl_mean: float
    tokens: int                  # held-out tokens scored
    min_top1: float | None
    max_kl: float | None
    steps: list[Step] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)  # group -> KL alone at F16
    seconds: float = 0.0

    @property
    def overrides_text(self) -> str:
        return ", ".join(f"{p}={t}" for p, t in self.overrides.items())

    def __repr__(self) -> str:
        goal = " and ".join(x for x in (
            f"top-1 >= {self.min_top1:.2%}" if self.min_top1 is not None else "",
            f"KL <= {self.max_kl:g}" if self.max_kl is not None else "") if x)
        f16 = ", ".join(self.promoted) or "none"
        return (f"{self.quant} held to {goal}: {self.path} ({self.bytes / 2**20:,.1f} MiB, "
                f"{self.bytes / self.uniform_bytes:.2f}x uniform {self.quant}'s "
                f"{self.uniform_bytes / 2**20:,.1f} MiB)\n  at F16: {f16}\n  held-out text: "
                f"top-1 {self.top1:.2%}, KL {self.kl_mean:.5f} on {self.tokens:,} tokens "
                f"({len(self.steps)} mixes tried in {self.seconds:.0f} s)")

    def _repr_html_(self) -> str:
        return f"<pre>{self!r}</pre>"


def check_targets(min_top1: Any, max_kl: Any, max_size: Any = None,
                  check_tokens: Any = CHECK_TOKENS) -> None:
    if min_top1 is not None and (isinstance(min_top1, bool) or not isinstance(min_top1, (int, float))
                                 or not 0 < min_top1 <= 1):
        raise WorkbenchError(f"--min-top1 {min_top1!r} is not a share in (0, 1]",
                             "Give top-1 agreement as a fraction, e.g. --min-top1 0.98.")
    if max_kl is not None and (isinstance(max_kl, bool) or not isinstance(max_kl, (int, float))
                               or not max_kl > 0 or max_kl != max_kl):
        raise WorkbenchError(f"--max-kl {max_kl!r} is not a positive number of nats",
                             "For example --max-kl 0.002.")
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, (int, float))
                                 or not max_size > 0 or max_size != max_size):
        raise WorkbenchError(f"--max-size {max_size!r} is not a positive multiple",
                             "Give the most bytes as a multiple of the uniform file's, e.g. "
                             "--max-size 1.25.")
    if isinstance(check_tokens, bool) or not isinstance(check_tokens, int) or check_tokens < 255:
        raise WorkbenchError(f"check_tokens={check_tokens!r} is fewer than one chunk's 255 tokens",
                             "Check a target on 255 held-out tokens or more (default 16,320).")
    if max_size is not None and min_top1 is None and max_kl is None:
        raise WorkbenchError("--max-size bounds a quality target, and none is given",
                             "Add --min-top1 or --max-kl.")


def _bits(type_name: str) -> float:
    for name, block, size in GGML_TYPES.values():
        if name == type_name:
            return 8 * size / block
    return 32.0


def groups_of(header: Any) -> dict[str, str]:
    """The promotable groups of a model's matrices: name -> tensor-name pattern."""
    out: dict[str, str] = {}
    for t in header.tensors:
        if len(t.shape) < 2:
            continue
        m = re.fullmatch(r"blk\.\d+\.(\w+)\.weight", t.name)
        if m:
            out.setdefault(m.group(1), rf"blk\.\d+\.{m.group(1)}\.weight")
        elif t.name.endswith(".weight"):
            stem = t.name[:-len(".weight")]
            out.setdefault(stem, re.escape(t.name))
    return out


def base_overrides(header: Any, quant: str) -> dict[str, str]:
    """Keep tensors the source holds quantized at no more bits than `quant`."""
    from ..models.gguf_file import ggml_type_name

    limit = _bits(quant if quant in {n for n, _, _ in GGML_TYPES.values()} else "Q8_0")
    kinds: dict[str, set[str]] = {}
    exact: dict[str, str] = {}
    for t in header.tensors:
        name = ggml_type_name(t.ggml_type)
        if len(t.shape) < 2 or name in _FLOAT or _bits(name) > limit:
            continue
        m = re.fullmatch(r"blk\.\d+\.(\w+)\.weight", t.name)
        if m:
            kinds.setdefault(m.group(1), set()).add(name)
        else:
            exact[re.escape(t.name)] = name
    out = dict(exact)
    for kind, types in kinds.items():
        if len(types) == 1:
            out[rf"blk\.\d+\.{kind}\.weight"] = next(iter(types))
        else:  # mixed within a kind: name each tensor
            for t in header.tensors:
                if re.fullmatch(rf"blk\.\d+\.{kind}\.weight", t.name):
                    out[re.escape(t.name)] = ggml_type_name(t.ggml_type)
    return out


def quantize_to_target(quantize: Callable[..., Any], src: Path, quant: str, dst: Path, tmp: Path,
                       *, min_top1: float | None, max_kl: float | None,
                       max_size: float | None, threads: int | None,
                       check_tokens: int = CHECK_TOKENS,
                       progress: Callable[..., Any] | None = None) -> TargetedQuantization:
    """The search (module docstring) with `quantize` (quantize.quantize); writes the
    chosen mix to `tmp` for the caller to rename to `dst`. `max_size`: the most bytes the
    mix may take, as a multiple of the uniform `quant` file's. `check_tokens`: how many
    held-out tokens the chosen mix is checked on."""
    from ..progress import advance
    from .evaluate import evaluate
    from .text import calibration_text, stdlib_text

    if quant in _FLOAT:
        raise WorkbenchError(f"{quant} has no quantized tensors to hold to a target",
                             "Pick a quantized type, e.g. --to int8.")
    t0 = time.monotonic()
    header = read_header(src)
    groups = groups_of(header)
    base = base_overrides(header, quant)
    work = Path(tempfile.mkdtemp(prefix=".wb-target-", dir=tmp.parent))
    done = [0.0]

    def step(share: float) -> None:
        done[0] = min(1.0, done[0] + share)
        advance(progress, done[0])

    def build(name: str, promoted: tuple[str, ...]) -> Path:
        return quantize(src, quant, work / f"{name}.gguf", overwrite=True,
                        overrides=_mix(groups, promoted, base) or None, threads=threads).path

    def measure(paths: list[Path], text: str, chunks: int) -> Any:
        return evaluate(paths, ref, text, n_ctx=512, max_chunks=chunks, threads=threads)

    def meets(row: Any) -> bool:
        return (min_top1 is None or row.top1 >= min_top1) and \
            (max_kl is None or row.kl_mean <= max_kl)

    def goodness(st: Step) -> tuple[float, float]:
        return (st.top1, -st.kl_mean) if min_top1 is not None else (-st.kl_mean, st.top1)

    steps: list[Step] = []
    try:
        ref = src if header.quantization.upper() in _FLOAT else \
            quantize(src, "F16", work / "reference.F16.gguf", threads=threads).path
        uniform = quantize(src, quant, work / "uniform.gguf", threads=threads).bytes
        budget = max_size * uniform if max_size else float("inf")
        calib, held = calibration_text(40000), stdlib_text()
        base_path = build("base", ())
        step(0.05)
        if base_path.stat().st_size > budget:
            raise WorkbenchError(
                f"the smallest mix is {base_path.stat().st_size / uniform:.2f}x uniform "
                f"{quant}'s size, over --max-size {max_size:g}",
                "Raise --max-size, or pick a smaller --to type.")
        sensitivity: dict[str, float] = {}
        order: list[str] = []
        extra: dict[str, int] = {}
        for k in range(len(groups) + 1):
            if k == 1:  # rank the groups by KL removed per byte, each alone at F16
                singles = {g: build(f"single-{i}", (g,)) for i, g in enumerate(groups)}
                ev1 = measure([base_path, *singles.values()], calib, SENSITIVITY_CHUNKS)
                b = ev1.row(base_path)
                for g, p in singles.items():
                    r = ev1.row(p)
                    sensitivity[g], extra[g] = r.kl_mean, r.bytes - b.bytes
                    steps.append(Step((g,), r.bytes, r.top1, r.kl_mean, "calibration"))
                order = sorted(groups, key=lambda g: -(b.kl_mean - sensitivity[g])
                               / max(1, extra[g]))
                step(0.3)
            promoted = tuple(order[:k])
            if base_path.stat().st_size + sum(extra.get(g, 0) for g in promoted) > budget:
                break
            path = base_path if k == 0 else build(f"mix-{k}", promoted)
            r = measure([path], calib, SEARCH_CHUNKS).row(path)
            steps.append(Step(promoted, r.bytes, r.top1, r.kl_mean, "calibration"))
            step(0.4 / len(groups))
            if not meets(r):
                continue
            check = measure([path], held, -(-check_tokens // 255))
            r = check.row(path)
            steps.append(Step(promoted, r.bytes, r.top1, r.kl_mean, "held-out"))
            step(0.1)
            if meets(r):
                shutil.copyfile(path, tmp)
                return TargetedQuantization(
                    dst, src, quant, r.bytes, uniform, _mix(groups, promoted, base), promoted,
                    r.top1, r.kl_mean, check.tokens_scored, min_top1, max_kl, steps,
                    sensitivity, time.monotonic() - t0)
        best = max((st for st in steps if st.bytes <= budget), key=goodness)
        raise WorkbenchError(
            f"no mix within {max_size:g}x uniform {quant}'s size reaches the target; the best "
            f"found, {', '.join(best.promoted) or 'no group'} at F16 "
            f"({best.bytes / uniform:.2f}x), reaches top-1 {best.top1:.2%} and KL "
            f"{best.kl_mean:.5f} on {best.text} text" if max_size else
            f"no mix reached the target on held-out text; the best found, "
            f"{', '.join(best.promoted) or 'no group'} at F16, reaches top-1 {best.top1:.2%} "
            f"and KL {best.kl_mean:.5f}",
            "Raise --max-size, lower --min-top1 or raise --max-kl.")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mix(groups: dict[str, str], promoted: tuple[str, ...], base: dict[str, str]) -> dict[str, str]:
    """Overrides in llama.cpp's order, the first match winning: the promoted groups at
    F16, then the tensors kept as the source holds them."""
    out = {groups[g]: "F16" for g in promoted}
    for pattern, kind in base.items():
        out.setdefault(pattern, kind)
    return out


def suffix(min_top1: float | None, max_kl: float | None) -> str:
    """The file name's mark of the target: -top1-0.98, -kl-0.002."""
    return f"-top1-{min_top1:g}" if min_top1 is not None else f"-kl-{max_kl:g}"

