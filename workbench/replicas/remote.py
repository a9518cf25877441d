"""The service's engine when its model runs in replicas: what `serve/app.py` needs of an
`Engine` (stream, model, subscribe, alive), over a Ray Serve deployment handle.

A replica that dies mid-request (its machine went away, its process was killed) fails the
request's stream with a Ray actor error. The request is then sent again, to another replica
(Ray Serve stops routing to a dead one), when that can give the client what it would have
had: a request that has streamed nothing yet; or a greedy one (temperature 0), whose text
is produced again and checked against what was already sent, which the client then does
not get twice. Anything else fails with a clear error (503). Nothing waits for ever: the
service's request timeout covers the retry.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable

from .. import errors
from ..errors import EngineCrashed, WorkbenchError
from .prefix import INDEX, block_hashes, request_text

RETRIES = 2  # sends of one request after its replica died


def _replica_died(e: BaseException) -> bool:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return isinstance(e, (ActorDiedError, ActorUnavailableError, RayActorError))


def _rebuild(err: dict[str, Any]) -> WorkbenchError:
    cls = getattr(errors, err.get("type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, WorkbenchError)):
        cls = WorkbenchError
    try:
        if cls is errors.BadText:
            return cls(err["message"], err["hint"], err.get("where") or "",
                       err.get("position") or 0)
        return cls(err["message"], err["hint"])
    except TypeError:
        return WorkbenchError(err["message"], err["hint"])


class RemoteEngine:
    def __init__(self, handle: Any, model: Any, router: str = "prefix") -> None:
        self.handle = handle.options(stream=True)
        self.model = model            # the ModelInfo of a replica (n_vocab, name, ...)
        self.router = router
        self.alive, self.pid, self.last_stats = True, None, None
        self._subscribers: list[Callable[[str, Any], None]] = []
        self._lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        # per replica: requests, prompt and cached tokens, the sum of TTFTs (the worker's)
        self.per_replica: dict[str, collections.Counter[str]] = {}
        self.live: dict[str, dict[str, Any]] = {}  # replica -> pid, host, streams now

    def subscribe(self, fn: Callable[[str, Any], None]) -> Callable[[], None]:
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn)

    def finished(self, metrics: Any, replica: str) -> None:
        with self._lock:
            self.counts["cached_tokens"] += metrics.cached_tokens
            r = self.per_replica.setdefault(replica, collections.Counter())
            r["requests"] += 1
            r["prompt_tokens"] += metrics.prompt_tokens
            r["cached_tokens"] += metrics.cached_tokens
            r["ttft_s"] += metrics.ttft_s
        for fn in list(self._subscribers):
            fn("finished", metrics)

    def bind(self, replica: dict[str, Any], change: int) -> None:
        """A stream started (+1) or stopped (-1) being served by `replica`."""
        with self._lock:
            r = self.live.setdefault(replica["replica"], {**replica, "streams": 0})
            r["streams"] = max(0, r["streams"] + change)

    def health_extra(self) -> dict[str, Any]:
        """For /health: the replicas seen serving, with their streams in progress."""
        with self._lock:
            return {"replicas": [dict(r) for r in self.live.values()]}

    def stream(self, kind: str, payload: Any, config: Any, tools: str = "") -> "RemoteStream":
        return RemoteStream(self, kind, payload, config, tools)

    def prometheus_lines(self) -> list[str]:
        """The router's decisions and hit rates, for the service's /metrics."""
        with self._lock:
            c = dict(self.counts)
            per = {r: dict(v) for r, v in self.per_replica.items()}
        snap = INDEX.snapshot()
        lines = [
            "# HELP workbench_router_decisions_total Requests routed, by reason: prefix "
            "(longest cached prefix), balance (the load guard), least (least loaded).",
            "# TYPE workbench_router_decisions_total counter"]
        lines += [f'workbench_router_decisions_total{{router="{self.router}",reason="{r}"}} {n}'
                  for r, n in sorted(snap["decisions"].items())]
        lines += [
            "# HELP workbench_router_prefix_hit_rate Of the routed requests' prefix blocks, "
            "the fraction the chosen replica was estimated to hold.",
            "# TYPE workbench_router_prefix_hit_rate gauge",
            f"workbench_router_prefix_hit_rate {snap['hit_rate'] or 0:.4f}",
            "# HELP workbench_replica_retries_total Requests sent again after their replica "
            "died.",
            "# TYPE workbench_replica_retries_total counter",
            f"workbench_replica_retries_total {c.get('retries', 0)}",
            "# HELP workbench_replica_in_flight Requests routed to each replica and not done.",
            "# TYPE workbench_replica_in_flight gauge"]
        lines += [f'workbench_replica_in_flight{{replica="{_tag(r)}"}} {n}'
                  for r, n in sorted(snap["in_flight"].items())]
        for name, key, help_ in (
                ("requests_total", "requests", "Requests each replica finished."),
                ("prompt_tokens_total", "prompt_tokens", "Prompt tokens of each replica."),
                ("cached_tokens_total", "cached_tokens", "Prompt tokens each replica restored "
                 "from its prefix cache."),
                ("ttft_seconds_sum", "ttft_s", "Each replica's time to first token, summed "
                 "(divide by requests_total)")):
            lines += [f"# HELP workbench_replica_{name} {help_}",
                      f"# TYPE workbench_replica_{name} counter"]
            lines += [f'workbench_replica_{name}{{replica="{r}"}} {v.get(key, 0):g}'
                      for r, v in sorted(per.items())]
        return lines


def _tag(replica_id: Any) -> str:
    """The short id a replica reports itself by (Ray's ReplicaID.unique_id)."""
    return getattr(replica_id, "unique_id", str(replica_id))


class RemoteStream:
    """A TokenStream's interface (async iteration, cancel_nowait, metrics, finish_reason,
    logprobs) over a replica's streamed reply."""

    def __init__(self, engine: RemoteEngine, kind: str, payload: Any, config: Any,
                 tools: str) -> None:
        self.engine, self.kind, self.payload, self.config, self.tools = \
            engine, kind, payload, config, tools
        self.prefix = block_hashes(request_text(kind, payload))
        self.metrics: Any = None
        self.finish_reason: str | None = None
        self.logprobs: tuple = ()
        self.text = ""
        self._sent: list[str] = []     # pieces given to the client
        self._replay = ""              # after a retry: text to match before giving more
        self._gen: Any = None
        self._sends = 0
        self._done = False
        self.replica: str | None = None  # the replica that finished it
        self.serving: dict[str, Any] | None = None  # the replica working on it now

    def _send(self) -> None:
        self._sends += 1
        self._gen = self.engine.handle.generate.remote(
            self.kind, self.payload, self.config, self.tools, prefix=self.prefix)

    def __aiter__(self) -> "RemoteStream":
        return self

    async def __anext__(self) -> str:
        while True:
            if self._done:
                raise StopAsyncIteration
            if self._gen is None:
                self._send()
            try:
                item = await self._gen.__anext__()
            except StopAsyncIteration:
                self._finish()
                raise EngineCrashed("a replica ended a request without its result",
                                    "Send the request again.") from None
            except Exception as e:  # noqa: BLE001: Ray's errors are many; only death retries
                if not _replica_died(e):
                    raise
                self._retry(e)
                continue
            if isinstance(item, str):
                piece = self._matched(item)
                if piece:
                    self._sent.append(piece)
                    return piece
                continue
            if "replica" in item and "result" not in item:  # who serves it: first
                self._unbind()
                self.serving = item
                self.engine.bind(item, +1)
                continue
            self._finish()
            if "error" in item:
                raise _rebuild(item["error"])
            if self._replay:  # the retry ended before reaching what was sent
                raise self._diverged()
            result = item["result"]
            self.metrics, self.finish_reason = result["metrics"], result["finish_reason"]
            self.logprobs, self.replica = result["logprobs"], result["replica"]
            self.text = "".join(self._sent)
            if self.metrics is not None:
                self.engine.finished(self.metrics, self.replica)

    def _retry(self, error: BaseException) -> None:
        greedy = getattr(self.config, "temperature", 1.0) == 0
        self._unbind()
        if self._sends > RETRIES or (self._sent and not greedy):
            self._finish()
            raise EngineCrashed(
                "the replica serving this request stopped" +
                (" after it had streamed part of the answer" if self._sent else ""),
                "Send the request again: the service goes on with its other replicas. "
                "(A greedy request, temperature 0, is resumed by itself.)") from error
        self.engine.counts["retries"] += 1
        self._replay = "".join(self._sent)
        self._gen = None

    def _matched(self, piece: str) -> str:
        """After a retry, the part of `piece` beyond the text the client already has."""
        if not self._replay:
            return piece
        n = min(len(piece), len(self._replay))
        if piece[:n] != self._replay[:n]:
            raise self._diverged()
        self._replay = self._replay[n:]
        return piece[n:]

    def _diverged(self) -> EngineCrashed:
        self.cancel_nowait()
        self._finish()
        return EngineCrashed("the replica serving this request stopped, and the replica "
                             "that took it over produced different text",
                             "Send the request again.")

    def _finish(self) -> None:
        self._done = True
        self._unbind()

    def _unbind(self) -> None:
        if self.serving is not None:
            self.engine.bind(self.serving, -1)
            self.serving = None

    def cancel_nowait(self) -> None:
        if self._gen is not None and not self._done:
            self._gen.cancel()
        self._finish()
