"""What each replica has probably cached, and the routing decision made from it.

A request's text (its chat messages, or its prompt) is cut into blocks of `BLOCK` characters
and each block is hashed together with the hash before it, so two requests share the first
k hashes exactly when their first k blocks are equal. A replica is credited with every
block of the requests it was sent (its prefix cache holds what it served, most recent
first), up to `capacity` blocks: an approximation of its cache, kept where the router runs,
with no call to the replica. Text rather than tokens: the router needs no tokenizer, and a
prefix of the text is a prefix of the tokens but for the last block.

`choose` is the policy: the replica holding the longest prefix of the request, unless its
queue is longer than the least loaded one's by more than `imbalance` requests; then the
least loaded (the load guard: without it, a popular prefix piles its requests onto one
replica while the other idles). This module has no Ray in it; `router.py` puts it behind
Ray Serve's request-router interface.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import threading
from typing import Any, Hashable, Sequence

BLOCK = 128            # characters per block (about 30 tokens of English)
CAPACITY = 1 << 14     # blocks remembered per replica (2 M characters)
IMBALANCE = 4          # requests; beyond this difference in queues, balance load


def request_text(kind: str, payload: Any) -> str:
    """The text a request's prompt is built from, in order: for a chat, each message's
    role and content (content parts as JSON); for a completion, the prompt."""
    if kind != "chat":
        return payload if isinstance(payload, str) else json.dumps(payload)
    parts = []
    for m in payload:
        content = m.get("content") if isinstance(m, dict) else m
        parts.append(f"{m.get('role', '') if isinstance(m, dict) else ''}\n"
                     f"{content if isinstance(content, str) else json.dumps(content)}\x1e")
    return "".join(parts)


def block_hashes(text: str, block: int = BLOCK) -> tuple[int, ...]:
    """Chained hashes of the text's whole blocks (a last partial block is left out: it is
    not a shared prefix yet)."""
    out, h = [], b""
    for i in range(0, len(text) - block + 1, block):
        h = hashlib.blake2b(h + text[i:i + block].encode("utf-8", "surrogatepass"),
                            digest_size=8).digest()
        out.append(int.from_bytes(h, "little"))
    return tuple(out)


@dataclasses.dataclass
class Decision:
    replica: Hashable
    reason: str        # "prefix" (longest cached prefix), "balance" (the load guard), "least"
    matched: int       # blocks of the request the chosen replica holds
    blocks: int        # blocks in the request


class PrefixIndex:
    """Blocks per replica (least recently used dropped first), in-flight requests per
    replica, and the counts of decisions. Thread-safe: Ray Serve's router calls it from
    its own event loop, the service's /metrics from another thread."""

    def __init__(self, capacity: int = CAPACITY, imbalance: int = IMBALANCE) -> None:
        self.capacity, self.imbalance = capacity, imbalance
        self._blocks: dict[Hashable, collections.OrderedDict[int, None]] = {}
        self.in_flight: collections.Counter[Hashable] = collections.Counter()
        self.decisions: collections.Counter[str] = collections.Counter()
        self.matched_blocks = self.request_blocks = 0
        self._turn = 0
        self._lock = threading.Lock()

    def matched(self, replica: Hashable, hashes: Sequence[int]) -> int:
        held = self._blocks.get(replica)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def choose(self, replicas: Sequence[Hashable], hashes: Sequence[int]) -> Decision:
        with self._lock:
            load = {r: self.in_flight[r] for r in replicas}
            self._turn += 1  # among equally loaded replicas, in turn
            least = min(replicas, key=lambda r: (load[r], -self.matched(r, hashes),
                                                 (replicas.index(r) - self._turn) % len(replicas)))
            best = max(replicas, key=lambda r: (self.matched(r, hashes), -load[r]))
            m = self.matched(best, hashes)
            if m == 0:
                d = Decision(least, "least", self.matched(least, hashes), len(hashes))
            elif load[best] - load[least] > self.imbalance:
                d = Decision(least, "balance", self.matched(least, hashes), len(hashes))
            else:
                d = Decision(best, "prefix", m, len(hashes))
            return d

    def served(self, replica: Hashable, hashes: Sequence[int], reason: str) -> None:
        """`replica` was sent a request with these blocks, chosen for `reason` (a
        replica that refused it sends it on to the next choice): it will hold them."""
        with self._lock:
            self.decisions[reason] += 1
            self.matched_blocks += self.matched(replica, hashes)
            self.request_blocks += len(hashes)
            held = self._blocks.setdefault(replica, collections.OrderedDict())
            for h in hashes:
                held[h] = None
                held.move_to_end(h)
            while len(held) > self.capacity:
                held.popitem(last=False)
            self.in_flight[replica] += 1

    def done(self, replica: Hashable) -> None:
        with self._lock:
            if self.in_flight[replica] > 0:
                self.in_flight[replica] -= 1

    def forget(self, replica: Hashable) -> None:
        """A replica that is gone: its cache went with it."""
        with self._lock:
            self._blocks.pop(replica, None)
            self.in_flight.pop(replica, None)

    def keep_only(self, replicas: Sequence[Hashable]) -> None:
        with self._lock:
            for r in [r for r in self._blocks if r not in replicas]:
                self._blocks.pop(r, None)
                self.in_flight.pop(r, None)

    def hit_rate(self) -> float | None:
        """Of the blocks of all routed requests, the fraction the chosen replica held."""
        return self.matched_blocks / self.request_blocks if self.request_blocks else None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"decisions": dict(self.decisions), "hit_rate": self.hit_rate(),
                    "matched_blocks": self.matched_blocks,
                    "request_blocks": self.request_blocks,
                    "in_flight": {str(r): n for r, n in self.in_flight.items()}}


# The index of the router in this process (Ray Serve makes the router inside the
# deployment handle; the service reads the same index for /metrics).
INDEX = PrefixIndex()
