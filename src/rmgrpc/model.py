"""Plain domain objects: nodes, GPUs, shapes, allocations, quotas, events.

These are the one vocabulary shared by the scheduler core, the store, the event
log and the services. They carry no gRPC or storage concerns; `codec.py` turns
them into protobuf messages and back. Times are float seconds since the epoch,
taken from the injectable clock (`clock.py`). Enum values equal the proto ones.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class AllocationState(enum.IntEnum):
    PENDING = 1
    ALLOCATED = 2
    RELEASED = 3
    EXPIRED = 4
    PREEMPTED = 5
    LOST = 6
    REJECTED = 7
    CANCELLED = 8

    @property
    def terminal(self) -> bool:
        return self not in (AllocationState.PENDING, AllocationState.ALLOCATED)


class AllocationEventType(enum.IntEnum):
    CREATED = 1
    PLACED = 2
    UPDATED = 3
    ENDED = 4
    PROGRESS = 5


class NodeState(enum.IntEnum):
    READY = 1
    CORDONED = 2
    DRAINING = 3
    DOWN = 4
    # Was DRAINING and no work is left on it; stays so until uncordoned.
    DRAINED = 5


class GpuHealth(enum.IntEnum):
    HEALTHY = 1
    UNHEALTHY = 2


@dataclass(frozen=True, slots=True)
class Shape:
    """What one replica needs. Frozen and hashable: equal shapes share scheduling work."""

    gpus: int = 0
    gpu_model: str = ""
    cpu_millis: int = 0
    memory_bytes: int = 0
    # Sorted (key, value) pairs so the shape stays hashable.
    node_selector: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def of(
        gpus: int = 0,
        gpu_model: str = "",
        cpu_millis: int = 0,
        memory_bytes: int = 0,
        node_selector: Mapping[str, str] | None = None,
    ) -> Shape:
        return Shape(
            gpus, gpu_model, cpu_millis, memory_bytes, tuple(sorted((node_selector or {}).items()))
        )

    @property
    def selector(self) -> dict[str, str]:
        return dict(self.node_selector)


@dataclass(slots=True)
class GpuMetrics:
    utilization_percent: float = 0.0
    memory_used_bytes: int = 0
    temperature_celsius: float = 0.0
    power_watts: float = 0.0
    ecc_errors: int = 0
    xid_errors: int = 0
    sample_time: float = 0.0
    # XID codes reported since the previous sample; the health policy judges them.
    recent_xids: tuple[int, ...] = ()


@dataclass(slots=True)
class Gpu:
    index: int
    uuid: str
    model: str
    memory_bytes: int
    health: GpuHealth = GpuHealth.HEALTHY
    metrics: GpuMetrics | None = None
    # Pinned out by an operator: UNHEALTHY until uncordoned, whatever its samples say.
    cordoned: bool = False
    # Why it is UNHEALTHY: the sample that quarantined it, or the operator's reason.
    health_reason: str = ""
    # Status, not state: since when a quarantined GPU's samples have been clean (None
    # while they are not); it returns to service after the policy's recovery time.
    healthy_since: float | None = None


@dataclass(slots=True)
class Node:
    id: str
    cpu_millis: int
    memory_bytes: int
    labels: dict[str, str] = field(default_factory=dict)
    gpus: list[Gpu] = field(default_factory=list)
    state: NodeState = NodeState.READY
    state_reason: str = ""
    # What operators asked for (READY, CORDONED, DRAINING): `state` returns to it when a
    # DOWN node's agent is back, so a cordon survives an agent's flap.
    admin_state: NodeState = NodeState.READY
    simulated: bool = False
    last_heartbeat_time: float = 0.0
    # None: the node holds no lease (simulated nodes never go DOWN).
    lease_expire_time: float | None = None
    revision: int = 0

    @property
    def schedulable(self) -> bool:
        return self.state == NodeState.READY


@dataclass(frozen=True, slots=True)
class Placement:
    node_id: str
    gpu_indices: tuple[int, ...] = ()


@dataclass(slots=True)
class Allocation:
    id: str
    tenant: str
    count: int
    shape: Shape
    request_id: str = ""
    priority: int = 0
    lease_seconds: int = 0
    max_duration_seconds: int = 0
    reservation_id: str = ""
    state: AllocationState = AllocationState.PENDING
    placements: tuple[Placement, ...] = ()
    pending_reason: str = ""
    queue_position: int = 0
    state_reason: str = ""
    revision: int = 0
    create_time: float = 0.0
    allocate_time: float | None = None
    lease_expire_time: float | None = None
    max_end_time: float | None = None
    end_time: float | None = None
    grace_end_time: float | None = None
    # For PREEMPTED: the pending allocation it made room for.
    preempted_by: str = ""
    # Sequence number in arrival order; the final tie-break of queue order.
    seq: int = 0
    # Digest of the request that created it: a repeated request_id must match it.
    request_digest: str = ""
    # Drain requeueing: the allocation this one replaces / the one that replaces it,
    # and whether the request opted out.
    requeued_from: str = ""
    requeued_as: str = ""
    no_requeue: bool = False

    def holds_capacity(self, now: float) -> bool:
        """Placed and not yet given back: a PREEMPTED one holds until its grace ends."""
        if self.state == AllocationState.ALLOCATED:
            return True
        return (
            self.state == AllocationState.PREEMPTED
            and self.grace_end_time is not None
            and now < self.grace_end_time
        )

    @property
    def total_gpus(self) -> int:
        return self.count * self.shape.gpus


@dataclass(slots=True)
class Resources:
    """An amount of capacity. In a limit, None means unbounded."""

    gpus: int | None = None
    cpu_millis: int | None = None
    memory_bytes: int | None = None
    gpus_by_model: dict[str, int] = field(default_factory=dict)


class BudgetPeriod(enum.IntEnum):
    """A budget's calendar period, in UTC; NONE: its `period_seconds` applies."""

    NONE = 0
    DAY = 1
    WEEK = 2  # ISO: from Monday 00:00
    MONTH = 3


@dataclass(slots=True)
class Budget:
    amount: float = 0.0
    period_seconds: int = 0
    # Spent: end the subtree's running work too, not only refuse new work.
    stop_running: bool = False
    # A calendar period instead of `period_seconds` (never both).
    period: BudgetPeriod = BudgetPeriod.NONE


class WithinTenantPreemption(enum.IntEnum):
    """Which of its own allocations a tenant's pending request may preempt."""

    NEVER = 1
    LOWER_PRIORITY = 2
    # Also equal priority when the victim arrived after the preemptor (Kueue's name).
    LOWER_OR_NEWER_EQUAL_PRIORITY = 3


class ReclaimPolicy(enum.IntEnum):
    """Which other tenants' allocations a tenant's pending request may preempt."""

    NEVER = 1
    LOWER_PRIORITY = 2
    # Borrowers at any priority when reclaiming a guarantee (priority preemption stays
    # strictly lower).
    ANY = 3


class BorrowingPreemption(enum.IntEnum):
    """May a request that would end above its tenant's guarantee preempt other tenants?"""

    NEVER = 1
    # Only victims of priority at most `Quota.borrowing_max_priority`.
    UP_TO_PRIORITY = 2
    ALWAYS = 3


@dataclass(slots=True)
class Quota:
    tenant: str
    parent: str = ""
    guaranteed: Resources = field(default_factory=Resources)
    limit: Resources = field(default_factory=Resources)
    weight: float = 1.0
    budget: Budget | None = None
    revision: int = 0
    update_time: float = 0.0
    # Preemption policies for this tenant's pending requests (the preemptor's quota
    # decides, as a Kueue ClusterQueue's does). Defaults keep guarantees reachable.
    within_tenant_preemption: WithinTenantPreemption = WithinTenantPreemption.LOWER_PRIORITY
    reclaim_from_others: ReclaimPolicy = ReclaimPolicy.ANY
    preemption_while_borrowing: BorrowingPreemption = BorrowingPreemption.ALWAYS
    borrowing_max_priority: int = 0
    # How much of `guaranteed` others may borrow while the tenant leaves it idle; a
    # field left None lends all of it (the rest stays free for the tenant alone).
    lending_limit: Resources = field(default_factory=Resources)


class ReservationState(enum.IntEnum):
    SCHEDULED = 1
    ACTIVE = 2
    ENDED = 3
    CANCELLED = 4

    @property
    def terminal(self) -> bool:
        return self in (ReservationState.ENDED, ReservationState.CANCELLED)


class ReservationEventType(enum.IntEnum):
    CREATED = 1
    STARTED = 2
    ENDED = 3
    PROGRESS = 4


@dataclass(slots=True)
class Reservation:
    """Capacity booked for a tenant over [start_time, end_time): `count` replicas of
    `shape`, pinned to the nodes and GPUs in `placements` when it was accepted."""

    id: str
    tenant: str
    shape: Shape
    count: int
    start_time: float
    end_time: float
    request_id: str = ""
    state: ReservationState = ReservationState.SCHEDULED
    placements: tuple[Placement, ...] = ()
    state_reason: str = ""
    revision: int = 0
    create_time: float = 0.0
    # Revision of its CREATED event: creation order, the key List pages on.
    seq: int = 0
    request_digest: str = ""

    def overlaps(self, start: float, end: float) -> bool:
        """Does the window [start, end) meet this one's?"""
        return self.start_time < end and start < self.end_time


def parent_of(tenant: str) -> str:
    """The tenant tree is spelled with '/': the parent of "org/team" is "org"."""
    return tenant.rpartition("/")[0]


class EventKind(enum.StrEnum):
    ALLOCATION = "allocation"
    NODE = "node"
    QUOTA = "quota"
    RESERVATION = "reservation"
    BUDGET = "budget"
    # The cost ledger (objects only, no events): see engine/cost.py.
    COST = "cost"


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of the event log. `data` is the encoded object after the change."""

    revision: int
    kind: EventKind
    type: int
    object_id: str
    time: float
    data: bytes
    # What watch filters match on, kept beside the payload so filtering needs no decode.
    tenant: str = ""
    node_ids: tuple[str, ...] = ()
