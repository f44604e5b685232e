"""The plan applier: a pass's decisions applied to the state as it is now, re-checked.

A pass decides on a snapshot taken at some revision; by the time its plan comes back the
state may have moved (an allocation cancelled, a node cordoned, its GPUs taken by a
request placed meanwhile, a quota lowered). As Nomad's plan applier does, each decision
is checked against the current state before it is applied, and what no longer holds is
refused and handed back, so the next pass decides again. The server's engine and the
simulator both apply plans through here, so they cannot drift apart.

Pure and synchronous: it changes the allocations and the `ClusterState` indexes it is
given and reports what changed; writing events is the caller's job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rmgrpc.model import Allocation, AllocationState, GpuHealth, Placement
from rmgrpc.scheduler.snapshot import Decisions, PendingStatus, SchedulerConfig
from rmgrpc.state import ClusterState

QuotaCheck = Callable[[Allocation, Sequence[Placement]], bool]


@dataclass(slots=True)
class Applied:
    placed: list[Allocation] = field(default_factory=list)
    # Victims now PREEMPTED (holding their capacity until their grace ends).
    preempted: list[Allocation] = field(default_factory=list)
    # Admissions that no longer held at apply time: (allocation id, why).
    refused: list[tuple[str, str]] = field(default_factory=list)
    # Allocations still PENDING, with the status the pass gave them.
    statuses: dict[str, PendingStatus] = field(default_factory=dict)


def place(
    state: ClusterState, a: Allocation, placements: tuple[Placement, ...], now: float
) -> None:
    """PENDING → ALLOCATED on `placements`; the state now shows it holding them."""
    a.state = AllocationState.ALLOCATED
    a.placements = placements
    a.allocate_time = now
    a.lease_expire_time = now + a.lease_seconds if a.lease_seconds else None
    a.max_end_time = now + a.max_duration_seconds if a.max_duration_seconds else None
    a.pending_reason = ""
    a.queue_position = 0
    state.hold(a)


def preempt(
    state: ClusterState,
    victim: Allocation,
    now: float,
    grace: float,
    reason: str,
    preemptor: str = "",
) -> None:
    """ALLOCATED → PREEMPTED; it keeps its capacity through `grace` (none when 0)."""
    victim.state = AllocationState.PREEMPTED
    victim.state_reason = reason
    victim.preempted_by = preemptor
    victim.end_time = now
    victim.grace_end_time = now + grace
    if grace <= 0:
        state.free(victim)


def placement_conflict(
    state: ClusterState, a: Allocation, placements: Sequence[Placement]
) -> str | None:
    """Why `placements` cannot be given to `a` in the current state, or None."""
    need: dict[str, tuple[int, int]] = {}
    taken: set[tuple[str, int]] = set()
    for p in placements:
        node = state.nodes.get(p.node_id)
        if node is None:
            return f"node {p.node_id} is gone"
        if not node.schedulable:
            return f"node {p.node_id} is {node.state.name}"
        gpus = {g.index: g for g in node.gpus}
        for i in p.gpu_indices:
            g = gpus.get(i)
            if g is None or g.health != GpuHealth.HEALTHY:
                return f"GPU {i} of node {p.node_id} is not usable"
            if (p.node_id, i) in state.holders or (p.node_id, i) in taken:
                return f"GPU {i} of node {p.node_id} was taken"
            if a.shape.gpu_model and g.model != a.shape.gpu_model:
                return f"GPU {i} of node {p.node_id} is not {a.shape.gpu_model}"
            taken.add((p.node_id, i))
        cpu, mem = need.get(p.node_id, (0, 0))
        need[p.node_id] = (cpu + a.shape.cpu_millis, mem + a.shape.memory_bytes)
    for node_id, (cpu, mem) in need.items():
        node = state.nodes[node_id]
        held = state.totals_of(node_id)
        if cpu > node.cpu_millis - (held.cpu_millis or 0):
            return f"node {node_id} no longer has {cpu}m CPU free"
        if mem > node.memory_bytes - (held.memory_bytes or 0):
            return f"node {node_id} no longer has the memory free"
    return None


def apply_plan(
    state: ClusterState,
    decisions: Decisions,
    now: float,
    config: SchedulerConfig,
    *,
    quota_ok: QuotaCheck | None = None,
) -> Applied:
    """Applies what still holds of `decisions`; victims first, so with no grace period
    their capacity goes straight to their preemptor."""
    out = Applied()
    grace = config.preemption_grace_seconds
    for pre in decisions.preemptions:
        victim = state.live.get(pre.allocation_id)
        if victim is None or victim.state != AllocationState.ALLOCATED:
            continue
        if pre.preemptor_id:
            p = state.live.get(pre.preemptor_id)
            if p is None or p.state != AllocationState.PENDING:
                continue  # whom it made room for is gone: nobody needs the victim's end
        preempt(state, victim, now, grace, pre.reason, pre.preemptor_id)
        out.preempted.append(victim)
    for adm in decisions.admissions:
        a = state.live.get(adm.allocation_id)
        if a is None or a.state != AllocationState.PENDING:
            continue
        why = placement_conflict(state, a, adm.placements)
        if why is None and quota_ok is not None and not quota_ok(a, adm.placements):
            why = "its tenant's quota changed"
        if why is not None:
            out.refused.append((a.id, why))
            continue
        place(state, a, adm.placements, now)
        out.placed.append(a)
    for aid, status in decisions.pending.items():
        a = state.live.get(aid)
        if a is not None and a.state == AllocationState.PENDING:
            out.statuses[aid] = status
    return out
