"""Allocation commands: Allocate, Release, Renew, and the reads the servicer makes.

Each write builds one txn and returns once that txn is durable; what it answers names
only durable revisions.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from dataclasses import replace

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
                await self.wait_committed(existing.revision)
                return existing, []
        if request.reservation_id:
            raise NotFound("reservation", request.reservation_id)
        request.lease_seconds = request.lease_seconds or self.settings.default_lease_seconds
        reason = fairshare.check_admissible(
            self._admission_snapshot(), request, self.scheduling.gpu_models
        )
        if reason is not None:
            log.info("allocation request of tenant %s refused: %s", request.tenant, reason)
            raise QuotaExceeded([QuotaViolation(f"tenant:{request.tenant}", reason)])
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
        a = self.get_allocation(allocation_id)
        if a.state.terminal:
            raise FailedPrecondition(
                "ALLOCATION_ENDED",
                f"allocation:{a.id}",
                f"allocation {a.id} is {a.state.name} and can no longer be renewed",
            )
        with self.committer.transaction() as txn:
            if lease_seconds:
                a.lease_seconds = lease_seconds
            if a.state == AllocationState.ALLOCATED:
                a.lease_expire_time = self.clock.now() + a.lease_seconds
                self.timers.arm("lease", a.id, a.lease_expire_time)
            self.transitions.allocation(txn, a, AllocationEventType.UPDATED)
        await self.committer.wait(txn)
        return a
