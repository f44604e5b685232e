"""The in-memory cluster state and its indexes: the read model every servicer reads through.

The engine is its only writer. Besides every node, quota and retained allocation it
keeps, up to date at each change, what the hot paths would otherwise scan for:

- `holders`: which allocation holds each GPU; `node_totals`: what is held on each node;
- `on_node`: the live allocations with a replica on a node;
- `by_tenant`: each tenant's retained allocations, in creation order;
- creation order of all retained allocations, for paging without sorting;
- `frozen`: a private copy of each live allocation as of its last event, which is what
  a scheduling snapshot is made of, so a pass running in a worker thread never reads an
  object the event loop is changing; `touched`/`touched_nodes` name the frozen copies
  changed since the pass runner last looked (so a worker process gets only those).
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from rmgrpc.model import Allocation, AllocationState, Node, Quota, Reservation, Resources


@dataclass(slots=True)
class NodeTotals:
    """Capacity held on one node by live allocations."""

    gpus: int = 0
    cpu_millis: int = 0
    memory_bytes: int = 0

    def resources(self) -> Resources:
        return Resources(gpus=self.gpus, cpu_millis=self.cpu_millis, memory_bytes=self.memory_bytes)


def in_subtree(tenant: str, root: str) -> bool:
    """`tenant` is `root` or below it: "org" covers "org/a", never "org2"."""
    return not root or tenant == root or tenant.startswith(root + "/")


def copy_node(node: Node) -> Node:
    """A copy that shares nothing mutable with `node` (GPU objects included)."""
    return dataclasses.replace(
        node, labels=dict(node.labels), gpus=[dataclasses.replace(g) for g in node.gpus]
    )


class ClusterState:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.quotas: dict[str, Quota] = {}
        # Every retained reservation, by id (the engine's reservation commands own them).
        self.reservations: dict[str, Reservation] = {}
        # Every retained allocation, live or ended.
        self.allocations: dict[str, Allocation] = {}
        # What the scheduler sees: PENDING, ALLOCATED, and PREEMPTED inside their grace.
        self.live: dict[str, Allocation] = {}
        # (node id, GPU index) -> allocation id, for every GPU a live allocation holds.
        self.holders: dict[tuple[str, int], str] = {}
        self.node_totals: dict[str, NodeTotals] = {}
        self.by_request: dict[tuple[str, str], str] = {}
        self._on_node: dict[str, dict[str, None]] = {}
        self._held: set[str] = set()
        self.by_tenant: dict[str, dict[str, None]] = {}
        # (seq, id) in creation order; forgotten ids are skipped and swept now and then.
        self._order: list[tuple[int, str]] = []
        self._forgotten = 0
        self.frozen: dict[str, Allocation] = {}
        self.frozen_nodes: dict[str, Node] = {}
        # Kept only while a pass runner mirrors the snapshot (`mirrored`); past a bound
        # they are dropped and `touched_overflow` asks the mirror for a full resend, so
        # a server whose passes are rare never grows them without end.
        self.mirrored = False
        self.touched: set[str] = set()
        self.touched_nodes: set[str] = set()
        self.touched_overflow = False

    # -- allocations -------------------------------------------------------

    def add(self, a: Allocation, now: float) -> None:
        """A new allocation (or one loaded at start, in creation order)."""
        self.allocations[a.id] = a
        if self._order and a.seq < self._order[-1][0]:
            raise ValueError(f"allocation {a.id} added out of creation order")
        self._order.append((a.seq, a.id))
        self.by_tenant.setdefault(a.tenant, {})[a.id] = None
        if a.request_id:
            self.by_request[(a.tenant, a.request_id)] = a.id
        in_grace = a.state == AllocationState.PREEMPTED and a.holds_capacity(now)
        if a.state in (AllocationState.PENDING, AllocationState.ALLOCATED) or in_grace:
            self.live[a.id] = a
            self.hold(a)
        self.changed(a)

    def changed(self, a: Allocation) -> None:
        """`a` changed (an event was written for it): refresh what snapshots see."""
        self._touch(a.id)
        if a.id in self.live:
            self.frozen[a.id] = dataclasses.replace(a)
        else:
            self.frozen.pop(a.id, None)

    def _touch(self, allocation_id: str) -> None:
        if not self.mirrored:
            return
        self.touched.add(allocation_id)
        if len(self.touched) > 2 * len(self.frozen) + 4096:
            self.touched.clear()
            self.touched_overflow = True

    def hold(self, a: Allocation) -> None:
        """`a` now holds the GPUs, CPU and memory of its placements."""
        if a.id in self._held or not a.placements:
            return
        self._held.add(a.id)
        for p in a.placements:
            for index in p.gpu_indices:
                self.holders[(p.node_id, index)] = a.id
            t = self.node_totals.setdefault(p.node_id, NodeTotals())
            t.gpus += len(p.gpu_indices)
            t.cpu_millis += a.shape.cpu_millis
            t.memory_bytes += a.shape.memory_bytes
            self._on_node.setdefault(p.node_id, {})[a.id] = None

    def free(self, a: Allocation, *, keep_live: bool = False) -> None:
        """Gives back what `a` holds and (unless `keep_live`) drops it from the live set."""
        if a.id in self._held:
            self._held.discard(a.id)
            for p in a.placements:
                for index in p.gpu_indices:
                    if self.holders.get((p.node_id, index)) == a.id:
                        del self.holders[(p.node_id, index)]
                t = self.node_totals.get(p.node_id)
                if t is not None:
                    t.gpus -= len(p.gpu_indices)
                    t.cpu_millis -= a.shape.cpu_millis
                    t.memory_bytes -= a.shape.memory_bytes
        if not keep_live:
            self.live.pop(a.id, None)
            if self.frozen.pop(a.id, None) is not None:
                self._touch(a.id)
            for p in a.placements:
                ids = self._on_node.get(p.node_id)
                if ids is not None:
                    ids.pop(a.id, None)
                    if not ids:
                        del self._on_node[p.node_id]

    def holds(self, a: Allocation) -> bool:
        return a.id in self._held

    def holding(self) -> list[Allocation]:
        """The live allocations that hold capacity (placed, or preempted in their grace),
        in creation order: found from the held set, not by a walk over a deep queue."""
        return sorted(self.holding_unordered(), key=_by_seq)

    def holding_unordered(self) -> Iterator[Allocation]:
        """`holding()` in no set order, for callers the order does not matter to (sorting
        thousands of running allocations is most of its cost)."""
        live = self.live
        return (live[aid] for aid in self._held if aid in live)

    def forget(self, a: Allocation) -> None:
        """Drops an ended allocation past its retention."""
        self.free(a)
        if self.allocations.pop(a.id, None) is None:
            return
        ids = self.by_tenant.get(a.tenant)
        if ids is not None:
            ids.pop(a.id, None)
            if not ids:
                del self.by_tenant[a.tenant]
        if a.request_id and self.by_request.get((a.tenant, a.request_id)) == a.id:
            del self.by_request[(a.tenant, a.request_id)]
        self._forgotten += 1
        if self._forgotten > 1024 and self._forgotten * 2 > len(self._order):
            self._order = [(s, i) for s, i in self._order if i in self.allocations]
            self._forgotten = 0

    def on_node(self, node_id: str) -> list[Allocation]:
        """Live allocations with a replica on `node_id` (a copy: callers may end them)."""
        return [self.live[aid] for aid in self._on_node.get(node_id, ()) if aid in self.live]

    def in_order(self, after_seq: int = 0) -> Iterator[Allocation]:
        """Retained allocations in creation order, from the first with seq > `after_seq`."""
        order = self._order
        start = bisect.bisect_right(order, (after_seq, "\U0010ffff"))
        for i in range(start, len(order)):
            a = self.allocations.get(order[i][1])
            if a is not None:
                yield a

    def of_subtree(self, root: str, after_seq: int = 0) -> Iterator[Allocation]:
        """Retained allocations of `root` and its subtree, in creation order, from the
        first with seq > `after_seq`: each tenant's own are kept in creation order, so
        they are merged, never sorted, and a page reads little more than itself."""
        per_tenant = [
            (a for aid in ids if (a := self.allocations[aid]).seq > after_seq)
            for tenant, ids in self.by_tenant.items()
            if in_subtree(tenant, root)
        ]
        return heapq.merge(*per_tenant, key=lambda a: a.seq)

    # -- nodes -------------------------------------------------------------

    def put_node(self, node: Node) -> None:
        self.nodes[node.id] = node
        self.frozen_nodes[node.id] = copy_node(node)
        if self.mirrored:
            self.touched_nodes.add(node.id)

    def remove_node(self, node_id: str) -> None:
        self.nodes.pop(node_id, None)
        self.frozen_nodes.pop(node_id, None)
        if self.mirrored:
            self.touched_nodes.add(node_id)
        self.node_totals.pop(node_id, None)

    # -- views -------------------------------------------------------------

    def uuid_of(self, node_id: str, index: int) -> str:
        node = self.nodes.get(node_id)
        if node is None:
            return ""
        for g in node.gpus:
            if g.index == index:
                return g.uuid
        return ""

    def holder_of(self, node_id: str, index: int) -> tuple[str, str] | None:
        """(allocation id, tenant) holding a GPU, or None."""
        aid = self.holders.get((node_id, index))
        if aid is None:
            return None
        return aid, self.allocations[aid].tenant

    def totals_of(self, node_id: str) -> Resources:
        t = self.node_totals.get(node_id)
        return t.resources() if t is not None else NodeTotals().resources()

    @classmethod
    def of(
        cls,
        nodes: Mapping[str, Node],
        quotas: Mapping[str, Quota],
        allocations: Iterable[Allocation],
        now: float,
    ) -> ClusterState:
        """A state over existing objects (shared, not copied): what the simulator applies to."""
        state = cls()
        state.nodes = dict(nodes)
        state.quotas = dict(quotas)
        for a in sorted(allocations, key=lambda a: (a.seq, a.id)):
            state.add(a, now)
        return state


def _by_seq(a: Allocation) -> int:
    return a.seq
