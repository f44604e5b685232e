"""Drain that finishes, through a real server on 127.0.0.1: DrainNode requeues the work
it ends (unless the request opted out), the replacement is linked both ways and survives
a restart, `ListGpus(free_only)` leaves out GPUs of nodes that take no work, and the
node is DRAINED once its victims' grace is over. The clock is a `ManualClock`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from rmgrpc.clock import ManualClock
from rmgrpc.server import RunningServer, start
from rmgrpc.v1 import allocator_pb2 as pb
from rmgrpc.v1 import allocator_pb2_grpc, gpu_manager_pb2_grpc
from rmgrpc.v1 import gpu_manager_pb2 as gm
from rmgrpc.v1.resources_pb2 import Shape
from tests.conftest import make_settings
from tests.e2e.helpers import eventually

GRACE = 5


class Server:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.clock = ManualClock()
        self.running: RunningServer | None = None
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        settings = make_settings(
            self.tmp_path,
            simulated_nodes=0,
            node_lease_seconds=3600.0,
            heartbeat_interval_seconds=10.0,
            min_runtime_seconds=3600.0,  # nothing is preempted but by the drain
        )
        self.running = await start(settings, clock=self.clock)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.running.port}")
        self.alloc = allocator_pb2_grpc.AllocatorServiceStub(self.channel)
        self.nodes = gpu_manager_pb2_grpc.GpuManagerServiceStub(self.channel)

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.running is not None:
            await self.running.stop(0)
        self.running = self.channel = None

    async def get(self, allocation_id: str) -> pb.Allocation:
        return (
            await self.alloc.GetAllocation(pb.GetAllocationRequest(id=allocation_id))
        ).allocation

    async def node(self, node_id: str) -> gm.Node:
        return (await self.nodes.GetNode(gm.GetNodeRequest(node_id=node_id))).node

    async def allocate(self, **kw: Any) -> pb.Allocation:
        request = pb.AllocateRequest(
            tenant="org/team", count=1, shape=Shape(gpus=2, cpu_millis=100), **kw
        )
        return (await self.alloc.Allocate(request)).allocation


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    s = Server(tmp_path)
    await s.start()
    yield s
    await s.stop()


async def test_drain_requeues_reaches_drained_and_survives_a_restart(server: Server) -> None:
    s = server
    for node_id in ("n1", "n2"):
        gpus = [gm.Gpu(index=i, model="H100", memory_bytes=80 << 30) for i in range(4)]
        await s.nodes.RegisterNode(
            gm.RegisterNodeRequest(
                node_id=node_id, cpu_millis=8000, memory_bytes=64 << 30, gpus=gpus
            )
        )
    await s.nodes.CordonNode(gm.CordonNodeRequest(node_id="n2"))
    keep = await s.allocate(priority=5, max_duration_seconds=7200, request_id="train-1")
    leave = await s.allocate(no_requeue=True)
    assert keep.no_requeue is False and leave.no_requeue is True
    assert {keep.placements[0].node_id, leave.placements[0].node_id} == {"n1"}
    # n1 is full and n2 cordoned: no GPU is free, though n2's four are idle.
    free = await s.nodes.ListGpus(gm.ListGpusRequest(free_only=True))
    assert list(free.gpus) == []
    await s.nodes.UncordonNode(gm.UncordonNodeRequest(node_id="n2"))

    drained = await s.nodes.DrainNode(
        gm.DrainNodeRequest(node_id="n1", reason="decommission", grace_seconds=GRACE)
    )
    assert drained.node.state == gm.NODE_STATE_DRAINING
    assert sorted(drained.allocation_ids) == sorted([keep.id, leave.id])
    (new_id,) = drained.requeued_allocation_ids
    old, left, new = await s.get(keep.id), await s.get(leave.id), await s.get(new_id)
    assert old.state == left.state == pb.ALLOCATION_STATE_PREEMPTED
    assert old.requeued_as == new_id and left.requeued_as == ""
    assert new.requeued_from == keep.id and new.tenant == keep.tenant
    assert (new.shape, new.priority, new.max_duration_seconds) == (keep.shape, 5, 7200)
    # The repeated request id answers the first allocation, which names its replacement.
    again = await s.allocate(priority=5, max_duration_seconds=7200, request_id="train-1")
    assert again.id == keep.id and again.requeued_as == new_id

    # The replacement runs on n2; n1's GPUs are still held (grace) and not free anyway.
    new = await eventually(
        lambda: s.get(new_id), lambda a: a.state == pb.ALLOCATION_STATE_ALLOCATED
    )
    assert new.placements[0].node_id == "n2"
    free = await s.nodes.ListGpus(gm.ListGpusRequest(free_only=True))
    assert {(g.node_id, g.index) for g in free.gpus} == {("n2", 2), ("n2", 3)}

    # Grace over: the node is empty, DRAINED, and still none of its GPUs is free.
    s.clock.advance(GRACE + 1)
    assert s.running is not None
    s.running.engine.fire_timers()
    node = await eventually(lambda: s.node("n1"), lambda n: n.state == gm.NODE_STATE_DRAINED)
    assert node.state_reason == "decommission" and node.admin_state == gm.NODE_STATE_DRAINING
    assert all(not g.allocation_id for g in node.gpus)
    free = await s.nodes.ListGpus(gm.ListGpusRequest(free_only=True))
    assert all(g.node_id == "n2" for g in free.gpus)
    listed = await s.nodes.ListNodes(gm.ListNodesRequest(states=[gm.NODE_STATE_DRAINED]))
    assert [n.id for n in listed.nodes] == ["n1"]

    # Everything answered was durable: a restart shows the same links and states.
    await s.stop()
    await s.start()
    old, new = await s.get(keep.id), await s.get(new_id)
    assert old.requeued_as == new_id and new.requeued_from == keep.id
    assert (await s.get(leave.id)).requeued_as == ""
    assert (await s.node("n1")).state == gm.NODE_STATE_DRAINED

    # Uncordon brings it back into service.
    back = await s.nodes.UncordonNode(gm.UncordonNodeRequest(node_id="n1"))
    assert back.node.state == gm.NODE_STATE_READY
    free = await s.nodes.ListGpus(gm.ListGpusRequest(free_only=True, node_id="n1"))
    assert len(free.gpus) == 4
