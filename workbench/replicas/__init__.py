"""Serving a whole class: replicas of the engine on Ray Serve behind the workbench's own
OpenAI-compatible service, with a prefix-aware router and rolling model updates.

    prefix.py   which replica probably holds a request's prefix; the routing decision
    router.py   that decision as Ray Serve's RequestRouter
    replica.py  one replica: an engine, its machine checked (versions, model sha256)
    remote.py   the service's engine over the replicas (retries when a replica dies)
    launch.py   Ray: connect or start, deploy, roll, shut down
    service.py  `workbench serve` of a replicated folder, `workbench deploy --update`

Needs the `replicas` extra (ray[serve]).
"""
