"""Placement across machines: which layers each node holds.

The local process always runs the token embeddings and sampling; its CPU (or GPU)
takes the first layers, then each node in the order they were added, the last one
with the output layer. Layers are shared in proportion to each member's measured
memory bandwidth (decoding reads every weight once per token, so a member twice as
fast takes twice the layers), capped by what its memory holds.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..device.plan import estimate_compute, estimate_host_compute
from ..errors import WorkbenchError
from ..models.inspect import ModelInspection

MiB = 2 ** 20
GiB = 2 ** 30
NODE_MARGIN = 64 * MiB     # what a node keeps free beyond its share (runtime, transfers)


@dataclass(frozen=True)
class Member:
    """One place layers can go: this machine ("local") or a node's device."""
    name: str                  # "local" or HOST:PORT
    kind: str                  # cpu | gpu
    usable: int                # bytes the plan may use there
    bandwidth_gbs: float | None
    rtt_ms: float = 0.0
    why: str = ""


@dataclass(frozen=True)
class Share:
    member: Member
    layers: range              # repeating blocks held
    output: bool               # holds the output layer
    weights: int
    kv: int
    compute: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute

    @property
    def span(self) -> str:
        """The layers held, as the tables and messages show them: "10-19 + output"."""
        layers = f"{self.layers.start}-{self.layers.stop - 1}" if len(self.layers) else ""
        if self.output:
            return f"{layers} + output" if layers else "output only"
        return layers or "none"


@dataclass(frozen=True)
class ClusterPlan:
    model: Path
    n_layers: int
    shares: tuple[Share, ...]
    settings: dict[str, Any]       # LoadConfig fields: rpc_servers, tensor_split, ...
    predicted_tps: float
    reasons: tuple[str, ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(s.member.name for s in self.shares if s.member.name != "local")

    def holder(self, endpoint: str) -> Share | None:
        return next((s for s in self.shares if s.member.name == endpoint), None)

    def rows(self) -> list[tuple[str, str, str, str, str, str]]:
        out = []
        for s in self.shares:
            bw = f"{s.member.bandwidth_gbs:,.1f} GB/s" if s.member.bandwidth_gbs else "unknown"
            out.append((s.member.name, s.member.kind, s.span, f"{s.total / MiB:,.0f} MiB",
                        f"{s.member.usable / GiB:,.2f} GiB", bw))
        return out

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("node", "device", "layers", "bytes",
                                                   "may use", "bandwidth"))
        body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>"
                                         for c in r) + "</tr>" for r in self.rows())
        notes = "".join(f"<li>{html.escape(r)}</li>" for r in self.reasons)
        return (f"<b>Cluster placement of {html.escape(self.model.name)}</b>: predicted "
                f"{self.predicted_tps:,.0f} tokens/s (bandwidth-bound)<table><tr>{head}</tr>"
                f"{body}</table><ul>{notes}</ul>")

    def __repr__(self) -> str:
        rows = [("node", "device", "layers", "bytes", "may use", "bandwidth")] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(6)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        return (f"Cluster placement of {self.model.name}: predicted {self.predicted_tps:,.0f} "
                f"tokens/s (bandwidth-bound)\n" + "\n".join(lines) +
                "".join(f"\n- {r}" for r in self.reasons))


def _apportion(n: int, weights: Sequence[float]) -> list[int]:
    """n items in proportion to weights, largest remainders first."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - counts[i],
                    reverse=True)[:n - sum(counts)]:
        counts[i] += 1
    return counts


def _share(m: ModelInspection, member: Member, layers: range, output: bool, first: bool,
           cfg: Any) -> Share:
    weights = sum(m.layer_bytes[i] for i in layers) + (m.output_offload_bytes if output else 0)
    if first and member.name == "local":
        weights += m.input_bytes
    kv = m.kv_bytes(cfg.n_ctx, cfg.type_k, cfg.type_v, layers=layers)
    fa = cfg.flash_attn == "on"
    if member.kind == "gpu" or member.name != "local":
        # a GPU, and a node's RPC server, allocate the whole compute buffer (a node's
        # memory limit counts allocations, not touched pages)
        compute = estimate_compute(m, cfg.n_ctx, cfg.n_ubatch, fa, bool(len(layers)), output)
    else:
        compute = estimate_host_compute(m, cfg.n_ctx, cfg.n_ubatch, fa, bool(len(layers)))
    return Share(member, layers, output, weights, kv, compute)


def _margin(x: Member) -> int:
    """A node keeps some memory beyond its share; this machine's budget already has its
    margin (512 MiB less than free)."""
    return 0 if x.name == "local" else NODE_MARGIN


def place(m: ModelInspection, members: Sequence[Member], cfg: Any,
          local_layers: bool = True) -> ClusterPlan:
    """Split `m`'s layers over `members` (local first). Raises when they cannot hold it.
    `local_layers=False` keeps the local CPU to the embeddings and sampling."""
    if len(members) < 2:
        raise WorkbenchError("a cluster placement needs at least one node",
                             "Add one with `%cluster add HOST:PORT`.")
    known = [x.bandwidth_gbs for x in members if x.bandwidth_gbs]
    fallback = sorted(known)[len(known) // 2] if known else 1.0
    speed = [x.bandwidth_gbs or fallback for x in members]
    reasons = []
    if len(known) < len(members):
        reasons.append(f"bandwidth unknown on {', '.join(x.name for x in members if not x.bandwidth_gbs)}"
                       f" (no rpc-worker status page): taken as {fallback:,.1f} GB/s")
    n = m.n_layers
    last = len(members) - 1
    # The most layers each member can hold, from its memory, with the output on the last.
    caps = []
    for i, x in enumerate(members):
        k, margin = 0, _margin(x)
        while k < n and _share(m, x, range(k + 1), i == last, i == 0, cfg).total + \
                margin <= x.usable:
            k += 1
        caps.append(k)
    if _share(m, members[last], range(0), True, False, cfg).total + _margin(members[last]) > \
            members[last].usable:
        caps[last] = -1
    if not local_layers:
        caps[0] = 0
        reasons.append("the local CPU holds no layers: every node runs on this machine, so "
                       "its cores are the nodes' cores, and one more process computing only "
                       "adds contention (benchmarks/cluster.py measures it)")
    if sum(max(c, 0) for c in caps) < n or caps[last] < 0:
        need = _share(m, members[0], range(n), True, True, cfg).total
        have = ", ".join(f"{x.name} {x.usable / MiB:,.0f} MiB" for x in members)
        raise WorkbenchError(
            f"{m.name} does not fit on this cluster: it needs about {need / MiB:,.0f} MiB "
            f"in all, and the members may use {have}",
            "Add a node (`%cluster add`), give nodes a larger --mem-limit, or use a smaller "
            "--n-ctx or quantization.")
    # Members over their cap keep the cap, and the rest is shared among the others, until
    # none is over (the caps hold n layers in all, so this ends).
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(members)) if i not in capped]
        shared = _apportion(n - sum(caps[i] for i in capped), [speed[i] for i in free])
        counts = [caps[i] if i in capped else shared[free.index(i)]
                  for i in range(len(members))]
        over = {i for i in free if counts[i] > caps[i]}
        if not over:
            break
        capped |= over
    shares, start = [], 0
    for i, (x, c) in enumerate(zip(members, counts)):
        shares.append(_share(m, x, range(start, start + c), i == last, i == 0, cfg))
        start += c
    # The caps assumed the first layers; where layers differ in size, check the real ones.
    over = [s for s in shares if s.total + _margin(s.member) > s.member.usable]
    if over:
        s = over[0]
        raise WorkbenchError(
            f"{m.name} does not fit on this cluster: {s.member.name} would need "
            f"{s.total / MiB:,.0f} MiB for layers {s.span} and may "
            f"use {s.member.usable / MiB:,.0f} MiB",
            "Add a node (`%cluster add`), give nodes a larger --mem-limit, or use a smaller "
            "--n-ctx or quantization.")
    local, remote = members[0], shares[1:]
    settings: dict[str, Any] = {
        "rpc_servers": tuple(s.member.name for s in remote),
        "device": local.kind,
        # Sampling and attention stay plain: the output layer lives on the last node, and
        # flash attention decoded slower on CPUs (engine/client.py).
        "flash_attn": "on" if cfg.type_v != "f16" else "off", "backend_sampling": "off",
    }
    if local.kind == "gpu":  # the local GPU is the first device, the CPU holds nothing
        settings["n_gpu_layers"] = n + 1
        settings["tensor_split"] = tuple(float(len(s.layers) + s.output) for s in shares)
    else:
        settings["n_gpu_layers"] = n + 1 - counts[0]
        settings["tensor_split"] = tuple(float(len(s.layers) + s.output) for s in remote)
    # Bandwidth-bound decode: each member reads its weights once per token, and each
    # hop to a node and back costs a round trip.
    seconds = sum(s.weights / ((x or fallback) * 1e9) for s, x in
                  zip(shares, [y.bandwidth_gbs for y in members]))
    seconds += sum(x.rtt_ms for x in members[1:]) / 1000
    reasons.append("layers in proportion to each member's memory bandwidth, capped by its "
                   "memory; the local process keeps the embeddings and samples")
    return ClusterPlan(m.path, n, tuple(shares), settings, 1 / seconds if seconds else 0.0,
                       tuple(reasons))
