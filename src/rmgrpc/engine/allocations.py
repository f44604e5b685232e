"""Allocation commands: Allocate, Release, Renew, and the reads the servicer makes.

Each write builds one txn and returns once that txn is durable; what it answers names
only durable revisions.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from dataclasses import replace

from rmgrpc import limits
from rmgrpc.engine import reservations
from rmgrpc.engine.core import EngineCore
from rmgrpc.engine.scheduling import QUEUED
from rmgrpc.errors import FailedPrecondition, NotFound, QuotaExceeded, QuotaViolation
from rmgrpc.model import Allocation, AllocationEventType, AllocationState
from rmgrpc.scheduler import fairshare
from rmgrpc.scheduler.snapshot import Snapshot

log = logging.getLogger("rmgrpc.engine")


class AllocationCommands(EngineCore):
    def get_allocation(self, allocation_id: str) -> Allocation:
        a = self.state.allocations.get(allocation_id)
        if a is None:
            raise NotFound("allocation", allocation_id)
        return a

    def list_allocations(
        self,
        tenant: str,
        node_id: str,
        states: frozenset[AllocationState],
        after_seq: int = 0,
    ) -> Iterator[Allocation]:
        """Matching retained allocations in creation order, from after `after_seq`."""
        source = (
            self.state.of_subtree(tenant, after_seq) if tenant else self.state.in_order(after_seq)
        )
        for a in source:
            if states and a.state not in states:
                continue
            if node_id and not any(p.node_id == node_id for p in a.placements):
                continue
            yield a

    def _admission_snapshot(self) -> Snapshot:
        """Enough for the static admission check (limits and the GPU models present)."""
        return Snapshot(
            now=self.clock.now(),
            nodes=self.state.nodes,
            allocations={},
            quotas=self.state.quotas,
            config=self.config,
        )

    async def allocate(self, request: Allocation, dry_run: bool) -> tuple[Allocation, list[str]]:
        """Creates an allocation and decides it: placed or pending with a reason.

        `request` carries the validated fields; the engine fills id, times and state.
        A repeated (tenant, request_id) answers with the first allocation.
        """
        if request.request_id:
            existing_id = self.state.by_request.get((request.tenant, request.request_id))
            if existing_id is not None:
                existing = self.state.allocations[existing_id]
                _check_same_request(existing, request)
                await self.wait_committed(existing.revision)
                return existing, []
        if not dry_run:
            limits.check_pending(
                self.settings,
                request.tenant,
                self.scheduling.pending_of.get(request.tenant, 0),
                self.scheduling.pending_total,
            )
        if request.reservation_id:
            reservations.check_use(self.state, request)
        # No lease unless asked (default_lease_seconds is 0 unless configured): work runs
        # until released or max_duration_seconds, as Slurm and Kubernetes users expect.
        request.lease_seconds = request.lease_seconds or self.settings.default_lease_seconds
        # A hard end unless configured otherwise (Slurm's DefaultTime, else MaxTime): it is
        # what start-time estimates and backfill learn when capacity frees from.
        request.max_duration_seconds = (
            request.max_duration_seconds
            or self.settings.default_max_duration_seconds
            or self.settings.max_allowed_duration_seconds
        )
        reason = fairshare.check_admissible(
            self._admission_snapshot(), request, self.scheduling.gpu_models
        )
        if reason is not None:
            log.info("allocation request of tenant %s refused: %s", request.tenant, reason)
            raise QuotaExceeded([QuotaViolation(f"tenant:{request.tenant}", reason)])
        self.cost.check_budget(request)
        await self.scheduling.quick_ready()
        never = self.scheduling.never_fits(request)
        if never is not None and not self.config.never_fits_pending:
            return await self._reject(request, never, dry_run)
        if dry_run:
            return await self._dry_run(request)
        now = self.clock.now()
        tr = self.transitions
        with self.committer.transaction() as txn:
            a = replace(
                request,
                id="a-" + secrets.token_hex(8),
                state=AllocationState.PENDING,
                create_time=now,
                placements=(),
                pending_reason=QUEUED,
                queue_position=0,
                seq=self.committer.revision + 1,
            )
            self.state.add(a, now)
            decided = self.scheduling.decide(a)
            if isinstance(decided, str):
                a.pending_reason = decided
            tr.allocation(txn, a, AllocationEventType.CREATED)
            if decided is None:
                self.scheduling.pending(a.id, considered=False)
                ticket = self.scheduling.request()
            elif isinstance(decided, str):
                self.scheduling.pending(a.id, considered=True)
            else:
                tr.place(txn, a, decided)
        await self.committer.wait(txn)
        if decided is None:
            # The queue is not settled: the next pass decides, in the fair order.
            await self.scheduling.wait(ticket)
            await self.wait_committed(a.revision)
        return a, []

    async def _reject(
        self, request: Allocation, reason: str, dry_run: bool
    ) -> tuple[Allocation, list[str]]:
        """A request no registered node could ever host: answered REJECTED at once, with
        the reason, in one event (a dry run only says so). Nodes registered later do not
        revive it: the client asks again (with `never_fits = "pending"` it would wait)."""
        now = self.clock.now()
        a = replace(
            request,
            state=AllocationState.REJECTED,
            state_reason=reason,
            create_time=now,
            end_time=now,
            placements=(),
            pending_reason="",
            queue_position=0,
        )
        if dry_run:
            a.id = ""
            return a, []
        log.info("allocation request of tenant %s rejected: %s", request.tenant, reason)
        with self.committer.transaction() as txn:
            a.id = "a-" + secrets.token_hex(8)
            a.seq = self.committer.revision + 1
            self.state.add(a, now)
            self.transitions.allocation(txn, a, AllocationEventType.CREATED)
        await self.committer.wait(txn)
        return a, []

    async def _dry_run(self, request: Allocation) -> tuple[Allocation, list[str]]:
        probe = replace(
            request, id="dry-run", create_time=self.clock.now(), seq=self.committer.revision + 1
        )
        result = await self.scheduling.dry_run(probe)
        probe.id = ""
        probe.seq = 0
        if result.placements:
            probe.state = AllocationState.ALLOCATED
            probe.placements = result.placements
        else:
            probe.state = AllocationState.PENDING
            probe.pending_reason = result.reason
            probe.queue_position = result.position
        return probe, list(result.preempted_ids)

    async def release(self, allocation_id: str) -> Allocation:
        a = self.get_allocation(allocation_id)
        if a.state.terminal:
            # Already ended: releasing again is a no-op that answers the same.
            await self.wait_committed(a.revision)
            return a
        with self.committer.transaction() as txn:
            if a.state == AllocationState.PENDING:
                self.transitions.end(txn, a, AllocationState.CANCELLED, "cancelled by its owner")
                self.scheduling.forget(a.id)
            else:
                self.transitions.end(txn, a, AllocationState.RELEASED, "released by its owner")
        await self.committer.wait(txn)
        return a

    async def renew(self, allocation_id: str, lease_seconds: int) -> Allocation:
        """Restarts the lease from now (`lease_seconds` > 0 also sets its length).

        An allocation with no lease and no new length has nothing to renew: it is answered
        as it is and nothing is written (keepalive loops may call this blindly)."""
        a = self.get_allocation(allocation_id)
        if a.state.terminal:
            raise FailedPrecondition(
                "ALLOCATION_ENDED",
                f"allocation:{a.id}",
                f"allocation {a.id} is {a.state.name} and can no longer be renewed",
            )
        if not lease_seconds and not a.lease_seconds:
            await self.wait_committed(a.revision)
            return a
        with self.committer.transaction() as txn:
            if lease_seconds:
                a.lease_seconds = lease_seconds
            if a.state == AllocationState.ALLOCATED:
                a.lease_expire_time = self.clock.now() + a.lease_seconds
                self.timers.arm("lease", a.id, a.lease_expire_time)
            self.transitions.allocation(txn, a, AllocationEventType.UPDATED)
        await self.committer.wait(txn)
        return a


def _check_same_request(first: Allocation, again: Allocation) -> None:
    """A request_id names one request: a repeat with another body is refused, naming
    what differs, rather than answered with the first allocation (as payment APIs do
    with idempotency keys). Allocations stored before digests were kept carry none."""
    if not first.request_digest or first.request_digest == again.request_digest:
        return
    differ = [
        name
        for name in ("count", "priority", "max_duration_seconds", "reservation_id", "no_requeue")
        if getattr(first, name, None) != getattr(again, name, None)
    ]
    for name in ("gpus", "gpu_model", "cpu_millis", "memory_bytes", "node_selector"):
        if getattr(first.shape, name) != getattr(again.shape, name):
            differ.append(f"shape.{name}")
    # lease_seconds is the field the allocation does not keep as asked (it takes the
    # default, and renewals change it): when nothing else differs, the digest tells.
    what = ", ".join(differ) or "lease_seconds"
    raise FailedPrecondition(
        "REQUEST_ID_REUSED",
        f"request_id:{again.request_id}",
        f"request_id {again.request_id!r} of tenant {again.tenant} was first used for "
        f"allocation {first.id} with a different request ({what} differ); "
        "send the same request to get that allocation, or use a new request_id",
    )
