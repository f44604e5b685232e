"""What the scheduler core takes in and gives back.

The core is pure and synchronous: the engine hands it a `Snapshot` (references to
its authoritative state plus the time and settings) and gets `Decisions` back. The
core never mutates the snapshot's objects; it works on its own scratch structures,
so a trial ("what if these two were preempted?") is free to abandon.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from rmgrpc.cost import BudgetLeft, PriceTable
from rmgrpc.model import Allocation, Node, Placement, Quota, Reservation, Resources


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    # Quota for tenants that have none of their own: no guarantee, no limit, weight 1.
    default_limit: Resources = field(default_factory=Resources)
    default_weight: float = 1.0
    # A placed allocation is not preempted before it has run this long.
    min_runtime_seconds: float = 60.0
    # At most this many allocations are preempted by one cycle.
    max_preemptions_per_cycle: int = 8
    # Victims keep their GPUs this long after the PREEMPTED event.
    preemption_grace_seconds: float = 30.0
    # A gang blocked this long gets free capacity held for it as it frees, so
    # smaller requests that keep backfilling do not starve it.
    starvation_seconds: float = 120.0
    # How many starving gangs may hold capacity at once.
    max_held_gangs: int = 1
    # Fair share orders by recent usage with this half-life (Slurm's
    # PriorityDecayHalfLife); 0 orders by what is held now only.
    fair_share_half_life_seconds: float = 0.0
    # What a request that no registered node could ever host gets: False answers it
    # REJECTED at once, True leaves it PENDING with the reason (re-checked as nodes come).
    never_fits_pending: bool = False


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: float
    # Every known node, any state; the core filters out those not READY.
    nodes: Mapping[str, Node]
    # Live allocations only: PENDING, ALLOCATED, and PREEMPTED still inside their grace.
    allocations: Mapping[str, Allocation]
    # Explicit quotas by tenant; tenants absent here take the config defaults.
    quotas: Mapping[str, Quota]
    config: SchedulerConfig = field(default_factory=SchedulerConfig)
    # Decayed usage of allocations that already ended, per tenant (own work only):
    # (GPUs, CPU millis, memory bytes) averaged over recent time as of `now`. Work that
    # still holds capacity is counted from `allocations`.
    ended_usage: Mapping[str, tuple[float, float, float]] = field(default_factory=dict)
    # Accepted reservations whose window is not over (private copies): their idle
    # capacity is kept from ordinary work, but for backfill that ends before they start.
    reservations: Mapping[str, Reservation] = field(default_factory=dict)
    # Budgeted tenants' spend in their current period, and the prices: pending work a
    # budget of its tenant (or an ancestor) cannot cover is not started (`cost.budget_block`).
    budgets: Mapping[str, BudgetLeft] = field(default_factory=dict)
    prices: PriceTable = field(default_factory=PriceTable)


@dataclass(frozen=True, slots=True)
class Admission:
    allocation_id: str
    placements: tuple[Placement, ...]


@dataclass(frozen=True, slots=True)
class Preemption:
    allocation_id: str
    # The pending allocation the victim makes room for.
    preemptor_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class PendingStatus:
    # Why it waits, in words a person can act on.
    reason: str
    # 1-based position among pending allocations in admission order.
    position: int


@dataclass(slots=True)
class Decisions:
    admissions: list[Admission] = field(default_factory=list)
    preemptions: list[Preemption] = field(default_factory=list)
    # Every allocation still PENDING after the cycle, by id.
    pending: dict[str, PendingStatus] = field(default_factory=dict)
    # Starving gangs this cycle held nodes for: gang id -> node ids. Decisions made
    # between passes keep off them (for work of the gang's priority or lower).
    held_nodes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Capacity set aside for preemptors beyond what their victims free:
    # (preemptor id, node id, GPU indices, CPU millis, memory bytes). Decisions made
    # between passes leave it alone.
    reserved: list[tuple[str, str, tuple[int, ...], int, int]] = field(default_factory=list)
    # Where each tenant with GPU work waiting for capacity stands against its fair share
    # (the note that ends such a request's reason; "" when nothing is shared): a quick
    # decision between passes ends its reason the same way, so the next pass does not
    # rewrite every arrival's reason only to add the note.
    share_notes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DryRun:
    """What would happen to one request if it arrived now."""

    # Where it would be placed now; empty when it would wait.
    placements: tuple[Placement, ...]
    # Why it would wait; empty when it would be placed.
    reason: str
    # Allocations that would be preempted to make room for it.
    preempted_ids: tuple[str, ...] = ()
    position: int = 0
