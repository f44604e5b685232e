"""Reservation commands: CreateReservation, CancelReservation, the reads, and the clock.

A reservation is accepted only when the pure core (`scheduler.reservations`) can book
concrete capacity for its whole window against what already occupies it (other
reservations, running work until its hard end, forever without one); otherwise the
refusal names what conflicts and the earliest window of the same length that fits.

Its state moves with the clock, through the engine's timers: SCHEDULED until its start
("rstart"), ACTIVE until its end ("rend"), then ENDED; or CANCELLED by its owner. Every
change is one event of kind RESERVATION in the one log, committed before it is answered.

Work that names a reservation (its tenant's subtree only) runs inside its capacity and
never past its window: when the reservation ends or is cancelled, such work still
running ends EXPIRED and such work still waiting ends REJECTED, in the same txn.

When the window begins, the booking is made good: replicas booked where they can no
longer run are booked again elsewhere, and booked GPUs still held by other work are
taken back — by preempting only work that started after the reservation was accepted.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from dataclasses import replace

from rmgrpc import codec
from rmgrpc.engine.core import EngineCore
from rmgrpc.engine.txn import Txn
from rmgrpc.errors import FailedPrecondition, NotFound, PermissionDenied
from rmgrpc.model import (
    Allocation,
    AllocationState,
    EventKind,
    Reservation,
    ReservationEventType,
    ReservationState,
)
from rmgrpc.scheduler import reservations as core
from rmgrpc.scheduler.placement import shape_text
from rmgrpc.scheduler.reservations import when
from rmgrpc.state import ClusterState, in_subtree

log = logging.getLogger("rmgrpc.engine")

# How many conflicts a refusal names (the rest are counted).
MAX_CONFLICTS_NAMED = 10


class ReservationCommands(EngineCore):
    # -- reads -------------------------------------------------------------------------

    def get_reservation(self, reservation_id: str) -> Reservation:
        r = self.state.reservations.get(reservation_id)
        if r is None:
            raise NotFound("reservation", reservation_id)
        return r

    def list_reservations(
        self, tenant: str, states: frozenset[ReservationState], after_seq: int = 0
    ) -> Iterator[Reservation]:
        """Matching reservations in creation order, from after `after_seq`."""
        for r in sorted(self.state.reservations.values(), key=lambda r: r.seq):
            if r.seq <= after_seq or (states and r.state not in states):
                continue
            if tenant and not in_subtree(r.tenant, tenant):
                continue
            yield r

    def occupied(self, *, skip_reservation: str = "") -> list[core.Busy]:
        """What occupies capacity from now on: running work and accepted reservations."""
        state = self.state
        return core.occupied(
            state.holding(),
            state.reservations.values(),
            self.clock.now(),
            skip_reservation=skip_reservation,
        )

    # -- writes ------------------------------------------------------------------------

    async def create_reservation(self, request: Reservation, dry_run: bool) -> Reservation:
        """Books `request` (validated fields; the engine fills id, state, placements) or
        raises FailedPrecondition naming the conflicts and the earliest window that fits.
        A repeated (tenant, request_id) answers with the first reservation."""
        if request.request_id:
            for first in self.state.reservations.values():
                if (first.tenant, first.request_id) == (request.tenant, request.request_id):
                    _check_same_request(first, request)
                    await self.wait_committed(first.revision)
                    return first
        busy = self.occupied()
        booking = core.book(
            self.state.nodes,
            busy,
            request.shape,
            request.count,
            request.start_time,
            request.end_time,
        )
        if not booking.ok:
            raise self._refusal(request, busy, booking)
        now = self.clock.now()
        r = replace(
            request,
            placements=booking.placements,
            state=(
                ReservationState.ACTIVE if request.start_time <= now else ReservationState.SCHEDULED
            ),
            create_time=now,
        )
        if dry_run:
            return r
        with self.committer.transaction() as txn:
            r.id = "r-" + secrets.token_hex(8)
            self.state.reservations[r.id] = r
            self._emit(txn, r, ReservationEventType.CREATED)
            self._arm(r)
        log.info(
            "reservation %s of tenant %s booked [%s, %s)",
            r.id,
            r.tenant,
            when(r.start_time),
            when(r.end_time),
        )
        # The capacity it holds from its start is no longer free for ordinary work.
        self.scheduling.changed()
        await self.committer.wait(txn)
        return r

    def _refusal(
        self, request: Reservation, busy: list[core.Busy], booking: core.Booking
    ) -> FailedPrecondition:
        window = f"[{when(request.start_time)}, {when(request.end_time)})"
        if booking.never:
            return FailedPrecondition(
                "RESERVATION_NEVER_FITS",
                f"tenant:{request.tenant}",
                f"the reservation {window} cannot be booked: {booking.never}",
            )
        extra: list[tuple[str, str, str]] = []
        for owner in booking.conflicts[:MAX_CONFLICTS_NAMED]:
            ends = [b.end for b in busy if b.owner == owner]
            until = max(ends, default=core.FOREVER)
            extra.append(
                (
                    "RESERVATION_CONFLICT",
                    owner,
                    f"{owner.replace(':', ' ')} occupies capacity "
                    + ("with no hard end" if until == core.FOREVER else f"until {when(until)}"),
                )
            )
        length = request.end_time - request.start_time
        found = core.earliest_window(
            self.state.nodes, busy, request.shape, request.count, request.start_time, length
        )
        if found is None:
            fits = (
                "no window of this length can be guaranteed: work without max_duration_seconds "
                "holds the capacity"
            )
            extra.append(("NO_WINDOW_FITS", f"tenant:{request.tenant}", fits))
        else:
            start = found[0]
            fits = f"the earliest window of the same length that fits is [{when(start)}, " + (
                f"{when(start + length)})"
            )
            extra.append(("EARLIEST_WINDOW", f"window:{when(start)}/{when(start + length)}", fits))
        named = len(booking.conflicts)
        return FailedPrecondition(
            "RESERVATION_NOT_GUARANTEED",
            f"tenant:{request.tenant}",
            f"{request.count} x {shape_text(request.shape)} cannot be guaranteed over {window}: "
            f"{named} conflicting item(s) ({', '.join(booking.conflicts[:3])}"
            f"{', …' if named > 3 else ''}); {fits}",
            tuple(extra),
        )

    async def cancel_reservation(self, reservation_id: str) -> Reservation:
        """Cancels a reservation (idempotent: an ended one is answered as it is)."""
        r = self.get_reservation(reservation_id)
        if r.state.terminal:
            await self.wait_committed(r.revision)
            return r
        with self.committer.transaction() as txn:
            self._finish(txn, r, ReservationState.CANCELLED, "cancelled by its owner")
        await self.committer.wait(txn)
        return r

    # -- the clock ---------------------------------------------------------------------

    def arm_reservations(self) -> None:
        for r in self.state.reservations.values():
            self._arm(r)

    def _arm(self, r: Reservation) -> None:
        if r.state == ReservationState.SCHEDULED:
            self.timers.arm("rstart", r.id, r.start_time)
        if not r.state.terminal:
            self.timers.arm("rend", r.id, r.end_time)

    def reservation_due(self, txn: Txn, kind: str, reservation_id: str) -> bool:
        r = self.state.reservations.get(reservation_id)
        if r is None or r.state.terminal:
            return False
        if kind == "rstart" and r.state == ReservationState.SCHEDULED:
            r.state = ReservationState.ACTIVE
            r.state_reason = "window began"
            self._rebook(txn, r)
            self._reclaim(txn, r)
            self._emit(txn, r, ReservationEventType.STARTED)
            self.scheduling.changed()
            return True
        if kind == "rend":
            self._finish(txn, r, ReservationState.ENDED, "window over")
            return True
        return False

    def _rebook(self, txn: Txn, r: Reservation) -> None:
        """The window begins where part of it can no longer run (a node not READY, a GPU
        unhealthy): those replicas are booked again for the rest of the window, in free
        capacity if there is some, else by preempting work that started after the
        reservation was accepted. What cannot be honoured is said in `state_reason`."""
        nodes = self.state.nodes
        good = tuple(p for p in r.placements if core.usable(nodes.get(p.node_id), p))
        lost = len(r.placements) - len(good)
        if not lost:
            return
        gone = sorted({p.node_id for p in r.placements if p not in good})
        where = ", ".join(
            f"{nid} ({nodes[nid].state.name.lower()})" if nid in nodes else f"{nid} (gone)"
            for nid in gone
        )
        now = self.clock.now()
        busy = self.occupied(skip_reservation=r.id)
        busy += core.reservation_busy(replace(r, placements=good))
        booking = core.book(nodes, busy, r.shape, lost, now, r.end_time)
        victims: list[Allocation] = []
        if not booking.ok:
            newer = {
                f"allocation:{a.id}": a
                for a in self.state.live.values()
                if a.state == AllocationState.ALLOCATED
                and not a.reservation_id
                and (a.allocate_time or a.create_time) > r.create_time
            }
            booking = core.book(
                nodes, [b for b in busy if b.owner not in newer], r.shape, lost, now, r.end_time
            )
            if booking.ok:
                # The fewest victims: those on the GPUs booked, then (for CPU or memory)
                # every newer one on the nodes booked.
                taken = {(p.node_id, i) for p in booking.placements for i in p.gpu_indices}
                on_nodes = {p.node_id for p in booking.placements}
                victims = [
                    a
                    for a in newer.values()
                    if any((p.node_id, i) in taken for p in a.placements for i in p.gpu_indices)
                ]
                left = [b for b in busy if b.owner not in {f"allocation:{v.id}" for v in victims}]
                again = core.book(nodes, left, r.shape, lost, now, r.end_time)
                if again.ok:
                    booking = again
                else:
                    victims = [
                        a
                        for a in newer.values()
                        if any(p.node_id in on_nodes for p in a.placements)
                    ]
        if not booking.ok:
            r.state_reason = (
                f"window began; {lost} of {len(r.placements)} replica(s) cannot be honoured: "
                f"booked on {where}, and no capacity can be found elsewhere"
            )
            log.warning("reservation %s: %s", r.id, r.state_reason)
            return
        grace = self.config.preemption_grace_seconds
        for a in victims:
            why = (
                f"reservation {r.id} begins and its capacity on {where} is lost: it takes "
                "this capacity, which it was promised before this allocation started"
            )
            self.transitions.preempt(txn, a, grace, why)
        r.placements = good + booking.placements
        r.state_reason = f"window began; {lost} replica(s) booked again, away from {where}"
        log.warning("reservation %s: %s", r.id, r.state_reason)

    def _reclaim(self, txn: Txn, r: Reservation) -> None:
        """The window begins: booked GPUs still held by other work are taken back.

        The scheduler keeps reserved capacity from all but backfill that ends by the
        start, so this is the last line of defence (a plan made before the reservation
        was accepted, say). Only work that started after the reservation was accepted
        is preempted — the booking was checked against everything running before — and
        backfill ending at this very instant is left to its own expiry."""
        grace = self.config.preemption_grace_seconds
        victims: dict[str, Allocation] = {}
        for p in r.placements:
            for i in p.gpu_indices:
                aid = self.state.holders.get((p.node_id, i))
                a = self.state.live.get(aid) if aid is not None else None
                if a is None or a.reservation_id == r.id or a.state != AllocationState.ALLOCATED:
                    continue
                if a.max_end_time is not None and a.max_end_time <= r.start_time:
                    continue
                if (a.allocate_time or a.create_time) <= r.create_time:
                    log.warning(
                        "reservation %s: GPU %d of node %s is held by %s, which started "
                        "before the reservation was accepted; left running",
                        r.id, i, p.node_id, a.id,
                    )  # fmt: skip
                    continue
                victims[a.id] = a
        for a in victims.values():
            why = (
                f"reservation {r.id} begins: it booked this capacity before this allocation started"
            )
            self.transitions.preempt(txn, a, grace, why)
            log.info("reservation %s reclaims its capacity from %s", r.id, a.id)

    def _finish(self, txn: Txn, r: Reservation, state: ReservationState, reason: str) -> None:
        r.state = state
        r.state_reason = reason
        self.timers.cancel_all(r.id, ("rstart", "rend"))
        self._emit(txn, r, ReservationEventType.ENDED)
        cancelled = state == ReservationState.CANCELLED
        why = f"reservation {r.id} {'was cancelled' if cancelled else 'ended'}"
        for a in [a for a in self.state.live.values() if a.reservation_id == r.id]:
            if a.state == AllocationState.ALLOCATED:
                self.transitions.end(txn, a, AllocationState.EXPIRED, why)
            elif a.state == AllocationState.PENDING:
                self.transitions.end(txn, a, AllocationState.REJECTED, why)
                self.scheduling.forget(a.id)
        log.info("reservation %s of tenant %s %s: %s", r.id, r.tenant, state.name, reason)
        # Its capacity is free for ordinary work again.
        self.scheduling.changed()

    def _emit(self, txn: Txn, r: Reservation, type: ReservationEventType) -> None:
        def encode(rev: int) -> bytes:
            r.revision = rev
            if not r.seq:
                r.seq = rev
            return codec.reservation_to_proto(r).SerializeToString()

        nodes = dict.fromkeys(p.node_id for p in r.placements)
        self.committer.emit(txn, EventKind.RESERVATION, int(type), r.id, encode, r.tenant, nodes)


def _check_same_request(first: Reservation, again: Reservation) -> None:
    """A request_id names one request: a repeat with another body is refused."""
    if first.request_digest == again.request_digest:
        return
    raise FailedPrecondition(
        "REQUEST_ID_REUSED",
        f"request_id:{again.request_id}",
        f"request_id {again.request_id!r} of tenant {again.tenant} was first used for "
        f"reservation {first.id} with a different request; send the same request to get "
        "that reservation, or use a new request_id",
    )


def check_use(state: ClusterState, request: Allocation) -> None:
    """May `request` run inside the reservation it names? NotFound for an unknown one,
    PermissionDenied for a tenant outside the reservation's subtree, FailedPrecondition
    when it is over or could never hold the request."""
    r = state.reservations.get(request.reservation_id)
    if r is None:
        raise NotFound("reservation", request.reservation_id)
    if not in_subtree(request.tenant, r.tenant):
        raise PermissionDenied(
            f"tenant:{request.tenant}",
            "use reservation",
            f"tenant {request.tenant!r} may not use reservation {r.id} of tenant {r.tenant!r} "
            "(only that tenant and its subtree may)",
        )
    if r.state.terminal:
        raise FailedPrecondition(
            "RESERVATION_ENDED",
            f"reservation:{r.id}",
            f"reservation {r.id} is {r.state.name}: work can no longer run inside it",
        )
    if not core.fits_in(r, state.nodes, request.shape, request.count):
        raise FailedPrecondition(
            "RESERVATION_TOO_SMALL",
            f"reservation:{r.id}",
            f"{request.count} replica(s) of this shape never fit in reservation {r.id} "
            f"({r.count} x {shape_text(r.shape)} booked)",
        )
