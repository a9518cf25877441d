"""Reads a GGUF file's header (metadata and tensor table) without loading it.

This is the check that runs before a file reaches llama.cpp: llama.cpp only says
"failed to load model", while this says what is wrong with the file and where.
Large arrays (the tokenizer's vocabulary) are skipped, not kept.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
_KEEP_ARRAY_MAX = 64  # arrays longer than this are summarised, not stored

# GGUF value types -> struct format (scalars only).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

# llama.cpp's file types (general.file_type) -> the quantization people name.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4",
}


@dataclass(frozen=True)
class ArraySummary:
    """A long metadata array, kept as its element type and length only."""

    element_type: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # bytes from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    file_size: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    # byte ranges of each metadata entry, for rewriting a header
    kv_spans: dict[str, tuple[int, int]] = field(repr=False, default_factory=dict)
    kv_end: int = 0
    tensor_info_end: int = 0

    @property
    def expected_size(self) -> int:
        if not self.tensors:  # a vocab-only file: no data section, so no padding to it
            return self.tensor_info_end
        end = max((t.offset + t.nbytes for t in self.tensors), default=0)
        return self.data_offset + end

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def n_params(self) -> int:
        total = 0
        for t in self.tensors:
            n = 1
            for d in t.shape:
                n *= d
            total += n
        return total

    @property
    def quantization(self) -> str:
        ft = self.metadata.get("general.file_type")
        return FILE_TYPES.get(ft, f"type {ft}") if ft is not None else "unknown"

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")


class _Truncated(Exception):
    pass


class _Absurd(ValueError):
    """A count or length no model file has: damage, told apart from truncation."""


def _n(n: int) -> str:
    """A count as the header claims it: 2^63 rather than 19 digits."""
    return f"2^{n.bit_length() - 1}" if n >= 1 << 32 and n & (n - 1) == 0 else f"{n:,}"


# Far beyond any real model (the largest have thousands of tensors, tens of thousands of
# metadata array items, strings of a few MiB), and far below what would exhaust memory.
_MOST = {"tensors": 1 << 20, "metadata entries": 1 << 20, "bytes in one string": 1 << 30,
         "items in one array": 1 << 32, "dimensions in one tensor": 8}


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def claim(self, n: int, what: str) -> int:
        """A count the header claims, refused when no model file could hold it."""
        if n > _MOST[what]:
            raise _Absurd(f"it claims {_n(n)} {what} (no model file has more than "
                          f"{_n(_MOST[what])})")
        return n

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.claim(self.take("<Q"), "bytes in one string")
        if self.pos + n > len(self.buf):
            raise _Truncated
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.claim(self.take("<Q"), "bytes in one string")
        self.pos += n
        if self.pos > len(self.buf):
            raise _Truncated

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype = self.take("<I")
            n = self.claim(self.take("<Q"), "items in one array")
            if n <= _KEEP_ARRAY_MAX:
                return [self.value(etype) for _ in range(n)]
            if etype in _SCALARS:
                self.pos += n * struct.calcsize(_SCALARS[etype])
                if self.pos > len(self.buf):
                    raise _Truncated
            else:
                for _ in range(n):
                    self.skip_array_item(etype)
            return ArraySummary(etype, n)
        raise ValueError(f"unknown metadata value type {vtype}")

    def skip_array_item(self, etype: int) -> None:
        if etype == _STRING:
            self.skip_string()
        else:
            self.value(etype)


# ggml tensor types: id -> (name, elements per block, bytes per block), as in ggml.h.
# Kept here rather than taken from the `gguf` package: importing that package imports
# sentencepiece and mistral_common where they are installed, and their C++ runtimes
# crashed llama.cpp's model loader in the same process on a CUDA machine. The worker
# reads every header, so the loader's path imports nothing it does not need.
# tests/test_models_bad_files.py checks this table against the `gguf` package's.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}


def ggml_type_name(ggml_type: int) -> str:
    entry = GGML_TYPES.get(ggml_type)
    return entry[0] if entry else f"type {ggml_type}"


def _ggml_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    entry = GGML_TYPES.get(ggml_type)
    if entry is None:
        raise ValueError(f"tensor type {ggml_type} is not one this workbench knows")
    _, block, type_size = entry
    n = 1
    for d in shape:
        n *= d
    return n // block * type_size


_REFETCH = "The download or copy was cut short: fetch or copy the file again."


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse and check a GGUF file's header; raise `ModelFileError` saying what is wrong."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileError(
            f"model file not found: {p}",
            "Check the path, or run `%load_model` with no argument for the default model.",
        )
    if p.is_dir():
        found = sorted(x.name for x in p.glob("*.gguf"))[:5]
        hint = (f"Name one of the GGUF files in it: {', '.join(found)}." if found
                else "Give the path of a .gguf file, not a folder.")
        raise ModelFileError(f"{p} is a directory, not a GGUF file", hint)
    size = p.stat().st_size
    if size == 0:
        raise ModelFileError(f"{p} is an empty file (0 bytes)", _REFETCH)
    # Read only the header: start with 16 MiB (a large vocabulary's worth), grow if needed.
    chunk = 16 << 20
    with open(p, "rb") as f:
        while True:
            f.seek(0)
            buf = f.read(min(size, chunk))
            try:
                return _parse(p, buf, size, complete=len(buf) == size)
            except _NeedMore:
                chunk *= 4


class _NeedMore(Exception):
    pass


def _parse(p: Path, buf: bytes, size: int, complete: bool) -> GGUFHeader:
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise ModelFileError(
            f"{p} is not a GGUF file: magic {magic!r}",
            "A GGUF file starts with b'GGUF'. Convert the model with llama.cpp's "
            "convert_hf_to_gguf.py, or get the .gguf variant of the model.",
        )
    r = _Reader(buf)
    r.pos = 4
    try:
        version = r.take("<I")
        if version not in SUPPORTED_VERSIONS:
            raise ModelFileError(
                f"{p} uses GGUF version {version}, which this llama.cpp cannot read "
                f"(it reads versions {', '.join(map(str, SUPPORTED_VERSIONS))})",
                "Re-convert the model with a current llama.cpp, or update the workbench.",
            )
        n_tensors = r.claim(r.take("<Q"), "tensors")
        n_kv = r.claim(r.take("<Q"), "metadata entries")
        metadata: dict[str, Any] = {}
        spans: dict[str, tuple[int, int]] = {}
        for _ in range(n_kv):
            start = r.pos
            key = r.string()
            vtype = r.take("<I")
            metadata[key] = r.value(vtype)
            spans[key] = (start, r.pos)
        kv_end = r.pos
        tensors = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.claim(r.take("<I"), "dimensions in one tensor")
            shape = tuple(r.take("<Q") for _ in range(n_dims))
            ggml_type = r.take("<I")
            offset = r.take("<Q")
            tensors.append(TensorInfo(name, shape, ggml_type, offset,
                                      _ggml_nbytes(ggml_type, shape)))
    except _Truncated:
        if not complete:
            raise _NeedMore from None
        raise ModelFileError(
            f"{p} is truncated: the file ends at byte {size:,}, inside the GGUF header",
            _REFETCH,
        ) from None
    except (ValueError, KeyError) as e:
        raise ModelFileError(f"{p} has a damaged GGUF header: {e}", _REFETCH) from None
    align = int(metadata.get("general.alignment", 32))
    data_offset = (r.pos + align - 1) // align * align
    header = GGUFHeader(p, version, size, metadata, tuple(tensors), data_offset, spans, kv_end,
                        r.pos)
    if size < header.expected_size:
        raise ModelFileError(
            f"{p} is truncated: {size:,} of {header.expected_size:,} bytes", _REFETCH
        )
    return header
