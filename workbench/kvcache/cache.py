"""The prefix cache: finds the longest cached prefix of a prompt, and decides what
is worth keeping where.

Cost-aware: it keeps measured rates of recomputing a prompt (tokens/s) and of
restoring a state from each tier (bytes/s), and uses a tier only where restoring
is predicted to beat recomputing. Entries leaving RAM go to disk on a background
thread, so a request never waits on disk I/O.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .._text import check_text
from ..errors import WorkbenchError
from .store import BadEntry, read_entry, read_info, write_entry
from .tiers import DiskFull, DiskTier, Entry, RamTier

log = logging.getLogger(__name__)

MIN_PREFIX = 32        # tokens: shorter prefixes are not worth a lookup
_EMA = 0.3             # weight of a new measurement in the running rates
_SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def entry_key(namespace: str, tokens: tuple[int, ...]) -> str:
    h = hashlib.sha256(namespace.encode())
    h.update(np.asarray(tokens, dtype=np.int32).tobytes())
    return h.hexdigest()[:40]


def check_session_name(name: str) -> str:
    check_text(name or "", "the KV session name")
    if not _SESSION_NAME.match(name or "") or ".." in name:
        raise WorkbenchError(
            f"invalid session name {name!r}",
            "Use letters, digits, '.', '_' and '-' (no path separators, no '..').")
    return name


class PrefixCache:
    def __init__(self, root: Path, *, namespace: str, model_sha256: str, llama_cpp: str,
                 ram_bytes: int, disk_bytes: int, codec: str = "zstd-shuffle",
                 notice: Callable[[str], None] = lambda s: None) -> None:
        self.namespace, self.model_sha256, self.llama_cpp = namespace, model_sha256, llama_cpp
        self.root = root
        self.notice = notice
        self._disk_off_told = False
        self.ram = RamTier(ram_bytes)
        self.disk: DiskTier | None = None
        if disk_bytes > 0:
            try:
                self.disk = DiskTier(root / namespace[:24], disk_bytes, codec,
                                     namespace=namespace, model_sha256=model_sha256,
                                     llama_cpp=llama_cpp)
            except OSError as e:
                self._disk_off(f"the KV cache's disk tier is off: {e}")
        # measured rates, with cautious priors until there are measurements
        self.prompt_tps = 200.0
        self.restore_bps = {"ram": 1e9, "disk": 2e8}
        self.stats = {"hits_ram": 0, "hits_disk": 0, "misses": 0, "tokens_saved": 0,
                      "stored": 0, "demoted": 0, "discarded": 0}
        self._lock = threading.RLock()
        self._promotion: tuple[str, Entry, Any] | None = None
        # background work: ("demote", key, entry), None to stop
        self._work: queue.Queue[tuple[str, str, Entry] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._background, name="kv-tiers",
                                        daemon=True)
        self._thread.start()

    # ---- measurements ---------------------------------------------------------

    def record_prompt(self, n_tokens: int, seconds: float) -> None:
        if n_tokens >= MIN_PREFIX and seconds > 0:
            self.prompt_tps += _EMA * (n_tokens / seconds - self.prompt_tps)

    def record_restore(self, tier: str, nbytes: int, seconds: float) -> None:
        if seconds > 0:
            self.restore_bps[tier] += _EMA * (nbytes / seconds - self.restore_bps[tier])

    def worth_it(self, tier: str, n_tokens: int, nbytes: int) -> bool:
        """Is restoring `nbytes` from `tier` predicted faster than recomputing n_tokens?"""
        return nbytes / self.restore_bps[tier] < n_tokens / self.prompt_tps

    # ---- lookup -----------------------------------------------------------------

    def _candidates(self, tokens: np.ndarray) -> list[tuple[int, str, str, Entry]]:
        out = []
        disk = self.disk
        tiers: list[Any] = [self.ram] + ([disk] if disk else [])
        for tier in tiers:
            for key, e in tier.items():
                if tier is disk and key in self.ram:
                    continue
                n = min(len(e.array), len(tokens) - 1)  # keep one token to compute logits
                if n < MIN_PREFIX:
                    continue
                diff = np.flatnonzero(e.array[:n] != tokens[:n])
                common = int(diff[0]) if diff.size else n
                if common >= MIN_PREFIX:
                    out.append((common, tier.name, key, e))
        return out

    def lookup(self, tokens: list[int]) -> tuple[int, bytes, str] | None:
        """The longest usable cached prefix: (its length, the state to restore, the tier).
        The state may hold more tokens than the prefix: the caller trims it."""
        with self._lock:
            self._promotion = None  # its buffers are about to be reused
            disk = self.disk
            if disk:
                disk.rescan()
            arr = np.asarray(tokens, dtype=np.int32)
            cands = self._candidates(arr)
            # longest prefix first; RAM before disk at the same length
            cands.sort(key=lambda c: (-c[0], c[1] != "ram"))
            for common, tier, key, e in cands:
                if not self.worth_it(tier, common, e.nbytes):
                    continue
                if tier == "disk" and disk is None:
                    continue
                state = self.ram.load(key) if tier == "ram" else disk.load(key)
                if state is None:  # gone, or discarded as damaged
                    self.stats["discarded"] += tier == "disk"
                    continue
                self.stats["hits_" + tier] += 1
                self.stats["tokens_saved"] += common
                if tier == "disk" and self.worth_it("ram", len(e.tokens), len(state)):
                    self._promotion = (key, e, state)  # done by after_request()
                return common, state, tier
            self.stats["misses"] += 1
            return None

    # ---- storing ----------------------------------------------------------------

    def after_request(self) -> None:
        """Work that must not delay a request: promote the last disk hit to RAM (its state
        still sits in the disk tier's read buffers), while the engine is otherwise idle."""
        promotion, self._promotion = self._promotion, None
        if promotion is not None:
            key, e, state = promotion
            if len(state) > self.ram.budget:
                return
            raw = state if isinstance(state, bytes) else state.tobytes()
            with self._lock:
                if key not in self.ram:
                    self._put_ram(key, Entry(e.tokens, len(raw), raw))

    def offer(self, tokens: tuple[int, ...], get_state: Callable[[], bytes]) -> bool:
        """Keep the KV state of `tokens` if restoring it would beat recomputing it."""
        if len(tokens) < MIN_PREFIX:
            return False
        key = entry_key(self.namespace, tokens)
        with self._lock:
            if key in self.ram:
                self.ram.load(key)  # touch
                return True
            state = get_state()
            if not self.worth_it("ram", len(tokens), len(state)) or len(state) > self.ram.budget:
                return False
            self._put_ram(key, Entry(tokens, len(state), state))
            self.stats["stored"] += 1
            return True

    def _put_ram(self, key: str, entry: Entry) -> None:
        for k, e in self.ram.put(key, entry):
            self._work.put(("demote", k, e))

    def _background(self) -> None:
        while True:
            item = self._work.get()
            try:
                if item is None:
                    return
                _, key, e = item
                self._demote_one(key, e)
            except Exception:  # keep the thread alive whatever one entry does
                log.exception("KV cache: background %s failed", item[0] if item else "")
            finally:
                self._work.task_done()

    def _demote_one(self, key: str, e: Entry) -> None:
        disk = self.disk
        if disk is None or e.state is None or key in disk.index:
            return
        if not self.worth_it("disk", len(e.tokens), e.nbytes):
            return
        try:
            info = disk.put(key, e.tokens, e.state)
            self.stats["demoted"] += 1
            disk.scratch.reserve(info.file_bytes, e.nbytes)
        except DiskFull as err:
            self._disk_off(f"the disk is full ({err}); the KV cache keeps to RAM")
        except OSError as err:
            log.warning("KV cache: could not write %s: %s", key, err)

    def _disk_off(self, message: str) -> None:
        """Go on with RAM only, and say so once."""
        if not self._disk_off_told:
            self._disk_off_told = True
            self.notice(message)
        self.disk = None

    def flush(self) -> None:
        """Wait until the background work queued so far (writes, promotions) is done."""
        self._work.join()

    def clear_ram(self) -> None:
        """Move every unpinned RAM entry to disk (and wait for the writes)."""
        with self._lock:
            for k, e in self.ram.clear():
                self._work.put(("demote", k, e))
        self.flush()

    def close(self) -> None:
        self.flush()
        self._work.put(None)
        self._thread.join(5)

    def occupancy(self) -> dict[str, Any]:
        return {**self.stats, "ram_bytes": self.ram.used(), "ram_budget": self.ram.budget,
                "ram_entries": len(self.ram.entries),
                "disk_bytes": self.disk.used() if self.disk else 0,
                "disk_budget": self.disk.budget if self.disk else 0,
                "disk_entries": len(self.disk.index) if self.disk else 0,
                "disk_on": self.disk is not None,
                "prompt_tps": self.prompt_tps, "restore_bps": dict(self.restore_bps)}

    # ---- named sessions -----------------------------------------------------------

    def sessions_dir(self) -> Path:
        d = self.root / "sessions"
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WorkbenchError(f"cannot use {d} for KV sessions: {e}",
                                 "Choose another folder with --kv-dir.") from None
        return d

    def save_session(self, name: str, tokens: tuple[int, ...], state: bytes) -> dict[str, Any]:
        path = self.sessions_dir() / f"{check_session_name(name)}.wbkv"
        try:
            info = write_entry(path, namespace=self.namespace, model_sha256=self.model_sha256,
                               llama_cpp=self.llama_cpp, tokens=tokens, state=state,
                               codec="zstd-shuffle", name=name)
        except OSError as e:
            raise WorkbenchError(f"could not save KV session {name!r}: {e}",
                                 f"Free some space in {path.parent}, or check its "
                                 "permissions.") from None
        return {"name": name, "tokens": len(tokens), "file_bytes": info.file_bytes}

    def load_session(self, name: str) -> dict[str, Any]:
        path = self.sessions_dir() / f"{check_session_name(name)}.wbkv"
        if not path.exists():
            raise WorkbenchError(f"no KV session named {name!r}", "List them with `%kv ls`.")
        try:
            info, state = read_entry(path, namespace=self.namespace,
                                     model_sha256=self.model_sha256, llama_cpp=self.llama_cpp)
        except BadEntry as e:
            raise WorkbenchError(f"KV session {name!r} cannot be used: {e}",
                                 "It was saved with another model, other context settings "
                                 "or another llama.cpp, or the file is damaged.") from None
        key = entry_key(self.namespace, info.tokens)
        with self._lock:
            self._put_ram(key, Entry(info.tokens, len(state), state, pinned=True))
        return {"name": name, "tokens": len(info.tokens), "file_bytes": info.file_bytes}

    def list_sessions(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted(self.sessions_dir().glob("*.wbkv")):
            try:
                info = read_info(p)
            except (BadEntry, OSError):
                continue
            out.append({"name": p.stem, "tokens": len(info.tokens), "file_bytes": info.file_bytes,
                        "created": info.created,
                        "this_model": info.model_sha256 == self.model_sha256
                        and info.namespace == self.namespace})
        return out

    def remove_session(self, name: str) -> None:
        path = self.sessions_dir() / f"{check_session_name(name)}.wbkv"
        if not path.exists():
            raise WorkbenchError(f"no KV session named {name!r}", "List them with `%kv ls`.")
        path.unlink()
