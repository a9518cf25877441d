"""Admission control: how many requests the service holds at once.

A request is admitted when fewer than `n_parallel + max_queue` are in the service: up
to `n_parallel` decode together and the rest wait their turn. Beyond that it is
refused at once (429), with a Retry-After estimated from how long requests take.
"""

from __future__ import annotations

import math
import threading
import time


class Admission:
    def __init__(self, n_parallel: int, max_queue: int) -> None:
        self.n_parallel, self.max_queue = n_parallel, max_queue
        self.in_service = 0
        self._lock = threading.Lock()
        self._mean_s = 1.0  # running mean of a request's time in the service

    @property
    def capacity(self) -> int:
        return self.n_parallel + self.max_queue

    @property
    def queued(self) -> int:
        """Requests waiting for a place in the batch."""
        return max(0, self.in_service - self.n_parallel)

    def try_enter(self) -> float | None:
        """Admit a request: its start time, or None when the service is full."""
        with self._lock:
            if self.in_service >= self.capacity:
                return None
            self.in_service += 1
            return time.monotonic()

    def leave(self, entered: float) -> None:
        with self._lock:
            self.in_service -= 1
            self._mean_s += 0.2 * ((time.monotonic() - entered) - self._mean_s)

    def retry_after_s(self) -> int:
        """Seconds until a place is likely free: one request's time per full batch ahead."""
        with self._lock:
            waves = self.in_service / max(1, self.n_parallel)
            return max(1, math.ceil(self._mean_s * min(waves, 1.0)))
