"""The two tiers of the prefix cache, behind one small interface.

A tier maps a key to (token ids, KV state bytes). The RAM tier keeps raw bytes under
a byte budget, least recently used first out. The disk tier keeps compressed,
checksummed files under its own budget; several engines may share its folder, so
writes are atomic renames and eviction holds a file lock.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from .store import BadEntry, EntryInfo, Scratch, read_entry, read_info, write_entry


_STALE_TMP_S = 3600.0  # a temporary file this old belongs to a writer that died


@dataclass
class Entry:
    tokens: tuple[int, ...]
    nbytes: int
    state: bytes | None = None          # RAM tier only
    pinned: bool = False                # named sessions are never evicted from RAM
    array: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.tokens, dtype=np.int32)


class Tier(Protocol):
    name: str
    budget: int

    def used(self) -> int: ...
    def items(self) -> Iterator[tuple[str, Entry]]: ...
    def load(self, key: str) -> bytes | None: ...
    def remove(self, key: str) -> None: ...


class RamTier:
    name = "ram"

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self._used = 0

    def used(self) -> int:
        return self._used

    def items(self) -> Iterator[tuple[str, Entry]]:
        return iter(list(self.entries.items()))

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def load(self, key: str) -> bytes | None:
        e = self.entries.get(key)
        if e is None:
            return None
        self.entries.move_to_end(key)
        return e.state

    def put(self, key: str, entry: Entry) -> list[tuple[str, Entry]]:
        """Add an entry; returns the entries evicted to stay within the budget."""
        self.remove(key)
        self.entries[key] = entry
        self._used += entry.nbytes
        evicted = []
        for k in list(self.entries):
            if self._used <= self.budget:
                break
            e = self.entries[k]
            if e.pinned or k == key:
                continue
            del self.entries[k]
            self._used -= e.nbytes
            evicted.append((k, e))
        return evicted

    def remove(self, key: str) -> None:
        e = self.entries.pop(key, None)
        if e is not None:
            self._used -= e.nbytes

    def clear(self) -> list[tuple[str, Entry]]:
        out = [(k, e) for k, e in self.entries.items() if not e.pinned]
        for k, _ in out:
            self.remove(k)
        return out


class DiskFull(Exception):
    pass


class DiskTier:
    name = "disk"

    def __init__(self, folder: Path, budget: int, codec: str, *, namespace: str,
                 model_sha256: str, llama_cpp: str) -> None:
        self.folder = folder
        self.budget = budget
        self.codec = codec
        self.namespace, self.model_sha256, self.llama_cpp = namespace, model_sha256, llama_cpp
        self.index: dict[str, Entry] = {}
        self.scratch = Scratch()
        self.discarded: list[str] = []  # why files were thrown away (for tests and logs)
        folder.mkdir(parents=True, exist_ok=True)
        self._scanned_mtime = 0.0
        self.rescan()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.wbkv"

    def used(self) -> int:
        return sum(e.nbytes for e in list(self.index.values()))

    def items(self) -> Iterator[tuple[str, Entry]]:
        return iter(list(self.index.items()))

    def _discard(self, path: Path, why: str) -> None:
        self.discarded.append(why)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.index.pop(path.stem, None)

    def rescan(self) -> None:
        """Re-read the headers of the folder's files (another engine may have written)."""
        try:
            mtime = self.folder.stat().st_mtime
        except FileNotFoundError:
            return
        if mtime == self._scanned_mtime:
            return
        self._scanned_mtime = mtime
        seen = set()
        for p in self.folder.glob(".*.tmp"):  # left by a writer that died mid-write
            with contextlib.suppress(OSError):
                if time.time() - p.stat().st_mtime > _STALE_TMP_S:
                    p.unlink()
        for p in self.folder.glob("*.wbkv"):
            seen.add(p.stem)
            if p.stem in self.index:
                continue
            try:
                info = read_info(p)
            except OSError:  # gone, or not ours to read
                continue
            except BadEntry as e:
                self._discard(p, str(e))
                continue
            if (info.model_sha256, info.llama_cpp, info.namespace) != \
                    (self.model_sha256, self.llama_cpp, self.namespace):
                self._discard(p, f"{p.name}: made with another model or llama.cpp")
                continue
            self.index[p.stem] = Entry(info.tokens, info.file_bytes)
        for k in set(self.index) - seen:
            self.index.pop(k, None)

    def load(self, key: str, scratch: bool = True) -> bytes | np.ndarray | None:
        """The entry's state. With `scratch` (the request path) it lives in reused buffers
        and is valid until the next load; without, it is a fresh copy."""
        p = self.path(key)
        try:
            _, state = read_entry(p, namespace=self.namespace, model_sha256=self.model_sha256,
                                  llama_cpp=self.llama_cpp,
                                  scratch=self.scratch if scratch else None)
        except OSError:  # gone (another engine evicted it), or unreadable
            self.index.pop(key, None)
            return None
        except BadEntry as e:
            self._discard(p, str(e))
            return None
        with contextlib.suppress(OSError):
            os.utime(p)  # recently used: evicted last
        return state

    def put(self, key: str, tokens: tuple[int, ...], state: bytes) -> EntryInfo:
        try:
            info = write_entry(self.path(key), namespace=self.namespace,
                               model_sha256=self.model_sha256, llama_cpp=self.llama_cpp,
                               tokens=tokens, state=state, codec=self.codec)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(str(e)) from None
            raise
        self.index[key] = Entry(tuple(tokens), info.file_bytes)
        self.enforce_budget()
        return info

    def remove(self, key: str) -> None:
        self._discard(self.path(key), "removed")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def enforce_budget(self) -> list[str]:
        """Delete the least recently used files until the folder fits its budget."""
        removed = []
        with self._locked():
            files = []
            for p in self.folder.glob("*.wbkv"):
                with contextlib.suppress(FileNotFoundError):
                    st = p.stat()
                    files.append((st.st_mtime, st.st_size, p))
            total = sum(s for _, s, _ in files)
            for _, size, p in sorted(files):
                if total <= self.budget:
                    break
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                self.index.pop(p.stem, None)
                total -= size
                removed.append(p.stem)
        return removed
