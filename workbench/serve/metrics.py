"""The service's metrics, in Prometheus' text exposition format (version 0.0.4).

Requests, tokens and TTFT are counted here, from the service's own events. The prefix
cache's counters (`workbench_kv_cache_*`) are the worker's own, as its last stats report
(once a second) gave them; they start again from zero when the engine restarts.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time

TTFT_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_RATE_WINDOW_S = 30.0


class ServiceMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.finished: collections.Counter[str] = collections.Counter()
        self.tokens_generated = 0
        self.prompt_tokens = 0
        self.draft_tokens = self.accepted_tokens = 0  # speculative decoding
        self.ttft_counts = [0] * (len(TTFT_BUCKETS_S) + 1)
        self.ttft_sum = 0.0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS_S, seconds)] += 1
            self.ttft_sum += seconds

    def generation(self, reason: str, generated: int, prompt: int, drafted: int = 0,
                   accepted: int = 0) -> None:
        """A generation ended in the engine (finished, stopped, or cancelled), with the
        tokens speculative decoding drafted for it and of those the model accepted."""
        now = time.monotonic()
        with self._lock:
            self.finished[reason] += 1
            self.tokens_generated += generated
            self.prompt_tokens += prompt
            self.draft_tokens += drafted
            self.accepted_tokens += accepted
            self._recent.append((now, generated))
            self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - _RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last 30 s, all requests together."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / _RATE_WINDOW_S

    def render(self, *, queue_depth: int, in_flight: int, model: str,
               kv: dict | None = None, extra: list[str] | None = None) -> str:
        """`kv`: the prefix cache's occupancy and counts (`PrefixCache.occupancy()`), None
        when the cache is off. `extra`: more lines (the replicas' router, replicas/)."""
        tps = self.tokens_per_second()
        with self._lock:
            lines = [
                "# HELP workbench_requests_total HTTP requests served, by endpoint and status.",
                "# TYPE workbench_requests_total counter",
            ]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'workbench_requests_total{{endpoint="{endpoint}",'
                             f'status="{status}"}} {n}')
            lines += [
                "# HELP workbench_queue_depth Requests admitted and waiting for the batch.",
                "# TYPE workbench_queue_depth gauge",
                f"workbench_queue_depth {queue_depth}",
                "# HELP workbench_requests_in_flight Requests in the service now.",
                "# TYPE workbench_requests_in_flight gauge",
                f"workbench_requests_in_flight {in_flight}",
                "# HELP workbench_generations_total Generations ended, by finish reason.",
                "# TYPE workbench_generations_total counter",
            ]
            lines += [f'workbench_generations_total{{reason="{r}"}} {n}'
                      for r, n in sorted(self.finished.items())]
            lines += [
                "# HELP workbench_generated_tokens_total Tokens generated.",
                "# TYPE workbench_generated_tokens_total counter",
                f"workbench_generated_tokens_total {self.tokens_generated}",
                "# HELP workbench_prompt_tokens_total Prompt tokens processed.",
                "# TYPE workbench_prompt_tokens_total counter",
                f"workbench_prompt_tokens_total {self.prompt_tokens}",
                "# HELP workbench_draft_tokens_total Tokens drafted by speculative decoding "
                "and checked by the model.",
                "# TYPE workbench_draft_tokens_total counter",
                f"workbench_draft_tokens_total {self.draft_tokens}",
                "# HELP workbench_draft_accepted_tokens_total Drafted tokens the model kept.",
                "# TYPE workbench_draft_accepted_tokens_total counter",
                f"workbench_draft_accepted_tokens_total {self.accepted_tokens}",
                "# HELP workbench_tokens_per_second Generated tokens/s over the last 30 s.",
                "# TYPE workbench_tokens_per_second gauge",
                f"workbench_tokens_per_second {tps:.3f}",
                "# HELP workbench_ttft_seconds Time from request to first token.",
                "# TYPE workbench_ttft_seconds histogram",
            ]
            total = 0
            for bound, n in zip(TTFT_BUCKETS_S, self.ttft_counts):
                total += n
                lines.append(f'workbench_ttft_seconds_bucket{{le="{bound}"}} {total}')
            total += self.ttft_counts[-1]
            lines += [f'workbench_ttft_seconds_bucket{{le="+Inf"}} {total}',
                      f"workbench_ttft_seconds_sum {self.ttft_sum:.6f}",
                      f"workbench_ttft_seconds_count {total}",
                      "# HELP workbench_model_info The model the service runs.",
                      "# TYPE workbench_model_info gauge",
                      f'workbench_model_info{{model="{model}"}} 1']
        return "\n".join(lines + _kv_lines(kv) + (extra or [])) + "\n"


def _kv_lines(kv: dict | None) -> list[str]:
    lines = ["# HELP workbench_kv_cache_enabled 1 when the prefix cache of KV states is on.",
             "# TYPE workbench_kv_cache_enabled gauge",
             f"workbench_kv_cache_enabled {int(kv is not None)}"]
    if kv is None:
        return lines
    tiers = ("ram", "disk")

    def family(name: str, kind: str, help_: str, values: list[tuple[str, int]]) -> None:
        lines.extend([f"# HELP workbench_kv_cache_{name} {help_}",
                      f"# TYPE workbench_kv_cache_{name} {kind}"])
        lines.extend(f"workbench_kv_cache_{name}{labels} {value}" for labels, value in values)

    family("hits_total", "counter", "Prompts that restored a cached prefix, by tier.",
           [(f'{{tier="{t}"}}', kv.get(f"hits_{t}", 0)) for t in tiers])
    family("misses_total", "counter", "Prompts with no usable cached prefix.",
           [("", kv.get("misses", 0))])
    family("tokens_saved_total", "counter", "Prompt tokens restored, not computed.",
           [("", kv.get("tokens_saved", 0))])
    family("bytes", "gauge", "Bytes the cache holds, by tier.",
           [(f'{{tier="{t}"}}', kv.get(f"{t}_bytes", 0)) for t in tiers])
    family("budget_bytes", "gauge", "Most bytes the cache may hold, by tier (0: tier off).",
           [(f'{{tier="{t}"}}', kv.get(f"{t}_budget", 0)) for t in tiers])
    family("entries", "gauge", "Cached prefixes, by tier.",
           [(f'{{tier="{t}"}}', kv.get(f"{t}_entries", 0)) for t in tiers])
    return lines
