"""Node commands: RegisterNode, Heartbeat, Cordon, Uncordon, Drain.

A node's state (its capacity, labels, GPUs and their health, READY/CORDONED/DRAINING/
DOWN) changes only with an event. What a heartbeat refreshes every few seconds (GPU
metrics, the last heartbeat, the lease's end) is status: kept on the node, served
fresh, never written into a revision.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from rmgrpc.engine.core import EngineCore
from rmgrpc.errors import NotFound
from rmgrpc.model import AllocationState, GpuHealth, GpuMetrics, Node, NodeState

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

    async def register_node(self, node: Node) -> Node:
        tr = self.transitions
        existing = self.state.nodes.get(node.id)
        with self.committer.transaction() as txn:
            if existing is not None:
                # Re-registering keeps what operators asked for (a cordon, a drain).
                node.admin_state = existing.admin_state
                node.state = existing.admin_state
                if existing.state == existing.admin_state:
                    node.state_reason = existing.state_reason
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
            log.info("node %s back (heartbeat): %s", node.id, node.state.name)
            changed = True
        by_index = {g.index: g for g in node.gpus}
        for report in reports:
            gpu = by_index.get(report.index)
            if gpu is None:
                continue
            if report.metrics is not None:
                gpu.metrics = report.metrics
            if report.health is not None and report.health != gpu.health:
                log.info("node %s GPU %d now %s", node.id, gpu.index, report.health.name)
                gpu.health = report.health
                changed = True
        if changed:
            with self.committer.transaction() as txn:
                self.transitions.node(txn, node)
                await self.committer.wait(txn)
        else:
            await self.wait_committed(node.revision)
        return node

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
    ) -> tuple[Node, list[str]]:
        node = self.get_node(node_id)
        grace = grace_seconds or self.config.preemption_grace_seconds
        evicted = []
        with self.committer.transaction() as txn:
            self._set_admin(node, NodeState.DRAINING, reason or "draining")
            self.transitions.node(txn, node)
            for a in self.state.on_node(node_id):
                if a.state == AllocationState.ALLOCATED:
                    self.transitions.preempt(txn, a, grace, f"node {node_id} is draining")
                    evicted.append(a.id)
        await self.committer.wait(txn)
        return node, evicted
