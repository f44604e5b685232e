"""Reservations in time: can a window be guaranteed, where, and what is the earliest that can.

Pure and synchronous, like the rest of the core: the engine hands in the nodes and what
occupies capacity over time (`Busy`), and gets placements or the reason back.

A reservation books concrete capacity (GPU indices, CPU, memory on named nodes), as a
Slurm reservation books nodes, so "guaranteed" means something checkable: over the
whole window no booked GPU is held by anything else. What occupies capacity:

- running work until its hard end (`max_end_time`); work without one holds it forever,
  since nothing says when it will give it back;
- a preempted victim until its grace ends;
- other accepted reservations over their own windows.

CPU and memory are counted conservatively: everything that overlaps the window at any
moment is summed, as if it all overlapped at once. That may refuse a window a finer
sweep would accept, never the reverse.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from rmgrpc.model import (
    Allocation,
    AllocationState,
    GpuHealth,
    Node,
    NodeState,
    Placement,
    Reservation,
    Shape,
)
from rmgrpc.scheduler.placement import CapacityView, labels_match, shape_text

FOREVER = math.inf


def when(t: float) -> str:
    """A time as RFC 3339 UTC, as grpcurl shows Timestamps."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Busy:
    """Capacity on one node occupied over [start, end) by an allocation or a reservation."""

    owner: str  # "allocation:a-…" or "reservation:r-…"
    node_id: str
    gpu_indices: tuple[int, ...]
    cpu_millis: int
    memory_bytes: int
    start: float
    end: float

    def overlaps(self, start: float, end: float) -> bool:
        return self.start < end and start < self.end


@dataclass(frozen=True, slots=True)
class Booking:
    """The answer for one window: placements when it can be guaranteed, else why not."""

    placements: tuple[Placement, ...] = ()
    # What occupies the eligible nodes during the window (owners, sorted), when refused.
    conflicts: tuple[str, ...] = ()
    # Set when no eligible node could host one replica even if empty.
    never: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.placements)


@dataclass(slots=True)
class _Free:
    gpus: dict[str, list[int]] = field(default_factory=dict)  # model -> free indices
    cpu: int = 0
    mem: int = 0

    def replica(self, shape: Shape) -> tuple[int, ...] | None:
        """Takes one replica of `shape` out of what is free; None when it does not fit."""
        if self.cpu < shape.cpu_millis or self.mem < shape.memory_bytes:
            return None
        taken: tuple[int, ...] = ()
        if shape.gpus:
            models = [shape.gpu_model] if shape.gpu_model else sorted(self.gpus)
            # Best fit: the model with the fewest free GPUs that still has enough.
            fitting = [m for m in models if len(self.gpus.get(m, ())) >= shape.gpus]
            if not fitting:
                return None
            model = min(fitting, key=lambda m: (len(self.gpus[m]), m))
            free = self.gpus[model]
            taken, self.gpus[model] = tuple(free[: shape.gpus]), free[shape.gpus :]
        self.cpu -= shape.cpu_millis
        self.mem -= shape.memory_bytes
        return taken


def allocation_busy(a: Allocation, now: float) -> list[Busy]:
    """What a live allocation occupies: from now to its hard end (forever without one);
    a preempted victim until its grace ends. Pending work occupies nothing."""
    if a.state == AllocationState.ALLOCATED:
        end = a.max_end_time if a.max_end_time is not None else FOREVER
    elif a.state == AllocationState.PREEMPTED and a.grace_end_time is not None:
        end = a.grace_end_time
    else:
        return []
    if end <= now:
        return []
    return [
        Busy(f"allocation:{a.id}", p.node_id, p.gpu_indices, a.shape.cpu_millis,
             a.shape.memory_bytes, now, end)
        for p in a.placements
    ]  # fmt: skip


def reservation_busy(r: Reservation) -> list[Busy]:
    """What an accepted reservation occupies: its placements over its window."""
    if r.state.terminal:
        return []
    return [
        Busy(f"reservation:{r.id}", p.node_id, p.gpu_indices, r.shape.cpu_millis,
             r.shape.memory_bytes, r.start_time, r.end_time)
        for p in r.placements
    ]  # fmt: skip


def occupied(
    allocations: Iterable[Allocation],
    reservations: Iterable[Reservation],
    now: float,
    *,
    skip_reservation: str = "",
) -> list[Busy]:
    """Everything that occupies capacity from `now` on. Allocations running inside a
    reservation occupy its capacity, which the reservation already counts."""
    out: list[Busy] = []
    for a in allocations:
        if not a.reservation_id:
            out.extend(allocation_busy(a, now))
    for r in reservations:
        if r.id != skip_reservation:
            out.extend(reservation_busy(r))
    return out


def eligible(node: Node, shape: Shape) -> bool:
    """Could the node ever take a replica of `shape`, whatever runs on it?"""
    if node.state != NodeState.READY or not labels_match(node.labels, shape.node_selector):
        return False
    if shape.gpus:
        usable = [g for g in node.gpus if g.health == GpuHealth.HEALTHY and not g.cordoned]
        by_model: dict[str, int] = {}
        for g in usable:
            by_model[g.model] = by_model.get(g.model, 0) + 1
        models = [shape.gpu_model] if shape.gpu_model else list(by_model)
        if not any(by_model.get(m, 0) >= shape.gpus for m in models):
            return False
    return node.cpu_millis >= shape.cpu_millis and node.memory_bytes >= shape.memory_bytes


def _free_over(node: Node, busy: Sequence[Busy], start: float, end: float) -> _Free:
    """What on `node` nothing occupies at any moment of [start, end)."""
    blocked: set[int] = set()
    cpu, mem = node.cpu_millis, node.memory_bytes
    for b in busy:
        if b.overlaps(start, end):
            blocked.update(b.gpu_indices)
            cpu -= b.cpu_millis
            mem -= b.memory_bytes
    free = _Free(cpu=cpu, mem=mem)
    for g in sorted(node.gpus, key=lambda g: g.index):
        if g.health == GpuHealth.HEALTHY and not g.cordoned and g.index not in blocked:
            free.gpus.setdefault(g.model, []).append(g.index)
    return free


def usable(node: Node | None, placement: Placement) -> bool:
    """Can the booked replica still run where it was booked (node READY, GPUs healthy)?"""
    if node is None or node.state != NodeState.READY:
        return False
    gpus = {g.index: g for g in node.gpus}
    for i in placement.gpu_indices:
        g = gpus.get(i)
        if g is None or g.health != GpuHealth.HEALTHY or g.cordoned:
            return False
    return True


def _by_node(busy: Iterable[Busy]) -> dict[str, list[Busy]]:
    out: dict[str, list[Busy]] = {}
    for b in busy:
        out.setdefault(b.node_id, []).append(b)
    return out


def book(
    nodes: Mapping[str, Node],
    busy: Iterable[Busy],
    shape: Shape,
    count: int,
    start: float,
    end: float,
) -> Booking:
    """Placements for `count` replicas of `shape` free over all of [start, end), all or
    none. Nodes that would be left with the least free GPUs are filled first (best fit),
    as placement does, so large holes stay whole for large requests."""
    per_node = _by_node(busy)
    candidates = [n for n in nodes.values() if eligible(n, shape)]
    if not candidates:
        return Booking(never=_never_text(shape))
    frees = {n.id: _free_over(n, per_node.get(n.id, ()), start, end) for n in candidates}
    order = sorted(candidates, key=lambda n: (sum(map(len, frees[n.id].gpus.values())), n.id))
    placements: list[Placement] = []
    for n in order:
        free = frees[n.id]
        while len(placements) < count:
            taken = free.replica(shape)
            if taken is None:
                break
            placements.append(Placement(n.id, taken))
        if len(placements) == count:
            return Booking(placements=tuple(placements))
    conflicts = sorted(
        {b.owner for n in candidates for b in per_node.get(n.id, ()) if b.overlaps(start, end)}
    )
    return Booking(conflicts=tuple(conflicts))


def earliest_window(
    nodes: Mapping[str, Node],
    busy: Sequence[Busy],
    shape: Shape,
    count: int,
    start: float,
    length: float,
) -> tuple[float, Booking] | None:
    """The earliest start at or after `start` whose window of `length` can be guaranteed,
    with its booking; None when none can (work without a hard end is in the way).

    What is free only grows when something occupying capacity ends, so the only starts
    worth trying are `start` itself and the ends of what occupies capacity after it."""
    candidates = sorted({start, *(b.end for b in busy if start < b.end < FOREVER)})
    for at in candidates:
        booking = book(nodes, busy, shape, count, at, at + length)
        if booking.ok:
            return at, booking
        if booking.never:
            return None
    return None


def _never_text(shape: Shape) -> str:
    return f"no READY node could ever host one replica ({shape_text(shape)})"


# -- inside a scheduling pass ---------------------------------------------------------


def live(reservation: Reservation, now: float) -> bool:
    """Does it still hold capacity (booked, its window not over)?"""
    return not reservation.state.terminal and now < reservation.end_time


def may_backfill(a: Allocation, reservation: Reservation, now: float) -> bool:
    """Ordinary work may use a reservation's idle capacity only if its hard end comes no
    later than the reservation's start (windows are half-open): work without a hard end
    never may, nor anything once the window has begun."""
    if a.reservation_id or a.max_duration_seconds <= 0:
        return False
    return now + a.max_duration_seconds <= reservation.start_time


@dataclass(slots=True)
class _Share:
    """One reservation's capacity that no allocation holds, per node, in one pass."""

    reservation: Reservation
    gpus: dict[str, list[int]] = field(default_factory=dict)
    cpu: dict[str, int] = field(default_factory=dict)
    mem: dict[str, int] = field(default_factory=dict)


class Reserved:
    """Reserved capacity during one pass (or between passes, for quick decisions).

    `withhold` takes every live reservation's idle capacity out of a view, so ordinary
    work cannot land there; `lend`/`take_back` let one request that may backfill use it
    and put back what it left; `place_inside` places work that names a reservation in
    that reservation's own capacity, and nowhere else.
    """

    def __init__(
        self,
        reservations: Mapping[str, Reservation],
        nodes: Mapping[str, Node],
        holding: Iterable[Allocation],
        now: float,
    ) -> None:
        self.now = now
        self.nodes = nodes
        held: set[tuple[str, int]] = set()
        used: dict[tuple[str, str], tuple[int, int]] = {}
        for a in holding:
            for p in a.placements:
                held.update((p.node_id, i) for i in p.gpu_indices)
                if a.reservation_id:
                    key = (a.reservation_id, p.node_id)
                    cpu, mem = used.get(key, (0, 0))
                    used[key] = (cpu + a.shape.cpu_millis, mem + a.shape.memory_bytes)
        self.shares: dict[str, _Share] = {}
        # Every GPU a live reservation booked -> that reservation.
        self.owner: dict[tuple[str, int], Reservation] = {}
        for rid in sorted(reservations):
            r = reservations[rid]
            if not live(r, now):
                continue
            share = _Share(r)
            for p in r.placements:
                self.owner.update(((p.node_id, i), r) for i in p.gpu_indices)
                free = [i for i in p.gpu_indices if (p.node_id, i) not in held]
                share.gpus.setdefault(p.node_id, []).extend(free)
                share.cpu[p.node_id] = share.cpu.get(p.node_id, 0) + r.shape.cpu_millis
                share.mem[p.node_id] = share.mem.get(p.node_id, 0) + r.shape.memory_bytes
            for nid in share.cpu:
                cpu, mem = used.get((rid, nid), (0, 0))
                share.cpu[nid] = max(0, share.cpu[nid] - cpu)
                share.mem[nid] = max(0, share.mem[nid] - mem)
            self.shares[rid] = share

    def __bool__(self) -> bool:
        return bool(self.shares)

    def touches(self, a: Allocation) -> bool:
        """Does `a` hold any reserved GPU (inside its reservation, or backfilled)?"""
        return bool(a.reservation_id) or any(
            (p.node_id, i) in self.owner for p in a.placements for i in p.gpu_indices
        )

    def conflict(self, a: Allocation, placements: Sequence[Placement]) -> str | None:
        """Why placing `a` on `placements` would break a reservation, or None. For plans
        made before a reservation was accepted (or its window began)."""
        if a.reservation_id and a.reservation_id not in self.shares:
            return f"reservation {a.reservation_id} is over"
        for p in placements:
            for i in p.gpu_indices:
                r = self.owner.get((p.node_id, i))
                if a.reservation_id:
                    if r is None or r.id != a.reservation_id:
                        return f"GPU {i} of node {p.node_id} is not in its reservation"
                elif r is not None and not may_backfill(a, r, self.now):
                    return f"GPU {i} of node {p.node_id} is reserved by {r.id}"
        return None

    def _take(self, view: CapacityView, share: _Share) -> None:
        """Takes what of `share` is still free in `view`; the share keeps only that."""
        for nid in sorted(share.gpus):
            n = view.nodes.get(nid)
            if n is None:
                share.gpus[nid], share.cpu[nid], share.mem[nid] = [], 0, 0
                continue
            free = [i for i in share.gpus[nid] if i in n.free.get(n.gpu_models.get(i, ""), ())]
            cpu = max(0, min(share.cpu[nid], n.cpu_free))
            mem = max(0, min(share.mem[nid], n.mem_free))
            share.gpus[nid], share.cpu[nid], share.mem[nid] = free, cpu, mem
            view.take(nid, free, cpu, mem)

    def withhold(self, view: CapacityView) -> None:
        """Keeps every live reservation's idle capacity out of `view`."""
        for share in self.shares.values():
            self._take(view, share)

    def lendable(self, a: Allocation) -> list[_Share]:
        return [s for s in self.shares.values() if may_backfill(a, s.reservation, self.now)]

    @staticmethod
    def lend(view: CapacityView, shares: Sequence[_Share]) -> None:
        for share in shares:
            for nid in sorted(share.gpus):
                view.give(nid, share.gpus[nid], share.cpu[nid], share.mem[nid])

    def take_back(self, view: CapacityView, shares: Sequence[_Share]) -> None:
        """After a backfill: what it left of the lent shares is withheld again."""
        for share in shares:
            self._take(view, share)

    def blocking(self, a: Allocation) -> list[Reservation]:
        """Live reservations whose idle capacity `a` may not use."""
        return [
            s.reservation
            for s in self.shares.values()
            if not may_backfill(a, s.reservation, self.now) and any(s.gpus.values())
        ]

    def place_inside(self, a: Allocation) -> tuple[tuple[Placement, ...] | None, str]:
        """Places `a` in its reservation's idle capacity: (placements, "") or (None, why)."""
        share = self.shares.get(a.reservation_id)
        if share is None:
            return None, f"reservation {a.reservation_id} is over or cancelled"
        r = share.reservation
        if self.now < r.start_time:
            return None, (
                f"waiting for reservation {r.id}: its window begins at {when(r.start_time)}"
            )
        sub: dict[str, Node] = {}
        for nid in sorted(share.gpus):
            node = self.nodes.get(nid)
            if node is None:
                continue
            mine = set(share.gpus[nid])
            sub[nid] = Node(
                id=nid,
                cpu_millis=share.cpu[nid],
                memory_bytes=share.mem[nid],
                labels=node.labels,
                gpus=[g for g in node.gpus if g.index in mine],
                state=node.state,
            )
        placements = CapacityView(sub).place_gang(a.shape, a.count, owner=a.id)
        if placements is None:
            return None, (
                f"no room in reservation {r.id}: its other allocations hold its capacity "
                f"({r.count} x {shape_text(r.shape)} booked)"
            )
        for p in placements:
            share.gpus[p.node_id] = [i for i in share.gpus[p.node_id] if i not in p.gpu_indices]
            share.cpu[p.node_id] -= a.shape.cpu_millis
            share.mem[p.node_id] -= a.shape.memory_bytes
        return placements, ""


def fits_in(reservation: Reservation, nodes: Mapping[str, Node], shape: Shape, count: int) -> bool:
    """Could `count` replicas of `shape` ever run inside the reservation's capacity?"""
    empty = Reserved({reservation.id: reservation}, nodes, (), reservation.start_time)
    probe = Allocation(id="probe", tenant="", count=count, shape=shape)
    probe.reservation_id = reservation.id
    placements, _ = empty.place_inside(probe)
    return placements is not None
