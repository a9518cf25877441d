"""The on-disk format of a KV cache entry, and its codecs. No pickle.

    b"WBKV" | u16 format | u16 0 | u32 header length | header (JSON, UTF-8)
    | payload (the state bytes, compressed) | sha256 of everything before it (32 bytes)

The header names the model (sha256), the cache namespace, the llama.cpp version and
the token ids whose KV state the payload holds. Any mismatch, a short file or a
flipped bit makes `read_entry` raise `BadEntry`: the caller discards the file and
recomputes, and the bytes never reach llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"WBKV"
FORMAT = 1
_PREFIX = struct.Struct("<4sHHI")
_DIGEST = 32


class BadEntry(Exception):
    """A cache file that must not be used (damaged, or for another model or build)."""


# ---- codecs -------------------------------------------------------------------
# KV states are float16 (or quantized blocks). Splitting the low and high bytes of each
# 16-bit word apart ("shuffle") lets zstd find the redundancy in signs and exponents.

def _shuffle(raw: bytes) -> bytes:
    n = len(raw) // 2 * 2
    a = np.frombuffer(raw, dtype=np.uint8, count=n).reshape(-1, 2)
    return a[:, 0].tobytes() + a[:, 1].tobytes() + raw[n:]


def _unshuffle(data: bytes) -> bytes:
    n = len(data) // 2 * 2
    half = n // 2
    a = np.empty((half, 2), dtype=np.uint8)
    a[:, 0] = np.frombuffer(data, dtype=np.uint8, count=half)
    a[:, 1] = np.frombuffer(data, dtype=np.uint8, count=half, offset=half)
    return a.tobytes() + data[n:]


def compress(raw: bytes, codec: str) -> bytes:
    if codec == "zstd-shuffle":
        import zstandard

        return zstandard.ZstdCompressor(level=1).compress(_shuffle(raw))
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=1).compress(raw)
    if codec == "lz4":
        import lz4.frame

        return lz4.frame.compress(raw)
    if codec == "none":
        return raw
    raise ValueError(f"unknown codec {codec!r}")


def decompress(data: bytes, codec: str) -> bytes:
    if codec == "zstd-shuffle":
        import zstandard

        return _unshuffle(zstandard.ZstdDecompressor().decompress(data))
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompress(data)
    if codec == "lz4":
        import lz4.frame

        return lz4.frame.decompress(data)
    if codec == "none":
        return data
    raise BadEntry(f"unknown codec {codec!r}")


CODECS = ("zstd-shuffle", "zstd", "lz4", "none")


# ---- entries ------------------------------------------------------------------

@dataclass(frozen=True)
class EntryInfo:
    path: Path
    namespace: str
    model_sha256: str
    llama_cpp: str
    tokens: tuple[int, ...]
    raw_bytes: int
    file_bytes: int
    created: float
    name: str | None = None


def write_entry(path: Path, *, namespace: str, model_sha256: str, llama_cpp: str,
                tokens: tuple[int, ...], state: bytes, codec: str,
                name: str | None = None) -> EntryInfo:
    """Write an entry atomically: a temporary file, fsync, then rename."""
    payload = compress(state, codec)
    header = json.dumps({
        "namespace": namespace, "model_sha256": model_sha256, "llama_cpp": llama_cpp,
        "tokens": list(tokens), "codec": codec, "raw_bytes": len(state),
        "payload_bytes": len(payload), "created": time.time(), "name": name,
    }).encode()
    head = _PREFIX.pack(MAGIC, FORMAT, 0, len(header)) + header
    digest = hashlib.sha256(head)
    digest.update(payload)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(payload)
            f.write(digest.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return EntryInfo(path, namespace, model_sha256, llama_cpp, tuple(tokens), len(state),
                     len(head) + len(payload) + _DIGEST, time.time(), name)


def _parse_header(path: Path, blob: bytes) -> tuple[dict[str, Any], int]:
    if len(blob) < _PREFIX.size:
        raise BadEntry(f"{path.name}: truncated")
    magic, fmt, _, hlen = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise BadEntry(f"{path.name}: not a KV cache file")
    if fmt != FORMAT:
        raise BadEntry(f"{path.name}: format {fmt}, expected {FORMAT}")
    end = _PREFIX.size + hlen
    if len(blob) < end:
        raise BadEntry(f"{path.name}: truncated header")
    try:
        header = json.loads(blob[_PREFIX.size:end])
    except ValueError:
        raise BadEntry(f"{path.name}: damaged header") from None
    return header, end


def read_info(path: Path) -> EntryInfo:
    """Read only the header (for the index); the checksum is verified on load."""
    with open(path, "rb") as f:
        first = f.read(_PREFIX.size)
        if len(first) == _PREFIX.size and first[:4] == MAGIC:
            first += f.read(_PREFIX.unpack(first)[3])
        size = os.fstat(f.fileno()).st_size
    h, end = _parse_header(path, first)
    try:
        tokens = tuple(int(t) for t in h["tokens"])
        if size != end + int(h["payload_bytes"]) + _DIGEST:
            raise BadEntry(f"{path.name}: {size:,} bytes, expected "
                           f"{end + int(h['payload_bytes']) + _DIGEST:,}")
        return EntryInfo(path, str(h["namespace"]), str(h["model_sha256"]),
                         str(h["llama_cpp"]), tokens, int(h["raw_bytes"]), size,
                         float(h["created"]), h.get("name"))
    except (KeyError, TypeError, ValueError):
        raise BadEntry(f"{path.name}: damaged header") from None


def read_entry(path: Path, *, namespace: str, model_sha256: str,
               llama_cpp: str) -> tuple[EntryInfo, bytes]:
    """Read, verify and decompress an entry; raise BadEntry if it must not be used."""
    blob = path.read_bytes()
    if len(blob) < _PREFIX.size + _DIGEST:
        raise BadEntry(f"{path.name}: truncated")
    if hashlib.sha256(blob[:-_DIGEST]).digest() != blob[-_DIGEST:]:
        raise BadEntry(f"{path.name}: checksum mismatch (truncated or damaged)")
    h, end = _parse_header(path, blob)
    if h.get("model_sha256") != model_sha256:
        raise BadEntry(f"{path.name}: made with another model")
    if h.get("llama_cpp") != llama_cpp:
        raise BadEntry(f"{path.name}: made by llama.cpp {h.get('llama_cpp')}, not {llama_cpp}")
    if h.get("namespace") != namespace:
        raise BadEntry(f"{path.name}: made with other context settings")
    state = decompress(blob[end:-_DIGEST], h["codec"])
    if len(state) != h["raw_bytes"]:
        raise BadEntry(f"{path.name}: wrong state size")
    info = EntryInfo(path, namespace, model_sha256, llama_cpp,
                     tuple(int(t) for t in h["tokens"]), len(state), len(blob),
                     float(h["created"]), h.get("name"))
    return info, state
