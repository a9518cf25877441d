"""The on-disk format of a KV cache entry, and its codecs. No pickle.

    b"WBKV" | u16 format | u16 0 | u32 header length | header (JSON, UTF-8)
    | payload (the state bytes, compressed) | sha256 of the prefix and header (32 bytes)

The payload carries its own checksum: zstd and lz4 frames hold a content checksum
that decompression verifies, and an uncompressed payload's sha256 is in the header.
Checking the frame instead of hashing the whole file again saves a pass over it.

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
    return a[:, 0].tobytes() + a[:, 1].tobytes() + bytes(raw[n:])


def _unshuffle(data: bytes) -> np.ndarray:
    """The inverse of _shuffle, written straight into one array (no intermediate copies)."""
    n = len(data) // 2 * 2
    half = n // 2
    src = np.frombuffer(data, dtype=np.uint8)
    out = np.empty(len(data), dtype=np.uint8)
    out[0:n:2] = src[:half]
    out[1:n:2] = src[half:n]
    out[n:] = src[n:]
    return out


def compress(raw: bytes, codec: str) -> bytes:
    if codec == "zstd-shuffle":
        import zstandard

        return zstandard.ZstdCompressor(level=1, write_checksum=True).compress(_shuffle(raw))
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=1, write_checksum=True).compress(raw)
    if codec == "lz4":
        import lz4.frame

        return lz4.frame.compress(raw, content_checksum=True)
    if codec == "none":
        return raw
    raise ValueError(f"unknown codec {codec!r}")


def decompress(data: bytes | memoryview, codec: str) -> bytes | np.ndarray:
    """The raw state: bytes, or a uint8 array (both usable as a buffer). A damaged
    frame raises BadEntry."""
    try:
        return _decompress(data, codec)
    except BadEntry:
        raise
    except Exception as e:  # zstd / lz4 errors: bad checksum, cut-off frame
        raise BadEntry(f"damaged payload: {e}") from None


def _decompress(data: bytes | memoryview, codec: str) -> bytes | np.ndarray:
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


class Scratch:
    """Reusable buffers for reading entries. A restore is on the request path: fresh
    buffers of tens of MB cost a page fault per 4 KiB, more than the decompression."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, size: int) -> np.ndarray:
        buf = self._bufs.get(name)
        if buf is None or len(buf) < size:
            buf = self._bufs[name] = np.empty(size, dtype=np.uint8)
        return buf[:size]

    def reserve(self, file_bytes: int, raw_bytes: int) -> None:
        """Allocate and touch the buffers a read of this size needs (in the background,
        so that the first restore from disk is as fast as the next ones)."""
        for name, size in (("file", file_bytes), ("frame", raw_bytes), ("state", raw_bytes)):
            buf = self._bufs.get(name)
            if buf is None or len(buf) < size:
                fresh = np.empty(size, dtype=np.uint8)
                fresh.fill(0)  # touch every page now, not on the request path
                self._bufs[name] = fresh


def _decompress_into(data: memoryview, codec: str, raw_bytes: int,
                     scratch: Scratch) -> np.ndarray:
    if codec not in ("zstd", "zstd-shuffle"):
        out = np.frombuffer(_decompress(data, codec), dtype=np.uint8)
        return out
    import zstandard

    dest = scratch.get("frame", raw_bytes)
    view = memoryview(dest)
    got = 0
    with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as r:
        while got < raw_bytes:
            n = r.readinto(view[got:])
            if not n:
                break
            got += n
        if got != raw_bytes or r.read(1):
            raise BadEntry("payload size does not match the header")
    if codec == "zstd":
        return dest
    out = scratch.get("state", raw_bytes)
    n = raw_bytes // 2 * 2
    half = n // 2
    out[0:n:2] = dest[:half]
    out[1:n:2] = dest[half:n]
    out[n:] = dest[n:]
    return out


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
        "payload_sha256": hashlib.sha256(payload).hexdigest() if codec == "none" else None,
        "namespace": namespace, "model_sha256": model_sha256, "llama_cpp": llama_cpp,
        "tokens": list(tokens), "codec": codec, "raw_bytes": len(state),
        "payload_bytes": len(payload), "created": time.time(), "name": name,
    }).encode()
    head = _PREFIX.pack(MAGIC, FORMAT, 0, len(header)) + header
    digest = hashlib.sha256(head)
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
        header = json.loads(bytes(blob[_PREFIX.size:end]))
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


def read_entry(path: Path, *, namespace: str, model_sha256: str, llama_cpp: str,
               scratch: Scratch | None = None) -> tuple[EntryInfo, bytes | np.ndarray]:
    """Read, verify and decompress an entry; raise BadEntry if it must not be used.
    With `scratch`, the state returned lives in its buffers until the next read."""
    if scratch is None:
        blob = path.read_bytes()
    else:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = scratch.get("file", size)
            got = f.readinto(memoryview(buf))
        blob = memoryview(buf)[:got]
    if len(blob) < _PREFIX.size + _DIGEST:
        raise BadEntry(f"{path.name}: truncated")
    view = memoryview(blob)  # slices of a view copy nothing
    h, end = _parse_header(path, blob)
    if hashlib.sha256(view[:end]).digest() != blob[-_DIGEST:]:
        raise BadEntry(f"{path.name}: header checksum mismatch (truncated or damaged)")
    if len(blob) != end + int(h.get("payload_bytes", -1)) + _DIGEST:
        raise BadEntry(f"{path.name}: {len(blob):,} bytes, expected "
                       f"{end + int(h.get('payload_bytes', 0)) + _DIGEST:,}")
    payload = view[end:-_DIGEST]
    if h.get("codec") == "none" and hashlib.sha256(payload).hexdigest() != h.get(
            "payload_sha256"):
        raise BadEntry(f"{path.name}: payload checksum mismatch")
    if h.get("model_sha256") != model_sha256:
        raise BadEntry(f"{path.name}: made with another model")
    if h.get("llama_cpp") != llama_cpp:
        raise BadEntry(f"{path.name}: made by llama.cpp {h.get('llama_cpp')}, not {llama_cpp}")
    if h.get("namespace") != namespace:
        raise BadEntry(f"{path.name}: made with other context settings")
    try:
        if scratch is None:
            state = decompress(payload, h["codec"])
        else:
            state = _decompress_into(payload, h["codec"], int(h["raw_bytes"]), scratch)
    except BadEntry as e:
        raise BadEntry(f"{path.name}: {e}") from None
    except Exception as e:  # zstd: bad checksum, cut-off frame
        raise BadEntry(f"{path.name}: damaged payload: {e}") from None
    if len(state) != h["raw_bytes"]:
        raise BadEntry(f"{path.name}: wrong state size")
    info = EntryInfo(path, namespace, model_sha256, llama_cpp,
                     tuple(int(t) for t in h["tokens"]), len(state), len(blob),
                     float(h["created"]), h.get("name"))
    return info, state
