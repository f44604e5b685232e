"""Drain that finishes, through the engine (no gRPC): victims are requeued unless they
opted out, the replacement is linked both ways, the node is DRAINED once empty and stays
so until uncordoned, and all of it is durable across a restart. Time moves only on a
`ManualClock`; grace periods end through `fire_timers`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rmgrpc.clock import ManualClock
from rmgrpc.config import load_settings
from rmgrpc.engine import Engine
from rmgrpc.gpu.simulated import simulated_nodes
from rmgrpc.model import Allocation, AllocationState, EventKind, NodeState, Shape
from rmgrpc.store import Store
from rmgrpc.v1 import allocator_pb2, gpu_manager_pb2
from tests.conftest import make_settings

GRACE = 30.0


class Harness:
    """An engine on a file database, restartable with the same clock and inventory."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        self.clock = ManualClock()
        self.settings = make_settings(
            tmp_path, preemption_grace_seconds=GRACE, min_runtime_seconds=0.0, **overrides
        )
        self.engine: Engine | None = None
        self.store: Store | None = None

    async def start(self) -> Engine:
        self.store = await Store.open(self.settings.db)
        self.engine = Engine(self.settings, self.store, self.clock)
        await self.engine.start(simulated_nodes(2, 4, now=self.clock.now()))
        await self.engine.schedule_now()
        return self.engine

    async def stop(self) -> None:
        if self.engine is not None and self.store is not None:
            await self.engine.stop()
            await self.store.close()
        self.engine = self.store = None


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    yield h
    await h.stop()


def request(gpus: int = 2, **kw: Any) -> Allocation:
    selector = kw.pop("selector", {})
    return Allocation(
        id="",
        tenant=kw.pop("tenant", "org/team"),
        count=1,
        shape=Shape.of(gpus=gpus, cpu_millis=1000, node_selector=selector),
        **kw,
    )


async def placed_on(engine: Engine, node_id: str, **kw: Any) -> Allocation:
    """An allocation placed on `node_id` (the other node cordoned meanwhile)."""
    other = next(n for n in engine.state.nodes if n != node_id)
    await engine.cordon(other, "steer")
    a, _ = await engine.allocate(request(**kw), dry_run=False)
    await engine.uncordon(other)
    assert a.state == AllocationState.ALLOCATED and a.placements[0].node_id == node_id
    return a


async def test_drain_requeues_and_the_node_is_drained_once_empty(harness: Harness) -> None:
    engine = await harness.start()
    node = "sim-node-0"
    kw: dict[str, Any] = {"priority": 7, "lease_seconds": 600, "max_duration_seconds": 3600}
    a = await placed_on(engine, node, request_id="job-1", **kw)
    before = engine.revision

    drained, evicted, requeued = await engine.drain(node, "decommission", 0)
    assert drained.state == NodeState.DRAINING and drained.admin_state == NodeState.DRAINING
    assert evicted == [a.id] and len(requeued) == 1
    assert a.state == AllocationState.PREEMPTED and a.requeued_as == requeued[0]
    again = engine.get_allocation(requeued[0])
    # The replacement keeps what the work asked for, and points back at it.
    assert again.requeued_from == a.id and again.requeued_as == ""
    assert (again.tenant, again.shape, again.priority) == (a.tenant, a.shape, a.priority)
    assert (again.lease_seconds, again.max_duration_seconds) == (600, 3600)
    assert again.create_time == harness.clock.now() and again.seq > a.seq
    # The request id still answers with the first allocation (which names the new one).
    assert engine.state.by_request[("org/team", "job-1")] == a.id

    # One txn: the node's event, the victim's ENDED (naming its replacement), the new
    # allocation's CREATED; all durable once drain() answered.
    events = await engine.store.read_events(before, 100)
    kinds = [(e.kind, e.object_id, e.type) for e in events]
    assert (EventKind.NODE, node, int(NodeState.DRAINING)) in kinds
    ended = [e for e in events if e.object_id == a.id]
    assert allocator_pb2.Allocation.FromString(ended[-1].data).requeued_as == again.id
    created = [e for e in events if e.object_id == again.id]
    assert created[0].type == 1  # CREATED
    assert allocator_pb2.Allocation.FromString(created[0].data).requeued_from == a.id

    # The replacement runs elsewhere while the victim still holds its GPUs (grace).
    await engine.schedule_now()
    assert again.state == AllocationState.ALLOCATED
    assert again.placements[0].node_id == "sim-node-1"
    assert engine.state.nodes[node].state == NodeState.DRAINING

    harness.clock.advance(GRACE + 1)
    engine.fire_timers()
    await engine.wait_committed()
    n = engine.state.nodes[node]
    assert n.state == NodeState.DRAINED and n.state_reason == "decommission"
    last = (await engine.store.read_events(0, 10_000))[-1]
    assert (last.kind, last.object_id, last.type) == (EventKind.NODE, node, 5)
    assert gpu_manager_pb2.Node.FromString(last.data).state == gpu_manager_pb2.NODE_STATE_DRAINED

    # DRAINED takes no work, survives a cordon, until uncordoned.
    b, _ = await engine.allocate(request(gpus=4), dry_run=False)
    assert b.state == AllocationState.PENDING
    assert (await engine.cordon(node, "x")).state == NodeState.DRAINED
    assert (await engine.uncordon(node)).state == NodeState.READY
    await engine.schedule_now()
    assert b.state == AllocationState.ALLOCATED and b.placements[0].node_id == node


async def test_no_requeue_is_honoured(harness: Harness) -> None:
    engine = await harness.start()
    kept = await placed_on(engine, "sim-node-0", gpus=1)
    opted_out = await placed_on(engine, "sim-node-0", gpus=1, no_requeue=True)
    _, evicted, requeued = await engine.drain("sim-node-0", "", 0)
    assert sorted(evicted) == sorted([kept.id, opted_out.id])
    assert len(requeued) == 1 and kept.requeued_as == requeued[0]
    assert opted_out.state == AllocationState.PREEMPTED and opted_out.requeued_as == ""
    # Nobody else points at the opted-out one.
    assert not [x for x in engine.state.allocations.values() if x.requeued_from == opted_out.id]


async def test_an_empty_or_graceless_drain_is_drained_at_once(harness: Harness) -> None:
    engine = await harness.start()
    node, _, _ = await engine.drain("sim-node-1", "", 0)
    assert node.state == NodeState.DRAINED and node.state_reason == "drained"
    revision = node.revision
    # Draining again changes nothing.
    again, evicted, requeued = await engine.drain("sim-node-1", "again", 0)
    assert (again.state, again.revision, evicted, requeued) == (NodeState.DRAINED, revision, [], [])

    await engine.uncordon("sim-node-1")
    harness.settings = make_settings(Path(harness.settings.db).parent, preemption_grace_seconds=0.0)
    await harness.stop()
    engine = await harness.start()
    a = await placed_on(engine, "sim-node-1", gpus=4)
    node, evicted, requeued = await engine.drain("sim-node-1", "", 0)
    # No grace: the victim let go at once, so the node is already empty.
    assert node.state == NodeState.DRAINED and evicted == [a.id] and len(requeued) == 1


async def test_drain_and_requeue_survive_a_restart(harness: Harness) -> None:
    engine = await harness.start()
    a = await placed_on(engine, "sim-node-0", request_id="r1")
    _, _, (new_id,) = await engine.drain("sim-node-0", "hw swap", 0)
    await harness.stop()

    engine = await harness.start()
    old, new = engine.get_allocation(a.id), engine.get_allocation(new_id)
    assert old.state == AllocationState.PREEMPTED and old.requeued_as == new_id
    assert new.requeued_from == a.id and new.state in (
        AllocationState.PENDING,
        AllocationState.ALLOCATED,
    )
    assert engine.state.nodes["sim-node-0"].state == NodeState.DRAINING
    # The victim's grace is re-armed from the store: the drain still finishes.
    harness.clock.advance(GRACE + 1)
    engine.fire_timers()
    await engine.wait_committed()
    assert engine.state.nodes["sim-node-0"].state == NodeState.DRAINED
    await harness.stop()

    engine = await harness.start()
    assert engine.state.nodes["sim-node-0"].state == NodeState.DRAINED
    assert engine.state.nodes["sim-node-0"].state_reason == "hw swap"


async def test_a_draining_node_that_was_down_is_drained_when_back(harness: Harness) -> None:
    engine = await harness.start()
    (agent_node,) = simulated_nodes(1, 2, prefix="agent", now=harness.clock.now())
    agent_node.simulated = False
    await engine.register_node(agent_node)
    a, _ = await engine.allocate(request(selector={"rmgrpc.io/hostname": "agent-0"}), False)
    assert a.placements[0].node_id == "agent-0"
    harness.clock.advance(harness.settings.node_lease_seconds + 1)
    engine.fire_timers()
    await engine.wait_committed()
    assert a.state == AllocationState.LOST
    node, evicted, _ = await engine.drain("agent-0", "", 0)
    assert node.state == NodeState.DOWN and node.admin_state == NodeState.DRAINING
    assert evicted == []
    back = await engine.heartbeat("agent-0", [])
    assert back.state == NodeState.DRAINED


def test_rows_stored_before_these_fields_still_decode() -> None:
    """An allocation and a node as an older server stored them (no requeue links, no GPU
    pin) decode with the defaults; the new ones round-trip."""
    from rmgrpc import codec

    old_alloc = allocator_pb2.Allocation(
        id="a-1", tenant="t", count=1, state=allocator_pb2.ALLOCATION_STATE_PREEMPTED
    ).SerializeToString()
    a = codec.allocation_from_proto(allocator_pb2.Allocation.FromString(old_alloc))
    assert (a.requeued_from, a.requeued_as, a.no_requeue) == ("", "", False)
    old_node = gpu_manager_pb2.Node(
        id="n", state=gpu_manager_pb2.NODE_STATE_DRAINING, gpus=[gpu_manager_pb2.Gpu(index=0)]
    ).SerializeToString()
    n = codec.node_from_proto(gpu_manager_pb2.Node.FromString(old_node))
    assert n.state == NodeState.DRAINING and not n.gpus[0].cordoned
    assert n.gpus[0].health_reason == ""

    a.requeued_as, a.no_requeue = "a-2", True
    n.state, n.gpus[0].cordoned, n.gpus[0].health_reason = NodeState.DRAINED, True, "pinned"
    again = codec.allocation_from_proto(codec.allocation_to_proto(a))
    assert (again.requeued_as, again.no_requeue) == ("a-2", True)
    back = codec.node_from_proto(codec.node_to_proto(n, status=False))
    assert back.state == NodeState.DRAINED
    assert (back.gpus[0].cordoned, back.gpus[0].health_reason) == (True, "pinned")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    jobs=st.lists(st.tuples(st.integers(1, 3), st.booleans(), st.integers(0, 3)), max_size=6),
    grace=st.sampled_from([0.0, GRACE]),
)
def test_drain_invariants(jobs: list[tuple[int, bool, int]], grace: float) -> None:
    """Whatever runs on the node: each victim is PREEMPTED and, unless it opted out,
    replaced by exactly one PENDING-or-placed allocation of the same tenant, shape and
    priority, linked both ways; nothing is placed on the node afterwards; it is DRAINED
    exactly when nothing holds capacity there, at the latest when the grace is over."""

    async def run() -> None:
        clock = ManualClock()
        config = load_settings(
            None,
            env={},
            overrides={"simulated_nodes": 0, "preemption_grace_seconds": GRACE},
        )
        store = await Store.open(":memory:")
        engine = Engine(config, store, clock)
        await engine.start(simulated_nodes(2, 4, now=clock.now()))
        try:
            for gpus, no_requeue, priority in jobs:
                await engine.allocate(
                    request(gpus=gpus, no_requeue=no_requeue, priority=priority), False
                )
            on_node = engine.state.on_node("sim-node-0")
            victims = [a for a in on_node if a.state == AllocationState.ALLOCATED]
            node, evicted, requeued = await engine.drain("sim-node-0", "", grace)
            assert sorted(evicted) == sorted(a.id for a in victims)
            assert len(requeued) == sum(not a.no_requeue for a in victims)
            for a in victims:
                assert a.state == AllocationState.PREEMPTED
                if a.no_requeue:
                    assert a.requeued_as == ""
                    continue
                b = engine.get_allocation(a.requeued_as)
                # Placed elsewhere already if the pass it asked for ran meanwhile.
                assert b.requeued_from == a.id and not b.state.terminal
                assert not any(p.node_id == "sim-node-0" for p in b.placements)
                assert (b.tenant, b.shape, b.priority) == (a.tenant, a.shape, a.priority)
            held = not engine.transitions.node_empty("sim-node-0")
            assert node.state == (NodeState.DRAINING if held else NodeState.DRAINED)
            clock.advance(GRACE + 1)
            engine.fire_timers()
            await engine.schedule_now()
            assert engine.state.nodes["sim-node-0"].state == NodeState.DRAINED
            assert engine.transitions.node_empty("sim-node-0")
            assert not [k for k in engine.state.holders if k[0] == "sim-node-0"]
        finally:
            await engine.stop()
            await store.close()

    asyncio.run(run())
