"""`workbench.quantize`: llama.cpp's own quantizer (`llama_model_quantize`), in a child
process, with a progress bar, writing next to the source under a clear name.

The file is written under a temporary name and renamed when whole: a failure (a full
disk, a crash) leaves no partial file.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import _paths
from ..errors import WorkbenchError
from ..models.gguf_file import read_header
from .target import CHECK_TOKENS, check_targets, suffix

# name -> llama_ftype (llama.h); int8 and int4 are the names the workbench teaches with
QUANT_TYPES: dict[str, int] = {"F16": 1, "Q8_0": 7, "Q6_K": 18, "Q5_K_M": 17, "Q4_K_M": 15,
                               "Q4_0": 2, "Q2_K": 10, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9}
ALIASES = {"INT8": "Q8_0", "INT4": "Q4_K_M"}
# ggml tensor types a per-tensor override may name (models/gguf_file.GGML_TYPES has the
# ids): the ones llama.cpp's quantizer writes without an importance matrix.
OVERRIDE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1",
                  "Q4_0", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS")
_PROGRESS = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")
_QUANT_SUFFIX = re.compile(r"[.-](F32|F16|BF16|Q\d_K(_[SML])?|Q\d_\d|IQ\w+)$", re.IGNORECASE)


@dataclass(frozen=True)
class Quantized:
    """What `quantize` wrote."""
    path: Path
    source: Path
    quant: str
    bytes: int
    source_bytes: int
    seconds: float
    pruned_layers: tuple[int, ...] = ()
    ranking: Any = None  # prune.LayerRanking, when the pruned layers were ranked

    def _repr_html_(self) -> str:
        return f"<pre>{self!r}</pre>"

    def __repr__(self) -> str:
        pruned = f", layers {list(self.pruned_layers)} removed" if self.pruned_layers else ""
        return (f"{self.quant}{pruned}: {self.path} ({self.bytes / 2**20:,.1f} MiB, "
                f"{self.bytes / self.source_bytes:.2f}× the source's "
                f"{self.source_bytes / 2**20:,.1f} MiB) in {self.seconds:.1f} s")


def quant_name(to: str) -> str:
    """The canonical name of a quantization ("int8" -> "Q8_0"), or a clear error."""
    name = ALIASES.get(to.upper(), to.upper())
    if name not in QUANT_TYPES:
        raise WorkbenchError(f"unknown quantization {to!r}",
                             "Valid: int8 (= Q8_0), int4 (= Q4_K_M), " + ", ".join(QUANT_TYPES)
                             + ".")
    return name


def tensor_type(name: str, where: str) -> str:
    """The canonical name of a type a tensor may be given, or a clear error naming
    `where` it was asked for."""
    kind = name.upper()
    if kind not in OVERRIDE_TYPES:
        raise WorkbenchError(f"unknown tensor type {name!r} {where}",
                             "Valid tensor types: " + ", ".join(OVERRIDE_TYPES) + ".")
    return kind


def tensor_overrides(overrides: Any) -> tuple[tuple[str, int], ...]:
    """Check per-tensor type overrides ({regex: type} or (regex, type) pairs, the first
    match wins, as in llama.cpp) and give them as (pattern, ggml type id)."""
    from ..models.gguf_file import GGML_TYPES

    ids = {name: i for i, (name, _, _) in GGML_TYPES.items()}
    pairs = list(overrides.items()) if isinstance(overrides, dict) else list(overrides or ())
    out = []
    for item in pairs:
        if not (isinstance(item, (tuple, list)) and len(item) == 2
                and all(isinstance(x, str) for x in item)):
            raise WorkbenchError(f"a tensor type override must be (pattern, type), got {item!r}",
                                 "For example {r'blk\\.(0|1)\\.': 'Q4_0'}.")
        pattern, name = item
        kind = tensor_type(name, f"in the override for {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise WorkbenchError(f"the override pattern {pattern!r} is not a valid regular "
                                 f"expression ({e})", "Patterns match tensor names such as "
                                 "blk.3.ffn_down.weight.") from None
        out.append((pattern, ids[kind]))
    return tuple(out)


def default_output(src: Path, quant: str, suffix: str = "") -> Path:
    """`<name>.<QUANT>.gguf` beside the source, or in ~/.workbench/models when the
    source lives inside an installed package (the bundled default model)."""
    stem = _QUANT_SUFFIX.sub("", src.name.removesuffix(".gguf"))
    folder = src.parent
    if "site-packages" in folder.parts or "dist-packages" in folder.parts \
            or not os.access(folder, os.W_OK):
        folder = _paths.home() / "models"
        folder.mkdir(parents=True, exist_ok=True)  # the workbench's own folder
    return folder / f"{stem}{suffix}.{quant}.gguf"


def temporary_output(src: Path, dst: Path, overwrite: bool) -> Path:
    """The temporary name `dst` is written under, after checking that `dst` may be
    written: not the source, not an existing file (unless `overwrite`), in a folder that
    exists and takes a file now (so an unwritable one is named before any work)."""
    if dst.resolve() == src.resolve():
        raise WorkbenchError("the output would overwrite the source", "Give another output.")
    if dst.exists() and not overwrite:
        raise WorkbenchError(f"{dst} exists", "Pass overwrite=True (--overwrite) to replace it.")
    if not dst.parent.is_dir():
        raise WorkbenchError(f"the output folder {dst.parent} does not exist",
                             "Create it first, or give another output path.")
    _paths.check_writable(dst.parent, "Give an output path in a folder you can write to.")
    return dst.with_name(f".{dst.name}.{os.getpid()}.partial")


def quantize(model: str | os.PathLike, to: str = "int8", out: str | os.PathLike | None = None,
             *, overwrite: bool = False, prune_layers: Sequence[int] = (),
             threads: int | None = None, same_type: bool = False, ranking: Any = None,
             imatrix: bool | str = False, overrides: Any = None,
             min_top1: float | None = None, max_kl: float | None = None,
             max_size: float | None = None, check_tokens: int | None = None, progress: Callable[[float], None] | None = None) -> Any:
    r"""Quantize `model` (a path) to `to`. `prune_layers`: layer indices to drop (the
    rest are renumbered). `out` defaults to `<name>.<QUANT>.gguf` beside the source.
    `same_type`: copy the tensors as they are (with `prune_layers`). `imatrix`: True (the
    calibration text) or a text: measure an importance matrix on it and quantize with it.
    `overrides`: per-tensor types, {regex on the tensor name: type}, e.g.
    {r"blk\.([0-9]|1[0-4])\.": "Q4_0"} (llama.cpp's --tensor-type). `min_top1` / `max_kl`:
    choose per-tensor types until top-1 agreement / KL against the model's F16 copy holds
    on held-out text (compress/target.py); returns a TargetedQuantization."""
    from .. import _child

    src = Path(model).expanduser()
    tt = tensor_overrides(overrides)
    targeted = min_top1 is not None or max_kl is not None
    check_tokens = CHECK_TOKENS if check_tokens is None else check_tokens
    check_targets(min_top1, max_kl, max_size, check_tokens)
    if targeted and (tt or prune_layers or imatrix or same_type):
        raise WorkbenchError("a quality target chooses the tensor types itself",
                             "Leave out overrides, prune_layers, imatrix and same_type with "
                             "min_top1 / max_kl.")
    header = read_header(src)  # a clear error for a missing or damaged file
    quant = header.quantization.upper() if same_type else quant_name(to)
    n_layers = int(header.arch_value("block_count", 0))
    pruned = tuple(sorted(set(int(i) for i in prune_layers)))
    if pruned:
        bad = [i for i in pruned if not 0 <= i < n_layers]
        if bad:
            raise WorkbenchError(f"layer {bad[0]} is out of range: {src.name} has layers "
                                 f"0 to {n_layers - 1}", "Give layer indices in that range.")
        if len(pruned) >= n_layers:
            raise WorkbenchError(f"pruning {len(pruned)} layers would remove every layer of "
                                 f"{src.name} ({n_layers})", "Keep at least one layer.")
    elif header.quantization.upper() == quant and not tt and not targeted:
        raise WorkbenchError(f"{src.name} is already {quant}",
                             "Pick another type, or copy the file if a copy is what you want.")
    dst = Path(out).expanduser() if out else default_output(
        src, quant, (f"-pruned{len(pruned)}" if pruned else "") + ("-imatrix" if imatrix else "")
        + ("-mixed" if tt else "") + (suffix(min_top1, max_kl) if targeted else ""))
    tmp = temporary_output(src, dst, overwrite)
    t0 = time.monotonic()
    if targeted:
        from .target import quantize_to_target

        try:
            result = quantize_to_target(quantize, src, quant, dst, tmp, min_top1=min_top1, max_kl=max_kl,
                                        max_size=max_size, threads=threads,
                                        check_tokens=check_tokens, progress=progress)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        return result
    importance = None
    if imatrix:
        from .._cpu import idle_cores
        from .imatrix import importance_child
        from .text import calibration_text

        text = imatrix if isinstance(imatrix, str) else calibration_text(20000)
        importance = _child.run(importance_child, (str(src), text, 1024,
                                                   threads or idle_cores().idle),
                                f"measuring the importance matrix of {src.name}")
    try:
        _child.run(_quantize_child, (str(src), str(tmp), QUANT_TYPES.get(quant, 0), pruned,
                                     threads or 0, same_type, importance, tt),
                   f"quantizing {src.name} to {quant}", progress)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return Quantized(dst, src, quant, dst.stat().st_size, src.stat().st_size,
                     time.monotonic() - t0, pruned, ranking)


def _quantize_child(src: str, tmp: str, ftype: int, pruned: tuple[int, ...], threads: int,
                    same_type: bool, importance: dict[str, Any] | None,
                    overrides: tuple[tuple[str, int], ...], report: Any) -> None:
    import ctypes

    import llama_cpp as L

    errors: list[str] = []

    def on_log(level: int, text: bytes, _user: object) -> None:
        s = text.decode("utf-8", errors="replace")
        m = _PROGRESS.search(s)
        if m:
            done, total = int(m.group(1)), max(1, int(m.group(2)))
            report.progress(done / total, done, total, "tensors")
        if level == 4 or "failed" in s or "error" in s.lower():  # GGML_LOG_LEVEL_ERROR
            errors.append(s.strip())

    cb = L.llama_log_callback(on_log)
    L.llama_log_set(cb, None)
    L.llama_backend_init()
    params = L.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True  # the default model is itself quantized (Q4_1)
    params.nthread = threads
    params.only_copy = same_type
    keep: Any = None
    if pruned:
        keep = (ctypes.c_int32 * (len(pruned) + 1))(*pruned, -1)
        params.prune_layers = ctypes.cast(keep, ctypes.POINTER(ctypes.c_int32))
    tt: Any = None
    if overrides:
        tt = (L.llama_model_tensor_override * (len(overrides) + 1))(
            *[L.llama_model_tensor_override(p.encode(), t) for p, t in overrides],
            L.llama_model_tensor_override(None, 0))
        params.tt_overrides = ctypes.cast(tt, ctypes.POINTER(L.llama_model_tensor_override))
    held: Any = None
    if importance:
        from .imatrix import as_params

        entries, held = as_params(importance)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(L.llama_model_imatrix_data))
    status = L.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    del held, tt  # the importance data and the overrides had to live until here
    if status != 0:
        why = next((e for e in reversed(errors) if "failed to quantize" in e),
                   errors[-1] if errors else f"status {status}")
        disk = any(w in why.lower() for w in ("no space", "file too large", "quota"))
        raise WorkbenchError(
            f"llama.cpp could not quantize {Path(src).name}: {why}",
            "The disk is full: free some space and run it again." if disk else
            "No file was written. Check the source model with workbench.inspect_model().")

