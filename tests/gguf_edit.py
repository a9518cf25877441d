"""Makes damaged and altered copies of a real GGUF file for the bad-input tests."""

from __future__ import annotations

import struct
from pathlib import Path

from workbench.models.gguf_file import read_header


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def with_strings(src: Path, dst: Path, overrides: dict[str, str]) -> Path:
    """Copy `src` to `dst` with some string metadata values replaced."""
    h = read_header(src)
    raw = src.read_bytes()
    out = bytearray(raw[:24])  # magic, version, tensor count, metadata count
    for key, (start, end) in h.kv_spans.items():
        if key in overrides:
            out += _string(key) + struct.pack("<I", 8) + _string(overrides[key])
        else:
            out += raw[start:end]
    out += raw[h.kv_end:h.tensor_info_end]
    align = int(h.metadata.get("general.alignment", 32))
    out += b"\0" * (-len(out) % align)
    out += raw[h.data_offset:]
    dst.write_bytes(out)
    return dst


def truncated(src: Path, dst: Path, size: int) -> Path:
    with open(src, "rb") as f:
        dst.write_bytes(f.read(size))
    return dst


def patched(src: Path, dst: Path, offset: int, data: bytes, keep: int = 4096) -> Path:
    """The first `keep` bytes of `src` with `data` written at `offset`."""
    with open(src, "rb") as f:
        head = bytearray(f.read(keep))
    head[offset:offset + len(data)] = data
    dst.write_bytes(bytes(head))
    return dst
