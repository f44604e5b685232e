"""State transitions and the events that record them.

Every change to an allocation, node or quota goes through here, inside a `Txn`: the
object is changed, the read model told, the deadlines it carries armed or cancelled,
and its event (the versioned encoding, status left out) appended. Commands, timers and
the scheduling loop all use these, so "what ending an allocation means" is written once.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable

from rmgrpc import codec
from rmgrpc.clock import Clock
from rmgrpc.engine.timers import TimerKind, Timers
from rmgrpc.engine.txn import Committer, Txn
from rmgrpc.model import (
    Allocation,
    AllocationEventType,
    AllocationState,
    EventKind,
    Node,
    NodeState,
    Placement,
    Quota,
)
from rmgrpc.scheduler import apply
from rmgrpc.state import ClusterState
from rmgrpc.v1 import allocator_pb2

log = logging.getLogger("rmgrpc.engine")

_ALLOCATION_TIMERS: tuple[TimerKind, ...] = ("lease", "max", "grace")
# Encoded allocation revisions kept for answers (a few ms of traffic, ~1 KB each).
_ENCODED_KEPT = 4096


class Transitions:
    def __init__(
        self, state: ClusterState, committer: Committer, timers: Timers, clock: Clock
    ) -> None:
        self.state = state
        self.committer = committer
        self.timers = timers
        self.clock = clock
        # Set by the engine: told when a node changed (capacity came or went) and when an
        # allocation gave its capacity back.
        self.on_node_change: Callable[[], None] = lambda: None
        self.on_freed: Callable[[Allocation], None] = lambda a: None
        # Set by the engine: told (in the txn) when placed work stops running, so its
        # final cost is written with the event that ends it.
        self.on_ending: Callable[[Txn, Allocation], None] = lambda txn, a: None
        # The last revisions encoded, by allocation id: a revision's message is also
        # the answer about it (with no status to add, as for work no longer pending),
        # so Allocate and Release need not build it twice. Bounded, oldest out first.
        self._encoded: OrderedDict[str, tuple[int, allocator_pb2.Allocation]] = OrderedDict()

    def encoded(self, a: Allocation) -> allocator_pb2.Allocation | None:
        """The message of `a`'s current revision as its event carries it, if still kept
        (read-only: it may be handed out again)."""
        hit = self._encoded.get(a.id)
        return hit[1] if hit is not None and hit[0] == a.revision else None

    # -- events ----------------------------------------------------------------------

    def allocation(self, txn: Txn, a: Allocation, type: AllocationEventType) -> None:
        def encode(rev: int) -> bytes:
            a.revision = rev
            if not a.seq:
                a.seq = rev
            msg = codec.allocation_to_proto(a, self.state.uuid_of, status=False)
            kept = self._encoded
            kept[a.id] = (rev, msg)
            kept.move_to_end(a.id)
            if len(kept) > _ENCODED_KEPT:
                kept.popitem(last=False)
            return msg.SerializeToString()

        nodes = dict.fromkeys(p.node_id for p in a.placements)
        self.committer.emit(txn, EventKind.ALLOCATION, type, a.id, encode, a.tenant, nodes)
        self.state.changed(a)

    def node(self, txn: Txn, node: Node, *, removed: bool = False) -> None:
        def encode(rev: int) -> bytes:
            node.revision = rev
            return codec.node_to_proto(node, status=False).SerializeToString()

        self.committer.emit(
            txn, EventKind.NODE, int(node.state), node.id, encode, "", (node.id,),
            persist=not removed,
        )  # fmt: skip
        if removed:
            txn.deletes.append((EventKind.NODE, node.id))
            self.state.remove_node(node.id)
        else:
            self.state.put_node(node)
        # Capacity may have come or gone (state, GPUs, health): decisions made on the
        # old view of this node no longer hold.
        self.on_node_change()

    def quota(self, txn: Txn, quota: Quota, *, deleted: bool = False) -> None:
        def encode(rev: int) -> bytes:
            quota.revision = rev
            return codec.quota_to_proto(quota).SerializeToString()

        self.committer.emit(
            txn, EventKind.QUOTA, 2 if deleted else 1, quota.tenant, encode, quota.tenant,
            persist=not deleted,
        )  # fmt: skip
        if deleted:
            txn.deletes.append((EventKind.QUOTA, quota.tenant))

    # -- allocations -----------------------------------------------------------------

    def place(self, txn: Txn, a: Allocation, placements: tuple[Placement, ...]) -> None:
        apply.place(self.state, a, placements, self.clock.now())
        self.placed(txn, a)

    def placed(self, txn: Txn, a: Allocation) -> None:
        """Records a placement already applied to the state (by `apply`)."""
        self.allocation(txn, a, AllocationEventType.PLACED)
        self.arm(a)

    def end(self, txn: Txn, a: Allocation, state: AllocationState, reason: str) -> None:
        """Ends `a` (RELEASED, CANCELLED, EXPIRED, LOST, REJECTED) and frees what it holds."""
        held = self.state.holds(a)
        if held:
            self.on_freed(a)  # told before it changes: what it held is what goes back
        if a.state == AllocationState.ALLOCATED:
            self.on_ending(txn, a)
        a.state = state
        a.state_reason = reason
        a.end_time = self.clock.now()
        a.pending_reason = ""
        a.queue_position = 0
        self.state.free(a)
        self.timers.cancel_all(a.id, _ALLOCATION_TIMERS)
        self.allocation(txn, a, AllocationEventType.ENDED)
        if state in (AllocationState.EXPIRED, AllocationState.LOST):
            log.info("allocation %s of tenant %s %s: %s", a.id, a.tenant, state.name, reason)
        if held:
            self.settle_drains(txn, (p.node_id for p in a.placements))

    def preempt(
        self, txn: Txn, victim: Allocation, grace: float, reason: str, preemptor: str = ""
    ) -> None:
        apply.preempt(self.state, victim, self.clock.now(), grace, reason, preemptor)
        self.preempted(txn, victim)

    def preempted(self, txn: Txn, victim: Allocation) -> None:
        """Records a preemption already applied to the state (by `apply`)."""
        self.on_ending(txn, victim)
        self.timers.cancel_all(victim.id, ("lease", "max"))
        if self.state.holds(victim) and victim.grace_end_time is not None:
            self.timers.arm("grace", victim.id, victim.grace_end_time)
        else:
            self.on_freed(victim)  # no grace: `apply.preempt` gave its capacity back
        self.allocation(txn, victim, AllocationEventType.ENDED)
        log.info(
            "allocation %s of tenant %s PREEMPTED%s: %s",
            victim.id,
            victim.tenant,
            f" for {victim.preempted_by}" if victim.preempted_by else "",
            victim.state_reason,
        )

    def grace_over(self, txn: Txn, a: Allocation) -> None:
        """A victim's grace ended: its capacity goes back (no event for it: the PREEMPTED
        event already named `grace_end_time`, when this was to happen). A draining node
        it was the last on is DRAINED now."""
        self.on_freed(a)
        self.state.free(a, keep_live=True)
        self.settle_drains(txn, (p.node_id for p in a.placements))

    def arm(self, a: Allocation) -> None:
        """Arms the deadlines `a` carries in its current state."""
        if a.state == AllocationState.ALLOCATED:
            if a.lease_expire_time is not None:
                self.timers.arm("lease", a.id, a.lease_expire_time)
            if a.max_end_time is not None:
                self.timers.arm("max", a.id, a.max_end_time)
        elif (
            a.state == AllocationState.PREEMPTED
            and a.grace_end_time is not None
            and self.state.holds(a)
        ):
            self.timers.arm("grace", a.id, a.grace_end_time)

    # -- drains ----------------------------------------------------------------------

    def drain_victim(
        self, txn: Txn, a: Allocation, grace: float, reason: str, pending_reason: str
    ) -> Allocation | None:
        """Preempts `a`, which a drain asks to leave, and (unless its request opted out)
        queues its replacement: a new PENDING allocation with the same tenant, shape,
        priority and durations, linked both ways. Both events are in `txn`; the caller
        tells the scheduler about the new one, returned."""
        apply.preempt(self.state, a, self.clock.now(), grace, reason)
        again = None
        if not a.no_requeue:
            now = self.clock.now()
            again = Allocation(
                id="a-" + secrets.token_hex(8),
                tenant=a.tenant,
                count=a.count,
                shape=a.shape,
                priority=a.priority,
                lease_seconds=a.lease_seconds,
                max_duration_seconds=a.max_duration_seconds,
                reservation_id=a.reservation_id,
                create_time=now,
                pending_reason=pending_reason,
                requeued_from=a.id,
            )
            a.requeued_as = again.id
        self.preempted(txn, a)
        if again is not None:
            # Its revision is the next one: arrival order is revision order.
            again.seq = self.committer.revision + 1
            self.state.add(again, self.clock.now())
            self.allocation(txn, again, AllocationEventType.CREATED)
            log.info("allocation %s of tenant %s requeued as %s", a.id, a.tenant, again.id)
        return again

    def node_empty(self, node_id: str) -> bool:
        """No allocation holds capacity on the node (victims in grace still do)."""
        return not any(self.state.holds(a) for a in self.state.on_node(node_id))

    def mark_drained(self, node: Node) -> bool:
        """DRAINING with no work left: DRAINED, until uncordoned. No event: the caller
        writes the node's."""
        if node.state != NodeState.DRAINING or not self.node_empty(node.id):
            return False
        node.state = NodeState.DRAINED
        # The operator's own reason ("decommission") still says why; generic ones go.
        if node.state_reason in ("", "draining") or node.state_reason.startswith("agent is"):
            node.state_reason = "drained"
        log.info("node %s DRAINED: no work left", node.id)
        return True

    def settle_drains(self, txn: Txn, node_ids: Iterable[str]) -> None:
        """Draining nodes among `node_ids` that are empty now become DRAINED (an event)."""
        for node_id in dict.fromkeys(node_ids):
            node = self.state.nodes.get(node_id)
            if node is not None and self.mark_drained(node):
                self.node(txn, node)

    # -- nodes -----------------------------------------------------------------------

    def lose_work_on(self, txn: Txn, node_id: str, reason: str) -> None:
        """Placed allocations on the node become LOST; preempted ones in grace let go."""
        for a in self.state.on_node(node_id):
            if a.state == AllocationState.ALLOCATED:
                self.end(txn, a, AllocationState.LOST, reason)
            else:
                self.timers.cancel("grace", a.id)
                self.state.free(a)

    def remove_node(self, txn: Txn, node: Node, reason: str) -> None:
        self.lose_work_on(txn, node.id, f"node {node.id} was removed: {reason}")
        node.state, node.state_reason = NodeState.DOWN, f"removed: {reason}"
        self.timers.cancel("node", node.id)
        self.node(txn, node, removed=True)
        log.info("node %s removed: %s", node.id, reason)

    def arm_node(self, node: Node) -> None:
        if node.lease_expire_time is not None and node.state != NodeState.DOWN:
            self.timers.arm("node", node.id, node.lease_expire_time)
