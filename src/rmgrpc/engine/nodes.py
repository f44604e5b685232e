"""Node commands: RegisterNode, Heartbeat, Cordon, Uncordon, Drain.

A node's state (its capacity, labels, GPUs and their health, READY/CORDONED/DRAINING/
DRAINED/DOWN) changes only with an event. What a heartbeat refreshes every few seconds (GPU
metrics, the last heartbeat, the lease's end) is status: kept on the node, served
fresh, never written into a revision.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from rmgrpc.engine.core import EngineCore
from rmgrpc.engine.scheduling import QUEUED
from rmgrpc.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from rmgrpc.gpu.health import HealthPolicy, Sample, recovered
from rmgrpc.model import AllocationState, Gpu, GpuHealth, GpuMetrics, Node, NodeState

log = logging.getLogger("rmgrpc.engine")


@dataclass(slots=True)
class GpuReport:
    index: int
    health: GpuHealth | None
    metrics: GpuMetrics | None


def _returned(admin: NodeState) -> str:
    if admin == NodeState.READY:
        return "agent is back"
    return f"agent is back; still {admin.name.lower()} by an operator"


class NodeCommands(EngineCore):
    def get_node(self, node_id: str) -> Node:
        node = self.state.nodes.get(node_id)
        if node is None:
            raise NotFound("node", node_id)
        return node

    def _lease(self, node: Node) -> None:
        now = self.clock.now()
        node.last_heartbeat_time = now
        node.lease_expire_time = now + self.settings.node_lease_seconds
        self.transitions.arm_node(node)

    def _check_uuids(self, node: Node) -> None:
        """A GPU uuid names one device: one another node holds is refused."""
        mine = {g.uuid: g.index for g in node.gpus}
        for other in self.state.nodes.values():
            if other.id == node.id:
                continue
            for g in other.gpus:
                if g.uuid in mine:
                    raise FailedPrecondition(
                        "GPU_UUID_IN_USE",
                        f"gpu:{g.uuid}",
                        f"GPU {mine[g.uuid]} has uuid {g.uuid!r}, which is GPU {g.index} of "
                        f"node {other.id}: one device cannot be on two nodes",
                    )

    def _carry_health(self, node: Node, existing: Node | None) -> None:
        """A re-registered GPU (same index and uuid) keeps its pin and its quarantine: an
        agent's restart is no reason for a bad GPU to return early."""
        before = {(g.index, g.uuid): g for g in existing.gpus} if existing else {}
        for g in node.gpus:
            prev = before.get((g.index, g.uuid))
            if prev is not None and prev.health == GpuHealth.UNHEALTHY:
                g.health, g.health_reason = GpuHealth.UNHEALTHY, prev.health_reason
                g.cordoned, g.healthy_since = prev.cordoned, prev.healthy_since
            elif g.health == GpuHealth.UNHEALTHY:
                g.health_reason = g.health_reason or "reported unhealthy by its node"
                log.warning("node %s GPU %d quarantined: %s", node.id, g.index, g.health_reason)

    async def register_node(self, node: Node) -> Node:
        tr = self.transitions
        self._check_uuids(node)
        existing = self.state.nodes.get(node.id)
        self._carry_health(node, existing)
        with self.committer.transaction() as txn:
            if existing is not None:
                # Re-registering keeps what operators asked for (a cordon, a drain).
                node.admin_state = existing.admin_state
                node.state = existing.admin_state
                if existing.state == existing.admin_state:
                    node.state_reason = existing.state_reason
                elif existing.state == NodeState.DRAINED:
                    node.state, node.state_reason = NodeState.DRAINED, existing.state_reason
                else:
                    node.state_reason = _returned(existing.admin_state)
                present = {g.index for g in node.gpus}
                for a in self.state.on_node(node.id):
                    gone = [
                        i
                        for p in a.placements
                        if p.node_id == node.id
                        for i in p.gpu_indices
                        if i not in present
                    ]
                    if gone and a.state == AllocationState.ALLOCATED:
                        tr.end(
                            txn,
                            a,
                            AllocationState.LOST,
                            f"GPU {gone[0]} is no longer reported by node {node.id}",
                        )
                tr.mark_drained(node)  # a draining node whose work is gone
                if existing.state == NodeState.DOWN and node.state != NodeState.DOWN:
                    log.info("node %s back (registered): %s", node.id, node.state.name)
            else:
                log.info("node %s registered with %d GPUs", node.id, len(node.gpus))
            self._lease(node)
            tr.node(txn, node)
        await self.committer.wait(txn)
        return node

    async def heartbeat(self, node_id: str, reports: Sequence[GpuReport]) -> Node:
        """Renews the node's lease and takes its GPU reports; a change of state or
        health is an event, metrics are status."""
        node = self.get_node(node_id)
        self._lease(node)
        changed = False
        if node.state == NodeState.DOWN:
            node.state, node.state_reason = node.admin_state, _returned(node.admin_state)
            self.transitions.mark_drained(node)  # its work was lost while it was away
            log.info("node %s back (heartbeat): %s", node.id, node.state.name)
            changed = True
        by_index = {g.index: g for g in node.gpus}
        now = self.clock.now()
        for report in reports:
            gpu = by_index.get(report.index)
            if gpu is None:
                continue
            if report.metrics is not None:
                gpu.metrics = report.metrics
            changed |= self._judge(node, gpu, report, now)
        if changed:
            with self.committer.transaction() as txn:
                self.transitions.node(txn, node)
                await self.committer.wait(txn)
        else:
            await self.wait_committed(node.revision)
        return node

    # -- GPU health ------------------------------------------------------------------

    @cached_property
    def health_policy(self) -> HealthPolicy:
        return self.settings.health_policy()

    def _judge(self, node: Node, gpu: Gpu, report: GpuReport, now: float) -> bool:
        """Applies the health policy to one GPU report; True when the GPU's health
        changed (quarantined, or back after `recovery_seconds` of clean reports)."""
        m = report.metrics
        if report.health is None and m is None:
            return False  # the report says nothing about health
        verdict = self.health_policy.judge(
            Sample(
                temperature_celsius=m.temperature_celsius if m is not None else None,
                uncorrectable_ecc=m.ecc_errors if m is not None else None,
                xids=m.recent_xids if m is not None else (),
                failed=report.health == GpuHealth.UNHEALTHY,
            )
        )
        for warning in verdict.warnings:
            log.warning("node %s GPU %d: %s", node.id, gpu.index, warning)
        if gpu.cordoned:
            return False  # pinned out by an operator: samples do not move it
        if not verdict.healthy:
            gpu.healthy_since = None
            if gpu.health == GpuHealth.UNHEALTHY:
                return False
            gpu.health, gpu.health_reason = GpuHealth.UNHEALTHY, verdict.reason
            log.warning("node %s GPU %d quarantined: %s", node.id, gpu.index, verdict.reason)
            return True
        if gpu.health == GpuHealth.HEALTHY:
            return False
        if gpu.healthy_since is None:
            gpu.healthy_since = now
        if not recovered(self.health_policy, gpu.healthy_since, now):
            return False
        log.info(
            "node %s GPU %d back in service: clean for %g s (was: %s)",
            node.id,
            gpu.index,
            now - gpu.healthy_since,
            gpu.health_reason or "unhealthy",
        )
        gpu.health, gpu.health_reason, gpu.healthy_since = GpuHealth.HEALTHY, "", None
        return True

    def _gpus_named(self, node: Node, indices: Sequence[int]) -> list[Gpu]:
        by_index = {g.index: g for g in node.gpus}
        missing = [
            FieldViolation(f"gpu_indices[{i}]", f"node {node.id} has no GPU {index}")
            for i, index in enumerate(indices)
            if index not in by_index
        ]
        if missing:
            raise InvalidArgument(missing)
        return [by_index[i] for i in dict.fromkeys(indices)]

    async def cordon_gpus(self, node_id: str, indices: Sequence[int], reason: str) -> Node:
        """Pins GPUs out: UNHEALTHY (no new work) until `uncordon_gpus`, whatever their
        samples say. Work already on them keeps running."""
        node = self.get_node(node_id)
        gpus = [g for g in self._gpus_named(node, indices) if not g.cordoned]
        if not gpus:
            await self.wait_committed(node.revision)
            return node
        with self.committer.transaction() as txn:
            for g in gpus:
                g.cordoned, g.health, g.healthy_since = True, GpuHealth.UNHEALTHY, None
                g.health_reason = f"cordoned by an operator{': ' + reason if reason else ''}"
                log.info("node %s GPU %d %s", node.id, g.index, g.health_reason)
            self.transitions.node(txn, node)
        await self.committer.wait(txn)
        return node

    async def uncordon_gpus(self, node_id: str, indices: Sequence[int]) -> Node:
        """Unpins GPUs: HEALTHY again; the next bad sample quarantines them anew."""
        node = self.get_node(node_id)
        gpus = [g for g in self._gpus_named(node, indices) if g.cordoned]
        if not gpus:
            await self.wait_committed(node.revision)
            return node
        with self.committer.transaction() as txn:
            for g in gpus:
                g.cordoned, g.health, g.health_reason = False, GpuHealth.HEALTHY, ""
                log.info("node %s GPU %d uncordoned by an operator", node.id, g.index)
            self.transitions.node(txn, node)
        await self.committer.wait(txn)
        return node

    # -- operators ---------------------------------------------------------------------

    def _set_admin(self, node: Node, admin: NodeState, reason: str) -> None:
        """Records an operator's cordon, drain or uncordon; a DOWN node shows it when back."""
        node.admin_state = admin
        if node.state != NodeState.DOWN:
            node.state, node.state_reason = admin, reason
        log.info(
            "node %s %s by an operator%s", node.id, admin.name, f": {reason}" if reason else ""
        )

    async def cordon(self, node_id: str, reason: str) -> Node:
        node = self.get_node(node_id)
        # Cordoning a draining node would stop nothing new and forget the drain.
        if node.admin_state != NodeState.READY:
            await self.wait_committed(node.revision)
            return node
        with self.committer.transaction() as txn:
            self._set_admin(node, NodeState.CORDONED, reason or "cordoned")
            self.transitions.node(txn, node)
        await self.committer.wait(txn)
        return node

    async def uncordon(self, node_id: str) -> Node:
        node = self.get_node(node_id)
        if node.admin_state == NodeState.READY:
            await self.wait_committed(node.revision)
            return node
        with self.committer.transaction() as txn:
            self._set_admin(node, NodeState.READY, "")
            self.transitions.node(txn, node)
        await self.committer.wait(txn)
        return node

    async def drain(
        self, node_id: str, reason: str, grace_seconds: float
    ) -> tuple[Node, list[str], list[str]]:
        """DRAINING: the node takes no new work and its running allocations are
        preempted with `grace_seconds` (0: the server's grace) and requeued unless they
        opted out; once nothing is left on it, it is DRAINED. Returns the node, the
        allocations asked to leave and their replacements. Draining a DRAINED node
        changes nothing."""
        node = self.get_node(node_id)
        if node.state == NodeState.DRAINED:
            await self.wait_committed(node.revision)
            return node, [], []
        grace = grace_seconds or self.config.preemption_grace_seconds
        tr = self.transitions
        evicted: list[str] = []
        requeued: list[str] = []
        with self.committer.transaction() as txn:
            self._set_admin(node, NodeState.DRAINING, reason or "draining")
            tr.node(txn, node)
            for a in self.state.on_node(node_id):
                if a.state == AllocationState.ALLOCATED:
                    why = f"node {node_id} is draining"
                    again = tr.drain_victim(txn, a, grace, why, QUEUED)
                    evicted.append(a.id)
                    if again is not None:
                        self.scheduling.pending(again.id, considered=False)
                        requeued.append(again.id)
            tr.settle_drains(txn, (node_id,))  # nothing left (or no grace): DRAINED now
        if requeued:
            self.scheduling.request()
        await self.committer.wait(txn)
        return node, evicted, requeued
