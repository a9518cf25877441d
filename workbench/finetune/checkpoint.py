"""Crash-safe checkpoints: safetensors files, written whole or not at all, and an
asynchronous double-buffered writer that takes the I/O wait out of the training loop.

A checkpoint is one file, `ckpt-<step>.safetensors`: the adapter's weights, the
optimizer's state and the random state as tensors; the step and the run's settings as
JSON in the header's metadata, with a sha256 of every tensor's bytes. It is written under
a temporary name, fsynced, renamed, and the folder fsynced: a crash leaves either the
whole file or none. Loading reads safetensors only: nothing is ever unpickled.

`AsyncCheckpointer.save` copies the state into whichever of two host buffers is free
and returns; a writer thread writes that buffer out. At most one write is in flight;
the loop waits only when both buffers are busy (one written, one queued).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import WorkbenchError

_NAME = re.compile(r"^ckpt-(\d{8})\.safetensors$")


def _digest(tensors: dict[str, Any]) -> str:
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer, not a copy
    return h.hexdigest()


class CheckpointStore:
    """A folder of checkpoints, newest last; keeps the last `keep`."""

    def __init__(self, folder: str | os.PathLike, keep: int = 3) -> None:
        if keep < 1:
            raise WorkbenchError(f"keep must be ≥ 1 (got {keep})", "For example keep=3.")
        self.folder = Path(folder).expanduser()
        self.keep = keep

    def paths(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _NAME.match(p.name))

    def newest(self) -> tuple[Path, dict[str, Any], dict[str, Any]] | None:
        """(path, tensors, metadata) of the newest checkpoint that reads back whole (an
        older one if it does not)."""
        for p in reversed(self.paths()):
            try:
                return (p, *self.load(p))
            except WorkbenchError:
                continue
        return None

    def latest(self) -> Path | None:
        found = self.newest()
        return found[0] if found else None

    def load(self, path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors, metadata) of a checkpoint, its digest checked."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        p = Path(path)
        try:
            data = p.read_bytes()
            tensors = load(data)
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
            info = json.loads(meta["workbench"])
        except (OSError, SafetensorError, ValueError, KeyError) as e:
            raise WorkbenchError(f"checkpoint {p.name} cannot be read: {e}",
                                 "Resume from an earlier checkpoint.") from None
        if _digest(tensors) != meta.get("sha256"):
            raise WorkbenchError(f"checkpoint {p.name} is corrupt (its digest does not match)",
                                 "Resume from an earlier checkpoint.")
        return tensors, info

    def write(self, step: int, tensors: dict[str, Any], info: dict[str, Any]) -> Path:
        """Write a checkpoint atomically; then drop all but the newest `keep`."""
        from safetensors.torch import save

        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"ckpt-{step:08d}.safetensors"
        tmp = self.folder / f".{final.name}.{os.getpid()}.tmp"
        blob = save(tensors, metadata={"workbench": json.dumps(info),
                                       "sha256": _digest(tensors)})
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(blob)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            fsync_path(self.folder)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        for old in self.paths()[:-self.keep]:
            old.unlink(missing_ok=True)
        return final

    def clean_partials(self) -> None:
        """Remove temporary files a killed writer left behind."""
        if self.folder.is_dir():
            for p in self.folder.glob(".ckpt-*.tmp"):
                p.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (so a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_into(buf: dict[str, Any], tensors: dict[str, Any]) -> None:
    """Copy `tensors` into the host buffer `buf`, reusing its tensors where they fit."""
    import torch

    on_gpu = False
    for name, t in tensors.items():
        held = buf.get(name)
        if held is None or held.shape != t.shape or held.dtype != t.dtype:
            # page-locked when the source is on a GPU, so the copies run asynchronously
            held = buf[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
        held.copy_(t.detach(), non_blocking=t.is_cuda)
        on_gpu = on_gpu or t.is_cuda
    if on_gpu:  # one wait for all the copies, not one per tensor
        torch.cuda.current_stream().synchronize()
    for name in set(buf) - set(tensors):
        del buf[name]


def _write_error(store: CheckpointStore, step: int, e: BaseException) -> WorkbenchError:
    before = [p.name for p in store.paths()]
    kept = (f"The previous checkpoint, {before[-1]}, is intact." if before
            else "No earlier checkpoint exists.")
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return WorkbenchError(f"the checkpoint at step {step} could not be written to "
                          f"{store.folder}: {why}. {kept}",
                          "Free disk space or choose a writable checkpoint folder, then resume "
                          "with resume=True.")


class AsyncCheckpointer:
    """Double-buffered, asynchronous checkpoints into a `CheckpointStore`."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._buffers: list[dict[str, Any]] = [{}, {}]
        self._busy = [False, False]
        self._queue: list[tuple[int, int, dict[str, Any]]] = []  # (buffer, step, info)
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._failed_step = 0
        self._closed = False
        self.written: list[Path] = []
        self._thread = threading.Thread(target=self._writer, name="checkpoint-writer",
                                        daemon=True)
        self._thread.start()

    def save(self, step: int, tensors: dict[str, Any], info: dict[str, Any]) -> float:
        """Copy `tensors` into a free buffer and queue it; returns the seconds blocked."""
        t0 = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: not all(self._busy) or self._error is not None)
            self._raise_if_failed()
            i = self._busy.index(False)
            self._busy[i] = True
        _copy_into(self._buffers[i], tensors)
        with self._cond:
            self._queue.append((i, step, info))
            self._cond.notify_all()
        return time.perf_counter() - t0

    def flush(self) -> None:
        """Wait until every queued checkpoint is written; raise a writer's error."""
        with self._cond:
            self._cond.wait_for(lambda: not any(self._busy) or self._error is not None)
            self._raise_if_failed()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise _write_error(self.store, self._failed_step, self._error)

    def _writer(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                i, step, info = self._queue.pop(0)
            try:
                self.written.append(self.store.write(step, self._buffers[i], info))
            except BaseException as e:  # reported to the loop at its next save or flush
                with self._cond:
                    self._error, self._failed_step = e, step
            with self._cond:
                self._busy[i] = False
                self._cond.notify_all()


class SyncCheckpointer:
    """The same interface, writing in the loop: the baseline the benchmark compares."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self.written: list[Path] = []
        self._buffer: dict[str, Any] = {}

    def save(self, step: int, tensors: dict[str, Any], info: dict[str, Any]) -> float:
        t0 = time.perf_counter()
        try:
            _copy_into(self._buffer, tensors)  # the same copy as the asynchronous path
            self.written.append(self.store.write(step, self._buffer, info))
        except OSError as e:
            raise _write_error(self.store, step, e) from None
        return time.perf_counter() - t0

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
