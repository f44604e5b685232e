"""The in-memory cluster state and its indexes; the engine is its only writer.

Holds every node, quota and retained allocation, plus the indexes the hot paths
need: which allocation holds each GPU, which allocations are live (what the
scheduler sees), and which allocation answered each (tenant, request_id).
"""

from __future__ import annotations

from collections.abc import Iterator

from rmgrpc.model import Allocation, AllocationState, Node, Quota, Resources


class ClusterState:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.quotas: dict[str, Quota] = {}
        # Every retained allocation, live or ended.
        self.allocations: dict[str, Allocation] = {}
        # What the scheduler sees: PENDING, ALLOCATED, and PREEMPTED inside their grace.
        self.live: dict[str, Allocation] = {}
        # (node id, GPU index) -> allocation id, for every GPU a live allocation holds.
        self.holders: dict[tuple[str, int], str] = {}
        self.by_request: dict[tuple[str, str], str] = {}

    # -- allocations -------------------------------------------------------

    def add(self, a: Allocation, now: float) -> None:
        self.allocations[a.id] = a
        if a.request_id:
            self.by_request[(a.tenant, a.request_id)] = a.id
        in_grace = a.state == AllocationState.PREEMPTED and a.holds_capacity(now)
        if a.state in (AllocationState.PENDING, AllocationState.ALLOCATED) or in_grace:
            self.live[a.id] = a
        if a.id in self.live:
            self.hold(a)

    def hold(self, a: Allocation) -> None:
        for p in a.placements:
            for index in p.gpu_indices:
                self.holders[(p.node_id, index)] = a.id

    def free(self, a: Allocation, *, keep_live: bool = False) -> None:
        """Gives back the GPUs `a` holds and (unless `keep_live`) drops it from the live set."""
        for p in a.placements:
            for index in p.gpu_indices:
                if self.holders.get((p.node_id, index)) == a.id:
                    del self.holders[(p.node_id, index)]
        if not keep_live:
            self.live.pop(a.id, None)

    def forget(self, a: Allocation) -> None:
        """Drops an ended allocation past its retention."""
        self.free(a)
        self.allocations.pop(a.id, None)
        if a.request_id and self.by_request.get((a.tenant, a.request_id)) == a.id:
            del self.by_request[(a.tenant, a.request_id)]

    def on_node(self, node_id: str) -> Iterator[Allocation]:
        """Live allocations with a replica on `node_id`."""
        for a in list(self.live.values()):
            if any(p.node_id == node_id for p in a.placements):
                yield a

    # -- views -------------------------------------------------------------

    def uuid_of(self, node_id: str, index: int) -> str:
        node = self.nodes.get(node_id)
        if node is None:
            return ""
        for g in node.gpus:
            if g.index == index:
                return g.uuid
        return ""

    def holder_view(self) -> dict[tuple[str, int], tuple[str, str]]:
        return {key: (aid, self.allocations[aid].tenant) for key, aid in self.holders.items()}

    def allocated_by_node(self, now: float) -> dict[str, Resources]:
        """Capacity held on each node by live allocations, in one pass."""
        out: dict[str, Resources] = {}
        for a in self.live.values():
            if not a.holds_capacity(now):
                continue
            for p in a.placements:
                res = out.setdefault(p.node_id, Resources(gpus=0, cpu_millis=0, memory_bytes=0))
                res.gpus = (res.gpus or 0) + len(p.gpu_indices)
                res.cpu_millis = (res.cpu_millis or 0) + a.shape.cpu_millis
                res.memory_bytes = (res.memory_bytes or 0) + a.shape.memory_bytes
        return out
