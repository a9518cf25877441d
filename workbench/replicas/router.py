"""The prefix-aware request router, as Ray Serve's `RequestRouter` (ray.serve.request_router).

Ray Serve makes one inside each deployment handle, in the process that holds the handle:
here the service's. It ranks the replicas for each request by `prefix.PrefixIndex.choose`
(longest cached prefix, guarded by load) and then the rest by their queues; Ray Serve
sends the request to the first that accepts it. The request carries its block hashes as
the keyword argument `prefix` (remote.py computes them).
"""

from __future__ import annotations

from typing import Any, List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from . import prefix  # a module, not its INDEX: Ray pickles this module's globals by value


class PrefixRouter(RequestRouter):
    def initialize_state(self, imbalance: int | None = None, **kwargs: Any) -> None:
        if imbalance is not None:
            prefix.INDEX.imbalance = int(imbalance)

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None,
                              ) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        hashes = _hashes(pending_request)
        by_id = {r.replica_id: r for r in candidate_replicas}
        decision = prefix.INDEX.choose(list(by_id), hashes)
        if pending_request is not None:
            pending_request.workbench_reason = decision.reason  # type: ignore[attr-defined]
        rest = sorted((r for r in candidate_replicas if r.replica_id != decision.replica),
                      key=lambda r: prefix.INDEX.in_flight[r.replica_id])
        return [[by_id[decision.replica]], rest] if rest else [[by_id[decision.replica]]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: Any,
                          result: Any) -> None:
        reason = getattr(pending_request, "workbench_reason", "least")
        prefix.INDEX.served(replica_id, _hashes(pending_request), reason)

    def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
        prefix.INDEX.done(replica_id)

    def on_replica_actor_died(self, replica_id: Any) -> None:
        prefix.INDEX.forget(replica_id)
        super().on_replica_actor_died(replica_id)

    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        prefix.INDEX.keep_only([r.replica_id for r in replicas])
        super().update_replicas(replicas)


def _hashes(pending_request: Optional[PendingRequest]) -> tuple[int, ...]:
    if pending_request is None:
        return ()
    return tuple(pending_request.kwargs.get("prefix") or ())
